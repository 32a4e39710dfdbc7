"""Small PNG figures drawn with Pillow (no plotting library among the dependencies): a heatmap with
labelled axes, and scatter/line plots. Enough for reports; not a plotting library.

All functions write ``path`` and return it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qlip_jax.atomic import save_image

_FONT = ImageFont.load_default()
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _viridis(t: np.ndarray) -> np.ndarray:
    """``t [...]`` in [0, 1] -> RGB uint8 ``[..., 3]`` (a coarse viridis-like ramp)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def heatmap(path: str, values: np.ndarray, row_labels: list[str], col_labels: list[str], title: str,
            cell: int = 18, vmin: float | None = None, vmax: float | None = None) -> str:
    """``values [R, C]`` as coloured cells, rows labelled on the left, columns below, a colour scale."""
    values = np.asarray(values, float)
    r, c = values.shape
    lo = np.nanmin(values) if vmin is None else vmin
    hi = np.nanmax(values) if vmax is None else vmax
    left = 8 + 6 * max((len(s) for s in row_labels), default=0)
    top, bottom = 24, 40
    w, h = left + c * cell + 90, top + r * cell + bottom
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill="black", font=_FONT)
    colours = _viridis((values - lo) / max(hi - lo, 1e-12))
    for i in range(r):
        d.text((4, top + i * cell + cell // 2 - 5), row_labels[i], fill="black", font=_FONT)
        for j in range(c):
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=tuple(int(v) for v in colours[i, j]))
    for j, lab in enumerate(col_labels):
        if c <= 30 or j % max(1, c // 15) == 0:
            d.text((left + j * cell + 2, top + r * cell + 4), lab, fill="black", font=_FONT)
    # colour scale
    sx = left + c * cell + 12
    for k in range(r * cell):
        col = tuple(int(v) for v in _viridis(np.array(1 - k / max(r * cell - 1, 1))))
        d.line([sx, top + k, sx + 12, top + k], fill=col)
    d.text((sx + 16, top - 2), f"{hi:.3g}", fill="black", font=_FONT)
    d.text((sx + 16, top + r * cell - 10), f"{lo:.3g}", fill="black", font=_FONT)
    save_image(img, path)
    return path


def _axes(d: ImageDraw.ImageDraw, box, xr, yr, xlabel: str, ylabel: str, title: str):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline="black")
    d.text((x0, 4), title, fill="black", font=_FONT)
    d.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 18), xlabel, fill="black", font=_FONT)
    d.text((4, y0 - 14), ylabel, fill="black", font=_FONT)
    for k in range(5):
        fx, fy = xr[0] + (xr[1] - xr[0]) * k / 4, yr[0] + (yr[1] - yr[0]) * k / 4
        px = x0 + (x1 - x0) * k / 4
        py = y1 - (y1 - y0) * k / 4
        d.text((px - 10, y1 + 4), f"{fx:.3g}", fill="black", font=_FONT)
        d.text((4, py - 5), f"{fy:.3g}", fill="black", font=_FONT)

    def to_px(x, y):
        return (x0 + (x - xr[0]) / max(xr[1] - xr[0], 1e-12) * (x1 - x0),
                y1 - (y - yr[0]) / max(yr[1] - yr[0], 1e-12) * (y1 - y0))
    return to_px


def _range(v: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


def scatter(path: str, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
            title: str, lines: bool = False, size: tuple[int, int] = (480, 360)) -> str:
    """One colour per series ``name -> (x [N], y [N])``; ``lines`` joins each series' points in x order."""
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    box = (60, 30, w - 130, h - 40)
    to_px = _axes(d, box, _range(xs), _range(ys), xlabel, ylabel, title)
    for k, (name, (x, y)) in enumerate(series.items()):
        col = _PALETTE[k % len(_PALETTE)]
        pts = [to_px(a, b) for a, b in sorted(zip(np.asarray(x, float), np.asarray(y, float)))]
        if lines and len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        d.text((w - 122, 34 + 14 * k), name[:20], fill=col, font=_FONT)
    save_image(img, path)
    return path
