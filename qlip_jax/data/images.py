"""Image geometry shared by the data sources and the metrics: center crops and the FID resize.

``fid_resize(image, size)`` brings a reference image of any size and aspect ratio to ``size x size`` the way
the guided-diffusion / ADM FID reference batches are made (``center_crop_arr``): halve with a box filter
while the short side is at least ``2 * size``, resize the short side to ``size`` (bicubic), then take the
central ``size x size`` square. The generated images are compared at that size; the Inception network does
its own 299x299 resize afterwards.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop(x: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """``[H, W, C] -> [ch, cw, C]``, the window's top-left at ``((H - ch) // 2, (W - cw) // 2)``; an image
    smaller than the crop is zero-padded around it first (as transformers' image processors do)."""
    ch, cw = crop
    h, w = x.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = x.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top:top + ch, left:left + cw]


def fid_resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Any RGB image -> ``uint8 [size, size, 3]`` (module docstring: ADM's ``center_crop_arr``)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    return center_crop(np.asarray(img, np.uint8), (size, size))
