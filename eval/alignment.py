"""Scene alignment of a model's float samples on held-out prompts, by specificity level and object count.

    python eval/alignment.py --n 200 --out runs/alignment
    python eval/alignment.py --compare runs/alignment runs/alignment-other     # runs side by side
    python eval/alignment.py --guidance-max-t 400 --out runs/alignment-gi400   # guided at t <= 400 only

Samples the first ``--n`` prompts of the evaluation set (held out from training; ``--split train``: of
the training prompts), parses every image with the scene parser, and scores it against what its caption
states (:func:`qlip_jax.metrics.parser.alignment_score`). Prints a markdown table (mean alignment per caption
level, for single- and multi-object prompts; then single-object prompts by the size their caption
states) and writes ``table.md``, ``scores.json`` and a grid PNG. ``--compare`` reads the ``scores.json``
of earlier runs (same prompts) and prints one row per run, single-object prompts by level.

Reference columns tell the model's failures from the measure's limits: the share of samples in which
the parser finds no object at all; how many objects it finds per sample against how many the prompts'
real scenes hold (too few: objects left out; too many: extras, which captions of levels 2-4 are
penalised for); and the alignment of the real scenes after a round trip through the model's VAE (encode
to the posterior mean, decode): what a perfect diffusion model over this VAE's latents would score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.scenes import LEVELS, SIZES, prompt_set, render, scene_of
from qlip_jax.errors import check_int, check_sampling_args, program
from qlip_jax.metrics.parser import SceneParser, alignment_score
from qlip_jax.metrics.scoring import alignment, sample_records
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.models.vae import AutoencoderKL
from qlip_jax.sampling.grid import save_grid
from qlip_jax.sampling.pipeline import Text2Image, to_uint8


def vae_round_trip(sd, images: np.ndarray, batch: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, H, W, 3]``: encoded to the VAE posterior mean and decoded."""
    vae = AutoencoderKL(sd.configs.vae)
    fn = jax.jit(lambda p, x: to_uint8(vae.apply({"params": p}, x)))
    return np.concatenate([np.asarray(fn(sd.params["vae"], images[i:i + batch].astype(np.float32) / 127.5 - 1.0))
                           for i in range(0, len(images), batch)])


_COLUMNS = ("mean alignment | samples with no object | objects found per sample | objects in the real scene | "
            "VAE round trip")


def stated_size(record) -> str | None:
    """The size a single-object caption states (``None``: none stated)."""
    return record.caption.objects[0].size if record.caption.objects else None


