"""Static mixed precision (issue #42, item 1b): one ``[T, L]`` schedule shared by every prompt, allocated
from per-layer, per-step sensitivities under a cost budget, as MixDQ does.

* :func:`layer_step_errors`: ``[T, L, K]``, the UNet output's mean squared error against float when only
  layer ``l`` runs at candidate ``k`` on the calibration inputs of step ``t`` (every other layer float).
* :func:`allocate`: the schedule of least summed error under a budget (below).
* :func:`static_schedule`: both with BitOPs costs and the budget of a uniform width (e.g. W4A8's).

The problem is a multiple-choice knapsack. Every (step, layer) pair is a group that takes exactly one of
``K`` candidates; candidate ``k`` of group ``(t, l)`` costs ``costs[t, l, k]`` (e.g. BitOPs: MACs x weight
bits x activation bits) and adds ``errors[t, l, k]`` (e.g. the output error measured when only that layer
at that step runs at that width). :func:`allocate` minimises the summed error with the summed cost at most
the budget, by dynamic programming over the cost in integer units:

* costs that are integer multiples of ``unit`` are handled exactly, so the allocation is optimal;
* other costs are rounded to the nearest unit (the roundings of many groups mostly cancel); if the true
  cost of the result exceeds the budget, the program runs again with its capacity lowered by the excess,
  until it fits. The budget always holds; the result is optimal for the rounded costs.

``unit`` defaults to the largest that keeps the exact problem in at most ``max_units`` cells (the gcd of
integer costs when that is small enough), else ``budget slack / max_units``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.ptq.calibration import CalibrationData, nearest_rows
from qlip_jax.quant.registry import layer_bitops
from qlip_jax.quant.state import QuantArgs, QuantSetup


@dataclasses.dataclass(frozen=True)
class Allocation:
    """``choice [T, L]`` candidate indices; ``error`` and ``cost`` their sums (with the given, unrounded
    costs); ``unit`` the cost resolution the program used; ``exact`` whether no cost was rounded."""

    choice: np.ndarray
    error: float
    cost: float
    unit: float
    exact: bool


def _integer_gcd(values: np.ndarray) -> int | None:
    """gcd of ``values`` if all are (non-negative) integers, else None."""
    v = np.unique(np.asarray(values, np.float64))
    if not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or np.any(np.abs(v) >= 2 ** 62):
        return None
    g = 0
    for x in v.astype(np.int64):
        g = math.gcd(g, int(x))
    return g or None


def allocate(errors: np.ndarray, costs: np.ndarray, budget: float, unit: float | None = None,
             max_units: int = 1 << 14) -> Allocation:
    """Minimum total error schedule with total cost <= ``budget``.

    Args:
      errors: ``[T, L, K]`` damage of each candidate (any real numbers; lower is better).
      costs: ``[T, L, K]`` or ``[L, K]`` (the same at every step) non-negative costs.
      budget: the most the whole schedule may cost (same units as ``costs``).
      unit: cost resolution of the program (default: see the module docstring).
      max_units: cells per group of the dynamic program when ``unit`` is chosen here.
    Raises ValueError if even the cheapest candidate everywhere costs more than ``budget``.
    """
    errors = np.asarray(errors, np.float64)
    T, L, K = errors.shape
    costs = np.broadcast_to(np.asarray(costs, np.float64), (T, L, K))
    if np.any(costs < 0) or not np.all(np.isfinite(costs)) or not np.all(np.isfinite(errors)):
        raise ValueError("costs must be finite and >= 0, errors finite")
    e, c = errors.reshape(T * L, K), costs.reshape(T * L, K)
    base = c.min(axis=1)
    slack = float(budget) - float(base.sum())
    if slack < 0:
        raise ValueError(f"the budget {budget:.6g} is below the cheapest schedule's cost {base.sum():.6g}")
    extra = c - base[:, None]                                                   # [G, K] >= 0
    if unit is None:
        g = _integer_gcd(extra)
        unit = float(g) if g is not None and slack / g <= max_units else max(slack / max_units, 1e-300)
    units = np.round(extra / unit).astype(np.int64)
    exact = bool(np.all(np.abs(units * unit - extra) <= 1e-9 * np.maximum(extra, 1.0)))
    rows = np.arange(len(e))
    cap = int(math.floor(slack / unit + 1e-9))
    while True:
        choice = _knapsack(e, units, cap)
        cost = float(c[rows, choice].sum())
        if cost <= budget or cap == 0:
            break
        cap = max(0, cap - int(math.ceil((cost - budget) / unit)))   # the rounding overshot: try less
    return Allocation(choice.reshape(T, L), float(e[rows, choice].sum()), cost, float(unit), exact)


def _knapsack(e: np.ndarray, units: np.ndarray, cap: int) -> np.ndarray:
    """``[G]`` choices minimising ``sum e[g, choice]`` with ``sum units[g, choice] <= cap`` (``units >= 0``)."""
    G, K = e.shape
    best = np.zeros(cap + 1)          # best[b]: least error of the groups so far with extra units <= b
    picks = np.empty((G, cap + 1), np.int8 if K < 128 else np.int32)
    for i in range(G):
        options = np.full((K, cap + 1), np.inf)
        for k in range(K):
            u = units[i, k]
            if u <= cap:
                options[k, u:] = best[:cap + 1 - u] + e[i, k]
        picks[i] = np.argmin(options, axis=0)
        best = options[picks[i], np.arange(cap + 1)]
    choice = np.empty(G, np.int64)
    b = cap
    for i in range(G - 1, -1, -1):
        choice[i] = picks[i, b]
        b -= units[i, choice[i]]
    return choice


def layer_step_errors(unet, unet_params, quant: QuantSetup, data: CalibrationData, num_steps: int,
                      rows_per_call: int = 64) -> np.ndarray:
    """``[T, L, K]`` float64: for sampler step ``t``, layer ``l`` (registry order) and quantized candidate
    ``k``, the mean squared difference between the UNet's output with only that layer at that candidate
    (every other layer float) and the float output, over the calibration inputs of step ``t``
    (``data.step_index == t``, both guidance halves). Steps without calibration inputs copy the nearest
    calibrated step. Every (layer, candidate) pair is one row of the batch (the bit widths are traced per
    row), ``rows_per_call`` rows per UNet call: one compiled program. Params and the quantizer state
    are arguments of it.
    """
    cfg, names = quant.config, quant.registry.names
    L, K = len(names), cfg.num_quantized
    pairs = np.full((L * K, L), cfg.fp_index, np.int32)                      # row l*K + k: layer l at k
    pairs[np.arange(L * K), np.repeat(np.arange(L), K)] = np.tile(np.arange(K), L)

    @jax.jit
    def reference(params, x, t, c):
        return unet.apply({"params": params}, x, t, c).astype(jnp.float32)

    @jax.jit
    def errors_of(params, state, x, t, c, step, idx, ref):                   # rows: pairs x inputs
        q = QuantArgs.from_indices(state, idx, names, cfg, step=step)
        out = unet.apply({"params": params}, x, t, c, q).astype(jnp.float32)
        return jnp.mean((out - ref) ** 2, axis=(1, 2, 3))

    calibrated = sorted(set(int(s) for s in data.step_index))
    per_step = {}
    for s in calibrated:
        rows = np.flatnonzero(data.step_index == s)
        x, t, c = data.latents[rows], data.timesteps[rows], data.context[rows]
        n = len(rows)
        ref = reference(unet_params, x, t, c)
        per = max(1, rows_per_call // n)                                     # pairs per call
        tile = lambda a: jnp.asarray(np.tile(a, (per,) + (1,) * (a.ndim - 1)))  # noqa: E731
        x_p, t_p, c_p, ref_p = tile(x), tile(t), tile(c), jnp.tile(ref, (per, 1, 1, 1))
        step = jnp.full((per * n,), s, jnp.int32)
        out = []
        for i in range(0, L * K, per):
            chunk = pairs[i:i + per]
            m = len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], per - m, axis=0)])   # one shape: one compile
            err = errors_of(unet_params, quant.state, x_p, t_p, c_p, step, jnp.asarray(np.repeat(chunk, n, 0)),
                            ref_p)
            out.append(np.asarray(err, np.float64).reshape(per, n).mean(axis=1)[:m])
        per_step[s] = np.concatenate(out).reshape(L, K)
    return np.stack([per_step[int(r)] for r in nearest_rows(calibrated, num_steps)])


def candidate_bitops(quant: QuantSetup) -> np.ndarray:
    """``[L, K]`` BitOPs of one UNet evaluation of each layer at each quantized candidate."""
    K = quant.config.num_quantized
    idx = np.broadcast_to(np.arange(K)[:, None], (K, len(quant.registry)))
    return np.asarray(layer_bitops(idx, quant.registry, quant.config), np.float64).T


def static_schedule(errors: np.ndarray, quant: QuantSetup, budget_act_bits: int, **kw) -> Allocation:
    """The :func:`allocate` schedule for ``errors [T, L, K]`` whose BitOPs are at most those of the uniform
    schedule at ``budget_act_bits`` (a quantized candidate, e.g. 8 for W4A8's budget)."""
    costs = candidate_bitops(quant)
    k = quant.config.index_of(budget_act_bits)   # raises unless a quantized candidate
    return allocate(errors, costs, errors.shape[0] * costs[:, k].sum(), **kw)
