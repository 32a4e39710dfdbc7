"""A static mixed-precision schedule (MixDQ-style, issue #42): one ``[T, L]`` schedule for every prompt,
allocated from per-layer, per-step sensitivities under a uniform width's BitOPs budget.

    python train/static_schedule.py --quant runs/quant/mse --budget 8 --out runs/static/w4a8.json
    qlip sample --prompt "a red star" --quant runs/quant/mse --precision runs/static/w4a8.json

1. Calibration inputs: float trajectories of ``--calib-prompts`` prompts of the data source's calibration
   split, every step kept (:func:`qlip_jax.ptq.calibration.collect_calibration_data`).
2. Sensitivities ``[T, L, K]``: the UNet output's MSE against float with only one layer at one candidate
   width at one step (:func:`qlip_jax.selector.static.layer_step_errors`), saved beside the schedule
   (``<out>.errors.npy``).
3. The schedule of least summed error whose BitOPs are at most uniform W{weight}A``--budget``'s
   (:func:`qlip_jax.selector.static.static_schedule`), written as a schedule JSON that ``qlip sample
   --precision FILE`` and ``eval/evaluate.py --settings FILE`` read. A summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import default_model_dir
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.sources import add_source_arguments, source_from_args
from qlip_jax.errors import BadArgument, MissingFile, check_int, check_sampling_args, program
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.ptq.calibration import collect_calibration_data
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.registry import average_act_bits
from qlip_jax.sampling.pipeline import Text2Image
from qlip_jax.selector.schedule_io import save_schedule_json
from qlip_jax.selector.static import candidate_bitops, layer_step_errors, static_schedule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--quant", required=True, help="calibrated quantizer folder (train/calibrate.py)")
    add_source_arguments(p, reference=False)
    p.add_argument("--calib-prompts", type=int, default=8, help="prompts whose trajectories measure the errors")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--budget", type=int, required=True,
                   help="activation width whose uniform schedule's BitOPs are the budget (a candidate, e.g. 8)")
    p.add_argument("--rows-per-call", type=int, default=64, help="UNet rows per sensitivity call")
    p.add_argument("--out", required=True, help="schedule JSON to write")
    compile_cache.add_argument(p)
    return p


@program
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    compile_cache.from_args(args)
    check_int(args.calib_prompts, "--calib-prompts", 1)
    check_int(args.rows_per_call, "--rows-per-call", 1)
    check_sampling_args(args, args.calib_prompts)
    if not os.path.isdir(args.quant):
        raise MissingFile(args.quant, f"--quant folder not found: {args.quant}", "calibrate one with train/calibrate.py")
    if args.model and not args.prompts:
        raise BadArgument("--model needs --prompts FILE (calibration captions for that model)",
                          "pass --prompts FILE")
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    source = source_from_args(args)
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    quant, quant_info = load_quant_setup(args.quant, model_fingerprint(sd.configs.unet, sd.params["unet"]),
                                         sd.params["unet"])
    if args.budget not in quant.config.act_bits:
        raise BadArgument(f"--budget {args.budget} is not a candidate width of {args.quant} "
                          f"({list(quant.config.act_bits)})", "pass one of them")
    pipe = Text2Image(sd, args.scheduler, args.steps)
    prompts = [r.text for r in source.prompts("calibration")[:args.calib_prompts]]
    print(f"[static] float trajectories of {len(prompts)} prompts, {pipe.num_steps} steps ...", file=sys.stderr)
    data = collect_calibration_data(pipe, prompts, args.seed + np.arange(len(prompts)), args.guidance)
    L, K = len(quant.registry), quant.config.num_quantized
    print(f"[static] sensitivities of {L} layers x {K} widths x {pipe.num_steps} steps ...", file=sys.stderr)
    errors = layer_step_errors(pipe.unet, sd.params["unet"], quant, data, pipe.num_steps, args.rows_per_call)
    alloc = static_schedule(errors, quant, args.budget)
    uniform = quant.config.index_of(args.budget)
    budget = errors.shape[0] * candidate_bitops(quant)[:, uniform].sum()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_write(args.out + ".errors.npy") as tmp:
        np.save(tmp, errors)
    save_schedule_json(args.out, alloc.choice, quant.registry, quant.config)
    counts = np.bincount(alloc.choice.ravel(), minlength=K)
    summary = {"schedule": args.out, "budget": f"W{quant.config.weight_bits}A{args.budget}",
               "bitops_vs_budget": alloc.cost / budget,
               "fab": float(np.asarray(average_act_bits(alloc.choice[None], quant.config))[0]),
               "share_per_width": {str(b): float(c / alloc.choice.size) for b, c in zip(quant.config.act_bits, counts)},
               "error_sum": alloc.error, "uniform_error_sum": float(errors[..., uniform].sum()),
               "exact": alloc.exact, "base_method": quant_info.get("method"), "calibration_prompts": len(prompts),
               "steps": pipe.num_steps, "scheduler": args.scheduler, "guidance": args.guidance,
               "command": "python train/static_schedule.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
