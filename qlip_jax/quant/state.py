"""Quantizer configuration, per-layer quantizer state, and the arguments a quantized forward pass takes.

Vocabulary
----------
* **Candidates.** A :class:`QuantConfig` names K activation bit widths ``act_bits`` (e.g. ``(6, 8, 10)``)
  that every quantized layer can choose among, plus one extra candidate, index ``K``, that is full
  precision (float weights *and* activations, bit-exact). Weights use ``weight_bits`` for every
  quantized candidate, as in QLIP (weights stay at 4 bits, only activation precision adapts).
  An activation width of 32 means "float activations, quantized weights" (e.g. BK-SDM's W4A32).
* **Quantizer state.** A pytree ``{layer_name: {...}}`` kept apart from the model params, so that
  calibration can learn it while params stay frozen. Per conv/linear layer:
  ``w_scale [O]`` (symmetric, per output channel), ``a_scale [K]`` and ``a_zero [K]`` (asymmetric,
  per tensor, one pair per candidate). Per attention matmul (QK^T or AV): ``a_scale, a_zero`` for the
  left operand and ``b_scale, b_zero`` for the right one, each ``[K]``.
  Optional extra arrays of a layer live in the same dict:

  - ``w_round`` (kernel-shaped, int8 0/1): AdaRound's learned rounding (``qdiff``); the weight is
    ``w_scale * clip(floor(W / w_scale) + w_round, qmin, qmax)`` instead of round-to-nearest.
  - ``a_scale_skip, a_zero_skip [K]`` and ``split`` (int32 scalar): split quantization of an input
    that is ``concat([hidden, skip])``: channels ``[split:]`` use the ``_skip`` pair.
  - Step tables (TDQ): any activation pair may be ``[S, K]`` instead of ``[K]``, one row per sampler
    step; the quantized forward then needs ``QuantArgs.step`` and reads row ``clip(step, 0, S - 1)``.
* **Bit index.** ``idx[name]`` is an int array ``[B]``: which candidate each sample of the batch uses
  at this layer. A schedule ``[B, T, L]`` (prompt, step, layer in registry order) is sliced per step
  to ``[B, L]`` and turned into that dict by :meth:`QuantArgs.from_indices`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.errors import BadArgument
from qlip_jax.quant.fake_quant import FLOAT_BITS, int_range, round_ste


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Static description of the candidate precisions (hashable, safe as a static jit argument).

    Attributes:
      act_bits: activation bit width of each quantized candidate; candidate ``K = len(act_bits)`` is
        full precision. A value of 32 keeps activations in float for that candidate.
      weight_bits: weight bit width shared by all quantized candidates (per output channel, symmetric).
      quantize_attn_matmul: also quantize both operands of the attention matmuls QK^T and AV.
    """

    act_bits: tuple[int, ...] = (6, 8, 10)
    weight_bits: int = 4
    quantize_attn_matmul: bool = False

    def __post_init__(self):
        object.__setattr__(self, "act_bits", tuple(int(b) for b in self.act_bits))
        if not self.act_bits:
            raise BadArgument("QuantConfig.act_bits must name at least one candidate bit width",
                              "give at least one activation width")
        for b in (*self.act_bits, self.weight_bits):
            if not 2 <= int(b) <= FLOAT_BITS:
                raise BadArgument(f"bit width {b} outside the supported range [2, {FLOAT_BITS}]",
                                  f"use widths from 2 to {FLOAT_BITS}")

    @property
    def num_quantized(self) -> int:
        """K: number of quantized candidates."""
        return len(self.act_bits)

    @property
    def fp_index(self) -> int:
        """Index of the full-precision candidate (== K)."""
        return len(self.act_bits)

    @property
    def num_candidates(self) -> int:
        """K + 1 (the quantized candidates and full precision)."""
        return len(self.act_bits) + 1

    def act_bits_table(self) -> np.ndarray:
        """``[K + 1]`` activation bits per candidate index; full precision counts as 32."""
        return np.asarray([*self.act_bits, FLOAT_BITS], np.float32)

    def weight_bits_table(self) -> np.ndarray:
        """``[K + 1]`` weight bits per candidate index; full precision counts as 32."""
        return np.asarray([self.weight_bits] * self.num_quantized + [FLOAT_BITS], np.float32)

    def index_of(self, act_bits: int | str) -> int:
        """Candidate index of an activation width, or of ``"fp"``. Raises if it is not a candidate."""
        if act_bits == "fp":
            return self.fp_index
        if act_bits not in self.act_bits:
            raise ValueError(f"activation bit width {act_bits} is not a candidate; candidates are "
                             f"{self.act_bits} and 'fp'")
        return self.act_bits.index(act_bits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s): {sorted(unknown)}")
        return cls(**d)


