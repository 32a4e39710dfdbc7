"""Calibrate a base PTQ quantizer for every candidate activation width at once, and save it.

    python train/calibrate.py --method mse --out runs/quant/mse            # embedded mini SD
    python train/calibrate.py --model SD_FOLDER --prompts captions.txt --act-bits 6 8 10 --weight-bits 4 \
        --method qdiff --out runs/quant/my-qdiff

Calibration prompts are the first ``--calib-prompts`` of the calibration split of ``--prompts FILE``
(:class:`qlip_jax.data.sources.FileSource`), or of the procedural scene prompts without it.

Steps: float sampling of the calibration prompts (held out from evaluation) with the sampler and step
count the quantizer will serve; the UNet inputs at ``--keep-steps`` steps spread over each trajectory,
both guidance halves, form the timestep-aware calibration set (Q-Diffusion); the chosen base method
fits weight scales (``--weight-bits``, per output channel) and activation ranges for each candidate in
``--act-bits``. The quantizer state is saved with orbax and tagged with the model's fingerprint
(:mod:`qlip_jax.ptq.persist`), so it is refused on any other model.

``--method qdiff`` runs Q-Diffusion's block reconstruction for ``--recon-iters`` steps of ``--recon-batch``
calibration samples (each at every candidate width).

``--method ptqd`` adds PTQD's output correction on top of a base quantizer (``--init``, default
``qdiff``); it is fitted per step of the ``--scheduler``/``--steps`` sampler and only serves a sampler
with that timestep grid (DDIM with ``eta > 0`` also absorbs the residual variance). ``--init-from DIR``
starts it from a quantizer already calibrated for this model (e.g. a ``qdiff`` folder) instead of
calibrating the base again (its widths must equal ``--act-bits``/``--weight-bits``)::

    python train/calibrate.py --method ptqd --init-from runs/quant/qdiff --out runs/quant/ptqd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from qlip_jax import compile_cache, distributed
from qlip_jax.assets import default_model_dir
from qlip_jax.atomic import check_writable_dir
from qlip_jax.data.sources import add_source_arguments, source_from_args
from qlip_jax.errors import BadArgument, MismatchError, check_int, check_sampling_args, program
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.programs import add_memory_arguments, micro_batch_for, settings_from_args
from qlip_jax.ptq.calibration import METHODS, calibrate, collect_calibration_data
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint, read_quant_info, save_quant_setup
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--method", default="mse", choices=METHODS)
    p.add_argument("--init", default=None, choices=[m for m in METHODS if m != "ptqd"],
                   help="base quantizer of --method qdiff (default mse) or ptqd (default qdiff)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="--method ptqd: start from this calibrated quantizer folder (no base calibration)")
    p.add_argument("--recon-iters", type=int, default=None,
                   help="qdiff (also as ptqd's base): reconstruction steps (default 500)")
    p.add_argument("--recon-batch", type=int, default=None,
                   help="qdiff: calibration samples per reconstruction step (default 8)")
    p.add_argument("--act-bits", type=int, nargs="+", default=[6, 8, 10])
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--attn-matmul", action="store_true", help="also quantize QK^T and AV")
    add_source_arguments(p, reference=False)
    p.add_argument("--calib-prompts", type=int, default=32,
                   help="calibration prompts: the first N of the calibration split of --prompts (or of the scenes)")
    p.add_argument("--keep-steps", type=int, default=10, help="trajectory steps kept per prompt")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", required=True, help="directory for the orbax quantizer state")
    p.add_argument("--overwrite", action="store_true")
    add_memory_arguments(p, "prompts per calibration trajectory batch and samples per qdiff reconstruction "
                            "micro-batch (gradient accumulation)")
    distributed.add_mesh_argument(p)
    compile_cache.add_argument(p)
    return p


@program
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distributed.initialize()  # several processes: trajectories split over them, every process saves its part
    compile_cache.from_args(args)
    mesh = distributed.mesh_from_arg(args.mesh)
    if args.init is not None and (args.method not in ("qdiff", "ptqd") or args.init == args.method):
        raise BadArgument(f"--init {args.init} does not apply to --method {args.method}",
                          "qdiff starts from minmax/percentile/mse/tdq, ptqd from any of those or qdiff")
    if os.path.isfile(args.out):
        raise BadArgument(f"--out {args.out} is a file, not a folder", "choose a folder for the quantizer state")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise BadArgument(f"{args.out} is not empty", "pass --overwrite to replace it, or choose another --out")
    check_writable_dir(args.out)
    if args.init_from is not None:
        if args.method != "ptqd" or args.init is not None:
            raise BadArgument("--init-from applies to --method ptqd alone (without --init)",
                              "pass --method ptqd --init-from DIR")
        read_quant_info(args.init_from)  # there and readable, before the model loads
    recon = {k: v for k, v in (("iters", args.recon_iters), ("batch", args.recon_batch)) if v is not None}
    for key, value in recon.items():
        check_int(value, f"--recon-{key}", 1)
    runs_qdiff = args.method == "qdiff" or (args.method == "ptqd" and args.init_from is None
                                            and args.init in (None, "qdiff"))
    if recon and not runs_qdiff:
        raise BadArgument("--recon-iters/--recon-batch apply to --method qdiff (and ptqd over a qdiff base)",
                          "leave them out for this method")
    check_int(args.calib_prompts, "--calib-prompts", 1)
    check_int(args.keep_steps, "--keep-steps", 1)
    check_sampling_args(args, args.calib_prompts)
    if args.model and not args.prompts:
        raise BadArgument("--model needs --prompts FILE (calibration captions for that model)",
                          "the procedural scene prompts are the embedded model's; pass --prompts FILE")
    source = source_from_args(args)
    prompts = [r.text for r in source.prompts("calibration")[:args.calib_prompts]]
    if len(prompts) < args.calib_prompts:
        print(f"[calibrate] note: the calibration split has {len(prompts)} prompts (--calib-prompts "
              f"{args.calib_prompts})", file=sys.stderr)
    config = QuantConfig(act_bits=tuple(args.act_bits), weight_bits=args.weight_bits,
                         quantize_attn_matmul=args.attn_matmul)
    t0 = time.time()
    dtype = jnp.dtype(args.dtype)
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant,
                               unet_dtype=None if dtype.itemsize == 2 else np.float32)
    pipe = Text2Image(sd, args.scheduler, args.steps, dtype=dtype, attention_chunk=args.attention_chunk, mesh=mesh)
    opts = dict(recon)
    if args.init is not None:
        opts["init"] = args.init
    if args.init_from is not None:
        base, base_info = load_quant_setup(args.init_from, model_fingerprint(sd.configs.unet, sd.params["unet"]),
                                           sd.params["unet"])
        opts["init"] = dataclasses.replace(base, info={"method": base_info.get("method"), "folder": args.init_from})
        if opts["init"].config != config:
            got = opts["init"].config
            raise MismatchError(f"--init-from {args.init_from} is W{got.weight_bits}A{list(got.act_bits)}"
                                f"{' with' if got.quantize_attn_matmul else ' without'} --attn-matmul, not "
                                f"W{config.weight_bits}A{list(config.act_bits)}"
                                f"{' with' if config.quantize_attn_matmul else ' without'}",
                                "pass the --act-bits, --weight-bits and --attn-matmul it was calibrated with")
    settings = settings_from_args(args, steps=args.steps, act_bits=config.act_bits, weight_bits=args.weight_bits,
                                  calib_prompts=len(prompts), recon_batch=recon.get("batch", 8))
    collect_mb = micro_batch_for(args, sd.configs, "calibration", settings, log=lambda m: print(m, file=sys.stderr))
    print(f"[calibrate] float trajectories of {len(prompts)} prompts ({pipe.num_steps} steps) ...",
          file=sys.stderr)
    data = collect_calibration_data(pipe, prompts, args.seed + np.arange(len(prompts)), args.guidance,
                                    args.keep_steps, micro_batch=collect_mb)
    print(f"[calibrate] {len(data)} UNet inputs; method {args.method}, W{args.weight_bits}"
          f"A{config.act_bits} ...", file=sys.stderr)
    if runs_qdiff:
        opts.update(remat=args.remat, micro_batch=micro_batch_for(args, sd.configs, "reconstruction", settings,
                                                                   log=lambda m: print(m, file=sys.stderr)))
    setup = calibrate(pipe, config, data, args.method, progress=True, **opts)
    meta = {"method": args.method, "init": setup.info.get("init"), "init_from": args.init_from,
            "recon": recon or None, "model": sd.folder,
            "scheduler": args.scheduler, "steps": args.steps,
            "guidance": args.guidance, "data": source.describe(), "calibration_prompts": len(prompts),
            "keep_steps": args.keep_steps,
            "seed": args.seed, "command": "python train/calibrate.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "minutes": round((time.time() - t0) / 60, 2)}
    save_quant_setup(args.out, setup, model_fingerprint(sd.configs.unet, sd.params["unet"]), meta)  # all processes
    if not distributed.is_main():
        return 0
    print(json.dumps(meta, indent=1))
    print(f"[calibrate] saved {len(setup.registry)} layers to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
