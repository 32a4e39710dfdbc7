"""Flax CLIP (transformers' ``CLIPTextModel``, and ``CLIPModel``'s vision tower and projections), float only.

``ids int [B, T] -> (last_hidden_state [B, T, D], pooled [B, D])``: token + learned position
embeddings, pre-LayerNorm transformer layers with a causal mask (and an optional padding mask),
final LayerNorm, pooled output at the end-of-text token, found as transformers does: the first
position holding ``eos_token_id``, or ``argmax(ids)`` for legacy configs with ``eos_token_id == 2``
(SD v1's text encoder, whose EOS id 49407 is also the largest id).
PyTorch keys carry the ``text_model.`` prefix in SD v1.x folders (not in transformers 5 saves).

:class:`CLIPModel` adds the ViT image tower (``pixels [B, S, S, 3] -> pooled [B, D]``, the same encoder
layers without a mask) and the two projections, for the CLIP score (:mod:`qlip_jax.metrics.clip_score`);
:func:`load_clip` reads a transformers ``CLIPModel`` folder.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models import io
from qlip_jax.models.blocks import norm_fp32
from qlip_jax.models.configs import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

Dtype = jnp.dtype
PREFIX = "text_model."


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """``x [B, T, D]``, additive attention ``bias [B, 1, T, T]``."""
        cfg, dt = self.config, self.dtype
        heads, d = cfg.num_attention_heads, cfg.hidden_size
        dh = d // heads
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)  # noqa: E731
        h = norm_fp32(ln("layer_norm1"), x, dt)
        attn = _SelfAttention(heads, dh, dt, name="self_attn")
        x = x + attn(h, bias)
        h = norm_fp32(ln("layer_norm2"), x, dt)
        mlp = _MLP(cfg.intermediate_size, cfg.hidden_act, dt, name="mlp")
        return x + mlp(h)


class _SelfAttention(nn.Module):
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        d = self.heads * self.dim_head
        dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.dim_head)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:2] + (d,))
        return dense("out_proj")(out)


class _MLP(nn.Module):
    intermediate: int
    act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate, dtype=self.dtype, name="fc1")(x)
        h = _act(self.act, h.astype(jnp.float32)).astype(self.dtype)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class _Embeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding")(
            jnp.arange(ids.shape[1]))
        return tok + pos[None]


class _Encoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, bias)
        return x


class CLIPTextModel(nn.Module):
    """``(ids [B, T], attention_mask [B, T] or None) -> (hidden [B, T, D], pooled [B, D])``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None):
        cfg = self.config
        if ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        t = ids.shape[1]
        neg = jnp.finfo(jnp.float32).min
        bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, neg)[None, None]
        if attention_mask is not None:
            bias = bias + jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg)
            bias = jnp.maximum(bias, neg)
        x = _Embeddings(cfg, name="embeddings")(ids).astype(self.dtype)
        x = _Encoder(cfg, self.dtype, name="encoder")(x, bias)
        x = norm_fp32(nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                                   name="final_layer_norm"), x, jnp.float32)
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(x.shape[0]), eos]
        return x, pooled


# ----------------------------------------------------------------------------------------------
# Weight I/O


def abstract_text_params(config: CLIPTextConfig) -> dict:
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda ids: CLIPTextModel(config).init(jax.random.key(0), ids), ids)["params"]  # no compile


def load_text_encoder(folder: str, variant: str | None = None) -> tuple[CLIPTextConfig, dict]:
    """Read a transformers ``text_encoder/`` folder (``config.json`` + ``model.safetensors``, or
    ``model.<variant>.safetensors``)."""
    config = CLIPTextConfig.from_dict(io.read_json(os.path.join(folder, "config.json")),
                                      source=os.path.join(folder, "config.json"))
    tensors = io.read_safetensors(folder, "model", variant)
    # SD v1.x and transformers 4 checkpoints prefix every key with "text_model."; transformers 5
    # saves CLIPTextModel without it. Both load.
    prefix = PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""
    params = io.torch_to_flax(tensors, abstract_text_params(config), prefix=prefix, source=folder,
                              ignore=lambda k: k.endswith("position_ids"))
    return config, params


