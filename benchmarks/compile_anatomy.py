"""Where the quantized sampler's compile time goes: the float and the quantized sampling loop, lowered
and compiled in one process with no persistent cache; StableHLO op counts, XLA fusions, seconds.

    python benchmarks/compile_anatomy.py [--model tiny|DIR] [--steps 25] [--batch 1] [--run 3] [--own] [--kernels]

``--run N`` also runs each compiled sampler N times (the median is printed): with ``XLA_FLAGS`` set, the
price a compile-time flag asks at run time, e.g.

    for f in "" --xla_llvm_disable_expensive_passes=true; do
      XLA_FLAGS="$f" python benchmarks/compile_anatomy.py --model tiny --steps 4 --batch 2 --run 5; done

``--own`` adds the quantized sampler with each layer looking its quantizer rows up itself
(``Text2Image.prepare_rows = False``, the code before the prepared rows); ``--kernels`` prints, per
program, the kernel-level instructions of the optimized HLO (fusions, convolutions, conditionals, ...)
attributed to the quantized layers' source lines (op metadata), counted over all layers.

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


_TRIVIAL = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "opt-barrier"}


def kernels(hlo: str) -> collections.Counter:
    """Kernel-level instructions of an optimized HLO text (those of computations that are not fused
    into another: entry, loop bodies, conditional branches), keyed by opcode (fusions by kind) and, for
    the quantized layers, the op's name inside the layer (``_weight_op/...``, ``quantizers/...``)."""
    fused = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
    out, comp = collections.Counter(), None
    for line in hlo.split("\n"):
        m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if m:
            comp = m[1]
            continue
        if line == "}":
            comp = None
        if comp is None or comp in fused:
            continue
        m = re.match(r"\s+(?:ROOT )?%\S+ = .+? ([a-z\-]+)\(", line)
        if not m or m[1] in _TRIVIAL:
            continue
        kind = re.search(r"kind=(\w+)", line)
        name = re.search(r'op_name="([^"]*)"', line)
        name = name[1] if name else ""
        layer = re.search(r"\.(_weight_op|quantizers)(/.*)?$", name)
        where = "layer " + re.sub(r"\.\d+$", "", layer[1] + (layer[2] or "")) if layer else "rest"
        out[(where, m[1] + (":" + kind[1] if kind else ""))] += 1
    return out


def measure(name: str, lower, args: tuple = (), runs: int = 0, show_kernels: bool = False) -> None:
    t0 = time.perf_counter()
    low = lower()
    t1 = time.perf_counter()
    c = low.compile()
    t2 = time.perf_counter()
    hlo = c.as_text()
    run = ""
    if runs:
        times = []
        for _ in range(runs):
            r0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times.append(time.perf_counter() - r0)
        run = f" run {np.median(times):6.3f}s |"
    print(f"| {name:44s} | {counts(low.as_text())} | fusions {hlo.count(' fusion(')} | lower {t1 - t0:5.1f}s | "
          f"compile {t2 - t1:6.1f}s |{run} load {os.getloadavg()[0]:.1f} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    if show_kernels:
        for (where, op), n in sorted(kernels(hlo).items(), key=lambda kv: (kv[0][0] == "rest", -kv[1])):
            print(f"    {n:5d}  {op:22s} {where}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--run", type=int, default=0, help="also run each compiled sampler this many times")
    p.add_argument("--own", action="store_true", help="also the quantized sampler on the layers' own path "
                   "(prepare_rows=False)")
    p.add_argument("--kernels", action="store_true", help="print the kernels of each program by source")
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
    fp_args = (fp._params(), emb.cond, unc, seeds, None, None, g)
    measure("sampler, float", lambda: fp._sample.lower(*fp_args), fp_args, args.run, args.kernels)
    sched = jnp.asarray(q.uniform_schedule(args.batch, 8))
    q_args = (q._params(), emb.cond, unc, seeds, sched, None, g)
    measure("sampler, quantized", lambda: q._sample.lower(*q_args), q_args, args.run, args.kernels)
    if args.own:
        own = Text2Image(sd, "ddim", args.steps, quant=quant)
        own.prepare_rows = False
        measure("sampler, quantized, layers' own path", lambda: own._sample.lower(*q_args), q_args, args.run,
                args.kernels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
