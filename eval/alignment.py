"""Scene alignment of a model's float samples on held-out prompts, by specificity level and object count.

    python eval/alignment.py --n 200 --out runs/alignment

Samples the first ``--n`` prompts of the evaluation set (held out from training), parses every image
with the scene parser, and scores it against what its caption states
(:func:`qlip_jax.metrics.parser.alignment_score`). Prints a markdown table (mean alignment per caption
level, for single- and multi-object prompts) and writes ``table.md``, ``scores.json`` and a grid PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.data.scenes import LEVELS, prompt_set
from qlip_jax.metrics.parser import SceneParser
from qlip_jax.metrics.scoring import alignment, sample_records
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.sampling.grid import save_grid
from qlip_jax.sampling.pipeline import Text2Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    sd = load_stable_diffusion(args.model or default_model_dir())
    parser = SceneParser.load(args.parser)
    pipe = Text2Image(sd, args.scheduler, args.steps)
    records = prompt_set("eval")[:args.n]
    images = sample_records(pipe, records, args.guidance, args.seed, args.batch, desc="sampling")
    scores = alignment(parser, records, images).tolist()

    rows = []
    for single in (True, False):
        for level in LEVELS:
            sel = [s for r, s in zip(records, scores) if r.level == level and (r.n_objects == 1) == single]
            rows.append((("single" if single else "multi"), level, len(sel), float(np.mean(sel)) if sel else float("nan")))
    single_all = [s for r, s in zip(records, scores) if r.n_objects == 1]
    multi_all = [s for r, s in zip(records, scores) if r.n_objects > 1]
    lines = [f"model `{sd.folder}`, {args.scheduler} {args.steps} steps, guidance {args.guidance}, "
             f"first {len(records)} eval prompts, seeds {args.seed}+i", "",
             "| objects | caption level | prompts | mean alignment |", "|---|---|---|---|"]
    lines += [f"| {o} | {lvl} | {n} | {m:.3f} |" for o, lvl, n, m in rows]
    lines += [f"| single | all | {len(single_all)} | {np.mean(single_all):.3f} |",
              f"| multi | all | {len(multi_all)} | {np.mean(multi_all):.3f} |",
              f"| all | all | {len(scores)} | {np.mean(scores):.3f} |"]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump([{"id": r.id, "prompt": r.text, "level": r.level, "n_objects": r.n_objects, "alignment": s}
                   for r, s in zip(records, scores)], f, indent=1)
    # grid: two prompts per level, single- and multi-object, prompt above its sample
    pick = [next(i for i, r in enumerate(records) if r.level == lvl and (r.n_objects == 1) == single)
            for single in (True, False) for lvl in LEVELS if any(
                r.level == lvl and (r.n_objects == 1) == single for r in records)]
    save_grid(os.path.join(args.out, "samples.png"), images[pick],
              [f"[{scores[i]:.2f}] {records[i].text}" for i in pick], cols=5, scale=3, caption_lines=5)
    print(f"wrote {args.out}/table.md, scores.json, samples.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
