"""Uniform fake quantization with a *traced* bit width.

Everything here is a pure function of arrays. The number of bits is an ordinary (traced) array, so
one compiled program serves every precision: ``2 ** bits`` is computed at run time, never baked into
the graph.

Gradients
---------
* Rounding uses the straight-through estimator (STE): ``round_ste(v) = v + stop_gradient(round(v) - v)``.
* The step size gets the LSQ gradient (Esser et al., 2020) automatically: writing the quantizer as
  ``s * (clip(round_ste(x / s) + z, lo, hi) - z)``, autodiff gives ``round(x/s) - x/s`` inside the
  range and the clip bound outside it, which is exactly LSQ's step-size gradient (without LSQ's
  optional gradient scale, which an optimiser can apply).
* ``x`` gets the identity inside the clipping range and zero outside (clipped STE).

Exactness of full precision
---------------------------
A float "candidate" is never emulated by rounding with 2**31 levels: callers *select* the
unquantized value (``jnp.where``), see :func:`fake_quant_or_float`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Bit widths at or above this are treated as "not quantized" (float) by :func:`fake_quant_or_float`.
FLOAT_BITS = 32


def round_ste(v: jax.Array) -> jax.Array:
    """Round to nearest with a straight-through (identity) gradient."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def int_range(bits: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Integer grid ``[lo, hi]`` for a (traced) bit width.

    signed (symmetric, weights): ``[-2^(b-1), 2^(b-1) - 1]``; unsigned (asymmetric, activations):
    ``[0, 2^b - 1]``.
    """
    bits = jnp.asarray(bits, jnp.float32)
    if signed:
        hi = jnp.exp2(bits - 1.0) - 1.0
        return -hi - 1.0, hi
    return jnp.zeros_like(bits), jnp.exp2(bits) - 1.0


def fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: jax.Array,
               *, signed: bool) -> jax.Array:
    """Quantize-dequantize ``x`` on a uniform grid.

    ``q = clip(round(x / scale) + round(zero_point), lo, hi)``; returns ``(q - round(zero_point)) * scale``.

    Args:
      x: any shape.
      scale: step size, broadcastable to ``x`` (e.g. ``[O]`` per output channel or ``[B, 1, 1, 1]``
        per sample); must be > 0.
      zero_point: offset in integer units, broadcastable to ``x`` (0 for symmetric). Stored as a float
        and rounded with STE, so it can be learned.
      bits: bit width, broadcastable to ``x``; traced.
      signed: symmetric signed grid (weights) or unsigned asymmetric grid (activations).
    """
    lo, hi = int_range(bits, signed)
    zp = round_ste(zero_point)
    q = jnp.clip(round_ste(x / scale) + zp, lo, hi)
    return (q - zp) * scale


def fake_quant_or_float(x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: jax.Array,
                        use_float: jax.Array, *, signed: bool) -> jax.Array:
    """:func:`fake_quant`, but the exact input where ``use_float`` (or ``bits >= FLOAT_BITS``) holds.

    ``use_float`` broadcastable to ``x`` (e.g. ``[B, 1, 1, 1]``): a select, so full precision is
    bit-exact and costs no rounding error.
    """
    use_float = jnp.logical_or(use_float, jnp.asarray(bits) >= FLOAT_BITS)
    # Keep the quantized branch finite where the float branch is selected (bits may be 32 there).
    safe_bits = jnp.where(use_float, 8.0, jnp.asarray(bits, jnp.float32))
    return jnp.where(use_float, x, fake_quant(x, scale, zero_point, safe_bits, signed=signed))


def minmax_weight_scale(w: jax.Array, bits: int | jax.Array, channel_axis: int = -1) -> jax.Array:
    """Symmetric per-output-channel step size from the channel's max |w|.  Returns ``[O]``."""
    axes = tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
    amax = jnp.max(jnp.abs(w), axis=axes)
    _, hi = int_range(jnp.asarray(bits), signed=True)
    return jnp.maximum(amax, 1e-8) / hi


def minmax_act_params(xmin: jax.Array, xmax: jax.Array, bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Asymmetric step size and zero point covering ``[xmin, xmax]`` (the range always includes 0).

    Shapes broadcast: e.g. ``xmin, xmax`` scalars and ``bits [K]`` give ``scale, zero_point [K]``.
    """
    xmin = jnp.minimum(xmin, 0.0)
    xmax = jnp.maximum(xmax, 0.0)
    _, hi = int_range(bits, signed=False)
    scale = jnp.maximum(xmax - xmin, 1e-8) / hi
    return scale, -xmin / scale


# ----------------------------------------------------------------------------------------------
# AdaRound (Nagel et al., 2020): learned up/down rounding of weights

#: Stretch of AdaRound's rectified sigmoid: ``h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``.
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def adaround_fake_quant(w: jax.Array, scale: jax.Array, rounding: jax.Array, bits: jax.Array) -> jax.Array:
    """Symmetric weight quantization with an explicit rounding decision.

    ``scale * clip(floor(w / scale) + rounding, lo, hi)``; ``rounding`` has the shape of ``w``, with
    values in ``{0, 1}`` (the hard decision: down or up) or in ``[0, 1]`` (AdaRound's soft relaxation,
    differentiable in ``rounding``). ``rounding = (w / scale - floor(w / scale) >= 0.5)`` is
    round-to-nearest (up to ties).
    """
    lo, hi = int_range(bits, signed=True)
    base = jax.lax.stop_gradient(jnp.floor(w / scale))
    return jnp.clip(base + rounding.astype(jnp.float32), lo, hi) * scale


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """AdaRound's ``h(V)`` in ``[0, 1]`` (exactly 0 or 1 beyond a finite ``|V|``)."""
    return jnp.clip(jax.nn.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def adaround_init(w: jax.Array, scale: jax.Array) -> jax.Array:
    """``V`` with ``h(V) = w / scale - floor(w / scale)``: the soft rounding starts at the float weight."""
    frac = w / scale - jnp.floor(w / scale)
    p = (frac - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA)
    return jnp.log(p) - jnp.log1p(-p)


def adaround_regularizer(v: jax.Array, beta: jax.Array) -> jax.Array:
    """``sum(1 - |2 h(V) - 1| ** beta)``: zero only when every ``h(V)`` is 0 or 1 (anneal ``beta`` down)."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)
