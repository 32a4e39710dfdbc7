"""The static registry of quantized layers, BitOPs accounting, and min-max quantizer-state init.

The registry is read off the model itself: the forward pass is traced abstractly
(``jax.eval_shape``, no FLOPs, no memory) with a Flax method interceptor that records every
:class:`QConv`, :class:`QDense` and :class:`QMatmul` call in execution order, with its MACs per
sample. Execution order is fixed by the config, so the registry is a pure function of (model,
input shape) and a schedule column ``l`` always means the same layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.naming import modules_by_name
from qlip_jax.quant.fake_quant import minmax_act_params, minmax_weight_scale
from qlip_jax.quant.layers import QConv, QDense, QMatmul
from qlip_jax.quant.state import QuantConfig


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantized layer.

    Attributes:
      name: PyTorch parameter path (``down_blocks.0.resnets.0.conv1``); attention matmuls are named
        ``<attention path>.qk`` / ``<attention path>.av``.
      kind: ``"conv"``, ``"linear"`` or ``"matmul"``.
      macs: multiply-accumulates per sample for one forward pass at the registry's input size.
      out_features: output channels (weight layers) or 0 (matmuls).
    """

    name: str
    kind: str
    macs: int
    out_features: int = 0


@dataclasses.dataclass(frozen=True)
class Registry:
    """Ordered quantized layers of one model at one input size (static, hashable)."""

    layers: tuple[LayerInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def macs(self) -> np.ndarray:
        """``[L]`` MACs per sample per forward pass."""
        return np.asarray([l.macs for l in self.layers], np.float64)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"'{name}' is not a quantized layer of this model") from None

    def select(self, predicate: Callable[[LayerInfo], bool]) -> np.ndarray:
        """Indices of the layers matching ``predicate`` (e.g. all cross-attention projections)."""
        return np.asarray([i for i, l in enumerate(self.layers) if predicate(l)], np.int64)


def build_registry(module: nn.Module, *example_args, quantize_attn_matmul: bool = False,
                   **example_kwargs) -> Registry:
    """Trace ``module.init(key, *example_args, **example_kwargs)`` abstractly and list its layers.

    ``example_args`` may be ``jax.ShapeDtypeStruct``s; MACs are per sample of their batch.
    """
    records: dict[str, LayerInfo] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense, QMatmul)):
            return out
        name = mod.qname
        if isinstance(mod, QConv):
            x = args[0]
            kh, kw = mod.kernel_size
            macs = math.prod(out.shape[1:3]) * kh * kw * x.shape[-1] * mod.features
            info = LayerInfo(name, "conv", int(macs), mod.features)
        elif isinstance(mod, QDense):
            x = args[0]
            tokens = math.prod(x.shape[1:-1])
            info = LayerInfo(name, "linear", int(tokens * x.shape[-1] * mod.features), mod.features)
        else:
            if not quantize_attn_matmul:
                return out
            macs = _einsum_macs(mod.spec, args[0].shape, args[1].shape)
            info = LayerInfo(name, "matmul", macs, 0)
        if name in records:
            raise ValueError(f"layer '{name}' is called twice in one forward pass; the registry "
                             "needs each quantized layer to run once")
        records[name] = info
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **example_kwargs), *example_args)
    return Registry(tuple(records.values()))


def _einsum_macs(spec: str, a_shape, b_shape) -> int:
    """MACs per sample of ``einsum(spec, a, b)``: the product of every index size but the batch axis."""
    lhs = spec.replace(" ", "").split("->")[0]
    a_spec, b_spec = lhs.split(",")
    sizes = dict(zip(a_spec, a_shape)) | dict(zip(b_spec, b_shape))
    return int(math.prod(v for k, v in sizes.items() if k != a_spec[0]))


# ----------------------------------------------------------------------------------------------
# Cost accounting


