"""Figures of docs/exact.md: stored size of a W4 UNet with integer weight codes, the shipped quantizer's
weights that change with exact codes, and the cost of batch-invariant sampling.

    python benchmarks/exact.py sizes [--config ../shared/configs/sd-v1-4/unet/config.json]
    python benchmarks/exact.py cost [--steps 10]
    python benchmarks/exact.py int8 [--steps 10] [--batches 1 8]

``sizes``: packed int4 codes + float32 per-channel scales for an SD v1.4-shaped UNet (shapes from
``jax.eval_shape``, nothing allocated) and for the shipped mini SD, and how many of the shipped
quantizer's effective weights differ between the old jitted float32 path (``round(W / s)`` as XLA
evaluates it) and the stored codes. ``cost``: wall time of batched vs batch-invariant W4A8 sampling of
8 prompts on the shipped model (second call, after compilation), the machine's load stated.
``int8``: the integer path (``--int8``) against the fake-quant path on the shipped model and quantizer:
per layer on the fake path's own inputs (:func:`qlip_jax.quant.layers.integer_path_errors`), for the whole
UNet call, beside a control (the fake path with every quantized layer's output moved by a relative
2^-21 of random sign, the size of float rounding), then W4A8 sampling time and image difference at each
batch size.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.errors import program

PROMPTS = ["a red star", "a large striped blue circle at the top left", "a shape", "two squares",
           "a green triangle", "a yellow circle", "three stars", "a blue square"]


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.2f} MiB"


def report_size(tag, params, registry) -> None:
    from qlip_jax.models.io import flat_leaves
    from qlip_jax.naming import modules_by_name

    layers = modules_by_name(params)
    names = [l.name for l in registry.layers if l.kind != "matmul"]
    kern = sum(int(np.prod(layers[n]["kernel"].shape)) for n in names)
    outs = sum(int(layers[n]["kernel"].shape[-1]) for n in names)
    total = sum(int(np.prod(v.shape)) for v in flat_leaves(params).values())
    codes = kern / 2 + 4 * outs
    print(f"{tag}: {len(names)} quantized conv/linear layers, {kern:,} weights of {total:,} params; float32 UNet "
          f"{_mib(4 * total)}; codes (int4 packed) + scales {_mib(codes)}; with the other params in float32 "
          f"{_mib(codes + 4 * (total - kern))}")


def sizes(config: str) -> None:
    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir
    from qlip_jax.models import io
    from qlip_jax.models.configs import UNetConfig
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.models.unet import abstract_unet_params, unet_registry
    from qlip_jax.naming import modules_by_name
    from qlip_jax.quant.fake_quant import adaround_fake_quant
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
    from qlip_jax.training.checkpoint import Checkpointer

    cfg = UNetConfig.from_dict(io.read_json(config))
    report_size("SD v1.4-shaped UNet (eval_shape)", abstract_unet_params(cfg), unet_registry(cfg, (64, 64), (77, 768)))
    sd = load_stable_diffusion(default_model_dir())
    p = sd.params["unet"]
    setup, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, p), p)
    report_size("shipped mini-SD UNet", p, setup.registry)
    raw, _ = Checkpointer(shipped_quant_dir(), max_to_keep=1).restore()
    layers, old_fn = modules_by_name(p), jax.jit(adaround_fake_quant)
    changed, total, where = 0, 0, set()
    for name, st in raw.items():
        if "w_scale" not in st:
            continue
        old = np.asarray(old_fn(jnp.asarray(layers[name]["kernel"]), st["w_scale"], st["w_round"], jnp.float32(4)))
        new = setup.state[name]["w_code"].astype(np.float32) * np.asarray(st["w_scale"])
        total += old.size
        if (d := old != new).any():
            changed, where = changed + int(d.sum()), where | {name}
    print(f"shipped quantizer: {changed} of {total:,} effective weights differ (old jitted path vs codes) "
          f"in {len(where)} layers")


def _shipped():
    """The shipped model and its quantizer setup."""
    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint

    sd = load_stable_diffusion(default_model_dir())
    quant, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, sd.params["unet"]),
                                sd.params["unet"])
    return sd, quant


def _best_of(fn, n: int = 2):
    """``(last result, best wall seconds of n calls)``."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def cost(steps: int) -> None:
    from qlip_jax.sampling.pipeline import Text2Image

    sd, quant = _shipped()
    images, best = {}, {}
    for invariant in (False, True):
        pipe = Text2Image(sd, "ddim", steps, quant=quant, batch_invariant=invariant)
        schedule = pipe.uniform_schedule(len(PROMPTS), 8)
        pipe(pipe.encode(PROMPTS), np.arange(len(PROMPTS)), 5.0, schedule)  # compiles
        images[invariant], best[invariant] = _best_of(
            lambda: pipe(pipe.encode(PROMPTS), np.arange(len(PROMPTS)), 5.0, schedule))
        print(f"batch_invariant={invariant}: {best[invariant]:.2f} s for {len(PROMPTS)} prompts, {steps} steps "
              f"(best of 2; load {os.getloadavg()[0]:.1f})", flush=True)
    diff = np.abs(images[False].astype(int) - images[True].astype(int)).max()
    print(f"max |batched - batch-invariant| = {diff} uint8 levels; cost ratio {best[True] / best[False]:.2f}")