@flax.struct.dataclass
class QuantArgs:
    """What a quantized forward pass receives (a pytree; ``config`` is static).

    Attributes:
      state: ``{layer_name: {array_name: array}}`` quantizer state (see module docstring).
      idx: ``{layer_name: int32 [B]}`` candidate index per sample, ``0 <= idx <= K``.
      config: the static :class:`QuantConfig`.
      mix: optional ``{layer_name: float [B, K]}`` straight-through weights over the quantized
        candidates (selector training, :meth:`from_mix`): the activation becomes
        ``sum_k mix[:, k] * Q_k(x)``; with one-hot forward values this is exactly candidate ``idx``.
      step: optional int32 ``[B]`` sampler step index of each row (step-dependent quantizers: TDQ
        ``[S, K]`` tables are read at row ``step``). A scalar is broadcast to every row.
      quantized_only: static promise that no row uses the full-precision candidate, so weight layers
        skip the float/quantized weight select (a smaller graph, e.g. for reconstruction training).
      int8: static: conv/linear rows whose candidate has at most 8 activation bits run a real integer
        product (int8 activations x int8 weight codes, int32 accumulation, one float rescale; see
        :func:`qlip_jax.quant.layers.integer_weight_op`) instead of the float simulation.
      prepared: optional ``{layer_name: float32 [12 B + 2]}`` per-row quantizer parameters of every
        layer, computed at once by :func:`prepare_rows` (``from_indices(..., prepare=True)``, or the
        sampler for all its steps before its loop); layers then read them (:func:`unpack_row`)
        instead of looking their rows up themselves.
    """

    state: dict[str, dict[str, jax.Array]]
    idx: dict[str, jax.Array]
    config: QuantConfig = flax.struct.field(pytree_node=False)
    mix: dict[str, jax.Array] | None = None
    step: jax.Array | None = None
    quantized_only: bool = flax.struct.field(pytree_node=False, default=False)
    int8: bool = flax.struct.field(pytree_node=False, default=False)
    prepared: dict[str, dict[str, jax.Array]] | None = None

    @classmethod
    def from_indices(cls, state: dict, indices: jax.Array, layer_names: tuple[str, ...],
                     config: QuantConfig, step: jax.Array | None = None,
                     quantized_only: bool = False, int8: bool = False, prepare: bool = False) -> "QuantArgs":
        """Build from an index array ``[B, L]`` whose columns follow ``layer_names`` (registry order).

        ``step``: the sampler step (int scalar or ``[B]``), needed by step-table (TDQ) states.
        ``int8``: the integer path for candidates of at most 8 bits (see the class docstring).
        ``prepare``: compute every layer's per-row quantizer parameters here, in a few vectorized
        operations over all layers (:func:`prepare_rows`), instead of in each layer: the same forward
        values with a much smaller compiled program (for inference; gradients with respect to the
        state's step sizes are not those of the layers' own path, see :func:`prepare_rows`).
        """
        if indices.ndim != 2 or indices.shape[1] != len(layer_names):
            raise ValueError(f"bit indices must have shape [B, L={len(layer_names)}], got {indices.shape}")
        check_indices(indices, config)
        if quantized_only and not isinstance(indices, jax.core.Tracer) and np.any(
                np.asarray(indices) == config.fp_index):
            raise ValueError("quantized_only=True but some bit index is the full-precision candidate")
        indices = jnp.asarray(indices).astype(jnp.int32)
        step = _rows(step, indices.shape[0])
        return cls(state=state, idx={n: indices[:, l] for l, n in enumerate(layer_names)},
                   config=config, step=step, quantized_only=quantized_only, int8=int8,
                   prepared=prepare_rows(state, indices, layer_names, config, step) if prepare else None)

    @classmethod
    def from_mix(cls, state: dict, mix: jax.Array, layer_names: tuple[str, ...], config: QuantConfig,
                 step: jax.Array | None = None) -> "QuantArgs":
        """Build from weights ``mix [B, L, K]`` over the quantized candidates (no full-precision column:
        every row uses the quantized weights). The hard index is the argmax."""
        if mix.ndim != 3 or mix.shape[1:] != (len(layer_names), config.num_quantized):
            raise ValueError(f"mix weights must have shape [B, L={len(layer_names)}, "
                             f"K={config.num_quantized}], got {mix.shape}")
        idx = jnp.argmax(mix, axis=-1).astype(jnp.int32)
        return cls(state=state, idx={n: idx[:, l] for l, n in enumerate(layer_names)}, config=config,
                   mix={n: mix[:, l] for l, n in enumerate(layer_names)}, step=_rows(step, mix.shape[0]),
                   quantized_only=True)

    def layer_mix(self, name: str) -> jax.Array | None:
        """``[B, K]`` straight-through weights of a layer, or None."""
        return None if self.mix is None else self.mix[name]

    def layer(self, name: str) -> tuple[dict[str, jax.Array], jax.Array]:
        """State dict and ``[B]`` index of one layer, with a clear error if either is missing."""
        if name not in self.state:
            raise KeyError(f"quantizer state has no entry for layer '{name}'")
        if name not in self.idx:
            raise KeyError(f"bit indices have no entry for layer '{name}'")
        return self.state[name], self.idx[name]


