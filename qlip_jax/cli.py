"""The ``qlip`` command.

``qlip sample --prompt TEXT [--prompt ...] [--model DIR] [--steps N] [--guidance G] [--seed S]
[--precision fp|wXaY|SCHEDULE.npy] [--out grid.png]``

Without ``--model`` the embedded miniature Stable Diffusion shipped in the package is used.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _parse_precision(text: str):
    """``'fp'`` -> ('fp', None); ``'w4a8'`` -> ('uniform', (4, 8)); ``x.npy`` -> ('file', path)."""
    text = text.strip()
    if text.lower() == "fp":
        return "fp", None
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text)
    if m:
        return "uniform", (int(m.group(1)), int(m.group(2)))
    if text.endswith(".npy"):
        if not os.path.isfile(text):
            raise SystemExit(f"error: schedule file not found: {text}")
        return "file", text
    raise SystemExit(f"error: --precision must be fp, wXaY (e.g. w4a8) or a .npy schedule, got '{text}'")


def cmd_sample(args) -> int:
    import numpy as np

    from qlip_jax.assets import default_model_dir
    from qlip_jax.data.scenes import prompt_set
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.quant.calibration import calibrate_minmax
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.grid import save_grid
    from qlip_jax.sampling.pipeline import Text2Image

    kind, value = _parse_precision(args.precision)
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists; pass --overwrite to replace it")
    t0 = time.time()
    sd = load_stable_diffusion(args.model or default_model_dir())
    pipe = Text2Image(sd, args.scheduler, args.steps)
    if kind != "fp":
        wbits, abits = value if kind == "uniform" else (args.weight_bits, None)
        config = QuantConfig(act_bits=(abits,) if abits else tuple(args.act_bits), weight_bits=wbits)
        calib = [r.text for r in prompt_set("calibration")[:args.calib_prompts]]
        print(f"[qlip] min-max calibration of W{wbits}A{config.act_bits} on {len(calib)} prompts ...",
              file=sys.stderr)
        quant = calibrate_minmax(pipe, config, calib, range(len(calib)), args.guidance, num_steps_kept=8)
        pipe = Text2Image(sd, args.scheduler, args.steps, quant=quant)
    schedule = None
    if kind == "uniform":
        schedule = pipe.uniform_schedule(len(args.prompt), value[1])
    elif kind == "file":
        schedule = np.load(value)
        if schedule.ndim == 2:  # one [T, L] schedule for every prompt
            schedule = np.broadcast_to(schedule, (len(args.prompt),) + schedule.shape)
    print(f"[qlip] model loaded in {time.time() - t0:.1f}s; sampling {len(args.prompt)} prompt(s), "
          f"{pipe.num_steps} steps ({args.scheduler}), precision {args.precision} ...", file=sys.stderr)
    emb = pipe.encode(args.prompt)
    for p, cut in zip(args.prompt, emb.truncated):
        if cut:
            print(f"[qlip] warning: prompt truncated to 77 tokens: {p[:60]}...", file=sys.stderr)
    t1 = time.time()
    images = pipe(emb, np.arange(len(args.prompt)) + args.seed, args.guidance, schedule)
    print(f"[qlip] sampled in {time.time() - t1:.1f}s (including compilation)", file=sys.stderr)
    save_grid(args.out, images, args.prompt)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="text-to-image sampling at a chosen precision")
    s.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0, help="prompt i uses seed S + i")
    s.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    s.add_argument("--precision", default="fp", help="fp, wXaY (uniform) or SCHEDULE.npy [B|1, T, L]")
    s.add_argument("--weight-bits", type=int, default=4, help="weights for a .npy schedule")
    s.add_argument("--act-bits", type=int, nargs="+", default=[6, 8, 10],
                   help="candidate activation bits a .npy schedule indexes")
    s.add_argument("--calib-prompts", type=int, default=16,
                   help="calibration prompts for min-max quantizer ranges (quantized precisions)")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_sample)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
