"""T2Q (text to quality): predict, from a prompt's pooled text embedding, the normalised quality
``q in (0, 1)`` of the image the full-precision model generates for that prompt.

The paper's form: three linear layers on one text-embedding vector, output normalised to ``[0, 1]``,
regressed with MSE on GIQA labels. Here the last layer's scalar goes through a sigmoid, so the output
is always a valid quality whatever the input (labels are min-max normalised to ``[0, 1]`` upstream).
Which pooling of the CLIP token states the paper uses is not known; the module takes any ``[B, D]``
vector (the caller chooses, e.g. CLIP's EOS state or the token mean).

Also the correlation helpers used to report T2Q: :func:`spearman` (SROCC, ties by average ranks) and
:func:`pearson` (PLCC), in numpy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ACTIVATIONS = {"gelu": nn.gelu, "silu": nn.silu}


class T2Q(nn.Module):
    """``pooled [B, D] -> q [B]`` in ``(0, 1)``: Dense-act-Dense-act-Dense(1)-sigmoid.

    Attributes:
      hidden: width of the two hidden layers.
      activation: ``"gelu"`` or ``"silu"``.

    Params: ``fc1 {kernel [D, H], bias [H]}``, ``fc2 {kernel [H, H], bias [H]}``,
    ``fc3 {kernel [H, 1], bias [1]}``. Computed in float32 whatever the input dtype.
    """

    hidden: int = 128
    activation: str = "gelu"

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"T2Q activation must be one of {sorted(_ACTIVATIONS)}, got '{self.activation}'")
        if pooled.ndim != 2:
            raise ValueError(f"T2Q expects a pooled text embedding [B, D], got shape {pooled.shape}")
        act = _ACTIVATIONS[self.activation]
        x = pooled.astype(jnp.float32)
        x = act(nn.Dense(self.hidden, name="fc1")(x))
        x = act(nn.Dense(self.hidden, name="fc2")(x))
        return jax.nn.sigmoid(nn.Dense(1, name="fc3")(x)[:, 0])


def t2q_loss(params, emb: jax.Array, target: jax.Array, model: T2Q | None = None) -> jax.Array:
    """Mean squared error ``mean_B (T2Q(emb) - target)^2`` (scalar).

    Args:
      params: T2Q params (the tree under ``'params'``).
      emb: ``[B, D]`` pooled text embeddings.
      target: ``[B]`` normalised quality labels in ``[0, 1]``.
      model: the module the params belong to; by default a GELU :class:`T2Q` whose hidden width is
        read off ``params['fc1']['kernel']`` (pass ``model`` for a SiLU one).
    """
    if model is None:
        model = T2Q(hidden=int(params["fc1"]["kernel"].shape[-1]))
    pred = model.apply({"params": params}, emb)
    target = jnp.asarray(target, jnp.float32)
    if target.shape != pred.shape:
        raise ValueError(f"target must have shape {pred.shape} (one label per prompt), got {target.shape}")
    return jnp.mean((pred - target) ** 2)


# ----------------------------------------------------------------------------------------------
# Correlations (numpy)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two sequences of equal length >= 2, got lengths {a.size} and {b.size}")
    return a, b


def average_ranks(x) -> np.ndarray:
    """0-based ranks of ``x [N]``; tied values all get the mean of the positions they occupy."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(x.size, np.float64)
    start = 0
    while start < x.size:
        stop = start + 1
        while stop < x.size and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1)   # mean of positions start..stop-1
        start = stop
    return ranks


def pearson(a, b) -> float:
    """Pearson linear correlation (PLCC) of two ``[N]`` sequences; nan if either is constant."""
    a, b = _pair(a, b)
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (SROCC): Pearson of the average ranks (ties share their mean rank)."""
    a, b = _pair(a, b)
    return pearson(average_ranks(a), average_ranks(b))
