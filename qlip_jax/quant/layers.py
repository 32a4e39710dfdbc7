"""Quantizable Flax layers: conv, dense and attention matmul.

Each layer takes an optional :class:`~qlip_jax.quant.state.QuantArgs` at call time. Without it the
layer is a plain float layer (no quantization ops in the graph). With it, the layer looks up its own
state and per-sample candidate index by its *registry name*, the PyTorch parameter path derived from
its Flax module path (:func:`qlip_jax.naming.flax_to_torch_path`), and fake-quantizes

* its input activation per tensor, asymmetric, with the scale of each sample's candidate, and
* its kernel per output channel, symmetric, at ``QuantConfig.weight_bits`` (read as integer codes times
  scales once calibrated, see :func:`quantize_weight`),

before the float op. Params are stored in float32; ``dtype`` is the compute dtype (e.g. bfloat16 on
TPU): inputs and kernels are cast to it after fake quantization.

Mixed batches. Rows of one batch may run at different candidates. Activation candidates are per-row
selects, which is free. Weights have only two variants (quantized or float, the latter for the
full-precision candidate); when the rows of a batch disagree on that, the layer computes both outputs
and selects per row (``lax.cond``, so the common uniform case costs one op).

Integer path (``QuantArgs.int8``). Rows whose candidate has at most 8 activation bits can run a real
integer product instead of the float simulation: the fake-quantized input's codes ``q`` (the same codes,
recovered exactly as ``round(x_q / s) + z``) shifted to int8 ``q - 128``, times the int8 weight codes
``w_code``, accumulated in int32 by ``lax.dot_general`` / ``lax.conv_general_dilated``, plus the
zero-point correction ``(128 - z) * op(1, w_code)`` (the ones carry the conv's padding), and one float
rescale ``s_a * w_scale`` (one per channel half with a split-concat quantizer). Other rows (wider or
float candidates) take the float path; a batch computes both only when its rows disagree.

Optional state (base PTQ methods, see :mod:`qlip_jax.quant.state`): an AdaRound rounding decision
``w_round`` replaces round-to-nearest of the kernel; ``a_scale_skip/a_zero_skip/split`` quantize the
skip half of a concatenated input with its own parameters; ``[S, K]`` step tables (TDQ) are read at
``QuantArgs.step``. All of it is data in the state pytree, so one compiled program serves them.

Calibration hook. In the float path each layer ``sow``s the min and max of its input(s) into the
``act_stats`` collection, and value samples into ``act_samples``; this is free unless the caller
makes the collection mutable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlip_jax.naming import flax_to_torch_path
from qlip_jax.quant.fake_quant import adaround_fake_quant, fake_quant, fake_quant_or_float, round_ste
from qlip_jax.quant.state import QuantArgs, unpack_row

Dtype = jnp.dtype

#: Activation values kept per batch row and layer call by the ``act_samples`` calibration tap.
ACT_SAMPLES = 256


def _per_row(v: jax.Array, ndim: int) -> jax.Array:
    """``[B] -> [B, 1, ..., 1]`` with ``ndim`` dims in total."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _rows(scale: jax.Array, q: QuantArgs, batch: int) -> jax.Array:
    """Quantizer parameters ``[K]`` (shared) or ``[S, K]`` (per sampler step) -> per row ``[B, K]``."""
    if scale.ndim == 2:
        if q.step is None:
            raise ValueError(f"this quantizer has per-step activation scales [S={scale.shape[0]}, K] (a TDQ "
                             "state); the call needs the sampler step index: "
                             "QuantArgs.from_indices(..., step=i)")
        row = jnp.clip(q.step, 0, scale.shape[0] - 1)
        return scale[row]                                                   # [B, K]
    if scale.ndim != 1:
        raise ValueError(f"activation quantizer parameters must be [K] or [S, K], got shape {scale.shape}")
    return jnp.broadcast_to(scale, (batch,) + scale.shape)


