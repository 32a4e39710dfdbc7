"""GIQA: per-image quality of generated images from the density of real features (Gu et al. 2020).

Works on the features of any extractor (Inception pool ``[N, 2048]``, the scene parser's
``[N, 256]``, ...), fitted on real images' features:

* :class:`GIQAKNN`: score = minus the mean Euclidean distance to the ``k`` nearest real features;
* :class:`GIQAGMM`: score = log-likelihood under a Gaussian mixture fitted by EM (numpy only),
  with diagonal or full covariances.

Higher scores mean better (more realistic) images for both. :func:`normalize` maps scores to
``[0, 1]`` against a reference set, by rank (empirical CDF) or min-max.
"""

from __future__ import annotations

import numpy as np

_LOG_2PI = float(np.log(2.0 * np.pi))


def _as_features(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim}-d features, got {x.shape[1]}-d")
    return x


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


class GIQAKNN:
    """KNN-GIQA: ``score(x) = -mean_{i<k} ||x - r_(i)||`` over the ``k`` nearest real features.

    Args:
      real_features: ``[M, D]`` features of real images (M >= k).
      k: number of neighbours.
      chunk: query rows per distance block (bounds memory at ``chunk * M`` floats).
    """

    def __init__(self, real_features: np.ndarray, k: int = 5, chunk: int = 1024):
        self.real = _as_features(real_features, "real_features")
        if not 1 <= k <= self.real.shape[0]:
            raise ValueError(f"k={k} must be in [1, {self.real.shape[0]}] (the number of real features)")
        self.k, self.chunk = int(k), int(chunk)
        self._real_sq = np.sum(self.real ** 2, axis=1)

    def knn_distances(self, features: np.ndarray) -> np.ndarray:
        """``features [N, D]`` -> sorted distances to the k nearest real features ``[N, k]``."""
        x = _as_features(features, "features", self.real.shape[1])
        out = np.empty((x.shape[0], self.k))
        for s in range(0, x.shape[0], self.chunk):
            q = x[s:s + self.chunk]
            d2 = np.sum(q ** 2, 1)[:, None] + self._real_sq[None] - 2.0 * q @ self.real.T
            part = np.partition(d2, self.k - 1, axis=1)[:, :self.k]
            out[s:s + self.chunk] = np.sqrt(np.clip(np.sort(part, axis=1), 0.0, None))
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """``features [N, D]`` -> ``[N]`` scores (higher = closer to real data). Note that a real
        feature scored against its own set finds itself at distance 0 among its k neighbours."""
        return -self.knn_distances(features).mean(axis=1)