def schedule_bits(schedule: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """Activation and weight bits ``[..., L]`` of a candidate-index array ``[..., L]``."""
    return (jnp.asarray(config.act_bits_table())[schedule],
            jnp.asarray(config.weight_bits_table())[schedule])


def bitops(schedule: jax.Array, registry: Registry, config: QuantConfig,
           evaluations_per_step: int = 1) -> jax.Array:
    """BitOPs per prompt of a schedule.

    ``BitOPs = sum over steps t and layers k of MACs_k * w_bits * a_bits * evaluations_per_step``.
    Weight bits *do* enter: a conv/linear layer counts ``w_bits x a_bits`` (``weight_bits`` for a
    quantized candidate, 32 for full precision); an attention matmul has no weights and counts
    ``a_bits x a_bits`` (both operands are activations). Unquantized ops (norms, softmax,
    nonlinearities, the text encoder and VAE) are not counted, as in the papers' UNet BitOPs.

    Args:
      schedule: int ``[B, T, L]`` candidate indices (or ``[T, L]``, or ``[L]`` for one pass).
      evaluations_per_step: UNet evaluations per step and prompt, 2 with classifier-free guidance.
    Returns:
      float ``[B]`` (or scalar) BitOPs.
    """
    per_layer = layer_bitops(schedule, registry, config)
    axes = tuple(range(1 if schedule.ndim == 3 else 0, schedule.ndim))
    return jnp.sum(per_layer, axis=axes) * evaluations_per_step


def layer_bitops(schedule: jax.Array, registry: Registry, config: QuantConfig) -> jax.Array:
    """BitOPs of each layer of one UNet evaluation under ``schedule`` (``[..., L]`` candidate indices) ->
    ``[..., L]``: ``MACs x a_bits x w_bits`` (``a_bits x a_bits`` for an attention matmul); see :func:`bitops`."""
    a_bits, w_bits = schedule_bits(schedule, config)
    is_matmul = jnp.asarray([l.kind == "matmul" for l in registry.layers])
    second = jnp.where(is_matmul, a_bits, w_bits)
    return jnp.asarray(registry.macs(), jnp.float32) * a_bits * second


def average_act_bits(schedule: jax.Array, config: QuantConfig, registry: Registry | None = None,
                     mac_weighted: bool = False) -> jax.Array:
    """FAB, the average activation bit width of a schedule ``[B, T, L]`` -> ``[B]``.

    Plain mean over (step, layer) by default, as the QLIP paper reports it (full precision counts as
    32); ``mac_weighted=True`` weights each layer by its MACs instead.
    """
    a_bits, _ = schedule_bits(schedule, config)
    if mac_weighted:
        if registry is None:
            raise ValueError("mac_weighted=True needs the registry")
        w = jnp.asarray(registry.macs() / registry.macs().sum(), jnp.float32)
        return jnp.mean(jnp.sum(a_bits * w, axis=-1), axis=-1)
    return jnp.mean(a_bits, axis=(-2, -1))


def uniform_schedule(batch: int, steps: int, registry: Registry, index: int) -> jax.Array:
    """``[B, T, L]`` schedule with every layer at candidate ``index``."""
    return jnp.full((batch, steps, len(registry)), index, jnp.int32)


# ----------------------------------------------------------------------------------------------
# Min-max quantizer state


def concat_splits(module: nn.Module, *example_args, **example_kwargs) -> dict[str, int]:
    """``{layer_name: split}`` for every quantized layer that declares a concatenated input
    (``QConv``/``QDense`` with ``split > 0``: the UNet up blocks' ``concat([hidden, skip])``).

    Traced abstractly like :func:`build_registry` (same arguments).
    """
    found: dict[str, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (QConv, QDense)) and mod.split:
            found[mod.qname] = int(mod.split)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **example_kwargs), *example_args)
    return found


def _stat_range(stats: dict | None, key: str) -> tuple[jax.Array, jax.Array]:
    """``(min, max)`` of one recorded input over every call, or ``[-1, 1]`` without statistics."""
    if stats is None or key not in stats:
        return jnp.float32(-1.0), jnp.float32(1.0)
    s = jnp.stack(stats[key]) if isinstance(stats[key], tuple) else stats[key]
    s = jnp.asarray(s).reshape(-1, 2)
    return jnp.min(s[:, 0]), jnp.max(s[:, 1])


def init_quant_state(params: dict, registry: Registry, config: QuantConfig,
                     act_stats: dict | None = None,
                     splits: dict[str, int] | None = None) -> dict[str, dict[str, jax.Array]]:
    """Min-max quantizer state for every registry layer.

    Weights: symmetric per-output-channel scale from max |w| at ``weight_bits``.
    Activations: asymmetric scale/zero point covering the observed ``[min, max]`` of the layer's
    input (``act_stats`` as collected by an ``apply(..., mutable=['act_stats'])`` of the float
    model), at each candidate's bit width; ``[-1, 1]`` where no statistics are given.

    Split quantization: a layer named in ``splits`` (``{name: channel index}``, see
    :func:`concat_splits`) gets ``a_scale/a_zero`` from its input's first ``split`` channels
    (``input_main``), ``a_scale_skip/a_zero_skip [K]`` from the rest (``input_skip``) and
    ``split`` (int32 scalar).

    Args:
      params: the model's ``params`` collection (the tree under ``'params'``).
      act_stats: the ``act_stats`` collection (tree under ``'act_stats'``), optional.
      splits: layers whose concatenated input gets two activation quantizers (default: none).
    """
    bits = jnp.asarray(config.act_bits, jnp.float32)
    layers = modules_by_name(params)
    stats_by_name = modules_by_name(act_stats) if act_stats is not None else {}
    splits = splits or {}
    state = {}
    for info in registry.layers:
        stats = stats_by_name.get(info.name)

        def act(key):
            return minmax_act_params(*_stat_range(stats, key), bits)

        if info.kind == "matmul":
            (a_s, a_z), (b_s, b_z) = act("a"), act("b")
            state[info.name] = {"a_scale": a_s, "a_zero": a_z, "b_scale": b_s, "b_zero": b_z}
        else:
            layer = layers.get(info.name)
            if layer is None:
                raise KeyError(f"params have no layer '{info.name}'")
            entry = {"w_scale": minmax_weight_scale(layer["kernel"], config.weight_bits)}
            if splits.get(info.name):
                (entry["a_scale"], entry["a_zero"]), (s_s, s_z) = act("input_main"), act("input_skip")
                entry.update(a_scale_skip=s_s, a_zero_skip=s_z, split=jnp.int32(splits[info.name]))
            else:
                entry["a_scale"], entry["a_zero"] = act("input")
            state[info.name] = entry
    return state