def _quantize_prepared(x: jax.Array, rows: dict, prefix: str, split: jax.Array | None = None) -> jax.Array:
    """:func:`_quantize_activation` (no ``mix``) on parameters :func:`~qlip_jax.quant.state.prepare_rows`
    computed: ``rows`` is the layer's entry, ``prefix`` its quantizer (``a`` or ``b``), ``split`` the
    channel index of a split-concat input (channels ``[split:]`` use the ``a_skip`` quantizer).

    The same operations on each element as the per-layer path, as XLA CPU compiles it (its ``x / s``
    is ``x * (1 / s)``, ``1 / s`` taken per row), with every per-row value precomputed so that the
    whole quantizer is one elementwise kernel."""
    b = x.shape[0]
    if split is None:
        s, r, zp = (_per_row(rows[f"{prefix}_{k}"], x.ndim) for k in ("s", "r", "zp"))
    else:
        is_main = jnp.arange(x.shape[-1]) < split                            # [C]
        shape = (b,) + (1,) * (x.ndim - 2) + (x.shape[-1],)

        def both(k):
            return jnp.where(is_main, rows[f"a_{k}"][:, None], rows[f"a_skip_{k}"][:, None]).reshape(shape)

        s, r, zp = both("s"), both("r"), both("zp")
    hi, fp = _per_row(rows["hi"], x.ndim), _per_row(rows["fp"], x.ndim)
    x32 = x.astype(jnp.float32)
    qv = jnp.clip(round_ste(x32 * r) + zp, jnp.zeros_like(hi), hi)
    return jnp.where(fp, x32, (qv - zp) * s)


