"""PNG grids of samples with captions (PIL only)."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qlip_jax.atomic import save_image


def make_grid(images: np.ndarray, captions: list[str] | None = None, cols: int | None = None,
              scale: int = 2, caption_lines: int = 3) -> Image.Image:
    """``images uint8 [N, H, W, 3]`` -> one PIL image, tiles upscaled by ``scale``, captions below."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    cols = cols or min(n, 8)
    rows = -(-n // cols)
    tw, th = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    cap_h = 11 * caption_lines + 4 if captions else 0
    grid = Image.new("RGB", (cols * tw, rows * (th + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * tw, r * (th + cap_h)
        grid.paste(Image.fromarray(images[i]).resize((tw, th), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 2, y + th + 2 + 11 * j), line, fill="black", font=font)
    return grid


def save_grid(path: str, images: np.ndarray, captions: list[str] | None = None, **kw) -> str:
    """Write :func:`make_grid` to ``path`` (format from its extension, e.g. PNG) atomically; creates
    the folder."""
    grid = make_grid(images, captions, **kw)
    return save_image(grid, path)
