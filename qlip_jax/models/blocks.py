"""Building blocks shared by the UNet and the VAE (NHWC layout throughout).

Module and attribute names follow diffusers so that params load by the generic rule of
:mod:`qlip_jax.models.io`. Every conv/linear is a :class:`~qlip_jax.quant.layers.QConv` /
:class:`~qlip_jax.quant.layers.QDense`, so the same block is float (``q=None``, the VAE) or
quantizable (the UNet). ``dtype`` is the compute dtype; params are float32; normalisation and
softmax statistics are computed in float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlip_jax.quant.layers import QConv, QDense, QMatmul
from qlip_jax.quant.state import QuantArgs

Dtype = jnp.dtype


def norm_fp32(module: nn.Module, x: jax.Array, dtype: Dtype) -> jax.Array:
    """Apply a LayerNorm/GroupNorm in float32 and return the compute dtype."""
    return module(x.astype(jnp.float32)).astype(dtype)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``resnet_time_scale_shift='default'``).

    ``x [B, H, W, Cin]``, ``temb [B, Ct]`` or None -> ``[B, H, W, out_channels]``.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    split: int = 0  # > 0: x is concat([hidden, skip]) with `split` hidden channels (UNet up blocks)

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, q: QuantArgs | None = None) -> jax.Array:
        norm = lambda name: nn.GroupNorm(num_groups=self.groups, epsilon=self.eps,  # noqa: E731
                                         dtype=jnp.float32, name=name)
        h = nn.silu(norm_fp32(norm("norm1"), x, self.dtype))
        h = QConv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, split=self.split,
                  name="conv1")(h, q)
        if self.use_temb:
            t = QDense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb), q)
            h = h + t[:, None, None, :]
        h = nn.silu(norm_fp32(norm("norm2"), h, self.dtype))
        h = QConv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h, q)
        if x.shape[-1] != self.out_channels:
            x = QConv(self.out_channels, (1, 1), dtype=self.dtype, split=self.split,
                      name="conv_shortcut")(x, q)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` (UNet) or 0, which pads bottom/right by one (VAE encoder)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return QConv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                     name="conv")(x, q)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. ``[B, H, W, C] -> [B, 2H, 2W, out_channels]``."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return QConv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x, q)


class Attention(nn.Module):
    """diffusers ``Attention`` (multi-head, optional cross-attention context).

    ``x [B, N, C]``, ``context [B, M, Cc]`` (None: self-attention) -> ``[B, N, C]``.
    With ``norm_groups`` set (the VAE's spatial attention), ``x`` is ``[B, H, W, C]``: it is
    group-normalised (``group_norm``, eps 1e-6), attended over its ``H*W`` tokens, and added back to
    the input (``residual_connection=True``).
    QK^T and AV go through :class:`QMatmul` (named ``qk`` and ``av``), quantized only when the quant
    config asks for it. Softmax runs in float32 (diffusers' ``upcast_softmax``).

    ``chunk > 0`` (static): memory-efficient attention. Queries are processed ``chunk`` at a time
    (``lax.map`` over query chunks, each rematerialised in the backward pass), so the scores are
    ``[B, heads, chunk, M]`` instead of ``[B, heads, N, M]``; every output row is computed exactly as
    in the full product (softmax over all M keys), so the result equals full attention to float
    rounding. The quantized products keep their semantics: their operands are fake-quantized element by
    element with per-row (per-sample) parameters (:meth:`QMatmul.quantizers`), which chunking along the
    queries does not change. A float pass that records calibration taps (``act_stats``/``act_samples``
    mutable) runs the full product, so the recorded statistics are those of the whole tensors.
    """

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    dtype: Dtype = jnp.float32
    chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 q: QuantArgs | None = None) -> jax.Array:
        if self.norm_groups is not None:
            residual, shape = x, x.shape
            x = norm_fp32(nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-6, dtype=jnp.float32,
                                       name="group_norm"), x, self.dtype)
            x = x.reshape(shape[0], -1, shape[-1])
        context = x if context is None else context
        inner = self.heads * self.dim_head
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        query = split(QDense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x, q))
        key = split(QDense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context, q))
        value = split(QDense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context, q))
        qk = QMatmul("bqhd,bkhd->bhqk", dtype=self.dtype, name="qk")
        av = QMatmul("bhqk,bkhd->bqhd", dtype=self.dtype, name="av")
        taps = q is None and (self.is_mutable_collection("act_stats") or self.is_mutable_collection("act_samples"))
        if self.chunk and self.chunk < query.shape[1] and not taps:
            out = chunked_attention(query, key, value, *qk.quantizers(q), *av.quantizers(q), self.chunk, self.dtype)
        else:
            scores = qk(query, key, q)
            probs = jax.nn.softmax(scores.astype(jnp.float32) / math.sqrt(self.dim_head), axis=-1)
            out = av(probs.astype(self.dtype), value, q)
        out = out.reshape(out.shape[:2] + (inner,))
        out = QDense(self.out_dim, dtype=self.dtype, name="to_out_0")(out, q)
        if self.norm_groups is not None:
            out = out.reshape(shape) + residual
        return out


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array, qk_a, qk_b, av_a, av_b,
                      chunk: int, dtype: Dtype) -> jax.Array:
    """Attention ``softmax(Q K^T / sqrt(d)) V`` over query chunks of ``chunk`` rows.

    ``query [B, N, h, d]``, ``key, value [B, M, h, d]`` -> ``[B, N, h, d]``. ``qk_a, qk_b, av_a, av_b``
    are the element-wise operand maps of the two products (:meth:`QMatmul.quantizers`). ``N`` is padded
    up to a multiple of ``chunk`` (padded rows are dropped). Each chunk is a ``jax.checkpoint``: the
    backward pass recomputes its scores instead of storing ``[B, h, N, M]``.
    """
    b, n, h, d = query.shape
    pad = -n % chunk
    kq, vq = qk_b(key), av_b(value)
    qs = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else query
    qs = jnp.moveaxis(qs.reshape(b, (n + pad) // chunk, chunk, h, d), 1, 0)       # [n/c, B, c, h, d]

    @jax.checkpoint
    def one(qc):
        scores = jnp.einsum("bqhd,bkhd->bhqk", qk_a(qc), kq)
        probs = jax.nn.softmax(scores.astype(jnp.float32) / math.sqrt(d), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", av_a(probs.astype(dtype)), vq)

    out = jnp.moveaxis(jax.lax.map(one, qs), 0, 1).reshape(b, n + pad, h, d)
    return out[:, :n] if pad else out


class GEGLU(nn.Module):
    """``proj`` to 2x width, split, ``a * gelu(b)`` (exact erf GELU, as torch's default)."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        h = QDense(self.dim_out * 2, dtype=self.dtype, name="proj")(x, q)
        a, gate = jnp.split(h, 2, axis=-1)
        return a * nn.gelu(gate.astype(jnp.float32), approximate=False).astype(self.dtype)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0`` (GEGLU), ``net.2`` (Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x, q)
        return QDense(self.dim, dtype=self.dtype, name="net_2")(h, q)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual."""

    dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention_chunk: int = 0  # query chunk of the attentions (0: full), see Attention.chunk

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)  # noqa: E731
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype,  # noqa: E731
                                      chunk=self.attention_chunk, name=name)
        x = x + attn("attn1")(norm_fp32(ln("norm1"), x, self.dtype), None, q)
        x = x + attn("attn2")(norm_fp32(ln("norm2"), x, self.dtype), context, q)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(norm_fp32(ln("norm3"), x, self.dtype), q)
        return x


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` for continuous NHWC input.

    ``x [B, H, W, C]``, ``context [B, M, Cc]`` -> ``[B, H, W, C]``. ``proj_in``/``proj_out`` are 1x1
    convs (SD v1) or linear layers (``use_linear_projection``, SD v2).
    """

    heads: int
    dim_head: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    dtype: Dtype = jnp.float32
    attention_chunk: int = 0  # query chunk of the attentions (0: full), see Attention.chunk

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        h = norm_fp32(nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=jnp.float32, name="norm"),
                  x, self.dtype)
        if self.use_linear_projection:
            h = QDense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c), q)
        else:
            h = QConv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h, q).reshape(b, hgt * wid, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(inner, self.heads, self.dim_head, dtype=self.dtype,
                                      attention_chunk=self.attention_chunk,
                                      name=f"transformer_blocks_{i}")(h, context, q)
        if self.use_linear_projection:
            h = QDense(c, dtype=self.dtype, name="proj_out")(h, q).reshape(b, hgt, wid, c)
        else:
            h = QConv(c, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(b, hgt, wid, inner), q)
        return h + x