def compare_table(runs: dict[str, list[dict]]) -> str:
    """One markdown row per run (name -> its ``scores.json`` records): single-object prompts' alignment
    (all, by level), the share with no object drawn (stated size small / medium, all), objects found per
    sample (levels 0-2 / 3-4; the real scenes hold 1), and multi-object prompts' alignment."""
    def mean(records, value=lambda r: r["alignment"], digits=3) -> str:
        return f"{np.mean([value(r) for r in records]):.{digits}f}" if records else "-"

    none = lambda r: float(r["objects_found"] == 0)  # noqa: E731
    found = lambda r: r["objects_found"]  # noqa: E731
    lines = ["| run | single-object alignment | levels 0-1 | level 2 | level 3 | level 4 | no object: small | "
             "no object: medium | no object: all | objects found, levels 0-2 | levels 3-4 | multi-object alignment |",
             "|---" * 12 + "|"]
    for name, scores in runs.items():
        single = [r for r in scores if r["n_objects"] == 1]
        level = lambda *ls: [r for r in single if r["level"] in ls]  # noqa: E731
        size = lambda z: [r for r in single if r["stated_sizes"] and r["stated_sizes"][0] == z]  # noqa: E731
        cells = [mean(single), mean(level(0, 1)), mean(level(2)), mean(level(3)), mean(level(4)),
                 mean(size("small"), none, 2), mean(size("medium"), none, 2), mean(single, none, 2),
                 mean(level(0, 1, 2), found, 2), mean(level(3, 4), found, 2),
                 mean([r for r in scores if r["n_objects"] > 1])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--split", default="eval", choices=["eval", "train"],
                   help="prompt set: held-out evaluation prompts, or training prompts (to tell under-fitting "
                        "from over-fitting)")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--guidance-max-t", type=int, default=None, metavar="T",
                   help="guide only the steps at timesteps <= T (the noisier ones use the conditional "
                        "prediction alone; guidance in a limited interval)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided prediction towards the conditional one's std, by PHI in [0, 1] "
                        "(Lin et al., 2024; 0.7 suggested for zero-terminal-SNR models)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic; 1: DDPM-like noise)")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where table.md, scores.json and samples.png go")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="instead of sampling: earlier --out folders, one row each (on the same prompts)")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_sampling_args(args, args.n)
    check_int(args.n, "--n", 1)
    check_int(args.batch, "--batch", 1)
    if args.out:
        check_writable_dir(args.out)
    compile_cache.from_args(args)
    if args.compare:
        runs = {}
        for folder in args.compare:
            path = os.path.join(folder, "scores.json")
            if not os.path.isfile(path):
                p.error(f"--compare: {path} does not exist (a folder written by this program's --out)")
            with open(path) as f:
                runs[folder] = json.load(f)
        ids = {name: [r["id"] for r in scores] for name, scores in runs.items()}
        if len({tuple(v) for v in ids.values()}) > 1:
            p.error("--compare: the runs scored different prompts: " +
                    ", ".join(f"{name} ({len(v)})" for name, v in ids.items()))
        print(compare_table(runs))
        return 0
    if not args.out:
        p.error("--out is required (unless --compare)")
    if args.guidance_max_t is not None and args.guidance_max_t < 0:
        p.error(f"--guidance-max-t must be >= 0, got {args.guidance_max_t}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        p.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")

    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    parser = SceneParser.load(args.parser)
    pipe = Text2Image(sd, args.scheduler, args.steps, eta=args.eta, guidance_rescale=args.guidance_rescale)
    records = prompt_set(args.split)[:args.n]
    guidance = args.guidance
    if args.guidance_max_t is not None:
        guidance = pipe.guidance_interval(args.guidance, args.guidance_max_t)
    images = sample_records(pipe, records, guidance, args.seed, args.batch, desc="sampling")
    parsed = parser.parse(images)
    scores = [alignment_score(r.caption, s) for r, s in zip(records, parsed)]
    empty = [float(not s.objects) for s in parsed]
    found = [len(s.objects) for s in parsed]
    truth = [r.n_objects for r in records]
    real = np.stack([render(scene_of(r)) for r in records])
    vae_scores = alignment(parser, records, vae_round_trip(sd, real, args.batch)).tolist()

    def row(labels: tuple[str, ...], keep) -> str:
        idx = [i for i, r in enumerate(records) if keep(r)]
        mean = lambda xs: float(np.mean([xs[i] for i in idx])) if idx else float("nan")  # noqa: E731
        return (f"| {' | '.join(labels)} | {len(idx)} | {mean(scores):.3f} | {mean(empty):.2f} | "
                f"{mean(found):.2f} | {mean(truth):.2f} | {mean(vae_scores):.3f} |")

    lines = [f"model `{sd.folder}`, {args.scheduler} {args.steps} steps"
             f"{f' (eta {args.eta})' if args.eta else ''}, guidance {args.guidance}"
             f"{'' if args.guidance_max_t is None else f' at timesteps <= {args.guidance_max_t}'}"
             f"{f' (rescale {args.guidance_rescale})' if args.guidance_rescale else ''}, "
             f"first {len(records)} {args.split} prompts, seeds {args.seed}+i", "",
             f"| objects | caption level | prompts | {_COLUMNS} |", "|---|---|---|---|---|---|---|---|"]
    for single in (True, False):
        lines += [row(("single" if single else "multi", str(lvl)),
                      lambda r, lvl=lvl, single=single: r.level == lvl and (r.n_objects == 1) == single)
                  for lvl in LEVELS]
    lines += [row(("single", "all"), lambda r: r.n_objects == 1), row(("multi", "all"), lambda r: r.n_objects > 1),
              row(("all", "all"), lambda r: True)]
    # Which words the model fails on: single-object captions by the size they state (levels 3-4 state one).
    lines += ["", f"| single object, stated size | prompts | {_COLUMNS} |", "|---|---|---|---|---|---|---|"]
    lines += [row((size or "not stated",), lambda r, size=size: r.n_objects == 1 and stated_size(r) == size)
              for size in (*SIZES, None)]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with atomic_write(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with atomic_write(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump([{"id": r.id, "prompt": r.text, "level": r.level, "n_objects": r.n_objects, "alignment": s,
                    "stated_sizes": [o.size for o in r.caption.objects], "objects_found": len(p.objects),
                    "vae_round_trip": v}
                   for r, s, p, v in zip(records, scores, parsed, vae_scores)], f, indent=1)
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
