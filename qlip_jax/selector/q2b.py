"""Q2B (quality to bits): from a prompt's predicted quality ``q`` to a bit choice per layer and step.

The paper's form, for quantized layer ``k`` and denoising step ``t`` in step group ``g = t // M``::

    p_q    = sigmoid((q - 0.5) * s_k + o_k)          forced to 1 during the first m steps
    p_m    = sigmoid(p_m_logit[g, k])
    p_h    = sigmoid(p_h_logit[g, k])
    p_low  = (1 - p_q) (1 - p_m)
    p_med  = (1 - p_q) p_m + p_q (1 - p_h)
    p_high = p_q p_h

Read it as a two-level tree: ``p_q`` sends a (layer, step) up (towards med/high) or down (towards
low/med); ``p_h`` splits the upper branch into high vs med, ``p_m`` the lower branch into med vs low.
The three probabilities sum to 1 exactly. The layer's activation width is the argmax among
``(b_low, b_med, b_high)`` (:func:`hard_indices`); training passes the straight-through one-hot
(:func:`ste_onehot`). The schedule depends only on ``(q, t)``: the whole layer x step map is known
before denoising starts.

First m steps. There ``p_q = 1``, so ``p_low = 0`` and the choice is med vs high by ``p_h`` alone:
the early steps, which fix the image layout and text alignment, never get the low width.

Ablations (the paper's Q2B table: FAB "p_q only" 7.57, "p_q + p_h" 6.73, "p_q + p_m" 8.60, full 7.86
with W4A{6,8,10}). Dropping a learnable probability fixes it at the value that removes the branch it
controls:

* ``use_pm=False`` (no p_m): ``p_m = 0``, the lower branch always goes to low:
  ``p_low = 1 - p_q``, ``p_med = p_q (1 - p_h)``, ``p_high = p_q p_h``.
* ``use_ph=False`` (no p_h): ``p_h = 1``, the upper branch always goes to high:
  ``p_low = (1 - p_q)(1 - p_m)``, ``p_med = (1 - p_q) p_m``, ``p_high = p_q``.
* neither ("p_q only"): two-way low vs high by ``p_q``: ``p_low = 1 - p_q``, ``p_med = 0``,
  ``p_high = p_q``.
* both (full): the formulas above.

These are consistent with the reported FAB ordering: without p_m every "down" decision costs the
low width (lowest FAB), without p_h every "up" decision costs the high width (highest FAB), p_q alone
lies in between. (A fixed ``p_m = 0.5`` was rejected: it keeps a three-way choice whose argmax can
never be low, which is not an ablation of a learnable split but a different selector.) The dropped
params are still created, so every variant has the same param tree; they get zero gradient.

Step count at inference. Params are per training step group. Sampling with ``T_inf`` steps, step
``i`` covers training position ``i * T / T_inf`` and reads group
``min(floor(i * T / (T_inf * M)), G - 1)`` (integer arithmetic, exact); it is forced (``p_q = 1``) iff
``i * T / T_inf < m``, i.e. the same leading fraction ``m / T`` of the trajectory. The groups are
resampled by relative position, never refitted: ``T_inf == T`` is the identity, ``T_inf = 2 T`` repeats
each training step twice.

Initialisation. ``s = 4``, ``o = 0``, ``p_m = sigmoid(log 9) = 0.9``, ``p_h = sigmoid(-log 9) = 0.1``.
Since ``p_m = 1 - p_h``, ``p_med = 0.9 (1 - p_q) + 0.9 p_q = 0.9`` for every ``q`` and step (forced
ones included): an untrained (full) Q2B picks the medium width everywhere, i.e. starts as the
uniform-width base quantizer, and training moves layers/steps down or up from there (the gradient
w.r.t. ``s, o`` is not zero: ``p_low`` and ``p_high`` still depend on ``p_q``). ``s = 4`` spreads
``p_q`` over ``[0.12, 0.88]`` for ``q in [0, 1]``, positive so that richer prompts lean to more bits.
In the ablations the untrained choice follows from the fixed values (e.g. "p_q only" at ``q = 0.5``
is a tie, broken towards low).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INIT_S = 4.0
INIT_O = 0.0
INIT_P = 0.9            # initial p_m; initial p_h is 1 - INIT_P


@dataclasses.dataclass(frozen=True)
class Q2BConfig:
    """Static Q2B description (hashable).

    Attributes:
      num_layers: L, quantized layers (registry order).
      num_steps: T, the step count Q2B is trained with.
      group_size: M, consecutive steps sharing ``p_m`` / ``p_h``; ``G = ceil(T / M)`` groups.
      first_fp_steps: m, leading steps whose ``p_q`` is forced to 1.
      low, med, high: candidate indices (into ``QuantConfig.act_bits``; ``K`` would be full
        precision) of b_low, b_med, b_high, e.g. 0, 1, 2 for ``act_bits = (6, 8, 10)``.
      use_pm, use_ph: keep the learnable ``p_m`` / ``p_h`` (see the module docstring for the
        ablations when either is False).
    """

    num_layers: int
    num_steps: int
    group_size: int = 5
    first_fp_steps: int = 2
    low: int = 0
    med: int = 1
    high: int = 2
    use_pm: bool = True
    use_ph: bool = True

    def __post_init__(self):
        for name in ("num_layers", "num_steps", "group_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Q2BConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.first_fp_steps <= self.num_steps:
            raise ValueError(f"Q2BConfig.first_fp_steps must lie in [0, num_steps={self.num_steps}], "
                             f"got {self.first_fp_steps}")
        if min(self.low, self.med, self.high) < 0:
            raise ValueError(f"candidate indices must be >= 0, got low={self.low} med={self.med} "
                             f"high={self.high}")

    @property
    def num_groups(self) -> int:
        """G = ceil(T / M)."""
        return math.ceil(self.num_steps / self.group_size)

    def candidates(self) -> np.ndarray:
        """int32 ``[3]`` candidate indices of (low, med, high)."""
        return np.asarray([self.low, self.med, self.high], np.int32)


def step_groups(cfg: Q2BConfig, num_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map ``T_inf = num_steps`` inference steps onto the training steps.

    Returns:
      ``group`` int32 ``[T_inf]``: the step group whose ``p_m``/``p_h`` each step reads,
      ``min(floor(i * T / (T_inf * M)), G - 1)``;
      ``forced`` bool ``[T_inf]``: ``p_q`` forced to 1 (``i * T / T_inf < m``).
    """
    t_inf = cfg.num_steps if num_steps is None else int(num_steps)
    if t_inf < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = np.arange(t_inf, dtype=np.int64)
    group = np.minimum((i * cfg.num_steps) // (t_inf * cfg.group_size), cfg.num_groups - 1)
    forced = i * cfg.num_steps < cfg.first_fp_steps * t_inf
    return group.astype(np.int32), forced


def q2b_probs(q: jax.Array, s: jax.Array, o: jax.Array, p_m_logit: jax.Array, p_h_logit: jax.Array,
              cfg: Q2BConfig, num_steps: int | None = None) -> jax.Array:
    """The Q2B formulas as a pure function (what :class:`Q2B` computes).

    Args:
      q: ``[B]`` predicted quality.
      s, o: ``[L]`` per-layer slope and offset of ``p_q``.
      p_m_logit, p_h_logit: ``[G, L]`` per step-group logits of ``p_m`` and ``p_h``.
      num_steps: T_inf (static), default the training T.
    Returns:
      ``[B, T_inf, L, 3]`` probabilities of (low, med, high).
    """
    group, forced = step_groups(cfg, num_steps)
    q = jnp.asarray(q, jnp.float32)
    if q.ndim != 1:
        raise ValueError(f"q must have shape [B], got {q.shape}")
    p_q = jax.nn.sigmoid((q[:, None] - 0.5) * s[None, :] + o[None, :])          # [B, L]
    p_q = jnp.where(jnp.asarray(forced)[None, :, None], 1.0, p_q[:, None, :])    # [B, T, L]
    gidx = jnp.asarray(group)
    p_m = jax.nn.sigmoid(p_m_logit[gidx]) if cfg.use_pm else jnp.zeros_like(p_m_logit[gidx])  # [T, L]
    p_h = jax.nn.sigmoid(p_h_logit[gidx]) if cfg.use_ph else jnp.ones_like(p_h_logit[gidx])   # [T, L]
    p_low = (1.0 - p_q) * (1.0 - p_m)
    p_med = (1.0 - p_q) * p_m + p_q * (1.0 - p_h)
    p_high = p_q * p_h
    return jnp.stack([p_low, p_med, p_high], axis=-1)


class Q2B(nn.Module):
    """``(q [B], num_steps T_inf) -> probs [B, T_inf, L, 3]`` over (low, med, high).

    Params: ``s [L]``, ``o [L]``, ``p_m_logit [G, L]``, ``p_h_logit [G, L]`` (see the module
    docstring for formulas, ablations, step resampling and initialisation). ``num_steps`` must be a
    Python int (static under jit); ``None`` means the training T.
    """

    config: Q2BConfig

    @nn.compact
    def __call__(self, q: jax.Array, num_steps: int | None = None) -> jax.Array:
        cfg = self.config
        L, G = cfg.num_layers, cfg.num_groups
        s = self.param("s", nn.initializers.constant(INIT_S), (L,), jnp.float32)
        o = self.param("o", nn.initializers.constant(INIT_O), (L,), jnp.float32)
        logit = math.log(INIT_P / (1.0 - INIT_P))
        p_m_logit = self.param("p_m_logit", nn.initializers.constant(logit), (G, L), jnp.float32)
        p_h_logit = self.param("p_h_logit", nn.initializers.constant(-logit), (G, L), jnp.float32)
        return q2b_probs(q, s, o, p_m_logit, p_h_logit, cfg, num_steps)


def hard_indices(probs: jax.Array, cfg: Q2BConfig) -> jax.Array:
    """int32 ``[B, T, L]`` candidate indices: argmax of ``probs [B, T, L, 3]`` mapped to
    ``(cfg.low, cfg.med, cfg.high)``. Exact ties go to the lower width (first maximum)."""
    return jnp.asarray(cfg.candidates())[jnp.argmax(probs, axis=-1)]


def ste_onehot(probs: jax.Array) -> jax.Array:
    """Straight-through one-hot of ``probs [..., C]``.

    Forward: exactly the one-hot of the argmax (``hard + (p - p)``, no rounding residue).
    Backward: the identity to ``probs``, so ``grad f(ste_onehot(p)) = grad_p f(p)|_{value = one-hot}``.
    """
    hard = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=probs.dtype)
    return hard + (probs - jax.lax.stop_gradient(probs))


