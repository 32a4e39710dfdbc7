"""A quantized forward prepared for a small compiled program: every layer's per-row activation quantizer
looked up at once, and one forward per group of rows that agree on which layers use float weights.

Measured on the shipped model's sampler (DDIM 25, batch 1; see docs/speed.md), the quantized program
compiled 4-6x slower than the float one. Not because of the convolutions: most of it was a dozen
small ops per layer around them, each its own kernel for XLA, and three copies of every op.

* **Per-row quantizer lookups** (:func:`prepare_rows`). Each layer used to gather its rows' scale,
  zero point and bit width from its ``[K]`` (or ``[S, K]``) tables and derive the integer grid
  (``2^bits``) itself. Here that is done for every layer in a few vectorized ops on ``[B, L]``
  arrays; a layer is left with the elementwise fake quantization of its input
  (:func:`~qlip_jax.quant.fake_quant.fake_quant_on_grid`), which fuses into one kernel.
* **Mixed batches** (:func:`apply_by_weight_variant`). A row uses, at each layer, either the
  quantized weights or the float ones (the full-precision candidate). Left to the layers, a batch whose
  rows disagree at a layer computes its op twice and selects per row, behind a ``lax.cond`` in every
  layer so that the usual uniform batch runs one op: a conditional and three copies of the op per layer.
  Here the forward runs inside a ``lax.while_loop``: each iteration takes the float-weight pattern
  ``[L]`` of the first row not yet done, runs the whole forward with that pattern as a per-layer
  *scalar* (``QuantArgs.weight_fp``: one op per layer, on ``where(float_here, kernel, quantized)``),
  and keeps the rows whose pattern it is. A batch whose rows agree (every uniform schedule, every single
  prompt, the two guidance halves of a prompt) takes one iteration; a mixed batch one per distinct
  pattern. Rows are independent in the forward (no cross-row arithmetic in the UNet); rows of another
  pattern are computed with the wrong weights in an iteration and discarded.

Each kept row is computed from the same inputs, by the same operations, at the same batch size as by
the layers' own path, so the images are the same bit for bit (tests/test_prepare.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from qlip_jax.quant.fake_quant import FLOAT_BITS, int_range, round_ste
from qlip_jax.quant.state import QuantArgs

#: Activation operands of a layer: name in ``QuantArgs.rows`` -> (scale, zero point) names in its state.
OPERANDS = {"a": ("a_scale", "a_zero"), "a_skip": ("a_scale_skip", "a_zero_skip"), "b": ("b_scale", "b_zero")}


def float_weight_rows(q: QuantArgs) -> tuple[tuple[str, ...], jax.Array]:
    """Layer names and ``bool [N, L]``: which rows use float weights at each layer."""
    names = tuple(q.idx)
    return names, jnp.stack([q.idx[n] == q.config.fp_index for n in names], axis=1)


def apply_by_weight_variant(fn: Callable[[QuantArgs], jax.Array], q: QuantArgs) -> jax.Array:
    """``fn(q)``, ``[N, ...]`` with rows on axis 0, computed once per group of rows sharing a float-weight
    pattern (see the module docstring). ``fn`` must be row-independent and its layers must read
    ``q.weight_fp``. Without float rows possible (``q.quantized_only``) it is just ``fn(q)``.

    Not differentiable in reverse mode (a while loop); training uses ``quantized_only`` arguments."""
    if q.quantized_only:
        return fn(q)
    names, rows_fp = float_weight_rows(q)                                   # [N, L]
    n = rows_fp.shape[0]

    def run(pattern):
        return fn(q.replace(weight_fp={name: pattern[l] for l, name in enumerate(names)}))

    shape = jax.eval_shape(run, rows_fp[0])

    def body(carry):
        done, out = carry
        pattern = rows_fp[jnp.argmin(done)]                                 # first row not done
        take = jnp.all(rows_fp == pattern, axis=1)                          # [N]
        y = run(pattern)
        out = jnp.where(take.reshape((n,) + (1,) * (y.ndim - 1)), y, out)
        return done | take, out

    init = (jnp.zeros((n,), bool), jnp.zeros(shape.shape, shape.dtype))
    return jax.lax.while_loop(lambda c: ~jnp.all(c[0]), body, init)[1]


def _lookup(tables: list[jax.Array], k: jax.Array, step: jax.Array | None) -> jax.Array | None:
    """``[K]`` (or ``[S, K]`` step) tables of ``n`` layers at per-row candidates ``k [B, n]`` (and steps
    ``step [B]``) -> ``[B, n]``; None when step tables of different lengths (or no step) prevent it."""
    cols = jnp.arange(len(tables))[None, :]
    if all(t.ndim == 1 for t in tables):
        return jnp.stack(tables)[cols, k]                                  # [n, K] -> [B, n]
    lengths = {t.shape[0] for t in tables if t.ndim == 2}
    if step is None or len(lengths) != 1 or any(t.ndim > 2 for t in tables):
        return None
    (s,) = lengths
    stacked = jnp.stack([jnp.broadcast_to(t, (s, t.shape[-1])) for t in tables])   # [n, S, K]
    return stacked[cols, jnp.clip(step, 0, s - 1)[:, None], k]


def prepare_rows(q: QuantArgs) -> QuantArgs:
    """``q`` with ``rows``: each layer's per-row activation quantizer (scale, rounded zero point,
    integer grid, float flag), looked up for all layers at once. The values are those the layers
    compute themselves from ``state`` and ``idx``. Unchanged for straight-through ``mix`` arguments."""
    if q.mix is not None or q.rows is not None:
        return q
    cfg = q.config
    names = tuple(q.idx)
    idx = jnp.stack([q.idx[n] for n in names], axis=1)                      # [B, L]
    a_bits = jnp.asarray(cfg.act_bits_table())[idx]
    use_float = jnp.logical_or(idx == cfg.fp_index, a_bits >= FLOAT_BITS)
    lo, hi = int_range(jnp.where(use_float, 8.0, a_bits), signed=False)    # (as fake_quant_or_float)
    k = jnp.minimum(idx, cfg.num_quantized - 1)  # the fp candidate has no scale of its own
    rows = {n: {"grid": (use_float[:, l], lo[:, l], hi[:, l])} for l, n in enumerate(names)}
    for operand, (scale_key, zero_key) in OPERANDS.items():
        cols = [l for l, n in enumerate(names) if scale_key in q.state[n]]
        if not cols:
            continue
        scale = _lookup([q.state[names[l]][scale_key] for l in cols], k[:, cols], q.step)
        zero = _lookup([q.state[names[l]][zero_key] for l in cols], k[:, cols], q.step)
        if scale is None or zero is None:
            return q  # the layers look up (and report a missing step) themselves
        zp = round_ste(zero)
        for j, l in enumerate(cols):
            rows[names[l]][operand] = (scale[:, j], zp[:, j])
    return q.replace(rows=rows)


def apply_quantized(fn: Callable[[QuantArgs], jax.Array], q: QuantArgs) -> jax.Array:
    """``fn(q)`` for a row-independent quantized forward, as a small program: :func:`prepare_rows`,
    then :func:`apply_by_weight_variant`. Same values as ``fn(q)``."""
    return apply_by_weight_variant(fn, prepare_rows(q))