#: Activation quantizers of a layer's state: ``prefix -> (scale key, zero-point key)``.
ACT_QUANTIZERS = {"a": ("a_scale", "a_zero"), "a_skip": ("a_scale_skip", "a_zero_skip"), "b": ("b_scale", "b_zero")}


#: Layout of a layer's prepared row vector (:func:`prepare_rows`): ``field -> offset in units of B``;
#: the scalars ``all_fp`` and ``mixed`` follow at offsets ``12 B`` and ``12 B + 1``.
ROW_FIELDS = {f"{p}_{k}": 3 * i + j for i, p in enumerate(ACT_QUANTIZERS) for j, k in enumerate(("s", "r", "zp"))}
ROW_FIELDS.update(hi=9, fp=10, w_fp=11)
_FILLER = {"s": 1.0, "r": 1.0, "zp": 0.0}


def prepare_rows(state: dict, indices: jax.Array, layer_names: tuple[str, ...], config: QuantConfig,
                 step: jax.Array | None) -> dict[str, jax.Array]:
    """Every layer's per-row quantizer parameters, for bit indices ``indices [B, L]``, at once.

    What each layer's own path (:func:`qlip_jax.quant.layers._quantize_activation`) computes per
    layer from its ``[K]`` / ``[S, K]`` tables and its ``idx [B]`` (gathers, ``2 ** bits``, the
    reciprocal of the step, the full-precision tests), here as a handful of ``[L, B]`` operations
    over all layers. Returns ``{layer_name: v}``, ``v`` a float32 vector ``[12 B + 2]`` (read with
    :func:`unpack_row`) holding, per row (``[B]`` each):

    * per activation quantizer ``p`` (``a``, ``a_skip``, ``b``: :data:`ACT_QUANTIZERS`; 1, 1, 0 where
      the layer has none): ``p_s`` the step, ``p_r = 1 / p_s``, ``p_zp`` the zero point rounded (STE);
    * ``hi``: upper clip bound ``2 ** bits - 1`` (8 bits where ``fp``, to keep it finite);
    * ``fp``: the activation passes unquantized (the full-precision candidate, or a 32-bit width);
    * ``w_fp``: the row uses the float kernel (full-precision candidate);

    and the scalars ``all_fp`` (every row uses the float kernel) and ``mixed`` (some but not all do).

    The quantizer then computes ``(clip(round(x * r) + zp, 0, hi) - zp) * s``: XLA CPU evaluates the
    layers' ``x / s`` (a division by a broadcast step) as ``x * (1 / s)`` too, so the values are the
    same bit for bit (tests/test_prepared.py). Gradients with respect to ``s`` are mathematically,
    not bitwise, those of ``x / s``: use the layers' own path (the default) to train step sizes.

    One vector per layer so that, handed to the layers as separate buffers (the sampler carries them
    through its step loop), each layer's kernels read their parameters at the same offsets: XLA CPU
    compiles structurally identical kernels once, so layers of the same shapes then share kernels.
    """
    b = indices.shape[0]
    cfg = config
    f32 = jnp.float32
    names = [n for n in layer_names if n in state]
    if not names:
        return {}
    col = {n: l for l, n in enumerate(layer_names)}
    idx_t = indices.T[np.asarray([col[n] for n in names])]                     # [L, B]
    bits = jnp.asarray(cfg.act_bits_table())[idx_t]                          # [L, B]
    w_fp = idx_t == cfg.fp_index
    fp = jnp.logical_or(w_fp, bits >= FLOAT_BITS)
    _, hi = int_range(jnp.where(fp, 8.0, bits), signed=False)
    any_fp, all_fp = jnp.any(w_fp, axis=1), jnp.all(w_fp, axis=1)            # [L]
    mixed = jnp.logical_and(any_fp, ~all_fp)
    k_all = jnp.minimum(idx_t, cfg.num_quantized - 1)   # the fp candidate has no scale of its own
    row_of = {n: i for i, n in enumerate(names)}
    # one stack per table shape: [K] tables, and [S, K] step tables per S
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for n in names:
        for prefix, (sk, zk) in ACT_QUANTIZERS.items():
            if sk in state[n]:
                groups.setdefault((jnp.shape(state[n][sk]), jnp.shape(state[n][zk])), []).append((n, prefix))
    # the groups' [G, B] results concatenated, a filler row (1, 1, 0) last; each field of each quantizer
    # prefix is then one gather of rows in layer order (no per-layer slices before the final ones)
    pos = {p: np.full(len(names), -1) for p in ACT_QUANTIZERS}
    res: dict[str, list] = {"s": [], "r": [], "zp": []}
    offset = 0
    for (shape, _), members in groups.items():
        scale = jnp.stack([jnp.asarray(state[n][ACT_QUANTIZERS[p][0]], f32) for n, p in members])  # [G, (S,) K]
        zero = jnp.stack([jnp.asarray(state[n][ACT_QUANTIZERS[p][1]], f32) for n, p in members])
        k = k_all[np.asarray([row_of[n] for n, _ in members])]                         # [G, B]
        if len(shape) == 2:
            if step is None:
                raise ValueError(f"this quantizer has per-step activation scales [S={shape[0]}, K] (a TDQ "
                                 "state); the call needs the sampler step index: "
                                 "QuantArgs.from_indices(..., step=i)")
            row = jnp.clip(step, 0, shape[0] - 1)                                   # [B]
            scale, zero = scale[:, row], zero[:, row]                                 # [G, B, K]
        elif len(shape) == 1:
            scale = jnp.broadcast_to(scale[:, None], (len(members), b, shape[0]))
            zero = jnp.broadcast_to(zero[:, None], (len(members), b, shape[0]))
        else:
            raise ValueError(f"activation quantizer parameters must be [K] or [S, K], got shape {shape}")
        sv = jnp.take_along_axis(scale, k[..., None], axis=2)[..., 0]                # [G, B]
        res["s"].append(sv)
        res["r"].append(1.0 / sv)
        res["zp"].append(round_ste(jnp.take_along_axis(zero, k[..., None], axis=2)[..., 0]))
        for g, (n, p) in enumerate(members):
            pos[p][row_of[n]] = offset + g
        offset += len(members)
    parts = []
    for p in ACT_QUANTIZERS:
        rows = np.where(pos[p] < 0, offset, pos[p])
        for key in ("s", "r", "zp"):
            cat = jnp.concatenate(res[key] + [jnp.full((1, b), _FILLER[key], f32)])  # [sum G + 1, B]
            parts.append(cat[rows])                                                  # [L, B]
    parts += [hi.astype(f32), fp.astype(f32), w_fp.astype(f32), all_fp.astype(f32)[:, None],
              mixed.astype(f32)[:, None]]
    table = jnp.concatenate(parts, axis=1)                                         # [L, 12 B + 2]
    return {n: table[i] for i, n in enumerate(names)}


