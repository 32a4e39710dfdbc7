"""The sensitivity study that motivates QLIP, on one model and one calibrated quantizer.

    python eval/sensitivity.py --method mse --n 96 --cell-prompts 12 --out runs/sensitivity

1. Per prompt: how much a low uniform precision (the lowest candidate, W4A6 by default) moves the
   image away from the float image of the same seed (PSNR, SSIM), against the prompt's richness
   (caption level 0-4; number of stated attributes) and against the float image's quality (its scene
   alignment, and GIQA-KNN over the scene parser's features). Spearman correlations are printed and
   saved; scatter plots of PSNR vs richness and vs float quality.
2. Per layer group x step group: the damage (MSE to the float images, in uint8 levels squared) when
   only that group of layers, at only those steps, drops to the lowest candidate while everything else
   stays in float. All cells run through the same compiled sampler (the schedule is traced).

Writes ``sensitivity.json``, ``summary.md``, ``prompts_psnr_vs_level.png``,
``prompts_psnr_vs_quality.png`` and ``layer_step_heatmap.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.scenes import prompt_set
from qlip_jax.errors import check_int, check_sampling_args, program
from qlip_jax.metrics.image import psnr, ssim
from qlip_jax.metrics.parser import SceneParser
from qlip_jax.metrics.scoring import alignment, sample_records
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.plots import heatmap, scatter
from qlip_jax.ptq.calibration import METHODS, calibrate, collect_calibration_data
from qlip_jax.quant.groups import group_indices, step_groups
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image
from qlip_jax.selector.quality import make_quality_fn, real_features
from qlip_jax.selector.t2q import spearman


def stated_attributes(caption) -> int:
    """Number of attribute values a caption states (objects' fields and the background)."""
    n = sum(sum(v is not None for v in vars(o).values()) for o in caption.objects)
    return n + (caption.background is not None)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"))
    p.add_argument("--method", default="mse", choices=METHODS)
    p.add_argument("--act-bits", type=int, nargs="+", default=[6, 8, 10])
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--n", type=int, default=96, help="prompts for the per-prompt study")
    p.add_argument("--cell-prompts", type=int, default=12, help="prompts per layer x step cell")
    p.add_argument("--step-groups", type=int, default=5)
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--real", type=int, default=2000, help="real scenes for GIQA")
    p.add_argument("--out", required=True)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_sampling_args(args, args.n)
    for name in ("n", "cell_prompts", "step_groups", "calib_prompts", "real"):
        check_int(getattr(args, name), "--" + name.replace("_", "-"), 1)
    QuantConfig(act_bits=tuple(args.act_bits), weight_bits=args.weight_bits)  # widths in the supported range
    check_writable_dir(args.out)
    compile_cache.from_args(args)
    os.makedirs(args.out, exist_ok=True)

    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    parser = SceneParser.load(args.parser)
    fp = Text2Image(sd, args.scheduler, args.steps)
    config = QuantConfig(act_bits=tuple(args.act_bits), weight_bits=args.weight_bits)
    calib = [r.text for r in prompt_set("calibration")[:args.calib_prompts]]
    data = collect_calibration_data(fp, calib, 1000 + np.arange(len(calib)), args.guidance, 10)
    setup = calibrate(fp, config, data, args.method)
    qp = Text2Image(sd, args.scheduler, args.steps, quant=setup)
    low = min(config.act_bits)
    records = prompt_set("eval")[:args.n]

    # 1. per prompt
    fp_images = sample_records(fp, records, args.guidance, desc="float")
    one = qp.uniform_schedule(1, low)
    q_images = sample_records(qp, records, args.guidance, schedule_fn=lambda i, e: np.repeat(
        one, e.cond.shape[0], 0), desc=f"W{config.weight_bits}A{low}")
    ps, ss = psnr(q_images, fp_images), ssim(q_images, fp_images)
    level = np.asarray([r.level for r in records], float)
    n_attr = np.asarray([stated_attributes(r.caption) for r in records], float)
    fp_align = alignment(parser, records, fp_images)
    giqa = make_quality_fn("giqa-knn", parser.features, real_features(parser.features, args.real))
    fp_giqa = giqa(fp_images, records)
    corr = {f"spearman(PSNR, {k})": float(spearman(ps, v)) for k, v in
            [("caption level", level), ("stated attributes", n_attr), ("FP alignment", fp_align),
             ("FP GIQA-KNN", fp_giqa)]}
    corr.update({f"spearman(SSIM, {k})": float(spearman(ss, v)) for k, v in
                 [("caption level", level), ("FP GIQA-KNN", fp_giqa)]})
    scatter(os.path.join(args.out, "prompts_psnr_vs_level.png"),
            {"prompts": (n_attr + np.random.default_rng(0).uniform(-0.2, 0.2, len(n_attr)), ps)},
            "stated attributes (jittered)", "PSNR vs FP (dB)",
            f"W{config.weight_bits}A{low} {args.method}: rho={corr['spearman(PSNR, stated attributes)']:.2f}")
    scatter(os.path.join(args.out, "prompts_psnr_vs_quality.png"), {"prompts": (fp_giqa, ps)},
            "FP image GIQA-KNN (parser features)", "PSNR vs FP (dB)",
            f"rho={corr['spearman(PSNR, FP GIQA-KNN)']:.2f}")

    # 2. layer group x step group
    groups = group_indices(setup.registry.names)
    sgroups = step_groups(qp.num_steps, args.step_groups)
    cell_records = records[:args.cell_prompts]
    ref = fp_images[:args.cell_prompts]
    fp_idx = config.fp_index
    damage = np.zeros((len(groups), len(sgroups)))
    for gi, (g, layers) in enumerate(groups.items()):
        for si, steps in enumerate(sgroups):
            sched = np.full((1, qp.num_steps, len(setup.registry)), fp_idx, np.int32)
            sched[np.ix_([0], steps, layers)] = config.index_of(low)
            imgs = sample_records(qp, cell_records, args.guidance,
                                  schedule_fn=lambda i, e: np.repeat(sched, e.cond.shape[0], 0))
            damage[gi, si] = float(np.mean((imgs.astype(float) - ref.astype(float)) ** 2))
        print(f"[sensitivity] {g}: {np.round(damage[gi], 1).tolist()}", file=sys.stderr)
    heatmap(os.path.join(args.out, "layer_step_heatmap.png"), damage, list(groups),
            [f"{s[0]}-{s[-1]}" for s in sgroups],
            f"MSE vs FP when one layer group x step group is at A{low} (rest float)")

    result = {"method": args.method, "config": config.to_dict(), "low_bits": low,
              "prompts": [r.id for r in records], "psnr": ps.tolist(), "ssim": ss.tolist(),
              "level": level.tolist(), "stated_attributes": n_attr.tolist(), "fp_alignment": fp_align.tolist(),
              "fp_giqa_knn": fp_giqa.tolist(), "correlations": corr, "groups": list(groups),
              "step_groups": [s.tolist() for s in sgroups], "damage_mse": damage.tolist()}
    with atomic_write(os.path.join(args.out, "sensitivity.json"), "w") as f:
        json.dump(result, f)
    order = np.argsort(-damage.mean(1))
    lines = [f"W{config.weight_bits}A{low} ({args.method}), {len(records)} prompts; cells: "
             f"{len(cell_records)} prompts", "", "| correlation | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in corr.items()]
    lines += ["", "| layer group | mean MSE over step groups | by step group (early -> late) |", "|---|---|---|"]
    lines += [f"| {list(groups)[i]} | {damage[i].mean():.2f} | {' / '.join(f'{v:.1f}' for v in damage[i])} |"
              for i in order]
    summary = "\n".join(lines)
    print(summary)
    with atomic_write(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