def bit_penalty(probs: jax.Array, b_high: float, b_med: float, weights: jax.Array | None = None) -> jax.Array:
    """The paper's bit term ``mean_B sum_{t, k} w_k (b_high p_high + b_med p_med)`` (scalar).

    Args:
      probs: ``[B, T, L, 3]`` Q2B probabilities.
      b_high, b_med: the costs of the high and medium widths (e.g. bits, or bits / b_high).
      weights: optional ``[L]`` per-layer weights (e.g. MACs normalised to mean 1); default 1.
    The low width costs nothing in this term. Callers wanting a depth/step-independent scale divide
    by ``T * L``.
    """
    per = b_high * probs[..., 2] + b_med * probs[..., 1]                      # [B, T, L]
    if weights is not None:
        weights = jnp.asarray(weights, per.dtype)
        if weights.shape != per.shape[-1:]:
            raise ValueError(f"weights must have shape [L={per.shape[-1]}], got {weights.shape}")
        per = per * weights
    return jnp.mean(jnp.sum(per, axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("t2q", "q2b", "num_steps"))
def select_schedule(t2q_params, q2b_params, pooled: jax.Array, t2q: nn.Module, q2b: Q2B,
                    num_steps: int) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings to a bit schedule, jitted (modules and ``num_steps`` static).

    Args:
      t2q_params, q2b_params: the two modules' params (trees under ``'params'``).
      pooled: ``[B, D]`` pooled text embeddings.
      t2q: a :class:`~qlip_jax.selector.t2q.T2Q`; q2b: a :class:`Q2B`.
      num_steps: T_inf of the sampler.
    Returns:
      ``(q [B] float32, schedule int32 [B, T_inf, L])`` of candidate indices.
    Compiles once per (modules, num_steps, input shapes); new prompts of the same batch size reuse it.
    """
    q = t2q.apply({"params": t2q_params}, pooled)
    probs = q2b.apply({"params": q2b_params}, q, num_steps)
    return q, hard_indices(probs, q2b.config).astype(jnp.int32)
