"""Where the quantized sampler's compile time goes: the float and the quantized sampling loop, lowered
and compiled in one process with no persistent cache; StableHLO op counts, XLA fusions, seconds.

    python benchmarks/compile_anatomy.py [--model tiny|DIR] [--steps 25] [--batch 1]

Without ``--model`` the shipped model and its quantizer state; ``tiny`` a random tiny-preset SD with
min-max quantizers. The sampler rows in docs/speed.md come from this script.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np


def counts(text: str) -> dict:
    ops = collections.Counter(re.findall(r"= \"?(stablehlo\.[a-z_]+)", text))
    return {"ops": sum(ops.values()), "conv": ops["stablehlo.convolution"], "dot": ops["stablehlo.dot_general"],
            "case": ops["stablehlo.case"], "while": ops["stablehlo.while"]}


def measure(name: str, lower) -> None:
    t0 = time.perf_counter()
    low = lower()
    t1 = time.perf_counter()
    c = low.compile()
    t2 = time.perf_counter()
    hlo = c.as_text()
    print(f"| {name:44s} | {counts(low.as_text())} | fusions {hlo.count(' fusion(')} | lower {t1 - t0:5.1f}s | "
          f"compile {t2 - t1:6.1f}s | load {os.getloadavg()[0]:.1f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)

    from sampling import _tiny_model_dir

    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.calibration import calibrate_minmax
    from qlip_jax.ptq.persist import QuantStateMismatch, load_quant_setup, model_fingerprint
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.pipeline import Text2Image

    folder = _tiny_model_dir() if args.model == "tiny" else (args.model or default_model_dir())
    sd = load_stable_diffusion(folder)
    fp = Text2Image(sd, "ddim", args.steps)
    try:
        quant, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, sd.params["unet"]))
    except QuantStateMismatch:
        quant = calibrate_minmax(fp, QuantConfig(act_bits=(6, 8, 10), weight_bits=4), ["a red star"], [0], 5.0,
                                 num_steps_kept=2)
    q = Text2Image(sd, "ddim", args.steps, quant=quant)
    emb = fp.encode(["a red star"] * args.batch)
    unc = jnp.broadcast_to(emb.uncond, emb.cond.shape)
    seeds = jnp.zeros((args.batch,), jnp.uint32)
    g = fp.guidance_scales(5.0)
    print(f"model {folder}, {len(quant.registry)} quantized layers, DDIM {args.steps}, batch {args.batch}")
    measure("sampler, float", lambda: fp._sample.lower(fp._params(), emb.cond, unc, seeds, None, None, g))
    sched = jnp.asarray(q.uniform_schedule(args.batch, 8))
    measure("sampler, quantized", lambda: q._sample.lower(q._params(), emb.cond, unc, seeds, sched, None, g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
