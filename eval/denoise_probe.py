"""Where along the sampling trajectory a model loses single-object prompts: does it keep an object it is
shown, and does it put one where the caption says?

    python eval/denoise_probe.py --n 60

Both probes read the model's one-step prediction of the clean latent (guided, ``--guidance``, with
``--guidance-rescale`` as the sampler's), decoded:

* keep (single-object prompts of levels 3-4, whose captions state the size): the real scene's latent noised
  to timestep ``t`` (``--timesteps``); the share of predictions in which the scene parser finds an object,
  and their alignment with the caption. A model that renders what it is shown keeps the object up to
  high ``t``; at ``t = 0`` this is the VAE round trip.
* place (single-object prompts of level 4, whose captions state the position): from pure noise at the
  sampler's first timestep, the prediction averaged over ``--draws`` noise draws; the share of its
  deviation from the stated background that falls on the pixels the object covers in the prompt's real
  scene, against the share of the image those pixels are (what a prediction that ignores the stated
  position gets). Where only the caption can say what goes where, this is what the model makes of it.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.data import scenes
from qlip_jax.errors import check_sampling_args, program
from qlip_jax.metrics.parser import SceneParser, alignment_score
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.models.vae import encode_images, scale_latents, unscale_latents
from qlip_jax.sampling import schedulers
from qlip_jax.sampling.guidance import guided_output
from qlip_jax.sampling.pipeline import Text2Image, to_uint8


def clean_predictor(pipe: Text2Image):
    """``predict(latents, t, emb, guidance)``: ``latents [B, h, w, c]`` (scaled, at training timestep ``t``)
    -> the decoded guided prediction of the clean latent, float images ``[B, H, W, 3]`` in about
    ``[-1, 1]``. One jitted function; ``t`` and the guidance scale are traced; the guidance rescale is
    the pipeline's."""
    vae_config = pipe.sd.configs.vae

    @jax.jit
    def run(params, x, t, cond, uncond, guidance):
        out = guided_output(pipe.unet, params["unet"], x, t, cond, uncond, guidance, rescale=pipe.guidance_rescale)
        x0 = schedulers.predicted_x0(pipe.sched, out, x, t)
        return pipe.vae.apply({"params": params["vae"]}, unscale_latents(vae_config, x0), method=pipe.vae.decode)

    def predict(latents, t: int, emb, guidance: float) -> np.ndarray:
        return np.asarray(run(pipe.sd.params, jnp.asarray(latents, jnp.float32), jnp.int32(t), emb.cond,
                              jnp.broadcast_to(emb.uncond, emb.cond.shape), jnp.float32(guidance)))

    return predict


def placement_share(images: np.ndarray, backgrounds: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share ``[N]`` of each image's absolute deviation from its background (mean over RGB) that falls on
    its mask. ``images [N, H, W, 3]`` and ``backgrounds [N, 3]`` on one scale, ``masks [N, H, W]`` bool."""
    dev = np.abs(images - backgrounds[:, None, None, :]).mean(-1)
    return (dev * masks).sum((1, 2)) / np.maximum(dev.sum((1, 2)), 1e-12)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--parser", default=f"{ASSETS}/scene-parser")
    p.add_argument("--n", type=int, default=60, help="prompts per probe (the first held-out ones)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 300, 500, 700, 900])
    p.add_argument("--draws", type=int, default=16, help="noise draws per prompt for the place probe")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescale in [0, 1], as eval/alignment.py's")
    p.add_argument("--seed", type=int, default=0)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_sampling_args(args)
    compile_cache.from_args(args)
    if args.n < 1 or args.draws < 1:
        p.error(f"--n and --draws must be >= 1, got {args.n} and {args.draws}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        p.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    steps = sd.configs.scheduler.num_train_timesteps
    bad = [t for t in args.timesteps if not 0 <= t < steps]
    if bad:
        p.error(f"--timesteps must be in [0, {steps}), got {bad}")
    parser = SceneParser.load(args.parser)
    pipe = Text2Image(sd, "ddim", 25, guidance_rescale=args.guidance_rescale)
    predict = clean_predictor(pipe)
    rng = np.random.default_rng(args.seed)
    evals = [r for r in scenes.prompt_set("eval") if r.n_objects == 1]

    recs = [r for r in evals if r.level in (3, 4)][:args.n]
    real = np.stack([scenes.render(scenes.scene_of(r)) for r in recs])
    z0 = np.asarray(scale_latents(sd.configs.vae, encode_images(sd.configs.vae, sd.params["vae"], real)))
    emb = pipe.encode([r.text for r in recs])
    noise = rng.standard_normal(z0.shape).astype(np.float32)
    print(f"model `{sd.folder}`, guidance {args.guidance}, guidance rescale {args.guidance_rescale}\n\n"
          f"keep: {len(recs)} held-out single-object prompts of "
          f"levels 3-4, their real scene noised to t\n\n| t | SNR | predictions with an object | alignment |\n"
          "|---|---|---|---|")
    abar = sd.configs.scheduler.alphas_cumprod()
    for t in args.timesteps:
        x_t = np.asarray(schedulers.add_noise(pipe.sched, jnp.asarray(z0), jnp.asarray(noise), t))
        images = predict(x_t, t, emb, args.guidance)
        parsed = parser.parse(np.asarray(to_uint8(images)))
        has = np.mean([bool(s.objects) for s in parsed])
        align = np.mean([alignment_score(r.caption, s) for r, s in zip(recs, parsed)])
        print(f"| {t} | {abar[t] / (1 - abar[t]):.4f} | {has:.2f} | {align:.3f} |")

    recs = [r for r in evals if r.level == 4][:args.n]
    t0 = int(np.asarray(pipe.sched.timesteps)[0])
    shares, areas = [], []
    for r in recs:
        scene = scenes.scene_of(r)
        x = rng.standard_normal((args.draws, *pipe.latent_shape)).astype(np.float32)
        mean = predict(x, t0, pipe.encode([r.text] * args.draws), args.guidance).mean(0)
        mask = scenes.object_coverage(scene) > 0.5
        bg = np.asarray(scenes.BACKGROUNDS[scene.background], np.float32) / 127.5 - 1.0
        shares.append(placement_share(mean[None], bg[None], mask[None])[0])
        areas.append(mask.mean())
    print(f"\nplace: {len(recs)} held-out single-object prompts of level 4, clean prediction from pure noise at "
          f"t = {t0}, mean of {args.draws} draws\n\n| deviation from the background on the object's pixels | "
          f"share of the image they are |\n|---|---|\n| {np.mean(shares):.3f} | {np.mean(areas):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
