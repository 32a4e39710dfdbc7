"""Where a pretraining step's time goes, side by side in one run: the VAE step on whole images and on
``--vae-crop`` windows, and the diffusion step with its parts (text encoder and UNet forward+backward,
the optimizer update), each with XLA's own FLOP count for it.

    python benchmarks/training.py [--preset mini-sd] [--batch 48 32] [--vae-batch 32] [--vae-crop 32] [--repeats 3]

The steps are the ones ``train/pretrain.py`` runs (``make_vae_step``, ``make_diffusion_step``), on
randomly initialised weights of the preset (a step costs the same whatever the weights). Each row: compile
(first call) time, then the median of ``--repeats`` timed calls; ``GFLOP/s`` is XLA's count over the median;
the last column divides by the first diffusion step's median.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sampling import timed

from qlip_jax import compile_cache
from qlip_jax.errors import program


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini-sd")
    p.add_argument("--batch", type=int, nargs="+", default=[48, 32], help="diffusion batch sizes, one block each")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    compile_cache.from_args(args)

    from qlip_jax.models.clip import CLIPTextModel
    from qlip_jax.models.presets import preset
    from qlip_jax.models.sd import configs_from_dicts, init_params
    from qlip_jax.models.unet import UNet2DConditionModel
    from qlip_jax.models.vae import AutoencoderKL
    from qlip_jax.training.diffusion import make_diffusion_step, make_vae_step

    configs = configs_from_dicts(preset(args.preset))
    if (why := configs.vae.window_error(args.vae_crop)):
        p.error(f"--vae-crop: {why}")
    if min(args.batch) < 1 or args.vae_batch < 1 or args.repeats < 1:
        p.error("--batch, --vae-batch and --repeats must be >= 1")
    params = init_params(configs, jax.random.key(0))
    vae, text, unet = AutoencoderKL(configs.vae), CLIPTextModel(configs.text), UNet2DConditionModel(configs.unet)
    key = jax.random.key(1)
    rows = []

    def row(name, fn, *fargs):
        """Time ``fn(*fargs)`` compiled once (the first call includes the compilation), with XLA's FLOP count
        of it (0 where the backend gives none)."""
        compiled = []

        def call():
            if not compiled:
                compiled.append(jax.jit(fn).lower(*fargs).compile())
            return jax.block_until_ready(compiled[0](*fargs))

        first, med = timed(call, args.repeats)
        cost = compiled[0].cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows.append((name, first, med, float((cost or {}).get("flops", 0.0))))

    # stage 1: the VAE step, whole images and windows
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    vae_step = make_vae_step(vae, tx, 1e-5)
    vae_state = {"params": params["vae"], "opt": tx.init(params["vae"]), "step": jnp.int32(0)}
    side = configs.vae.sample_size
    for s in (side, args.vae_crop):
        images = jax.random.uniform(key, (args.vae_batch, s, s, 3), minval=-1.0, maxval=1.0)
        row(f"VAE step, batch {args.vae_batch}, {s}x{s}", lambda st, x: vae_step(st, x, key), vae_state, images)

    # stage 2: the diffusion step and its parts, per batch size
    trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.01))
    state = {"params": trainable, "opt": tx.init(trainable), "ema": trainable, "step": jnp.int32(0)}
    ac = jnp.asarray(configs.scheduler.alphas_cumprod(), jnp.float32)
    step = make_diffusion_step(unet, text, tx, ac, 0.999)
    h = configs.unet.sample_size
    for b in args.batch:
        latents = jax.random.normal(key, (b, h, h, configs.unet.in_channels))
        ids = np.full((b, configs.text.max_position_embeddings), configs.text.eos_token_id, np.int32)
        ids[:, 0], ids[:, 1:13] = configs.text.bos_token_id, 320  # a 12-token caption, then padding
        ids = jnp.asarray(ids)
        t = jnp.arange(b, dtype=jnp.int32) * (1000 // b)
        context, _ = text.apply({"params": params["text_encoder"]}, ids)
        row(f"diffusion step, batch {b}", lambda st, x, i: step(st, x, i, key), state, latents, ids)
        row(f"  text encoder fwd+bwd, batch {b}",
            jax.grad(lambda p_, i: jnp.sum(text.apply({"params": p_}, i)[0])), params["text_encoder"], ids)
        row(f"  UNet fwd+bwd, batch {b}",
            jax.grad(lambda p_, x, c, t_: jnp.sum(unet.apply({"params": p_}, x, t_, c))), params["unet"],
            latents, context, t)
    row("optimizer update (clip + AdamW)",
        lambda st, g: optax.apply_updates(st["params"], tx.update(g, st["opt"], st["params"])[0]), state, trainable)

    base = next(med for name, _, med, _ in rows if name.startswith("diffusion step"))
    print(f"\npreset {args.preset}, {jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}\n")
    print(f"| {'what':36s} | first call (s) | median (s) | GFLOP | GFLOP/s | ratio to first diffusion step |")
    print(f"|{'-' * 38}|----------------|------------|-------|---------|-------------------------------|")
    for name, first, med, flops in rows:
        print(f"| {name:36s} | {first:14.2f} | {med:10.3f} | {flops / 1e9:5.1f} | {flops / 1e9 / med:7.1f} | "
              f"{med / base:29.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
