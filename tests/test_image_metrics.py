import numpy as np
import pytest

from qlip_jax.metrics.image import psnr, ssim


def _images(seed, shape=(3, 32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_psnr_values():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 10                                      # MSE 100 -> 10 log10(255^2 / 100)
    out = psnr(a, b)
    np.testing.assert_allclose(out[0], 10 * np.log10(255.0 ** 2 / 100.0), rtol=1e-5)
    assert out[1] == 100.0                          # identical: capped


def test_ssim_identical_constant_and_noise():
    a = _images(0)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)
    # constant images: variances and covariance vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = (0.01 * 255) ** 2
    x, y = np.full((1, 20, 20, 3), 80, np.uint8), np.full((1, 20, 20, 3), 120, np.uint8)
    np.testing.assert_allclose(ssim(x, y)[0], (2 * 80 * 120 + c1) / (80 ** 2 + 120 ** 2 + c1), rtol=1e-5)
    # more noise, lower SSIM and PSNR
    rng = np.random.default_rng(1)
    smooth = np.repeat(np.repeat(_images(2, (2, 8, 8, 3)), 4, 1), 4, 2)
    noisy = [np.clip(smooth + rng.normal(0, s, smooth.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    s_vals = [ssim(smooth, n).mean() for n in noisy]
    p_vals = [psnr(smooth, n).mean() for n in noisy]
    assert s_vals[0] > s_vals[1] > s_vals[2]
    assert p_vals[0] > p_vals[1] > p_vals[2]


def test_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_images(0), _images(1, (2, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        ssim(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))