def save_text_encoder(folder: str, config: CLIPTextConfig, params: dict, dtype=np.float32) -> None:
    """Write a ``text_encoder/`` folder that ``CLIPTextModel.from_pretrained`` loads (keys in the
    SD v1.x layout, with the ``text_model.`` prefix)."""
    os.makedirs(folder, exist_ok=True)
    io.write_json(os.path.join(folder, "config.json"), config.to_dict())
    io.write_safetensors(io.flax_to_torch(params, prefix=PREFIX, dtype=dtype),
                         os.path.join(folder, "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Vision tower and the full CLIPModel (for the CLIP score)


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels):
        """``pixels [B, S, S, 3]`` -> ``[B, 1 + (S/p)^2, D]``: class token + patch embeddings + positions."""
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding")(pixels)
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.initializer_range), (d,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        n = (cfg.image_size // p) ** 2 + 1
        return x + nn.Embed(n, d, name="position_embedding")(jnp.arange(n))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionTransformer``: ``pixels [B, S, S, 3]`` (normalised, NHWC, ``S =
    image_size``) -> ``(hidden [B, 1 + N, D], pooled [B, D])``; pooled is the post-LayerNorm class token."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array):
        cfg = self.config
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"CLIP vision tower takes [B, {cfg.image_size}, {cfg.image_size}, 3] images, "
                             f"got {pixels.shape}")
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)  # noqa: E731
        x = _VisionEmbeddings(cfg, name="embeddings")(pixels.astype(jnp.float32))
        x = norm_fp32(ln("pre_layrnorm"), x, self.dtype)  # sic: transformers' name
        x = _Encoder(cfg, self.dtype, name="encoder")(x, jnp.zeros((), jnp.float32))
        return x, norm_fp32(ln("post_layernorm"), x[:, 0], jnp.float32)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel``: both towers, ``visual_projection``/``text_projection`` (no bias) and
    ``logit_scale``.

    ``__call__(ids [Bt, T], pixels [Bi, S, S, 3], attention_mask [Bt, T] | None)`` ->
    ``(image_embeds [Bi, P], text_embeds [Bt, P], logits_per_text [Bt, Bi])`` with unit-norm embeddings and
    ``logits_per_text = exp(logit_scale) * text_embeds @ image_embeds.T``.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextModel(cfg.text_config, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), ())

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """``[Bi, S, S, 3] -> [Bi, P]`` (not normalised, as ``get_image_features``)."""
        return self.visual_projection(self.vision_model(pixels)[1]).astype(jnp.float32)

    def text_features(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``[Bt, T] -> [Bt, P]`` (not normalised, as ``get_text_features``)."""
        return self.text_projection(self.text_model(ids, attention_mask)[1]).astype(jnp.float32)

    def __call__(self, ids: jax.Array, pixels: jax.Array, attention_mask: jax.Array | None = None):
        image, text = _unit(self.image_features(pixels)), _unit(self.text_features(ids, attention_mask))
        return image, text, jnp.exp(self.logit_scale) * text @ image.T


def abstract_clip_params(config: CLIPConfig) -> dict:
    v = config.vision_config
    ids = jax.ShapeDtypeStruct((1, config.text_config.max_position_embeddings), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3), jnp.float32)
    return jax.eval_shape(CLIPModel(config).init, jax.random.key(0), ids, pixels)["params"]


def load_clip(folder: str) -> tuple[CLIPConfig, dict]:
    """Read a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``), torch-free.

    Raises ConfigError (one line) for a folder of another architecture (a text-only or vision-only
    tower, SigLIP, ...)."""
    path = os.path.join(folder, "config.json")
    config = CLIPConfig.from_dict(io.read_json(path), source=path)
    tensors = io.read_safetensors(folder, "model")
    params = io.torch_to_flax(tensors, abstract_clip_params(config), source=folder,
                              ignore=lambda k: k.endswith("position_ids"))
    return config, params
