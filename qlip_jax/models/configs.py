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

C = TypeVar("C")

#: Keys written by the libraries for bookkeeping; never configuration.
META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                       "transformers_version", "architectures", "model_type", "dtype", "torch_dtype"})


class ConfigError(ValueError):
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
            "mid_block_type": lambda v: v == "UNetMidBlock2DCrossAttn",
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

    def to_dict(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", **config_to_dict(self)}
