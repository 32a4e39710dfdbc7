"""Figures of docs/exact.md: stored size of a W4 UNet with integer weight codes, the shipped quantizer's
weights that change with exact codes, and the cost of batch-invariant sampling.

    python benchmarks/exact.py sizes [--config ../shared/configs/sd-v1-4/unet/config.json]
    python benchmarks/exact.py cost [--steps 10]

``sizes``: packed int4 codes + float32 per-channel scales for an SD v1.4-shaped UNet (shapes from
``jax.eval_shape``, nothing allocated) and for the shipped mini SD, and how many of the shipped
quantizer's effective weights differ between the old jitted float32 path (``round(W / s)`` as XLA
evaluates it) and the stored codes. ``cost``: wall time of batched vs batch-invariant W4A8 sampling of
8 prompts on the shipped model (second call, after compilation), the machine's load stated.
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


def cost(steps: int) -> None:
    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
    from qlip_jax.sampling.pipeline import Text2Image

    sd = load_stable_diffusion(default_model_dir())
    quant, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, sd.params["unet"]),
                                sd.params["unet"])
    images, best = {}, {}
    for invariant in (False, True):
        pipe = Text2Image(sd, "ddim", steps, quant=quant, batch_invariant=invariant)
        schedule = pipe.uniform_schedule(len(PROMPTS), 8)
        pipe(pipe.encode(PROMPTS), np.arange(len(PROMPTS)), 5.0, schedule)  # compiles
        times = []
        for _ in range(2):
            t = time.perf_counter()
            images[invariant] = pipe(pipe.encode(PROMPTS), np.arange(len(PROMPTS)), 5.0, schedule)
            times.append(time.perf_counter() - t)
        best[invariant] = min(times)
        print(f"batch_invariant={invariant}: {best[invariant]:.2f} s for {len(PROMPTS)} prompts, {steps} steps "
              f"(best of 2; load {os.getloadavg()[0]:.1f})", flush=True)
    diff = np.abs(images[False].astype(int) - images[True].astype(int)).max()
    print(f"max |batched - batch-invariant| = {diff} uint8 levels; cost ratio {best[True] / best[False]:.2f}")


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["sizes", "cost"])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs",
                                                    "sd-v1-4", "unet", "config.json"))
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    sizes(args.config) if args.what == "sizes" else cost(args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
