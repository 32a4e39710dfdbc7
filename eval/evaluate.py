"""Evaluate float, uniform-precision and QLIP sampling on the held-out evaluation prompts.

    python eval/evaluate.py --quant runs/quant/mse --quant runs/quant/qdiff \\
        --selector runs/selector/lam0.02 --selector runs/selector/lam0.05 --n 256 --out runs/eval
    python eval/evaluate.py --model SD_DIR --prompts captions.txt --reference val_images/ --clip CLIP_DIR \\
        --quant runs/quant/qdiff --selector runs/selector/export --n 256 --out runs/eval-sd

Prompts: the first ``--n`` of the evaluation split of ``--prompts FILE`` (FID/sFID against ``--reference``,
a folder or an ``.npz`` of Inception statistics; CLIP score with ``--clip DIR``), or of the procedural
scenes (with domain FID and alignment). A metric whose inputs are absent is skipped with a one-line note.

One run: FP; every candidate width (or ``--settings W4A6 W4A8 ...``) of each ``--quant`` folder
(``train/calibrate.py``) as a uniform setting; each ``--selector`` folder (``train/train_selector.py``,
e.g. several ``--lambda-bit``) as QLIP. Metrics: FID and sFID (FID Inception, against the real scenes of
the evaluation prompts; cached statistics), domain FID (scene-parser features), scene alignment,
PSNR/SSIM against the FP image of the same seed, BitOPs (vs FP and absolute) and FAB.

Writes ``report.md``, ``report.csv``, ``report.json``, ``pareto_*.png``, ``schedule_*.png`` (QLIP
layer x step schedules of a caption-level-0 and a level-4 prompt) and ``samples.png`` into ``--out``
(see :mod:`qlip_jax.evaluation`). ``qlip demo`` is the small version of this on the shipped model.
"""

from __future__ import annotations

import argparse
import sys

from qlip_jax import compile_cache
from qlip_jax.errors import program
from qlip_jax.evaluation import add_arguments, run_evaluation


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", action="append", default=[], metavar="DIR",
                   help="base quantizer state (repeat); its widths are the uniform settings")
    p.add_argument("--selector", action="append", default=[], metavar="DIR", help="QLIP selector folder (repeat)")
    add_arguments(p, n=256, out=None)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    compile_cache.from_args(args)
    if not args.quant and not args.selector:
        p.error("give at least one --quant or --selector folder")
    run_evaluation(args, args.quant, args.selector, tag="evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
