"""Quantizable Flax layers: conv, dense and attention matmul.

Each layer takes an optional :class:`~qlip_jax.quant.state.QuantArgs` at call time. Without it the
layer is a plain float layer (no quantization ops in the graph). With it, the layer looks up its own
state and per-sample candidate index by its *registry name*, the PyTorch parameter path derived from
its Flax module path (:func:`qlip_jax.naming.flax_to_torch_path`), and fake-quantizes

* its input activation per tensor, asymmetric, with the scale of each sample's candidate, and
* its kernel per output channel, symmetric, at ``QuantConfig.weight_bits``,

before the float op. Params are stored in float32; ``dtype`` is the compute dtype (e.g. bfloat16 on
TPU): inputs and kernels are cast to it after fake quantization.

Mixed batches. Rows of one batch may run at different candidates. Activation candidates are per-row
selects, which is free. Weights have only two variants (quantized or float, the latter for the
full-precision candidate); when the rows of a batch disagree on that, the layer computes both outputs
and selects per row (``lax.cond``, so the common uniform case costs one op).

Calibration hook. In the float path each layer ``sow``s the min and max of its input(s) into the
``act_stats`` collection; this is free unless the caller makes that collection mutable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlip_jax.naming import flax_to_torch_path
from qlip_jax.quant.fake_quant import fake_quant, fake_quant_or_float
from qlip_jax.quant.state import QuantArgs

Dtype = jnp.dtype

#: Activation values kept per layer call by the ``act_samples`` calibration tap.
ACT_SAMPLES = 2048


def _per_row(v: jax.Array, ndim: int) -> jax.Array:
    """``[B] -> [B, 1, ..., 1]`` with ``ndim`` dims in total."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _quantize_activation(x: jax.Array, scale: jax.Array, zero: jax.Array, idx: jax.Array,
                         q: QuantArgs) -> jax.Array:
    """Per-tensor asymmetric fake quantization of ``x [B, ...]`` at each row's candidate ``idx [B]``."""
    cfg = q.config
    a_bits = jnp.asarray(cfg.act_bits_table())[idx]
    is_fp = idx == cfg.fp_index
    k = jnp.minimum(idx, cfg.num_quantized - 1)  # the fp candidate has no scale of its own
    x32 = x.astype(jnp.float32)
    out = fake_quant_or_float(x32, _per_row(scale[k], x.ndim), _per_row(zero[k], x.ndim),
                              _per_row(a_bits, x.ndim), _per_row(is_fp, x.ndim), signed=False)
    return out


def quantized_weight_op(op: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                        kernel: jax.Array, state: dict, idx: jax.Array, q: QuantArgs,
                        dtype: Dtype) -> jax.Array:
    """Apply ``op(x, kernel)`` with fake-quantized input and kernel.

    Args:
      op: the float op, e.g. a convolution; called with compute-dtype arrays.
      x: ``[B, ...]`` input.
      kernel: float32 kernel whose last axis is the output channel ``O``.
      state: the layer's quantizer state: ``w_scale [O]``, ``a_scale [K]``, ``a_zero [K]``.
      idx: ``[B]`` candidate index per row.
    """
    cfg = q.config
    if idx.shape != (x.shape[0],):
        raise ValueError(f"bit index must have shape [B={x.shape[0]}], got {idx.shape}")
    xq = _quantize_activation(x, state["a_scale"], state["a_zero"], idx, q).astype(dtype)
    wq = fake_quant(kernel, state["w_scale"], 0.0, jnp.float32(cfg.weight_bits), signed=True)
    is_fp = idx == cfg.fp_index
    all_fp, any_fp = jnp.all(is_fp), jnp.any(is_fp)

    def uniform():
        # Every row uses the same weight variant; xq is already exact x on fp rows.
        return op(xq, jnp.where(all_fp, kernel, wq).astype(dtype))

    def mixed():
        y_fp = op(x.astype(dtype), kernel.astype(dtype))
        y_q = op(xq, wq.astype(dtype))
        return jnp.where(_per_row(is_fp, y_q.ndim), y_fp, y_q)

    return jax.lax.cond(jnp.logical_and(any_fp, ~all_fp), mixed, uniform)


class _Quantizable(nn.Module):
    """Mixin: registry name and calibration statistics."""

    @property
    def qname(self) -> str:
        """Registry name: the PyTorch parameter path of this layer."""
        return flax_to_torch_path(self.path)

    def _record_range(self, x: jax.Array, key: str = "input") -> None:
        """Calibration taps (no-ops unless the collection is mutable): the input's ``[min, max]`` in
        ``act_stats``, and ``ACT_SAMPLES`` of its values, drawn uniformly at fixed positions, in
        ``act_samples`` (for clipping searches)."""
        self.sow("act_stats", key, jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32))
        if self.is_mutable_collection("act_samples"):
            pos = jax.random.randint(jax.random.key(0), (ACT_SAMPLES,), 0, x.size)
            self.sow("act_samples", key, x.reshape(-1)[pos].astype(jnp.float32))


class _WeightLayer(_Quantizable):
    """Shared body of :class:`QDense` and :class:`QConv` (fields ``features``, ``use_bias``, ``dtype``)."""

    def _weight_op(self, op, x: jax.Array, kernel: jax.Array, q: QuantArgs | None) -> jax.Array:
        """``op(x, kernel) + bias``: float (recording calibration taps) or fake-quantized."""
        if q is None:
            self._record_range(x)
            y = op(x.astype(self.dtype), kernel.astype(self.dtype))
        else:
            state, idx = q.layer(self.qname)
            y = quantized_weight_op(op, x, kernel, state, idx, q, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class QDense(_WeightLayer):
    """Quantizable ``nn.Dense``: kernel ``[I, O]``, bias ``[O]``; input ``[B, ..., I]``."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            jnp.float32)
        return self._weight_op(jnp.matmul, x, kernel, q)


class QConv(_WeightLayer):
    """Quantizable 2-D convolution, NHWC: kernel ``[kh, kw, I, O]``, bias ``[O]``; input ``[B, H, W, I]``.

    ``padding`` is an int (symmetric) or explicit ``((top, bottom), (left, right))``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: int | Sequence[tuple[int, int]] = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features), jnp.float32)
        pad = ((self.padding, self.padding),) * 2 if isinstance(self.padding, int) else tuple(self.padding)

        def op(a, w):
            return jax.lax.conv_general_dilated(a, w, self.strides, pad,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        return self._weight_op(op, x, kernel, q)


class QMatmul(_Quantizable):
    """Quantizable activation-activation product ``einsum(spec, a, b)`` (attention QK^T or AV).

    Both operands are fake-quantized per tensor, asymmetric, at the row's activation candidate.
    It is quantized only when ``QuantConfig.quantize_attn_matmul`` is set; batch is axis 0 of both.
    """

    spec: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        if q is None or not q.config.quantize_attn_matmul:
            if q is None:
                self._record_range(a, "a")
                self._record_range(b, "b")
            return jnp.einsum(self.spec, a.astype(self.dtype), b.astype(self.dtype))
        state, idx = q.layer(self.qname)
        aq = _quantize_activation(a, state["a_scale"], state["a_zero"], idx, q).astype(self.dtype)
        bq = _quantize_activation(b, state["b_scale"], state["b_zero"], idx, q).astype(self.dtype)
        return jnp.einsum(self.spec, aq, bq)
