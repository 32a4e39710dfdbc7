"""How strongly one object shows in a model's diffusion latents, by its size.

    python eval/object_signal.py --n 600

For one-object training scenes, encodes the scene and the same scene without its object (VAE posterior
mean, times the model's ``scaling_factor``: the space the UNet denoises, where the noise at SNR 1 has
unit variance per element) and reports the squared difference: in total, in the cell that changes most
(summed over channels), and how many cells change by more than a quarter of that. A small number would
mean the VAE hides small objects from the diffusion loss; a large one that the loss sees them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from qlip_jax import compile_cache
from qlip_jax.assets import default_model_dir
from qlip_jax.data import scenes
from qlip_jax.errors import program
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.models.vae import encode_images


def latent_change(sd, with_object: np.ndarray, without: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 images ``[N, H, W, 3]`` twice -> squared latent difference per cell ``[N, h, w]`` (scaled
    latents, summed over channels)."""
    scale = sd.configs.vae.scaling_factor
    z = [encode_images(sd.configs.vae, sd.params["vae"], x, batch).astype(np.float64) * scale
         for x in (with_object, without)]
    return ((z[0] - z[1]) ** 2).sum(-1)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--n", type=int, default=600, help="one-object training scenes")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    compile_cache.from_args(args)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    seeds = scenes.split_seeds("train")[:args.n]
    one = [scenes.sample_scene(s, n_objects=1) for s in seeds]
    empty = [dataclasses.replace(sc, objects=(), jitter=()) for sc in one]
    change = latent_change(sd, np.stack([scenes.render(s) for s in one]), np.stack([scenes.render(s) for s in empty]))
    total, peak = change.sum((1, 2)), change.max((1, 2))
    cells = (change > 0.25 * peak[:, None, None]).sum((1, 2))
    h, w = change.shape[1:]
    print(f"model `{sd.folder}`, {args.n} one-object training scenes; latents {h}x{w}x"
          f"{sd.configs.vae.latent_channels}, unit variance per element\n")
    print("| object size | scenes | squared latent change, total | in the cell that changes most | "
          "cells changing > 1/4 of that |\n|---|---|---|---|---|")
    sizes = np.array([sc.objects[0].size for sc in one])
    for size in scenes.SIZES:
        k = sizes == size
        if k.any():
            print(f"| {size} | {k.sum()} | {total[k].mean():.1f} | {peak[k].mean():.1f} | {cells[k].mean():.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