def int8(steps: int, batches: list[int]) -> None:
    import flax.linen as nn

    from qlip_jax.quant.layers import QConv, QDense, integer_path_errors
    from qlip_jax.quant.state import QuantArgs
    from qlip_jax.sampling.pipeline import Text2Image

    sd, quant = _shipped()
    cfg, names = quant.config, quant.registry.names
    pipe = Text2Image(sd, "ddim", steps, quant=quant)
    emb = pipe.encode(PROMPTS[:2])
    x = jax.random.normal(jax.random.key(0), (2, *pipe.latent_shape))
    params, state = sd.params["unet"], quant.state

    def unet(p, st, x, cond, idx, int8=False):
        return pipe.unet.apply({"params": p}, x, jnp.asarray(500), cond,
                               QuantArgs.from_indices(st, idx, names, cfg, int8=int8))

    @jax.jit
    def per_layer(p, st, x, cond, idx):  # [layers, 2]: max |int - fake|, max |fake|
        _, found = integer_path_errors(lambda: unet(p, st, x, cond, idx))
        return jnp.stack([jnp.stack(f[1:]) for f in found])

    @jax.jit
    def noisy(p, st, x, cond, idx, key):  # the fake path, each quantized layer's output * (1 +- 2^-21)
        keys = iter(jax.random.split(key, 4 * len(names)))

        def intercept(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            q = kwargs.get("q", args[1] if len(args) > 1 else None)
            if context.method_name != "__call__" or not isinstance(context.module, (QConv, QDense)) or q is None:
                return y
            return y * (1.0 + 2.0 ** -21 * jnp.where(jax.random.bernoulli(next(keys), 0.5, y.shape), 1.0, -1.0))

        with nn.intercept_methods(intercept):
            return unet(p, st, x, cond, idx)

    fake_fn = jax.jit(unet, static_argnames="int8")
    print(f"shipped UNet, {len(names)} quantized layers, candidates {cfg.act_bits}; one call, batch 2, t=500 "
          f"(load {os.getloadavg()[0]:.1f})")
    print("| activation bits | worst layer: max|int - fake| / max|fake| | whole UNet max / mean |int - fake| "
          "| control (fake +- 2^-21 per layer, 2 seeds) max / mean |")
    print("|---|---:|---:|---:|")
    for bits in [b for b in cfg.act_bits if b <= 8]:
        idx = jnp.full((2, len(names)), cfg.index_of(bits), jnp.int32)
        err = np.asarray(per_layer(params, state, x, emb.cond, idx))
        fake = np.asarray(fake_fn(params, state, x, emb.cond, idx))
        real = np.asarray(fake_fn(params, state, x, emb.cond, idx, int8=True))
        ctrl = [np.abs(fake - np.asarray(noisy(params, state, x, emb.cond, idx, jax.random.key(s)))) for s in (0, 1)]
        print(f"| {bits} | {np.max(err[:, 0] / err[:, 1]):.2e} ({len(err)} layers) | "
              f"{np.abs(real - fake).max():.3g} / {np.abs(real - fake).mean():.3g} | "
              + ", ".join(f"{c.max():.3g} / {c.mean():.3g}" for c in ctrl) + " |", flush=True)

    print(f"\nW4A8 sampling, {steps} DDIM steps, guidance 5 (best of 2 after compiling)")
    print("| batch | fake-quant (s) | int8 (s) | int8 / fake | max / mean |image difference| (uint8) | load |")
    print("|---:|---:|---:|---:|---:|---:|")
    pipes = {i8: Text2Image(sd, "ddim", steps, quant=quant, int8=i8) for i8 in (False, True)}
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        e, sched = pipe.encode(prompts), pipe.uniform_schedule(b, 8)
        out = {}
        for i8, p in pipes.items():
            p(e, np.arange(b), 5.0, sched)  # compiles
            out[i8] = _best_of(lambda: p(e, np.arange(b), 5.0, sched))
        d = np.abs(out[True][0].astype(int) - out[False][0].astype(int))
        print(f"| {b} | {out[False][1]:.2f} | {out[True][1]:.2f} | {out[True][1] / out[False][1]:.2f} | "
              f"{d.max()} / {d.mean():.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["sizes", "cost", "int8"])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs",
                                                    "sd-v1-4", "unet", "config.json"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    if args.what == "sizes":
        sizes(args.config)
    elif args.what == "cost":
        cost(args.steps)
    else:
        int8(args.steps, args.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
