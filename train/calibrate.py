"""Calibrate a base PTQ quantizer for every candidate activation width at once, and save it.

    python train/calibrate.py --method mse --out runs/quant/mse            # embedded mini SD
    python train/calibrate.py --model SD_FOLDER --act-bits 6 8 10 --weight-bits 4 --method qdiff ...

Steps: float sampling of the calibration prompts (held out from evaluation) with the sampler and step
count the quantizer will serve; the UNet inputs at ``--keep-steps`` steps spread over each trajectory,
both guidance halves, form the timestep-aware calibration set (Q-Diffusion); the chosen base method
fits weight scales (``--weight-bits``, per output channel) and activation ranges for each candidate in
``--act-bits``. The quantizer state is saved with orbax and tagged with the model's fingerprint
(:mod:`qlip_jax.quant.persist`), so it is refused on any other model.

``--method ptqd`` adds PTQD's output correction on top of a base quantizer (``--init``, default
``qdiff``); it is fitted per step of the ``--scheduler``/``--steps`` sampler and only serves a sampler
with that timestep grid (DDIM with ``eta > 0`` also absorbs the residual variance).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from qlip_jax.assets import default_model_dir
from qlip_jax.data.scenes import prompt_set
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.programs import add_memory_arguments, micro_batch_for, settings_from_args
from qlip_jax.quant.calibration import METHODS, calibrate, collect_calibration_data
from qlip_jax.quant.persist import model_fingerprint, save_quant_setup
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    p.add_argument("--method", default="mse", choices=METHODS)
    p.add_argument("--init", default=None, choices=[m for m in METHODS if m != "ptqd"],
                   help="base quantizer of --method qdiff (default mse) or ptqd (default qdiff)")
    p.add_argument("--act-bits", type=int, nargs="+", default=[6, 8, 10])
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--attn-matmul", action="store_true", help="also quantize QK^T and AV")
    p.add_argument("--prompts", type=int, default=32, help="calibration prompts (held-out set)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line instead of the scene prompts")
    p.add_argument("--keep-steps", type=int, default=10, help="trajectory steps kept per prompt")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", required=True, help="directory for the orbax quantizer state")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--recon-batch", type=int, default=8, help="qdiff: calibration samples per reconstruction step")
    add_memory_arguments(p, "prompts per calibration trajectory batch and samples per qdiff reconstruction "
                            "micro-batch (gradient accumulation)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.init is not None and (args.method not in ("qdiff", "ptqd") or args.init == args.method):
        raise SystemExit(f"error: --init {args.init} does not apply to --method {args.method} (qdiff starts "
                         f"from minmax/percentile/mse/tdq, ptqd from any of those or qdiff)")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} is not empty; pass --overwrite to replace it")
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()][:args.prompts]
    else:
        prompts = [r.text for r in prompt_set("calibration")[:args.prompts]]
    if not prompts:
        raise SystemExit("error: no calibration prompts")
    config = QuantConfig(act_bits=tuple(args.act_bits), weight_bits=args.weight_bits,
                         quantize_attn_matmul=args.attn_matmul)
    t0 = time.time()
    dtype = jnp.dtype(args.dtype)
    sd = load_stable_diffusion(args.model or default_model_dir(), unet_dtype=None if dtype.itemsize == 2 else np.float32)
    pipe = Text2Image(sd, args.scheduler, args.steps, dtype=dtype, attention_chunk=args.attention_chunk)
    settings = settings_from_args(args, steps=args.steps, act_bits=config.act_bits, weight_bits=args.weight_bits,
                                  calib_prompts=len(prompts), recon_batch=args.recon_batch)
    collect_mb = micro_batch_for(args, sd.configs, "calibration", settings, log=lambda m: print(m, file=sys.stderr))
    print(f"[calibrate] float trajectories of {len(prompts)} prompts ({pipe.num_steps} steps) ...",
          file=sys.stderr)
    data = collect_calibration_data(pipe, prompts, args.seed + np.arange(len(prompts)), args.guidance,
                                    args.keep_steps, micro_batch=collect_mb)
    print(f"[calibrate] {len(data)} UNet inputs; method {args.method}, W{args.weight_bits}"
          f"A{config.act_bits} ...", file=sys.stderr)
    recon = {}
    if args.method == "qdiff" or (args.method == "ptqd" and args.init in (None, "qdiff")):
        recon = {"batch": args.recon_batch, "remat": args.remat,
                 "micro_batch": micro_batch_for(args, sd.configs, "reconstruction", settings,
                                                log=lambda m: print(m, file=sys.stderr))}
    setup = calibrate(pipe, config, data, args.method, progress=True,
                      **({} if args.init is None else {"init": args.init}), **recon)
    meta = {"method": args.method, "init": setup.info.get("init"), "model": sd.folder,
            "scheduler": args.scheduler, "steps": args.steps,
            "guidance": args.guidance, "calibration_prompts": len(prompts), "keep_steps": args.keep_steps,
            "seed": args.seed, "command": "python train/calibrate.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "minutes": round((time.time() - t0) / 60, 2)}
    save_quant_setup(args.out, setup, model_fingerprint(sd.configs.unet, sd.params["unet"]), meta)
    print(json.dumps(meta, indent=1))
    print(f"[calibrate] saved {len(setup.registry)} layers to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