def unpack_row(v: jax.Array, batch: int) -> dict[str, jax.Array]:
    """A layer's :func:`prepare_rows` vector -> ``{field: [B]}`` (booleans for ``fp``, ``w_fp``) and the
    scalars ``all_fp``, ``mixed``: the same static slices for every layer."""
    d = {k: v[o * batch:(o + 1) * batch] for k, o in ROW_FIELDS.items()}
    d["fp"], d["w_fp"] = d["fp"] != 0, d["w_fp"] != 0
    d["all_fp"], d["mixed"] = v[12 * batch] != 0, v[12 * batch + 1] != 0
    return d


def _rows(step, batch: int):
    """``None``, a scalar or ``[B]`` step index -> ``None`` or int32 ``[B]``."""
    if step is None:
        return None
    return jnp.broadcast_to(jnp.asarray(step, jnp.int32), (batch,))


def check_indices(indices: Any, config: QuantConfig) -> None:
    """Raise a clear error if concrete indices fall outside ``[0, K]`` (no-op for traced arrays)."""
    if isinstance(indices, jax.core.Tracer):
        return
    arr = np.asarray(indices)
    if not np.issubdtype(arr.dtype, np.integer):
        raise BadArgument(f"bit indices must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > config.fp_index):
        bad = arr[(arr < 0) | (arr > config.fp_index)].ravel()[:5].tolist()
        raise BadArgument(
            f"bit index out of the candidate set: found {bad}; valid indices are 0..{config.fp_index} "
            f"(activation bits {config.act_bits} and {config.fp_index} = full precision)")


@dataclasses.dataclass
class QuantSetup:
    """A calibrated quantizer for one UNet: static config and registry, and the state pytree.

    ``registry`` is a :class:`~qlip_jax.quant.registry.Registry` (its layer order defines the
    schedule's ``L`` axis). ``info`` is free-form provenance (calibration method, options, logs); it is
    not part of the quantizer. ``ptqd`` is an optional output correction applied by the sampler
    (:class:`~qlip_jax.sampling.correction.PTQDCorrection`, method ``ptqd``); it is kept apart from ``state``,
    which holds one entry per layer only.
    """

    config: QuantConfig
    registry: Any
    state: dict
    info: dict = dataclasses.field(default_factory=dict)
    ptqd: Any = None
