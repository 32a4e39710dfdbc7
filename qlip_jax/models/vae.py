"""Flax ``AutoencoderKL`` (the Stable Diffusion VAE), NHWC, float only.

``encode(x [B, H, W, Cin] in [-1, 1]) -> (mean, logvar) [B, H/f, W/f, latent]`` (the diagonal
Gaussian posterior; ``logvar`` clipped to [-30, 20] as in diffusers), ``decode(z) -> [B, H, W, Cout]``,
with ``f = 2 ** (len(block_out_channels) - 1)``. The diffusion model works on
:func:`scale_latents` ``(z) = (z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models import io
from qlip_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, norm_fp32
from qlip_jax.models.configs import VAEConfig
from qlip_jax.quant.layers import QConv

Dtype = jnp.dtype


class _MidBlock(nn.Module):
    """``resnets.0 -> attentions.0 (spatial, one head) -> resnets.1``."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        res = lambda name: ResnetBlock2D(c, self.groups, 1e-6, use_temb=False,  # noqa: E731
                                         dtype=self.dtype, name=name)
        x = res("resnets_0")(x, None)
        if self.add_attention:
            x = Attention(1, c, c, qkv_bias=True, norm_groups=self.groups, dtype=self.dtype,
                          name="attentions_0")(x)
        return res("resnets_1")(x, None)


class _Block(nn.Module):
    """``DownEncoderBlock2D`` (resnets, then a stride-2 conv) or ``UpDecoderBlock2D`` (resnets, then
    nearest x2 + conv)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: bool
    up: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, use_temb=False, dtype=self.dtype,
                              name=f"resnets_{j}")(x, None)
        if self.resample and self.up:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        elif self.resample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class _Coder(nn.Module):
    """The encoder (``up=False``: image -> 2 x latent channels) or the decoder (``up=True``)."""

    config: VAEConfig
    up: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
        channels = cfg.block_out_channels[::-1] if self.up else cfg.block_out_channels
        x = QConv(channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(x.astype(dt))
        mid = _MidBlock(g, cfg.mid_block_add_attention, dt, name="mid_block")
        if self.up:
            x = mid(x)
        layers = cfg.layers_per_block + (1 if self.up else 0)
        for i, c in enumerate(channels):
            name = f"{'up' if self.up else 'down'}_blocks_{i}"
            x = _Block(c, layers, g, i < n - 1, self.up, dt, name=name)(x)
        if not self.up:
            x = mid(x)
        x = nn.silu(norm_fp32(nn.GroupNorm(num_groups=g, epsilon=1e-6, dtype=jnp.float32,
                                           name="conv_norm_out"), x, dt))
        out = cfg.out_channels if self.up else 2 * cfg.latent_channels
        return QConv(out, (3, 3), padding=1, dtype=dt, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """``__call__(x, key=None)``: encode, sample the posterior (its mean without ``key``), decode."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = _Coder(cfg, up=False, dtype=self.dtype)
        self.decoder = _Coder(cfg, up=True, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = QConv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = QConv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, H, W, Cin]`` -> ``(mean, logvar)``, each ``[B, H/f, W/f, latent]`` float32."""
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z [B, h, w, latent]`` (unscaled) -> image ``[B, h*f, w*f, Cout]`` float32, about [-1, 1]."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return self.decode(z)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """Draw ``z ~ N(mean, exp(logvar))``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_loss(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed over latent elements, per sample ``[B]``."""
    return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))


def scale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """VAE latents -> diffusion latents: ``(z - shift_factor) * scaling_factor``."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Inverse of :func:`scale_latents`."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _posterior_mean(config: VAEConfig, params, images: jax.Array) -> jax.Array:
    vae = AutoencoderKL(config)
    return vae.apply({"params": params}, images.astype(jnp.float32) / 127.5 - 1.0, method=vae.encode)[0]


def encode_images(config: VAEConfig, params, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 images ``[N, H, W, 3]`` -> VAE posterior means ``float32 [N, h, w, latent]`` (unscaled: see
    :func:`scale_latents`), ``batch`` images per call of one jitted encoder."""
    return np.concatenate([np.asarray(_posterior_mean(config, params, jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


# ----------------------------------------------------------------------------------------------
# Weight I/O

#: Legacy diffusers VAE attention names (e.g. the original SD v1.4 ``vae/``) -> current names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_keys(tensors: dict) -> dict:
    """Map ``...attentions.0.{query,key,value,proj_attn}.*`` to ``to_q/to_k/to_v/to_out.0``."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION and "attentions" in parts:
            key = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        out[key] = value
    return out


def abstract_vae_params(config: VAEConfig) -> dict:
    f = config.downsampling_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x), x)["params"]  # no compile


def load_vae(folder: str, variant: str | None = None) -> tuple[VAEConfig, dict]:
    """Read a diffusers ``vae/`` folder -> ``(config, params)`` (legacy attention names accepted);
    ``variant='fp16'`` reads ``diffusion_pytorch_model.fp16.safetensors``."""
    config = VAEConfig.from_dict(io.read_json(os.path.join(folder, "config.json")),
                                 source=os.path.join(folder, "config.json"))
    tensors = rename_legacy_keys(io.read_safetensors(folder, "diffusion_pytorch_model", variant))
    return config, io.torch_to_flax(tensors, abstract_vae_params(config), source=folder)


def save_vae(folder: str, config: VAEConfig, params: dict, dtype=np.float32) -> None:
    """Write a diffusers-loadable ``vae/`` folder (tensors stored as ``dtype``)."""
    os.makedirs(folder, exist_ok=True)
    io.write_json(os.path.join(folder, "config.json"), config.to_dict())
    io.write_safetensors(io.flax_to_torch(params, dtype=dtype),
                         os.path.join(folder, "diffusion_pytorch_model.safetensors"))
