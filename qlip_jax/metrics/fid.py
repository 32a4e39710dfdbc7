"""Fréchet distance between Gaussian fits of two feature sets: FID, sFID, and any domain FID.

* FID: :func:`qlip_jax.metrics.inception.inception_features` ``pool [N, 2048]``;
* sFID: the same function's ``spatial [N, 2023]`` (``mixed_6/conv`` first 7 channels);
* the scene domain's FID: :meth:`qlip_jax.metrics.parser.SceneParser.features` ``[N, 256]``.

The distance ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` is computed in float64 without
scipy: ``tr (S1 S2)^(1/2)`` is the sum of the square roots of the eigenvalues of the symmetric PSD
matrix ``S1^(1/2) S2 S1^(1/2)`` (similar to ``S1 S2``), so two symmetric eigen-decompositions
suffice and no complex ``sqrtm`` is involved. Rank-deficient covariances (fewer samples than
dimensions) are fine; if round-off still gives a clearly negative or non-finite spectrum, ``eps * I``
is added to both covariances and the trace recomputed, as pytorch-fid does.

Reference statistics (e.g. of the real images) are cached with :func:`save_stats` /
:func:`load_stats` in an ``.npz`` carrying a ``tag`` naming the feature extractor and preprocessing;
loading refuses a file whose tag or dimension differs from what the caller expects.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from qlip_jax.atomic import atomic_write
from qlip_jax.errors import MismatchError

STATS_FORMAT = 1


class StatsMismatchError(MismatchError):
    """Cached statistics do not belong to the features they are compared with."""


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set: ``mean [D]``, ``cov [D, D]`` (unbiased, ``ddof=1``), ``n``."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """``features [N, D]`` (N >= 2) -> stats, in float64."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"expected features [N, D], got shape {f.shape}")
        if f.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
        mean = f.mean(axis=0)
        centred = f - mean
        cov = centred.T @ centred / (f.shape[0] - 1)
        return cls(mean, cov, int(f.shape[0]))


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> tuple[float, bool]:
    """``tr (s1 s2)^(1/2)`` and whether the spectrum was clean (finite, no clearly negative value)."""
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    if not np.all(np.isfinite(w)):
        return float("nan"), False
    clean = w.min() >= -1e-6 * max(abs(w).max(), 1e-30)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum()), bool(clean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu1 [D], sigma1 [D, D])`` and ``N(mu2, sigma2)``.

    ``eps``: offset added to both diagonals when the product's spectrum is non-finite or clearly
    negative (pytorch-fid's fallback for near-singular covariances). The result is clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape}")
    tr_covmean, clean = _trace_sqrt_product(s1, s2)
    if not clean:
        offset = eps * np.eye(d)
        tr_covmean, _ = _trace_sqrt_product(s1 + offset, s2 + offset)
        if not np.isfinite(tr_covmean):
            raise FloatingPointError("Fréchet distance: covariance product has a non-finite spectrum")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    if a.dim != b.dim:
        raise StatsMismatchError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, eps)


def fid_from_features(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussian fits of ``a [N, D]`` and ``b [M, D]``
    (FID for Inception pool features, sFID for spatial features)."""
    return fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b), eps)


def fid_features_vs_stats(features: np.ndarray, stats: FeatureStats, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussian fit of ``features [N, D]`` and ``stats`` (e.g. cached
    reference statistics); equal to ``fid_from_stats(FeatureStats.from_features(features), stats)``.

    With fewer samples than dimensions (``N <= D``: 64 generated images, 2048-d Inception features),
    ``S_f = A^T A`` with ``A = (features - mean) / sqrt(N - 1)`` has rank below ``N``, and the nonzero
    eigenvalues of ``S_f^(1/2) S_r S_f^(1/2)`` are those of the ``[N, N]`` matrix ``A S_r A^T``: one
    small symmetric eigen-decomposition instead of two ``[D, D]`` ones (seconds -> milliseconds).
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
    if f.shape[1] != stats.dim:
        raise StatsMismatchError(f"feature dimensions differ: {f.shape[1]} vs {stats.dim}")
    if f.shape[0] > f.shape[1]:
        return fid_from_stats(FeatureStats.from_features(f), stats, eps)
    mean = f.mean(axis=0)
    a = (f - mean) / np.sqrt(f.shape[0] - 1)
    m = a @ stats.cov @ a.T
    w = np.linalg.eigvalsh((m + m.T) / 2)
    if not np.all(np.isfinite(w)):
        raise FloatingPointError("Fréchet distance: covariance product has a non-finite spectrum")
    diff = mean - stats.mean
    fd = diff @ diff + np.sum(a * a) + np.trace(stats.cov) - 2.0 * np.sqrt(np.clip(w, 0.0, None)).sum()
    return float(max(fd, 0.0))


def save_stats(path: str, stats: FeatureStats, tag: str) -> None:
    """Write ``stats`` to ``path`` (``.npz``) with a ``tag`` such as ``'fid-inception-pool3'``."""
    if not tag:
        raise ValueError("a non-empty tag naming the feature extractor is required")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_write(path, "wb") as f:  # a file object: np.savez would otherwise append '.npz'
        np.savez(f, mean=stats.mean, cov=stats.cov, n=np.int64(stats.n), tag=np.str_(tag),
                 format=np.int64(STATS_FORMAT))


def load_stats(path: str, tag: str | None = None, dim: int | None = None) -> FeatureStats:
    """Read stats written by :func:`save_stats`.

    Args:
      tag: if given, the file's tag must equal it.
      dim: if given, the feature dimension must equal it.
    Raises:
      FileNotFoundError; StatsMismatchError on a different tag or dimension, or a malformed file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature statistics not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if not {"mean", "cov", "n", "tag"} <= keys:
            raise StatsMismatchError(f"{path} is not a feature-statistics file (keys {sorted(keys)})")
        mean, cov, n, file_tag = z["mean"], z["cov"], int(z["n"]), str(z["tag"])
    if tag is not None and file_tag != tag:
        raise StatsMismatchError(f"{path} holds statistics tagged '{file_tag}', expected '{tag}': "
                                 "they come from another feature extractor or preprocessing")
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise StatsMismatchError(f"{path}: malformed statistics, mean {mean.shape}, cov {cov.shape}")
    if dim is not None and mean.shape[0] != dim:
        raise StatsMismatchError(f"{path} holds {mean.shape[0]}-d statistics (tag '{file_tag}'), "
                                 f"expected {dim}-d")
    return FeatureStats(mean.astype(np.float64), cov.astype(np.float64), n)


def stats_tag(path: str) -> str:
    """The tag stored in a stats file."""
    with np.load(path, allow_pickle=False) as z:
        return str(z["tag"])