def _quantize_activation(x: jax.Array, scale: jax.Array, zero: jax.Array, idx: jax.Array,
                         q: QuantArgs, mix: jax.Array | None = None,
                         skip: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """Per-tensor asymmetric fake quantization of ``x [B, ...]`` at each row's candidate ``idx [B]``.

    ``scale``/``zero`` are ``[K]``, or ``[S, K]`` step tables read at the row's ``q.step``. With
    ``mix [B, K]`` the result is ``sum_k mix[:, k] * Q_k(x)`` (straight-through selector training).
    ``skip = (scale_skip, zero_skip, split)`` quantizes the channels ``x[..., split:]`` (the skip half of
    a concatenation) with their own parameters and ``x[..., :split]`` with ``scale``/``zero``.
    """
    cfg = q.config
    b = x.shape[0]
    scale, zero = _rows(scale, q, b), _rows(zero, q, b)
    if skip is not None:
        skip_scale, skip_zero = _rows(skip[0], q, b), _rows(skip[1], q, b)
        is_main = jnp.arange(x.shape[-1]) < skip[2]                           # [C]

    def expand(main, other=None):
        """``[B]`` per-row value -> broadcastable to ``x``, per channel half with a split."""
        if skip is None:
            return _per_row(main, x.ndim)
        v = jnp.where(is_main, main[:, None], other[:, None])              # [B, C]
        return v.reshape((b,) + (1,) * (x.ndim - 2) + (x.shape[-1],))

    x32 = x.astype(jnp.float32)
    table = jnp.asarray(cfg.act_bits_table())
    if mix is not None:
        out = jnp.zeros_like(x32)
        for k in range(cfg.num_quantized):
            sk = expand(scale[:, k], None if skip is None else skip_scale[:, k])
            zk = expand(zero[:, k], None if skip is None else skip_zero[:, k])
            qk = fake_quant_or_float(x32, sk, zk, table[k], jnp.zeros((), bool), signed=False)
            out = out + _per_row(mix[:, k], x.ndim) * qk
        return out
    a_bits = table[idx]
    is_fp = idx == cfg.fp_index
    k = jnp.minimum(idx, cfg.num_quantized - 1)  # the fp candidate has no scale of its own
    rows = jnp.arange(b)
    s = expand(scale[rows, k], None if skip is None else skip_scale[rows, k])
    z = expand(zero[rows, k], None if skip is None else skip_zero[rows, k])
    return fake_quant_or_float(x32, s, z, _per_row(a_bits, x.ndim), _per_row(is_fp, x.ndim), signed=False)


def _skip_quantizer(state: dict) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """The split-concat quantizer of a layer's input, if its state has one."""
    if "a_scale_skip" not in state:
        return None
    if "split" not in state:
        raise KeyError("quantizer state has 'a_scale_skip' but no 'split' channel index")
    return state["a_scale_skip"], state["a_zero_skip"], state["split"]


def quantize_weight(kernel: jax.Array, state: dict, bits: jax.Array) -> jax.Array:
    """Quantized kernel: per output channel, symmetric, step ``state['w_scale'] [O]``.

    A calibrated state holds the integer codes ``w_code`` (int8, kernel-shaped, :mod:`qlip_jax.quant.codes`):
    the kernel is ``w_code * w_scale`` and ``kernel`` is not read. During calibration (no codes yet) the
    float kernel is fake-quantized: round to nearest, or, when the state holds an AdaRound decision
    ``w_round`` (kernel-shaped, 0/1 or, during reconstruction, soft values in ``[0, 1]``),
    ``s * clip(floor(W / s) + w_round, lo, hi)``.
    """
    if "w_code" in state:
        return state["w_code"].astype(jnp.float32) * state["w_scale"]
    if "w_round" in state:
        return adaround_fake_quant(kernel, state["w_scale"], state["w_round"], bits)
    return fake_quant(kernel, state["w_scale"], 0.0, bits, signed=True)


def quantized_weight_op(op: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                        kernel: jax.Array, state: dict, idx: jax.Array, q: QuantArgs,
                        dtype: Dtype, mix: jax.Array | None = None, rows: dict | None = None) -> jax.Array:
    """Apply ``op(x, kernel)`` with fake-quantized input and kernel.

    Args:
      op: the float op, e.g. a convolution; called with compute-dtype arrays.
      x: ``[B, ...]`` input.
      kernel: float32 kernel whose last axis is the output channel ``O``.
      state: the layer's quantizer state: ``w_scale [O]``, ``a_scale [K]``, ``a_zero [K]``; optionally
        ``w_round`` (AdaRound, kernel-shaped), ``a_scale_skip``/``a_zero_skip``/``split`` (split
        quantization of a concatenated input), and ``[S, K]`` step tables instead of ``[K]`` (TDQ).
      idx: ``[B]`` candidate index per row.
      mix: optional ``[B, K]`` straight-through candidate weights (see :class:`QuantArgs`).
      rows: optional per-row parameters of this layer precomputed for ``idx``
        (:func:`~qlip_jax.quant.state.prepare_rows`); ignored with ``mix``.
    """
    cfg = q.config
    if idx.shape != (x.shape[0],):
        raise ValueError(f"bit index must have shape [B={x.shape[0]}], got {idx.shape}")
    rows = rows if mix is None else None
    if rows is None:
        xq32 = _quantize_activation(x, state["a_scale"], state["a_zero"], idx, q, mix, _skip_quantizer(state))
    else:
        skip = _skip_quantizer(state)
        xq32 = _quantize_prepared(x, rows, "a", None if skip is None else skip[2])
    xq = xq32.astype(dtype)
    wq = quantize_weight(kernel, state, jnp.float32(cfg.weight_bits))
    if q.int8 and mix is None and "w_code" in state:
        return _with_integer_rows(op, x, xq32, kernel, wq, state, idx, q, dtype, rows)
    return _float_weight_op(op, x, xq, kernel, wq, idx, q, dtype, rows)


def _float_weight_op(op, x, xq, kernel, wq, idx, q, dtype, rows=None):
    """``op`` on the fake-quantized input ``xq`` and kernel ``wq`` (float ``kernel`` on fp rows);
    ``rows``: the layer's prepared per-row parameters, if any (see :func:`quantized_weight_op`)."""
    cfg = q.config
    if q.quantized_only:
        return op(xq, wq.astype(dtype))
    if rows is None:
        is_fp = idx == cfg.fp_index
        all_fp, any_fp = jnp.all(is_fp), jnp.any(is_fp)
        is_mixed = jnp.logical_and(any_fp, ~all_fp)
    else:
        is_fp, all_fp, is_mixed = rows["w_fp"], rows["all_fp"], rows["mixed"]

    if rows is None:
        def uniform():
            # Every row uses the same weight variant; xq is already exact x on fp rows.
            return op(xq, jnp.where(all_fp, kernel, wq).astype(dtype))

        def mixed():
            y_fp = op(x.astype(dtype), kernel.astype(dtype))
            y_q = op(xq, wq.astype(dtype))
            return jnp.where(_per_row(is_fp, y_q.ndim), y_fp, y_q)

        return jax.lax.cond(is_mixed, mixed, uniform)
    # The same values with fewer kernels: the uniform op is computed outside the conditional (with
    # mixed rows it is the quantized op); the mixed rows add the float op on ``x`` and a row select.
    # (Reading ``xq`` there instead, equal to ``x`` on the float rows, changed images of the shipped
    # model by up to 18 levels under mixed schedules: benchmarks/prepared_check.py.)
    y = op(xq, jnp.where(all_fp, kernel, wq).astype(dtype))
    return jax.lax.cond(is_mixed, lambda: jnp.where(_per_row(is_fp, y.ndim), op(x.astype(dtype), kernel.astype(dtype)),
                                                    y), lambda: y)


def _prepared(q: QuantArgs, name: str) -> dict | None:
    """The layer's :attr:`QuantArgs.prepared` rows (unpacked), if the call has them and no ``mix``."""
    if q.prepared is None or q.mix is not None:
        return None
    return unpack_row(q.prepared[name], q.idx[name].shape[0])


def _integer_rows(idx: jax.Array, q: QuantArgs) -> jax.Array:
    """``[B]`` bool: rows whose candidate is quantized with at most 8 activation bits."""
    bits = jnp.asarray(q.config.act_bits_table())[idx]
    return jnp.logical_and(idx != q.config.fp_index, bits <= 8)


def _with_integer_rows(op, x, xq32, kernel, wq, state, idx, q, dtype, rows=None):
    """The integer path on the rows :func:`_integer_rows` selects, the float path on the others (both
    computed only when the batch's rows disagree). ``xq32``: the float32 fake-quantized input."""
    use_int = _integer_rows(idx, q)
    all_int, any_int = jnp.all(use_int), jnp.any(use_int)

    def integer():
        return integer_weight_op(op, xq32, state, idx, q).astype(dtype)

    def floating():
        return _float_weight_op(op, x, xq32.astype(dtype), kernel, wq, idx, q, dtype, rows)

    def both():
        y_i, y_f = integer(), floating()
        return jnp.where(_per_row(use_int, y_i.ndim), y_i, y_f)

    return jax.lax.cond(all_int, integer, lambda: jax.lax.cond(any_int, both, floating))


def _activation_grid(state: dict, idx: jax.Array, q: QuantArgs, shape: tuple[int, ...]):
    """Per row (and channel half) step and integer zero point of the input ``[B, ..., C]``:
    ``(scale, zero, halves)`` broadcastable to ``shape``, ``halves`` a list of ``[C]`` float masks
    (one all-ones mask without a split-concat quantizer)."""
    cfg, b, nd = q.config, shape[0], len(shape)
    k = jnp.minimum(idx, cfg.num_quantized - 1)
    rows = jnp.arange(b)

    def pick(table):
        return _rows(table, q, b)[rows, k]                                    # [B]

    skip = _skip_quantizer(state)
    if skip is None:
        return [(_per_row(pick(state["a_scale"]), nd), _per_row(jnp.round(pick(state["a_zero"])), nd),
                 jnp.ones(shape[-1], jnp.float32))]
    is_main = (jnp.arange(shape[-1]) < skip[2]).astype(jnp.float32)
    return [(_per_row(pick(state["a_scale"]), nd), _per_row(jnp.round(pick(state["a_zero"])), nd), is_main),
            (_per_row(pick(skip[0]), nd), _per_row(jnp.round(pick(skip[1])), nd), 1.0 - is_main)]


def integer_accumulator(op, xq: jax.Array, state: dict, idx: jax.Array, q: QuantArgs) -> list:
    """int32 accumulators of the integer path, one per channel half: ``[(acc [B, ..., O], s_a)]`` with
    ``acc = sum_k (q_k - z) * w_code_k`` computed as ``op(q - 128, w_code) + (128 - z) * op(1, w_code)``
    on int8 operands with int32 accumulation; ``xq`` is the float32 fake-quantized input (its codes ``q``
    are recovered exactly), meaningful on rows of at most 8 activation bits only."""
    code = state["w_code"]
    out = []
    for s, z, mask in _activation_grid(state, idx, q, xq.shape):
        codes = (jnp.round(xq.astype(jnp.float32) / s) + z) * mask           # q in [0, 255] on this half
        shifted = ((codes - 128.0) * mask).astype(jnp.int8)                  # 0 off the half
        ones = jnp.broadcast_to(mask, xq.shape[1:])[None].astype(jnp.int8)   # [1, ..., C]
        acc = op(shifted, code, preferred_element_type=jnp.int32)
        acc = acc + (128 - z.astype(jnp.int32)) * op(ones, code, preferred_element_type=jnp.int32)
        out.append((acc, s))
    return out


def integer_weight_op(op, xq: jax.Array, state: dict, idx: jax.Array, q: QuantArgs) -> jax.Array:
    """float32 ``op(x_q, w_code * w_scale)`` from the int32 accumulators of :func:`integer_accumulator`,
    one float rescale ``s_a * w_scale`` per channel half."""
    return sum(acc.astype(jnp.float32) * (s * state["w_scale"])
               for acc, s in integer_accumulator(op, xq, state, idx, q))


def integer_path_errors(fn: Callable[[], object]) -> tuple[object, list[tuple[str, jax.Array, jax.Array]]]:
    """Teacher-forced check of the integer path inside a real network: run ``fn()`` (e.g. a UNet
    ``apply`` with :class:`QuantArgs`, fake-quant path) and, for every quantized conv/dense layer it
    calls, run that layer once more with ``int8=True`` on the very input the fake path gave it.

    Returns ``(fn's result, [(layer name, max |int - fake|, max |fake|)])`` in call order. Comparing layer
    by layer separates the integer path's own error (float rounding of the rescale) from its amplification
    over later layers (a one-ulp change can move an activation code by one step, and the network
    amplifies that), which a whole-network comparison mixes. Traceable under ``jit``.
    """
    found, busy = [], []

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        q = kwargs.get("q", args[1] if len(args) > 1 else None)
        y = next_fun(*args, **kwargs)
        if busy or context.method_name != "__call__" or not isinstance(module, _WeightLayer) or q is None:
            return y
        name = module.qname
        alone = QuantArgs(state={"": q.state[name]}, idx={"": q.idx[name]}, config=q.config, step=q.step,
                          quantized_only=q.quantized_only, int8=True)
        busy.append(name)
        y_int = module.clone(parent=None).apply({"params": module.variables["params"]}, args[0], alone)
        busy.pop()
        found.append((name, jnp.max(jnp.abs(y_int - y)), jnp.max(jnp.abs(y))))
        return y

    with nn.intercept_methods(intercept):
        out = fn()
    return out, found


class _Quantizable(nn.Module):
    """Mixin: registry name and calibration statistics."""

    @property
    def qname(self) -> str:
        """Registry name: the PyTorch parameter path of this layer."""
        return flax_to_torch_path(self.path)

    def _record_range(self, x: jax.Array, key: str = "input") -> None:
        """Calibration taps (no-ops unless the collection is mutable): the input's ``[min, max]`` in
        ``act_stats``, and ``[B, ACT_SAMPLES]`` of its values, ``ACT_SAMPLES`` per batch row drawn
        uniformly at fixed positions, in ``act_samples`` (for clipping searches; per row so that
        samples can be grouped by the row's denoising step)."""
        self.sow("act_stats", key, jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32))
        if self.is_mutable_collection("act_samples"):
            rows = x.reshape(x.shape[0], -1)
            pos = jax.random.randint(jax.random.key(0), (rows.shape[0], ACT_SAMPLES), 0, rows.shape[1])
            self.sow("act_samples", key, jnp.take_along_axis(rows, pos, axis=1).astype(jnp.float32))


