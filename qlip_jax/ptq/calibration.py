"""Timestep-aware calibration data and the base PTQ methods of a :class:`QuantSetup`.

As in Q-Diffusion, the calibration set is made of the UNet's actual inputs along full-precision
sampling trajectories: for calibration prompts, the latent ``x_t`` at steps spread over the whole
trajectory, with both halves of classifier-free guidance (the conditional and the unconditional
text embedding), so every layer sees the activation ranges it meets at every noise level.

Methods (:func:`calibrate`, every candidate activation width at once, weights at ``weight_bits``):

* ``minmax``: per-tensor activation range = observed [min, max]; weights per output channel max |w|.
* ``percentile``: activation range = 0.01 / 99.99 percentiles of the observed values.
* ``mse``: activation range and per-channel weight scale minimising the quantization MSE.
* ``qdiff``: Q-Diffusion / BRECQ: the ``mse`` state, then AdaRound weight rounding and LSQ activation
  step sizes learned by output reconstruction on the calibration data
  (:mod:`qlip_jax.ptq.reconstruction`).
* ``tdq``: TDQ-style step-dependent activation quantizers: ``a_scale, a_zero [S, K]`` with one row
  per sampler step (``S = pipe.num_steps``), MSE-clipped on the calibration inputs of that step
  (steps absent from the data copy the nearest calibrated step); weights as ``mse``. The quantized
  UNet reads the row of ``QuantArgs.step`` (the sampler passes its step index).
* ``ptqd``: PTQD: a base quantizer (``qdiff`` by default, option ``init``) plus a correction of the
  UNet output's quantization noise per sampler step and candidate (``QuantSetup.ptqd``, applied by
  the sampler; :mod:`qlip_jax.ptq.ptqd`), fitted for ``pipe``'s timesteps.

Split quantization (Q-Diffusion's shortcut splitting): layers whose input is the up blocks'
``concat([hidden, skip])`` (their ``split`` field, see :func:`~qlip_jax.quant.registry.concat_splits`)
get a second activation quantizer for the skip channels (``a_scale_skip, a_zero_skip`` and the
channel index ``split``) under every method, unless ``split_concat=False``.

Every method ends by computing the layers' integer weight codes ``w_code`` once, exactly (float64,
AdaRound's ``w_round`` folded in; :mod:`qlip_jax.quant.codes`): the stored form of the quantized
kernels, which the quantized layers read instead of rounding the float kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax import distributed
from qlip_jax.models.unet import UNet2DConditionModel, unet_registry
from qlip_jax.naming import flax_to_torch_path, modules_by_name
from qlip_jax.quant.codes import add_weight_codes, strip_weight_codes
from qlip_jax.quant.fake_quant import fake_quant, minmax_act_params, minmax_weight_scale
from qlip_jax.quant.registry import Registry, concat_splits, init_quant_state
from qlip_jax.quant.state import QuantConfig, QuantSetup

#: Calibration methods of :func:`calibrate`.
METHODS = ("minmax", "percentile", "mse", "qdiff", "tdq", "ptqd")


@dataclasses.dataclass
class CalibrationData:
    """UNet inputs: ``latents [N, h, w, c]``, ``timesteps [N]``, ``context [N, M, D]``,
    ``step_index [N]`` (position in the sampler's timestep array), ``is_cond [N]`` (CFG half)."""

    latents: np.ndarray
    timesteps: np.ndarray
    context: np.ndarray
    step_index: np.ndarray
    is_cond: np.ndarray

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield (self.latents[i:i + batch_size], self.timesteps[i:i + batch_size],
                   self.context[i:i + batch_size])

    def subset(self, rows) -> "CalibrationData":
        """The samples at ``rows`` (indices or a boolean mask)."""
        return CalibrationData(*(np.asarray(a)[rows] for a in (self.latents, self.timesteps, self.context,
                                                                self.step_index, self.is_cond)))


def collect_calibration_data(pipe, prompts: list[str], seeds, guidance: float,
                             num_steps_kept: int | None = None, micro_batch: int | None = None) -> CalibrationData:
    """Run float sampling with ``pipe`` (a :class:`~qlip_jax.sampling.pipeline.Text2Image`) and keep
    the UNet inputs at ``num_steps_kept`` steps spread uniformly over the trajectory (all by default).

    ``micro_batch``: sample this many prompts at a time (None: all at once). Each prompt's trajectory
    depends on its own seed only, so the data are the same (to float rounding).
    """
    emb = pipe.encode(prompts)
    seeds = np.broadcast_to(np.asarray(seeds), (len(prompts),))
    mb = micro_batch or len(prompts)
    traj = np.concatenate([pipe.trajectory(dataclasses.replace(emb, cond=emb.cond[i:i + mb]), seeds[i:i + mb],
                                           guidance)[1] for i in range(0, len(prompts), mb)], axis=1)  # [T, B, ...]
    t_total = traj.shape[0]
    keep = np.arange(t_total) if num_steps_kept is None else np.unique(
        np.round(np.linspace(0, t_total - 1, num_steps_kept)).astype(int))
    timesteps = np.asarray(pipe.sched.timesteps)
    cond, uncond = np.asarray(emb.cond), np.broadcast_to(np.asarray(emb.uncond), emb.cond.shape)
    lat, ts, ctx, idx, half = [], [], [], [], []
    for i in keep:
        for is_cond, c in ((False, uncond), (True, cond)):
            lat.append(traj[i])
            ts.append(np.full(len(prompts), timesteps[i]))
            ctx.append(c)
            idx.append(np.full(len(prompts), i))
            half.append(np.full(len(prompts), is_cond))
    cat = np.concatenate
    return CalibrationData(cat(lat), cat(ts), cat(ctx), cat(idx), cat(half))


def _merge_ranges(a, b):
    """Elementwise (min, max) of two ``[2]`` ranges, over same-structured trees."""
    return jax.tree.map(lambda x, y: jnp.stack([jnp.minimum(x[0], y[0]), jnp.maximum(x[1], y[1])]), a, b)


@functools.lru_cache(maxsize=8)
def _tap(unet, collection: str):
    """Jitted ``(params, x, t, c) -> collection`` of a float pass (one compilation per input shape)."""
    @jax.jit
    def run(params, x, t, c):
        _, col = unet.apply({"params": params}, x, t, c, mutable=[collection])
        # each sow'd entry is a 1-tuple holding one array
        return jax.tree.map(lambda v: v[0], col[collection], is_leaf=lambda v: isinstance(v, tuple))

    return run


def _tapped_batches(tap, params: dict, data: CalibrationData, batch_size: int, mesh=None):
    """``(tap(params, x, t, c), rows)`` for every batch of ``data``. With a mesh (:mod:`qlip_jax.distributed`)
    each batch's rows are split over its batch shards, on every process's devices (the last row repeated
    up to a multiple of them: ``rows`` are the real ones, first), and the UNet's params over ``fsdp``."""
    if mesh is not None:
        params = distributed.put_params(params, mesh)
    for x, t, c in data.batches(batch_size):
        yield tap(params, *([x, t, c] if mesh is None else distributed.put_rows([x, t, c], mesh))), len(x)


def activation_ranges(unet, params: dict, data: CalibrationData, batch_size: int = 32, mesh=None) -> dict:
    """Min/max of every quantized layer's input over the calibration data.

    Returns the ``act_stats`` tree (one ``[2]`` array per recorded input) that
    :func:`~qlip_jax.quant.registry.init_quant_state` reads. With ``mesh`` the batches are split over
    its devices and the min/max reduced across them (and across processes) by XLA; repeated padding
    rows change no min or max.
    """
    stats = _tap(unet, "act_stats")
    total = None
    for s, _ in _tapped_batches(stats, params, data, batch_size, mesh):
        total = s if total is None else _merge_ranges(total, s)
    return total if mesh is None else jax.tree.map(lambda a: jnp.asarray(distributed.gather(a)), total)


def model_splits(pipe, context_shape: tuple[int, int]) -> dict[str, int]:
    """``{layer: split}`` of ``pipe``'s UNet: the layers whose input is a ``[hidden, skip]`` concat."""
    spec = jax.ShapeDtypeStruct
    return concat_splits(UNet2DConditionModel(pipe.sd.configs.unet),
                         spec((1, *pipe.latent_shape), jnp.float32), spec((1,), jnp.int32),
                         spec((1, *context_shape), jnp.float32))


def minmax_state(unet, params: dict, registry: Registry, config: QuantConfig,
                 data: CalibrationData, batch_size: int = 32, splits: dict[str, int] | None = None,
                 mesh=None) -> dict:
    """Min-max quantizer state: per-channel weight max, per-tensor activation range on ``data``."""
    return init_quant_state(params, registry, config, activation_ranges(unet, params, data, batch_size, mesh),
                            splits)


def calibrate_minmax(pipe, config: QuantConfig, prompts: list[str], seeds, guidance: float,
                     num_steps_kept: int | None = None, quantize_attn_matmul: bool | None = None) -> QuantSetup:
    """Min-max :class:`QuantSetup` for ``pipe``'s UNet from float trajectories of ``prompts``."""
    return calibrate(pipe, config, collect_calibration_data(pipe, prompts, seeds, guidance, num_steps_kept))


# ----------------------------------------------------------------------------------------------
# Clipping searches: percentile and MSE-optimal ranges


def activation_samples(unet, params: dict, data: CalibrationData, batch_size: int = 32, mesh=None) -> dict:
    """``{layer_name: {input_key: [N, n] values}}``: for each of the ``N`` calibration samples, ``n``
    activation values of every quantized layer's input(s) (a fixed-position uniform subsample per row,
    see :data:`~qlip_jax.quant.layers.ACT_SAMPLES`); rows follow ``data``'s order. With ``mesh`` the
    batches run split over its devices and every process gathers all rows."""
    tap = _tap(unet, "act_samples")
    out: dict = {}
    for tapped, rows in _tapped_batches(tap, params, data, batch_size, mesh):
        for path, value in jax.tree_util.tree_flatten_with_path(tapped)[0]:
            keys = [p.key for p in path if hasattr(p, "key")]
            name, key = flax_to_torch_path(keys[:-1]), keys[-1]
            out.setdefault(name, {}).setdefault(key, []).append(distributed.gather(value)[:rows])
    return {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in out.items()}


#: At most this many activation values enter one clipping search (a fixed random subset).
MAX_SEARCH_SAMPLES = 16384


#: Shrink factors of the MSE clipping search (``lo * a, hi * b`` over this grid squared).
_SHRINK = np.linspace(1.0, 0.2, 40)


@jax.jit
def _clip_errors(x: jax.Array, cand_lo: jax.Array, cand_hi: jax.Array, bits: jax.Array) -> jax.Array:
    """``[K, G]`` mean squared quantization error of samples ``x [N]`` for every bit width ``bits [K]``
    and candidate range ``(cand_lo, cand_hi) [G]`` (one compilation per sample count)."""
    def err(lh, nb):
        s, z = minmax_act_params(lh[0], lh[1], nb)
        return jnp.mean((fake_quant(x, s, z, nb, signed=False) - x) ** 2)

    cands = jnp.stack([cand_lo, cand_hi], axis=-1)
    return jax.lax.map(lambda nb: jax.lax.map(lambda lh: err(lh, nb), cands, batch_size=64), bits)


def _search_ranges(values: np.ndarray, bits, method: str) -> list[tuple[float, float]]:
    """Clipping range ``(lo, hi)`` of one activation tensor for each bit width in ``bits``.

    ``minmax``: the observed range. ``percentile``: the 0.01 / 99.99 percentiles. ``mse``: the range
    minimising the mean squared quantization error of the samples, searched over ``lo * a, hi * b``
    for a grid of shrink factors.
    """
    values = np.asarray(values, np.float32).ravel()
    lo, hi = float(min(values.min(), 0.0)), float(max(values.max(), 0.0))
    if method == "minmax":
        return [(lo, hi)] * len(bits)
    if method == "percentile":
        r = (float(min(np.percentile(values, 0.01), 0.0)), float(max(np.percentile(values, 99.99), 0.0)))
        return [r] * len(bits)
    if method != "mse":
        raise ValueError(f"unknown clipping method '{method}' (minmax, percentile, mse)")
    if values.size > MAX_SEARCH_SAMPLES:
        values = np.random.default_rng(0).choice(values, MAX_SEARCH_SAMPLES, replace=False)
    a, b = (g.ravel() for g in np.meshgrid(_SHRINK, _SHRINK))
    cand_lo, cand_hi = (lo * a).astype(np.float32), (hi * b).astype(np.float32)
    errs = np.asarray(_clip_errors(jnp.asarray(values), jnp.asarray(cand_lo), jnp.asarray(cand_hi),
                                   jnp.asarray(bits, jnp.float32)))
    best = np.argmin(errs, axis=1)
    return [(float(cand_lo[i]), float(cand_hi[i])) for i in best]


def _search_range(values: np.ndarray, bits: float, method: str, grid: int = 40) -> tuple[float, float]:
    """One bit width of :func:`_search_ranges` (kept for callers of the single-width form)."""
    return _search_ranges(values, [bits], method)[0]


@jax.jit
def _weight_clip_errors(w: jax.Array, base: jax.Array, alphas: jax.Array, bits: jax.Array) -> jax.Array:
    """``[grid, O]`` weight MSE per output channel for step sizes ``base * alpha``."""
    return jax.lax.map(lambda a: jnp.mean((fake_quant(w, base * a, 0.0, bits, signed=True) - w) ** 2, axis=0),
                       alphas)


def _mse_weight_scale(kernel: np.ndarray, bits: int, grid: int = 40) -> jax.Array:
    """Per-output-channel symmetric step size minimising the weight MSE (``[O]``).

    Small kernels are searched in NumPy (no compilation per kernel shape), large ones by a jitted
    sweep; both evaluate the same quantizer."""
    w = np.asarray(kernel, np.float32).reshape(-1, kernel.shape[-1])
    alphas = np.linspace(1.0, 0.3, grid, dtype=np.float32)
    hi = 2.0 ** (bits - 1) - 1.0
    base = np.maximum(np.abs(w).max(axis=0), 1e-8).astype(np.float32) / np.float32(hi)
    if w.size * grid <= 2 ** 24:
        s = base[None, None, :] * alphas[:, None, None]                            # [grid, 1, O]
        q = np.clip(np.round(w[None] / s), -hi - 1.0, hi) * s
        errs = np.mean((q - w[None]) ** 2, axis=1)                                # [grid, O]
    else:
        errs = np.asarray(_weight_clip_errors(jnp.asarray(w), jnp.asarray(base), jnp.asarray(alphas),
                                              jnp.float32(bits)))
    return jnp.asarray(base * alphas[np.argmin(errs, axis=0)])


def _act_entries(layer_samples: dict, kind: str, split: int, config: QuantConfig, method: str) -> dict:
    """Activation quantizer arrays (``[K]`` each) of one layer from its input samples."""
    def act(key):
        ranges = _search_ranges(layer_samples[key], config.act_bits, method)
        s, z = minmax_act_params(jnp.asarray([r[0] for r in ranges], jnp.float32),
                                 jnp.asarray([r[1] for r in ranges], jnp.float32),
                                 jnp.asarray(config.act_bits, jnp.float32))
        return s, z

    if kind == "matmul":
        (a_s, a_z), (b_s, b_z) = act("a"), act("b")
        return {"a_scale": a_s, "a_zero": a_z, "b_scale": b_s, "b_zero": b_z}
    if split:
        (a_s, a_z), (s_s, s_z) = act("input_main"), act("input_skip")
        return {"a_scale": a_s, "a_zero": a_z, "a_scale_skip": s_s, "a_zero_skip": s_z,
                "split": jnp.int32(split)}
    a_s, a_z = act("input")
    return {"a_scale": a_s, "a_zero": a_z}


def clipped_state(unet, params: dict, registry: Registry, config: QuantConfig, data: CalibrationData,
                  method: str, batch_size: int = 32, splits: dict[str, int] | None = None,
                  samples: dict | None = None, mesh=None) -> dict:
    """Quantizer state whose ranges come from a clipping search (``percentile`` or ``mse``) per layer
    and per candidate bit width, on the calibration data; weights per output channel (MSE search for
    ``mse``, max |w| for ``percentile``). Layers in ``splits`` get split-concat quantizers.
    ``samples``: :func:`activation_samples` of ``data`` if already computed; ``mesh``: theirs."""
    if method not in ("percentile", "mse"):
        raise ValueError(f"unknown clipping method '{method}' (minmax, percentile, mse)")
    splits = splits or {}
    if samples is None:
        samples = activation_samples(unet, params, data, batch_size, mesh)
    layers = modules_by_name(params)
    state = {}
    for info in registry.layers:
        entry = _act_entries(samples[info.name], info.kind, splits.get(info.name, 0), config, method)
        if info.kind != "matmul":
            kernel = np.asarray(layers[info.name]["kernel"])
            entry["w_scale"] = (_mse_weight_scale(kernel, config.weight_bits) if method == "mse"
                                else minmax_weight_scale(jnp.asarray(kernel), config.weight_bits))
        state[info.name] = entry
    return state


# ----------------------------------------------------------------------------------------------
# TDQ: step-dependent activation quantizers

#: Activation quantizer arrays that become ``[S, K]`` step tables under TDQ.
ACT_KEYS = ("a_scale", "a_zero", "a_scale_skip", "a_zero_skip", "b_scale", "b_zero")


def nearest_rows(calibrated, num_steps: int) -> np.ndarray:
    """``[S]``: for every sampler step, the calibrated step closest to it (ties: the earlier one)."""
    calibrated = np.asarray(sorted(set(int(s) for s in calibrated)))
    if calibrated.size == 0:
        raise ValueError("no calibrated steps")
    steps = np.arange(num_steps)
    return calibrated[np.argmin(np.abs(steps[:, None] - calibrated[None, :]), axis=1)]


def tdq_state(unet, params: dict, registry: Registry, config: QuantConfig, data: CalibrationData,
              num_steps: int, clip: str = "mse", batch_size: int = 32,
              splits: dict[str, int] | None = None, mesh=None) -> dict:
    """TDQ-style state: the ``clip`` state (``mse`` or ``percentile``) with every activation quantizer
    replaced by an ``[S = num_steps, K]`` table, row ``s`` clipped on the inputs of sampler step ``s``
    (``data.step_index == s``); rows of steps absent from the data copy the nearest calibrated one."""
    steps = np.asarray(data.step_index)
    if steps.min() < 0 or steps.max() >= num_steps:
        raise ValueError(f"calibration data has step indices {steps.min()}..{steps.max()} outside the "
                         f"sampler's 0..{num_steps - 1}")
    splits = splits or {}
    samples = activation_samples(unet, params, data, batch_size, mesh)       # [N, n] per input
    state = clipped_state(unet, params, registry, config, data, clip, batch_size, splits, samples)
    calibrated = sorted(set(int(s) for s in steps))
    per_step = {}
    for s in calibrated:
        rows = steps == s
        per_step[s] = {info.name: _act_entries({k: v[rows] for k, v in samples[info.name].items()},
                                               info.kind, splits.get(info.name, 0), config, clip)
                       for info in registry.layers}
    rows = nearest_rows(calibrated, num_steps)
    for name, entry in state.items():
        for key in ACT_KEYS:
            if key in entry:
                entry[key] = jnp.stack([per_step[int(r)][name][key] for r in rows])   # [S, K]
    return state


# ----------------------------------------------------------------------------------------------


def calibrate(pipe, config: QuantConfig, data: CalibrationData, method: str = "minmax", *,
              split_concat: bool = True, batch_size: int = 32, progress: bool = False, **opts) -> QuantSetup:
    """A :class:`QuantSetup` for ``pipe``'s UNet by one of :data:`METHODS`.

    Args:
      pipe: a :class:`~qlip_jax.sampling.pipeline.Text2Image` (its UNet, params, latent size and, for
        ``tdq``, step count ``S = pipe.num_steps``).
      data: timestep-aware calibration inputs (:func:`collect_calibration_data`).
      method: ``minmax``, ``percentile``, ``mse``, ``qdiff``, ``tdq`` or ``ptqd`` (see the module
        docstring).
      split_concat: separate activation quantizers for the two halves of the up blocks'
        ``[hidden, skip]`` concatenations.
      batch_size: UNet batch of the statistics passes.
      progress: a progress bar over the ``qdiff`` block reconstruction (also when ``ptqd`` runs it).
      **opts: ``tdq``: ``clip`` (``"mse"`` or ``"percentile"``). ``qdiff``: ``init`` (the starting
        state's method, default ``"mse"``; ``"tdq"`` refines a step table; or an already calibrated
        :class:`QuantSetup` of the same config and model, e.g. an ``mse`` one) and the fields of
        :class:`~qlip_jax.ptq.reconstruction.ReconOptions` (``iters``, ``batch``, ``granularity``,
        ``lr_weight``, ``lr_act``, ``reg_weight``, ``warmup``, ``beta_start``, ``beta_end``,
        ``learn_weights``, ``learn_act``, ``seed``, ``log_every``). ``ptqd``: ``init`` (the base
        quantizer: a method name, default ``"qdiff"``, or a calibrated :class:`QuantSetup`, e.g. a
        ``qdiff`` one to skip its reconstruction), ``pixels`` (output pixels per row in the fit), and
        the options of the ``init`` method.
    Returns:
      the setup; ``setup.info`` records the method, options and (``qdiff``) the reconstruction log.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clipping method '{method}'; methods are {METHODS}")
    if method == "ptqd":
        return _calibrate_ptqd(pipe, config, data, split_concat, batch_size, progress, **opts)
    allowed = {"tdq": {"clip"}, "qdiff": None}.get(method, set())
    if method == "qdiff":
        from qlip_jax.ptq.reconstruction import ReconOptions
        allowed = {"init", "clip"} | {f.name for f in dataclasses.fields(ReconOptions)} - {"progress"}
    unknown = set(opts) - allowed
    if unknown:
        raise TypeError(f"calibrate(method='{method}') got unknown option(s) {sorted(unknown)}; "
                        f"valid: {sorted(allowed)}")
    registry = unet_registry(pipe.sd.configs.unet, pipe.latent_shape[:2], data.context.shape[1:],
                             config.quantize_attn_matmul)
    unet, params = pipe.unet, pipe.sd.params["unet"]
    splits = model_splits(pipe, data.context.shape[1:]) if split_concat else {}
    info = {"method": method, "split_concat": bool(split_concat), **opts}

    mesh = getattr(pipe, "mesh", None)  # the statistics passes split over the pipe's devices and processes

    def base(m, **kw):
        if m == "minmax":
            return minmax_state(unet, params, registry, config, data, batch_size, splits, mesh)
        if m == "tdq":
            return tdq_state(unet, params, registry, config, data, pipe.num_steps, kw.get("clip", "mse"),
                             batch_size, splits, mesh)
        return clipped_state(unet, params, registry, config, data, m, batch_size, splits, mesh=mesh)

    if method == "qdiff":
        from qlip_jax.ptq.reconstruction import ReconOptions, reconstruct

        opts = dict(opts)
        init = opts.pop("init", "mse")
        clip = opts.pop("clip", "mse")
        if isinstance(init, QuantSetup):
            if init.config != config or init.registry != registry:
                raise ValueError("qdiff init setup was calibrated for another quant config or model layout")
            start = strip_weight_codes(init.state)   # reconstruction learns scales and rounding anew
            info["init"] = init.info.get("method", "given")
        elif init in ("minmax", "percentile", "mse", "tdq"):
            start = base(init, clip=clip)
        else:
            raise ValueError(f"qdiff init must be minmax, percentile, mse, tdq or a QuantSetup, got {init!r}")
        state, log = reconstruct(unet, params, registry, config, start, data, ReconOptions(**opts, progress=progress))
        info["reconstruction"] = log
    else:
        state = base(method, **opts)
    return QuantSetup(config, registry, with_codes(state, params, config), info)


def with_codes(state: dict, unet_params: dict, config: QuantConfig) -> dict:
    """The calibrated ``state`` with its integer weight codes (the stored form of the quantized kernels,
    :mod:`qlip_jax.quant.codes`), when ``weight_bits`` fits int8."""
    if config.weight_bits > 8:
        return state
    return add_weight_codes(state, unet_params, config.weight_bits)[0]


def _calibrate_ptqd(pipe, config: QuantConfig, data: CalibrationData, split_concat: bool, batch_size: int,
                    progress: bool, init="qdiff", pixels: int | None = None, **opts) -> QuantSetup:
    """``calibrate(method="ptqd")``: the ``init`` quantizer, then the PTQD correction on ``data``."""
    from qlip_jax.ptq import ptqd
    from qlip_jax.sampling.correction import summary

    if isinstance(init, QuantSetup):
        if opts:
            raise TypeError(f"calibrate(method='ptqd') with a calibrated init setup got unknown "
                            f"option(s) {sorted(opts)}; valid: ['init', 'pixels']")
        registry = unet_registry(pipe.sd.configs.unet, pipe.latent_shape[:2], data.context.shape[1:],
                                 config.quantize_attn_matmul)
        if init.config != config or init.registry != registry:
            raise ValueError("ptqd init setup was calibrated for another quant config or model layout")
        base = dataclasses.replace(init, state=with_codes(init.state, pipe.sd.params["unet"], config))
    elif init in METHODS and init != "ptqd":
        base = calibrate(pipe, config, data, init, split_concat=split_concat, batch_size=batch_size,
                         progress=progress, **opts)
    else:
        raise ValueError(f"ptqd init must be one of {tuple(m for m in METHODS if m != 'ptqd')} or a "
                         f"QuantSetup, got {init!r}")
    corr = ptqd.calibrate_correction(pipe, base, data, pixels or ptqd.DEFAULT_PIXELS, batch_size)
    info = {"method": "ptqd", "init": init.info.get("method", "given") if isinstance(init, QuantSetup)
            else init, "pixels": pixels or ptqd.DEFAULT_PIXELS, "base": base.info, "ptqd": summary(corr)}
    return QuantSetup(config, base.registry, base.state, info, ptqd=corr)
