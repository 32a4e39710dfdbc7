"""Static model configs, read from (and written to) the same ``config.json`` diffusers/transformers use.

Each config is a frozen dataclass that lists *every* field the reference library writes, with the
reference default. Reading is strict:

* a key that is not a field of the reference class raises (it is probably a typo or another model);
* a field whose value this implementation does not support (e.g. ``class_embed_type='timestep'``)
  raises naming the field and the value, instead of silently building a different model;
* bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) are accepted and ignored.

Lists become tuples so configs are hashable (usable as static ``jit`` arguments).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from qlip_jax.errors import QlipInputError

C = TypeVar("C")

#: Keys written by the libraries for bookkeeping; never configuration.
META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                       "transformers_version", "architectures", "model_type", "dtype", "torch_dtype"})


class ConfigError(QlipInputError, ValueError):
    """A config.json this implementation cannot honour."""


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def config_from_dict(cls: type[C], d: Mapping[str, Any], *, supported: Mapping[str, Callable[[Any], bool]],
                     ignore: frozenset[str] = frozenset(), source: str = "config") -> C:
    """Strictly build ``cls`` from a reference config dict (see module docstring).

    Args:
      supported: ``{field: predicate}``; a value failing its predicate raises :class:`ConfigError`.
      ignore: extra keys the reference writes that carry no information for us (accepted, dropped).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and k not in META_KEYS and k not in ignore)
    if unknown:
        raise ConfigError(f"{source}: unknown config field(s) {unknown} for {cls.__name__}")
    kwargs = {k: _tuplify(v) for k, v in d.items() if k in fields}
    for name, ok in supported.items():
        if name in kwargs and not ok(kwargs[name]):
            raise ConfigError(f"{source}: unsupported value {name}={kwargs[name]!r} for {cls.__name__}")
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    """Plain JSON-able dict (tuples -> lists) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _is_default(cls, name):
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    return lambda v: v == default


def _int_or_tuple(v):
    return isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(x, int) for x in v))


# ----------------------------------------------------------------------------------------------
# UNet2DConditionModel


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config (Stable Diffusion v1/v2 subset is supported).

    Note the diffusers naming quirk: for SD v1 ``attention_head_dim`` actually holds the *number of
    heads* (8) when ``num_attention_heads`` is unset; :meth:`heads` reproduces it.

    Supported beyond SD v1: SD 2.x's ``use_linear_projection``, per-block head counts and
    ``upcast_attention`` (accepted: in float32 it changes nothing; with a bfloat16 compute dtype ``QK^T``
    stays in bfloat16, whose range does not overflow as float16's does, and the softmax is float32);
    BK-SDM's ``mid_block_type: null`` (no mid block). Any other non-default value is refused by name.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: Any = None
    encoder_hid_dim_type: Any = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Any = None
    addition_embed_type: Any = None
    addition_time_embed_dim: Any = None
    num_class_embeds: Any = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Any = None
    time_embedding_act_fn: Any = None
    timestep_post_act: Any = None
    time_cond_proj_dim: Any = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Any = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Any = None
    cross_attention_norm: Any = None
    addition_embed_type_num_heads: int = 64

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
        must_be_default = [
            "only_cross_attention", "reverse_transformer_layers_per_block", "encoder_hid_dim",
            "encoder_hid_dim_type", "dual_cross_attention", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift",
            "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type",
            "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
            "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
            "mid_block_only_cross_attention", "cross_attention_norm", "center_input_sample",
        ]
        supported = {name: _is_default(cls, name) for name in must_be_default}
        supported |= {
            "act_fn": lambda v: v == "silu",
            "mid_block_type": lambda v: v in ("UNetMidBlock2DCrossAttn", None),  # None: BK-SDM
            "down_block_types": lambda v: all(b in ("CrossAttnDownBlock2D", "DownBlock2D") for b in v),
            "up_block_types": lambda v: all(b in ("CrossAttnUpBlock2D", "UpBlock2D") for b in v),
            "layers_per_block": lambda v: isinstance(v, int),
            "attention_head_dim": _int_or_tuple,
            "num_attention_heads": lambda v: v is None or _int_or_tuple(v),
            "transformer_layers_per_block": _int_or_tuple,
            "conv_in_kernel": lambda v: v % 2 == 1,
            "conv_out_kernel": lambda v: v % 2 == 1,
        }
        cfg = config_from_dict(cls, d, supported=supported, source=source)
        if len(cfg.down_block_types) != len(cfg.block_out_channels) or \
                len(cfg.up_block_types) != len(cfg.block_out_channels):
            raise ConfigError(f"{source}: down_block_types, up_block_types and block_out_channels "
                              "must have the same length")
        return cfg

    def _per_block(self, v) -> tuple:
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    def heads(self) -> tuple[int, ...]:
        """Number of attention heads per down block (diffusers' ``attention_head_dim`` quirk)."""
        return self._per_block(self.num_attention_heads or self.attention_head_dim)

    def transformer_layers(self) -> tuple[int, ...]:
        return self._per_block(self.transformer_layers_per_block)

    @property
    def downsampling_factor(self) -> int:
        """How much the lowest resolution is smaller than the input: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", **config_to_dict(self)}


# ----------------------------------------------------------------------------------------------
# AutoencoderKL


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
        supported = {
            "act_fn": lambda v: v == "silu",
            "down_block_types": lambda v: all(b == "DownEncoderBlock2D" for b in v),
            "up_block_types": lambda v: all(b == "UpDecoderBlock2D" for b in v),
            "latents_mean": lambda v: v is None, "latents_std": lambda v: v is None,
        }
        cfg = config_from_dict(cls, d, supported=supported, source=source)
        if not len(cfg.down_block_types) == len(cfg.up_block_types) == len(cfg.block_out_channels):
            raise ConfigError(f"{source}: down_block_types, up_block_types and block_out_channels "
                              "must have the same length")
        return cfg

    @property
    def downsampling_factor(self) -> int:
        """Image side over latent side, ``f = 2 ** (levels - 1)`` (8 for SD v1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def window_error(self, side: int) -> str | None:
        """Why a square training window of ``side`` pixels does not fit this VAE, or None if it does: it must
        be a multiple of the downsampling factor, from one factor up to ``sample_size``."""
        f = self.downsampling_factor
        if side < f or side % f or side > self.sample_size:
            return (f"a window side must be a multiple of the VAE's downsampling factor {f} between {f} "
                    f"and the image side {self.sample_size}, got {side}")
        return None

    def to_dict(self) -> dict:
        return {"_class_name": "AutoencoderKL", **config_to_dict(self)}


# ----------------------------------------------------------------------------------------------
# CLIPTextModel


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` (the text tower SD conditions on)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    #: keys transformers writes that describe heads/outputs we do not have
    _IGNORED = frozenset({
        "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
        "id2label", "label2id", "problem_type", "output_attentions", "tie_word_embeddings",
        "use_return_dict", "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "finetuning_task", "torchscript",
        "pruned_heads", "tie_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
        "bad_words_ids", "num_beams", "max_length", "min_length", "do_sample", "temperature",
        "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
        "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
        "begin_suppress_tokens", "diversity_penalty", "num_beam_groups", "early_stopping",
        "chunk_size_feed_forward", "use_bfloat16", "_attn_implementation_autoset", "attn_implementation",
    })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "text encoder config") -> "CLIPTextConfig":
        d = dict(d)
        if "text_config" in d:  # a full CLIPModel config: take its text tower
            d = d["text_config"]
        supported = {"hidden_act": lambda v: v in ("quick_gelu", "gelu")}
        return config_from_dict(cls, d, supported=supported, ignore=cls._IGNORED, source=source)

    def to_dict(self) -> dict:
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **config_to_dict(self)}


# ----------------------------------------------------------------------------------------------
# CLIPModel (vision tower + projections, for the CLIP score)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` (ViT image tower of a ``CLIPModel``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "vision config") -> "CLIPVisionConfig":
        supported = {"hidden_act": lambda v: v in ("quick_gelu", "gelu"), "num_channels": lambda v: v == 3}
        ignore = CLIPTextConfig._IGNORED | {"gradient_checkpointing", "vocab_size", "max_position_embeddings",
                                            "pad_token_id", "bos_token_id", "eos_token_id"}
        cfg = config_from_dict(cls, d, supported=supported, ignore=ignore, source=source)
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"{source}: image_size={cfg.image_size} is not a multiple of "
                              f"patch_size={cfg.patch_size}")
        return cfg


#: the architectures a CLIP-score folder may declare
CLIP_ARCHITECTURES = ("CLIPModel",)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: text and vision towers, a shared ``projection_dim`` and the initial
    ``logit_scale`` (the checkpoint's ``logit_scale`` parameter is what is used)."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "CLIP config") -> "CLIPConfig":
        arch = list(d.get("architectures") or [])
        if d.get("model_type") != "clip" or "text_config" not in d or "vision_config" not in d or \
                (arch and not set(arch) & set(CLIP_ARCHITECTURES)):
            raise ConfigError(
                f"{source}: not a transformers CLIPModel (model_type={d.get('model_type')!r}, "
                f"architectures={arch}); the CLIP score needs a CLIPModel folder with both towers and "
                "their projections (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        top = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        top["text_config"] = CLIPTextConfig.from_dict(d["text_config"], source=f"{source} text_config")
        top["vision_config"] = CLIPVisionConfig.from_dict(d["vision_config"], source=f"{source} vision_config")
        ignore = CLIPTextConfig._IGNORED | {"text_config_dict", "vision_config_dict"}
        return config_from_dict(cls, top, supported={}, ignore=ignore, source=source)
