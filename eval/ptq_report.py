"""Post-training quantization report: each base method at each uniform precision against float.

    python eval/ptq_report.py --methods minmax mse --settings W4A6 W4A8 W4A10 W4A16 W8A8 --n 64 --out runs/ptq

For every weight width among ``--settings`` and every base method, one quantizer is calibrated for all
of that width's activation candidates at once (``train/calibrate.py``'s recipe: float trajectories of
held-out calibration prompts) and saved under ``<out>/quant/<method>-w<bits>``; ``ptqd`` starts from
the ``qdiff`` quantizer of the same width when ``qdiff`` comes before it in ``--methods`` (one
reconstruction, not two), and its correction is fitted for the report's sampler. Then the first ``--n``
evaluation prompts are sampled in float and at each uniform setting with the same seeds, and scored:

* BitOPs relative to float (UNet, both guidance halves, every step; :func:`qlip_jax.quant.registry.bitops`),
* FAB, the MAC-unweighted average activation bit width,
* PSNR and SSIM of each image against the float image of the same seed,
* scene alignment (the parser's reading of the image against the prompt).

Writes ``report.md`` (markdown table), ``report.json`` (per-image scores too) and ``grid.png``
(rows: prompts; columns: float, then each setting under ``--grid-method``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.scenes import prompt_set
from qlip_jax.errors import BadArgument, check_int, check_sampling_args, program
from qlip_jax.metrics.parser import SceneParser
from qlip_jax.metrics.scoring import sample_records, score_images
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.ptq.calibration import METHODS, calibrate, collect_calibration_data
from qlip_jax.ptq.persist import model_fingerprint, save_quant_setup
from qlip_jax.quant.registry import average_act_bits, bitops
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.grid import save_grid
from qlip_jax.sampling.pipeline import Text2Image, add_int8_argument


def parse_setting(text: str) -> tuple[int, int]:
    """``'W4A8'`` -> ``(4, 8)``; a clear error otherwise."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    if not m:
        raise BadArgument(f"a setting looks like W4A8, got '{text}'", "write settings as W<weight bits>A<act bits>")
    return int(m.group(1)), int(m.group(2))


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"))
    p.add_argument("--methods", nargs="+", default=["minmax", "mse"], choices=METHODS)
    p.add_argument("--settings", nargs="+", default=["W4A6", "W4A8", "W4A10", "W4A16", "W8A8"])
    p.add_argument("--n", type=int, default=64, help="evaluation prompts")
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--keep-steps", type=int, default=10)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-method", default=None, help="method shown in grid.png (default: the last)")
    p.add_argument("--grid-prompts", type=int, default=6)
    p.add_argument("--out", required=True)
    add_int8_argument(p)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    compile_cache.from_args(args)
    settings = [parse_setting(s) for s in args.settings]
    for wbits, abits in settings:
        QuantConfig(act_bits=(abits,), weight_bits=wbits)  # widths in the supported range
    check_sampling_args(args, args.n)
    for name in ("n", "calib_prompts", "keep_steps", "batch"):
        check_int(getattr(args, name), "--" + name.replace("_", "-"), 1)
    check_writable_dir(args.out)
    t0 = time.time()

    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    parser = SceneParser.load(args.parser)
    pipe = Text2Image(sd, args.scheduler, args.steps)
    records = prompt_set("eval")[:args.n]
    calib = [r.text for r in prompt_set("calibration")[:args.calib_prompts]]
    os.makedirs(args.out, exist_ok=True)

    fp_images = sample_records(pipe, records, args.guidance, args.seed, args.batch, desc="float")
    rows = [{"method": "float", "setting": "W32A32", "rel_bitops": 1.0, "fab": 32.0,
             **{k: v.tolist() for k, v in score_images(fp_images, None, records, parser).items()}}]
    data = collect_calibration_data(pipe, calib, 1000 + np.arange(len(calib)), args.guidance, args.keep_steps)
    fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"])
    grid_method = args.grid_method or args.methods[-1]
    grid_cols = {"float": fp_images[:args.grid_prompts]}
    fp_bitops = None
    calibrated = {}
    for method in args.methods:
        for wbits in sorted({w for w, _ in settings}):
            act = tuple(sorted({a for w, a in settings if w == wbits}))
            config = QuantConfig(act_bits=act, weight_bits=wbits)
            print(f"[ptq] calibrating {method} W{wbits}A{act} ...", file=sys.stderr)
            reuse = method == "ptqd" and ("qdiff", wbits) in calibrated
            opts = {"init": calibrated[("qdiff", wbits)]} if reuse else {}
            setup = calibrated[(method, wbits)] = calibrate(pipe, config, data, method, **opts)
            save_quant_setup(os.path.join(args.out, "quant", f"{method}-w{wbits}"), setup, fingerprint,
                             {"method": method, "calibration_prompts": len(calib)})
            qpipe = Text2Image(sd, args.scheduler, args.steps, quant=setup, int8=args.int8)
            if fp_bitops is None:
                fp_bitops = float(bitops(qpipe.uniform_schedule(1, "fp")[0], setup.registry, config, 2))
            for abits in act:
                name = f"W{wbits}A{abits}"
                sched_one = qpipe.uniform_schedule(1, abits)
                images = sample_records(qpipe, records, args.guidance, args.seed, args.batch,
                                        lambda i, emb: np.repeat(sched_one, emb.cond.shape[0], 0),
                                        desc=f"{method} {name}")
                scores = score_images(images, fp_images, records, parser)
                rows.append({"method": method, "setting": name,
                             "rel_bitops": float(bitops(sched_one[0], setup.registry, config, 2)) / fp_bitops,
                             "fab": float(average_act_bits(sched_one[0], config)),
                             **{k: v.tolist() for k, v in scores.items()}})
                if method == grid_method:
                    grid_cols[name] = images[:args.grid_prompts]

    lines = [f"model `{sd.folder}`, {args.scheduler} {pipe.num_steps} steps, guidance {args.guidance}, "
             f"{len(records)} held-out prompts (seeds {args.seed}+i), calibration on {len(calib)} prompts x "
             f"{args.keep_steps} steps x 2 guidance halves", "",
             "| method | setting | BitOPs vs FP | FAB | PSNR (dB) | SSIM | alignment |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ps = f"{np.mean(r['psnr']):.2f}" if "psnr" in r else "-"
        ss = f"{np.mean(r['ssim']):.3f}" if "ssim" in r else "-"
        lines.append(f"| {r['method']} | {r['setting']} | {r['rel_bitops']:.4f} | {r['fab']:.2f} | {ps} | {ss} "
                     f"| {np.mean(r['alignment']):.3f} |")
    table = "\n".join(lines)
    print(table)
    with atomic_write(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table + "\n")
    with atomic_write(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"prompts": [r.text for r in records], "rows": rows,
                   "minutes": round((time.time() - t0) / 60, 1)}, f)
    cols = list(grid_cols)
    tiles = np.stack([grid_cols[c][i] for i in range(len(grid_cols["float"])) for c in cols])
    caps = [f"{c}: {records[i].text}" if c == "float" else f"{grid_method} {c}"
            for i in range(len(grid_cols["float"])) for c in cols]
    save_grid(os.path.join(args.out, "grid.png"), tiles, caps, cols=len(cols))
    print(f"[ptq] wrote {args.out}/report.md, report.json, grid.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
