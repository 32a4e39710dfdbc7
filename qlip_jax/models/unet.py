"""Flax ``UNet2DConditionModel`` (Stable Diffusion v1/v2 layout), quantizable layer by layer.

Layout is NHWC: ``sample [B, H, W, C]`` (diffusers is NCHW). Module names follow diffusers parameter
paths, so a diffusers ``unet/`` folder loads by the generic rule of :mod:`qlip_jax.models.io`, and
each quantized layer's registry name is its diffusers path.

Every conv and linear layer (``conv_in``, the time-embedding MLP, resnet convs and time projections,
shortcuts, attention projections, feed-forward, ``proj_in``/``proj_out``, down/up-sampler convs,
``conv_out``) is a :class:`~qlip_jax.quant.layers.QConv`/:class:`~qlip_jax.quant.layers.QDense`;
the attention matmuls are :class:`~qlip_jax.quant.layers.QMatmul`. Pass ``q=None`` for the float
model, or a :class:`~qlip_jax.quant.state.QuantArgs` for fake-quantized inference.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models.blocks import (Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D,
                                    norm_fp32)
from qlip_jax.models import io
from qlip_jax.models.configs import UNetConfig
from qlip_jax.quant.layers import QConv, QDense
from qlip_jax.quant.registry import Registry, build_registry
from qlip_jax.quant.state import QuantArgs

Dtype = jnp.dtype


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of ``timesteps [B]`` -> ``[B, dim]`` (diffusers' ``get_timestep_embedding``).

    ``freq_j = exp(-log(max_period) * j / (dim/2 - freq_shift))``; output ``[sin, cos]``, or
    ``[cos, sin]`` with ``flip_sin_to_cos``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class _Block(nn.Module):
    """One down or up block: ``num_layers`` x (resnet [+ transformer]) and an optional resampler.

    Down: returns ``(x, skips)`` with one skip per layer plus one after the downsampler.
    Up: consumes ``skips`` (last first), concatenating each onto the channels before its resnet.
    """

    out_channels: int
    num_layers: int
    cross_attn: bool
    resample: bool
    up: bool
    heads: int
    depth: int
    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    attention_chunk: int = 0

    @nn.compact
    def __call__(self, x, temb, context, skips=None, q: QuantArgs | None = None):
        cfg = self.cfg
        outputs = []
        for j in range(self.num_layers):
            split = x.shape[-1] if self.up else 0  # split quantization of [hidden, skip]
            if self.up:
                x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                              split=split, name=f"resnets_{j}")(x, temb, q)
            if self.cross_attn:
                x = Transformer2DModel(self.heads, self.out_channels // self.heads, self.depth,
                                       cfg.norm_num_groups, cfg.use_linear_projection, dtype=self.dtype,
                                       attention_chunk=self.attention_chunk, name=f"attentions_{j}")(x, context, q)
            outputs.append(x)
        if self.resample and self.up:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, q)
        elif self.resample:
            x = Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x, q)
            outputs.append(x)
        return x, outputs


class UNet2DConditionModel(nn.Module):
    """``(sample [B, H, W, Cin], timesteps [B] or [], context [B, M, D], q) -> [B, H, W, Cout]``.

    ``H`` and ``W`` must be divisible by ``2 ** (len(block_out_channels) - 1)``.

    Memory options (static; the same params and the same function, to float rounding):

    * ``attention_chunk``: query chunk of every attention (0: full ``[B, heads, N, M]`` scores), see
      :class:`~qlip_jax.models.blocks.Attention`.
    * ``remat``: rematerialise every down/up block and the mid block in the backward pass
      (``nn.remat``); the value names the ``jax.checkpoint_policies`` policy (``"nothing_saveable"``:
      keep only each block's inputs; ``"dots_saveable"``: also the matmul/conv outputs). ``""``: off.
      Only differentiated programs (pretraining, reconstruction, Q2B) are affected.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_chunk: int = 0
    remat: str = ""

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 q: QuantArgs | None = None) -> jax.Array:
        cfg, dt = self.config, self.dtype
        n = len(cfg.block_out_channels)
        factor = 2 ** (n - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"sample spatial size {sample.shape[1:3]} must be divisible by {factor}")
        heads, depths = cfg.heads(), cfg.transformer_layers()
        b = sample.shape[0]
        block, mid_block = _Block, UNetMidBlock2DCrossAttn
        if self.remat:
            policy = getattr(jax.checkpoint_policies, self.remat, None)
            if policy is None:
                raise ValueError(f"remat policy '{self.remat}' is not one of jax.checkpoint_policies "
                                 "(e.g. 'nothing_saveable', 'dots_saveable')")
            block, mid_block = (nn.remat(c, policy=policy) for c in (_Block, UNetMidBlock2DCrossAttn))
        chunk = self.attention_chunk

        # time embedding
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb_dim = cfg.block_out_channels[0] * 4
        temb = TimestepEmbedding(temb_dim, dtype=dt, name="time_embedding")(temb.astype(dt), q)

        pad = cfg.conv_in_kernel // 2
        x = QConv(cfg.block_out_channels[0], (cfg.conv_in_kernel,) * 2, padding=pad, dtype=dt,
                  name="conv_in")(sample.astype(dt), q)

        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, outs = block(cfg.block_out_channels[i], cfg.layers_per_block,
                            kind == "CrossAttnDownBlock2D", i < n - 1, False, heads[i], depths[i], cfg,
                            dt, chunk, name=f"down_blocks_{i}")(x, temb, context, None, q)
            skips += outs

        if cfg.mid_block_type is not None:  # None: no mid block (BK-SDM)
            x = mid_block(cfg, heads[-1], depths[-1], dt, chunk, name="mid_block")(x, temb, context, q)

        rev_channels = cfg.block_out_channels[::-1]
        rev_heads, rev_depths = heads[::-1], depths[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            k = cfg.layers_per_block + 1
            block_skips, skips = skips[-k:], skips[:-k]
            x, _ = block(rev_channels[i], k, kind == "CrossAttnUpBlock2D", i < n - 1, True,
                         rev_heads[i], rev_depths[i], cfg, dt, chunk, name=f"up_blocks_{i}")(
                x, temb, context, block_skips, q)

        x = norm_fp32(nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps,
                                   dtype=jnp.float32, name="conv_norm_out"), x, dt)
        x = nn.silu(x)
        pad = cfg.conv_out_kernel // 2
        return QConv(cfg.out_channels, (cfg.conv_out_kernel,) * 2, padding=pad, dtype=dt,
                     name="conv_out")(x, q)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> silu -> linear_2``: ``[B, C0] -> [B, 4 C0]``."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        x = QDense(self.dim, dtype=self.dtype, name="linear_1")(x, q)
        return QDense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x), q)


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnets.0 -> attentions.0 -> resnets.1`` at the lowest resolution."""

    cfg: UNetConfig
    heads: int
    depth: int
    dtype: Dtype = jnp.float32
    attention_chunk: int = 0

    @nn.compact
    def __call__(self, x, temb, context, q: QuantArgs | None = None):
        cfg, c = self.cfg, x.shape[-1]
        res = lambda name: ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps,  # noqa: E731
                                         output_scale_factor=cfg.mid_block_scale_factor,
                                         dtype=self.dtype, name=name)
        x = res("resnets_0")(x, temb, q)
        x = Transformer2DModel(self.heads, c // self.heads, self.depth, cfg.norm_num_groups,
                               cfg.use_linear_projection, dtype=self.dtype,
                               attention_chunk=self.attention_chunk, name="attentions_0")(x, context, q)
        return res("resnets_1")(x, temb, q)


def unet_registry(config: UNetConfig, latent_hw: tuple[int, int], context_shape: tuple[int, int],
                  quantize_attn_matmul: bool = False) -> Registry:
    """Quantized layers of the UNet in execution order, with MACs per sample at ``latent_hw``.

    ``context_shape`` is ``(M, D)`` of the text embedding (77 x 768 for SD v1).
    """
    spec = jax.ShapeDtypeStruct
    return build_registry(UNet2DConditionModel(config),
                          spec((1, *latent_hw, config.in_channels), jnp.float32),
                          spec((1,), jnp.int32), spec((1, *context_shape), jnp.float32),
                          quantize_attn_matmul=quantize_attn_matmul)


def abstract_unet_params(config: UNetConfig, context_dim: int | None = None) -> dict:
    """Param tree of shapes (``ShapeDtypeStruct``s) for ``config``, without computing anything."""
    size = config.downsampling_factor
    spec = jax.ShapeDtypeStruct
    # the key is made inside the traced function: loading a model compiles nothing
    tree = jax.eval_shape(lambda *a: UNet2DConditionModel(config).init(jax.random.key(0), *a),
                          spec((1, size, size, config.in_channels), jnp.float32), spec((1,), jnp.int32),
                          spec((1, 1, context_dim or config.cross_attention_dim), jnp.float32))
    return tree["params"]


#: Memory defaults: attention over more than 1024 tokens (SD v1 at 512x512 has 4096) is chunked into
#: query chunks of this many rows ...
ATTENTION_CHUNK = 256
#: ... and rematerialise trained UNets whose widest level has at least this many channels (SD v1: 1280;
#: the embedded model: 128).
REMAT_CHANNELS = 512


def default_attention_chunk(latent_hw: tuple[int, int]) -> int:
    """Query chunk the programs use unless told otherwise: :data:`ATTENTION_CHUNK` when the largest
    attention has more than 1024 tokens, else 0 (full attention: the embedded model is unchanged)."""
    return ATTENTION_CHUNK if latent_hw[0] * latent_hw[1] > 1024 else 0


def default_remat(config: UNetConfig) -> str:
    """Remat policy of differentiated programs unless told otherwise: ``nothing_saveable`` for UNets
    as wide as SD's (:data:`REMAT_CHANNELS`), off ("") for smaller ones."""
    return "nothing_saveable" if max(config.block_out_channels) >= REMAT_CHANNELS else ""


def load_unet(folder: str, variant: str | None = None, dtype=np.float32) -> tuple[UNetConfig, dict]:
    """Read a diffusers ``unet/`` folder (``config.json`` + safetensors) -> ``(config, params)``;
    ``variant='fp16'`` reads ``diffusion_pytorch_model.fp16.safetensors``.

    ``dtype``: of the params (None: as stored, so a float16 folder served with 16-bit compute is never
    copied to float32)."""
    config = UNetConfig.from_dict(io.read_json(f"{folder}/config.json"), source=f"{folder}/config.json")
    tensors = io.read_safetensors(folder, "diffusion_pytorch_model", variant)
    return config, io.torch_to_flax(tensors, abstract_unet_params(config), source=folder, dtype=dtype)


def save_unet(folder: str, config: UNetConfig, params: dict, dtype=np.float32) -> None:
    """Write a diffusers-loadable ``unet/`` folder (tensors stored as ``dtype``)."""
    os.makedirs(folder, exist_ok=True)
    io.write_json(f"{folder}/config.json", config.to_dict())
    io.write_safetensors(io.flax_to_torch(params, dtype=dtype),
                         f"{folder}/diffusion_pytorch_model.safetensors")
