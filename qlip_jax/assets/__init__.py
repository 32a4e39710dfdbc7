"""Files shipped inside the package: the embedded miniature Stable Diffusion (``mini-sd/``, a
diffusers-format folder made by ``train/pretrain.py``) and what later stages trained on it."""

from __future__ import annotations

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))


def default_model_dir() -> str:
    """The embedded miniature SD folder; a clear error if it is absent."""
    path = os.path.join(ASSETS, "mini-sd")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the embedded model is missing from {path}; build it with "
            "`python train/pretrain.py --work runs/pretrain --out qlip_jax/assets/mini-sd`, "
            "or pass --model DIR with a diffusers-format Stable Diffusion folder")
    return path