class _WeightLayer(_Quantizable):
    """Shared body of :class:`QDense` and :class:`QConv` (fields ``features``, ``use_bias``, ``dtype``,
    ``split``).

    ``split > 0`` declares that the input is ``concat([a, b], axis=-1)`` with ``a`` holding the first
    ``split`` channels (the UNet up blocks' ``[upsampled, skip]``): the float path then also records
    the ranges/samples of the two halves (``input_main``, ``input_skip``) so calibration can give
    them separate activation quantizers (Q-Diffusion's split quantization). Quantized, the layer
    splits only if its state has ``a_scale_skip`` (and reads the channel index from ``split``).
    """

    def _weight_op(self, op, x: jax.Array, kernel: jax.Array, q: QuantArgs | None) -> jax.Array:
        """``op(x, kernel) + bias``: float (recording calibration taps) or fake-quantized."""
        if q is None:
            self._record_range(x)
            if self.split:
                # the two halves of a concatenated input, for split quantization
                self._record_range(x[..., :self.split], "input_main")
                self._record_range(x[..., self.split:], "input_skip")
            y = op(x.astype(self.dtype), kernel.astype(self.dtype))
        else:
            state, idx = q.layer(self.qname)
            y = quantized_weight_op(op, x, kernel, state, idx, q, self.dtype, q.layer_mix(self.qname),
                                    _prepared(q, self.qname))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def _matmul(a: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """``a [..., I] @ w [I, O]`` (int32 accumulation for int8 operands on request)."""
    return jnp.matmul(a, w, preferred_element_type=preferred_element_type)


class QDense(_WeightLayer):
    """Quantizable ``nn.Dense``: kernel ``[I, O]``, bias ``[O]``; input ``[B, ..., I]``."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    split: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            jnp.float32)
        return self._weight_op(_matmul, x, kernel, q)


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
    split: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, q: QuantArgs | None = None) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features), jnp.float32)
        pad = ((self.padding, self.padding),) * 2 if isinstance(self.padding, int) else tuple(self.padding)

        def op(a, w, preferred_element_type=None):
            return jax.lax.conv_general_dilated(a, w, self.strides, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                preferred_element_type=preferred_element_type)

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
        if q is None:
            self._record_range(a, "a")
            self._record_range(b, "b")
        fa, fb = self.quantizers(q)
        return jnp.einsum(self.spec, fa(a), fb(b))

    def quantizers(self, q: QuantArgs | None) -> tuple[Callable, Callable]:
        """Pure functions ``(a -> a', b -> b')`` giving the operands as :meth:`__call__` multiplies them
        (fake-quantized per row at its candidate, or only cast, then in the compute dtype). They act
        element by element with per-row parameters, so applying them to slices of the operands along
        any axis but the batch is the same as slicing the quantized operands (chunked attention).
        No calibration taps are recorded."""
        if q is None or not q.config.quantize_attn_matmul:
            cast = lambda x: x.astype(self.dtype)  # noqa: E731
            return cast, cast
        state, idx = q.layer(self.qname)
        rows = _prepared(q, self.qname)
        if rows is not None:
            fa = lambda x: _quantize_prepared(x, rows, "a").astype(self.dtype)  # noqa: E731
            fb = lambda x: _quantize_prepared(x, rows, "b").astype(self.dtype)  # noqa: E731
            return fa, fb
        mix = q.layer_mix(self.qname)
        fa = lambda x: _quantize_activation(x, state["a_scale"], state["a_zero"], idx, q,  # noqa: E731
                                            mix).astype(self.dtype)
        fb = lambda x: _quantize_activation(x, state["b_scale"], state["b_zero"], idx, q,  # noqa: E731
                                            mix).astype(self.dtype)
        return fa, fb
