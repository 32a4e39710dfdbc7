"""Full-reference image metrics: PSNR and SSIM of quantized samples against float samples of the
same seeds (how far quantization moved each image).

Both take uint8 images ``[B, H, W, 3]`` and return one value per image ``[B]``.
SSIM follows Wang et al. (2004): Gaussian window 11x11 with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``,
dynamic range 255, computed per channel on the valid region and averaged over channels and pixels
(the definition of ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _as_float(images) -> jax.Array:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {arr.shape}")
    return jnp.asarray(arr, jnp.float32)


def _check_pair(a, b) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"image sets differ in shape: {np.shape(a)} vs {np.shape(b)}")


def psnr(a, b, max_value: float = 255.0, cap: float = 100.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image ``[B]``; identical images give ``cap``."""
    _check_pair(a, b)
    mse = jnp.mean((_as_float(a) - _as_float(b)) ** 2, axis=(1, 2, 3))
    out = 10.0 * jnp.log10(max_value ** 2 / jnp.maximum(mse, 1e-12))
    return np.asarray(jnp.minimum(out, cap))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    g = jnp.asarray(_gaussian_window())
    kernel = jnp.outer(g, g)[:, :, None, None]                        # [11, 11, 1, 1]

    def blur(x):                                                      # [B, H, W, C] valid filter
        b_, h, w, c = x.shape
        y = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2).reshape(b_ * c, h, w, 1), kernel,
                                         (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(b_, c, y.shape[1], y.shape[2]).transpose(0, 2, 3, 1)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(a, b) -> np.ndarray:
    """Structural similarity per image ``[B]`` in ``[-1, 1]`` (1 for identical images)."""
    _check_pair(a, b)
    return np.asarray(_ssim(_as_float(a), _as_float(b)))