class GIQAGMM:
    """GMM-GIQA: ``score(x) = log p(x)`` under a Gaussian mixture fitted to real features by EM.

    Args:
      real_features: ``[M, D]``.
      n_components: mixture size K (<= M).
      seed: seeds the initialisation (means at K distinct random real points, k-means++ style).
      covariance: ``'diag'`` (``[K, D]`` variances) or ``'full'`` (``[K, D, D]``).
      max_iter, tol: EM stops when the mean log-likelihood gains less than ``tol``.
      reg: added to variances / covariance diagonals for stability.

    After fitting, ``log_likelihoods`` lists the mean log-likelihood of the real features before each
    M-step (non-decreasing up to ``reg`` effects), ``weights [K]``, ``means [K, D]``, ``covariances``.
    """

    def __init__(self, real_features: np.ndarray, n_components: int = 8, seed: int = 0,
                 covariance: str = "diag", max_iter: int = 100, tol: float = 1e-5, reg: float = 1e-6):
        x = _as_features(real_features, "real_features")
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        if not 1 <= n_components <= x.shape[0]:
            raise ValueError(f"n_components={n_components} must be in [1, {x.shape[0]}]")
        self.covariance, self.reg, self.dim = covariance, float(reg), x.shape[1]
        self.log_likelihoods: list[float] = []
        self._init(x, n_components, np.random.default_rng(seed))
        for _ in range(max_iter):
            log_resp, ll = self._e_step(x)
            self.log_likelihoods.append(ll)
            if len(self.log_likelihoods) > 1 and abs(ll - self.log_likelihoods[-2]) < tol:
                break
            self._m_step(x, np.exp(log_resp))
        self.converged = len(self.log_likelihoods) < max_iter

    # -- EM --------------------------------------------------------------------------------------

    def _init(self, x: np.ndarray, k: int, rng: np.random.Generator) -> None:
        """k-means++ seeding, then hard assignment to the nearest seed as the first responsibilities."""
        idx = [int(rng.integers(x.shape[0]))]
        d2 = np.sum((x - x[idx[0]]) ** 2, 1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(x.shape[0], 1.0 / x.shape[0])
            idx.append(int(rng.choice(x.shape[0], p=p)))
            d2 = np.minimum(d2, np.sum((x - x[idx[-1]]) ** 2, 1))
        centres = x[idx]
        dist = np.sum(x ** 2, 1)[:, None] + np.sum(centres ** 2, 1)[None] - 2 * x @ centres.T
        resp = np.zeros((x.shape[0], k))
        resp[np.arange(x.shape[0]), np.argmin(dist, 1)] = 1.0
        self._m_step(x, resp)

    def _m_step(self, x: np.ndarray, resp: np.ndarray) -> None:
        nk = resp.sum(0) + 10 * np.finfo(np.float64).eps                    # [K]
        self.weights = nk / nk.sum()
        self.means = resp.T @ x / nk[:, None]                               # [K, D]
        if self.covariance == "diag":
            ex2 = resp.T @ (x ** 2) / nk[:, None]
            self.covariances = np.clip(ex2 - self.means ** 2, 0.0, None) + self.reg
        else:
            covs = np.empty((len(nk), self.dim, self.dim))
            for j in range(len(nk)):
                c = x - self.means[j]
                covs[j] = (resp[:, j, None] * c).T @ c / nk[j] + self.reg * np.eye(self.dim)
            self.covariances = covs

    def _component_log_prob(self, x: np.ndarray) -> np.ndarray:
        """``[N, K]``: ``log w_k + log N(x | mu_k, S_k)``."""
        n, d = x.shape
        if self.covariance == "diag":
            prec = 1.0 / self.covariances                                   # [K, D]
            maha = (x ** 2) @ prec.T - 2 * x @ (self.means * prec).T + np.sum(self.means ** 2 * prec, 1)
            logdet = np.sum(np.log(self.covariances), 1)
        else:
            maha = np.empty((n, len(self.weights)))
            logdet = np.empty(len(self.weights))
            for j, cov in enumerate(self.covariances):
                chol = np.linalg.cholesky(cov)
                y = np.linalg.solve(chol, (x - self.means[j]).T)            # L^-1 (x - mu)
                maha[:, j] = np.sum(y ** 2, 0)
                logdet[j] = 2 * np.sum(np.log(np.diag(chol)))
        return np.log(self.weights) - 0.5 * (d * _LOG_2PI + logdet + np.clip(maha, 0.0, None))

    def _e_step(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        lp = self._component_log_prob(x)
        ll = _logsumexp(lp, axis=1)
        return lp - ll[:, None], float(ll.mean())

    # -- scoring ---------------------------------------------------------------------------------

    def score(self, features: np.ndarray) -> np.ndarray:
        """``features [N, D]`` -> ``[N]`` log-likelihoods (higher = more like the real data)."""
        x = _as_features(features, "features", self.dim)
        return _logsumexp(self._component_log_prob(x), axis=1)


def normalize(scores: np.ndarray, reference: np.ndarray | None = None, method: str = "rank") -> np.ndarray:
    """Map ``scores [N]`` to ``[0, 1]`` against ``reference [M]`` scores (default: ``scores`` itself).

    * ``'rank'``: the empirical CDF of the reference, ``#{ref < s} + #{ref == s} / 2`` over ``M``
      (mid-rank for ties): 0.5 is a median reference image; monotone and robust to outliers.
    * ``'minmax'``: ``(s - min ref) / (max ref - min ref)``, clipped to ``[0, 1]`` (all 0.5 if the
      reference is constant).
    """
    s = np.asarray(scores, np.float64)
    ref = s.ravel() if reference is None else np.asarray(reference, np.float64).ravel()
    if ref.size == 0:
        raise ValueError("empty reference scores")
    if method == "rank":
        ref = np.sort(ref)
        lo = np.searchsorted(ref, s, side="left")
        hi = np.searchsorted(ref, s, side="right")
        return (lo + hi) / (2.0 * ref.size)
    if method == "minmax":
        lo, hi = ref.min(), ref.max()
        if hi <= lo:
            return np.full(s.shape, 0.5)
        return np.clip((s - lo) / (hi - lo), 0.0, 1.0)
    raise ValueError(f"method must be 'rank' or 'minmax', got {method!r}")
