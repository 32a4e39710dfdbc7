"""Timestep-aware calibration data and min-max calibration (the naive PTQ baseline).

As in Q-Diffusion, the calibration set is made of the UNet's actual inputs along full-precision
sampling trajectories: for calibration prompts, the latent ``x_t`` at steps spread over the whole
trajectory, with both halves of classifier-free guidance (the conditional and the unconditional
text embedding), so every layer sees the activation ranges it meets at every noise level.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models.unet import unet_registry
from qlip_jax.quant.fake_quant import fake_quant, minmax_act_params, minmax_weight_scale
from qlip_jax.quant.registry import Registry, init_quant_state
from qlip_jax.quant.state import QuantConfig, QuantSetup


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


def collect_calibration_data(pipe, prompts: list[str], seeds, guidance: float,
                             num_steps_kept: int | None = None) -> CalibrationData:
    """Run float sampling with ``pipe`` (a :class:`~qlip_jax.sampling.pipeline.Text2Image`) and keep
    the UNet inputs at ``num_steps_kept`` steps spread uniformly over the trajectory (all by default).
    """
    emb = pipe.encode(prompts)
    _, traj = pipe.trajectory(emb, seeds, guidance)                   # [T, B, h, w, c]
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


def activation_ranges(unet, params: dict, data: CalibrationData, batch_size: int = 32) -> dict:
    """Min/max of every quantized layer's input over the calibration data.

    Returns the ``act_stats`` tree (one ``[2]`` array per recorded input) that
    :func:`~qlip_jax.quant.registry.init_quant_state` reads.
    """
    @jax.jit
    def stats(x, t, c):
        _, col = unet.apply({"params": params}, x, t, c, mutable=["act_stats"])
        # each sow'd entry is a 1-tuple holding one [2] (min, max) array
        return jax.tree.map(lambda v: v[0], col["act_stats"], is_leaf=lambda v: isinstance(v, tuple))

    total = None
    for x, t, c in data.batches(batch_size):
        s = stats(x, t, c)
        total = s if total is None else _merge_ranges(total, s)
    return total


def minmax_state(unet, params: dict, registry: Registry, config: QuantConfig,
                 data: CalibrationData, batch_size: int = 32) -> dict:
    """Min-max quantizer state: per-channel weight max, per-tensor activation range on ``data``."""
    return init_quant_state(params, registry, config, activation_ranges(unet, params, data, batch_size))


def calibrate_minmax(pipe, config: QuantConfig, prompts: list[str], seeds, guidance: float,
                     num_steps_kept: int | None = None, quantize_attn_matmul: bool | None = None) -> QuantSetup:
    """Min-max :class:`QuantSetup` for ``pipe``'s UNet from float trajectories of ``prompts``."""
    return calibrate(pipe, config, collect_calibration_data(pipe, prompts, seeds, guidance, num_steps_kept))


# ----------------------------------------------------------------------------------------------
# Clipping searches: percentile and MSE-optimal ranges


def activation_samples(unet, params: dict, data: CalibrationData, batch_size: int = 32) -> dict:
    """``{layer_name: {input_key: [N] values}}``: activation values of every quantized layer's
    input(s) over the calibration data (a fixed-size uniform subsample per batch)."""
    from qlip_jax.naming import flax_to_torch_path

    @jax.jit
    def tap(x, t, c):
        _, col = unet.apply({"params": params}, x, t, c, mutable=["act_samples"])
        return col["act_samples"]

    out: dict = {}
    for x, t, c in data.batches(batch_size):
        flat = jax.tree_util.tree_flatten_with_path(tap(x, t, c))[0]
        for path, value in flat:
            keys = [p.key for p in path if hasattr(p, "key")]
            name, key = flax_to_torch_path(keys[:-1]), keys[-1]
            out.setdefault(name, {}).setdefault(key, []).append(np.asarray(value))
    return {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in out.items()}


def _search_range(values: np.ndarray, bits: float, method: str, grid: int = 40) -> tuple[float, float]:
    """Clipping range ``(lo, hi)`` of one activation tensor for one bit width.

    ``percentile``: the 0.01 / 99.99 percentiles. ``mse``: the range minimising the mean squared
    quantization error of the samples, searched over ``lo * a, hi * b`` for a grid of shrink factors.
    """
    lo, hi = float(min(values.min(), 0.0)), float(max(values.max(), 0.0))
    if method == "percentile":
        return float(min(np.percentile(values, 0.01), 0.0)), float(max(np.percentile(values, 99.99), 0.0))
    if method != "mse":
        raise ValueError(f"unknown clipping method '{method}' (minmax, percentile, mse)")
    shrink = np.linspace(1.0, 0.2, grid)
    a, b = (g.ravel() for g in np.meshgrid(shrink, shrink))
    cand_lo, cand_hi = jnp.asarray(lo * a, jnp.float32), jnp.asarray(hi * b, jnp.float32)
    x, nb = jnp.asarray(values), jnp.float32(bits)

    def err(l, h):
        s, z = minmax_act_params(l, h, nb)
        return jnp.mean((fake_quant(x, s, z, nb, signed=False) - x) ** 2)

    best = int(jnp.argmin(jax.jit(jax.vmap(err))(cand_lo, cand_hi)))
    return float(cand_lo[best]), float(cand_hi[best])


def _mse_weight_scale(kernel: np.ndarray, bits: int, grid: int = 40) -> jax.Array:
    """Per-output-channel symmetric step size minimising the weight MSE (``[O]``)."""
    w = jnp.asarray(kernel).reshape(-1, kernel.shape[-1])
    base = minmax_weight_scale(w, bits)
    alphas = jnp.linspace(1.0, 0.3, grid)

    def err(a):
        return jnp.mean((fake_quant(w, base * a, 0.0, jnp.float32(bits), signed=True) - w) ** 2, axis=0)

    errs = jax.vmap(err)(alphas)                    # [grid, O]
    return base * alphas[jnp.argmin(errs, axis=0)]


def clipped_state(unet, params: dict, registry: Registry, config: QuantConfig, data: CalibrationData,
                  method: str, batch_size: int = 32) -> dict:
    """Quantizer state whose ranges come from a clipping search (``percentile`` or ``mse``) per layer
    and per candidate bit width, on the calibration data; weights per output channel (MSE search for
    ``mse``, max |w| for ``percentile``)."""
    from qlip_jax.naming import modules_by_name

    samples = activation_samples(unet, params, data, batch_size)
    layers = modules_by_name(params)
    state = {}
    for info in registry.layers:
        def act(key):
            ranges = [_search_range(samples[info.name][key], b, method) for b in config.act_bits]
            s, z = zip(*[minmax_act_params(jnp.float32(lo), jnp.float32(hi), jnp.float32(b))
                         for (lo, hi), b in zip(ranges, config.act_bits)])
            return jnp.stack(s), jnp.stack(z)

        if info.kind == "matmul":
            (a_s, a_z), (b_s, b_z) = act("a"), act("b")
            state[info.name] = {"a_scale": a_s, "a_zero": a_z, "b_scale": b_s, "b_zero": b_z}
            continue
        kernel = np.asarray(layers[info.name]["kernel"])
        w_scale = (_mse_weight_scale(kernel, config.weight_bits) if method == "mse"
                   else minmax_weight_scale(jnp.asarray(kernel), config.weight_bits))
        a_s, a_z = act("input")
        state[info.name] = {"w_scale": w_scale, "a_scale": a_s, "a_zero": a_z}
    return state


def calibrate(pipe, config: QuantConfig, data: CalibrationData, method: str = "minmax") -> QuantSetup:
    """A :class:`QuantSetup` for ``pipe``'s UNet by ``minmax``, ``percentile`` or ``mse`` clipping."""
    registry = unet_registry(pipe.sd.configs.unet, pipe.latent_shape[:2], data.context.shape[1:],
                             config.quantize_attn_matmul)
    unet, params = pipe.unet, pipe.sd.params["unet"]
    if method == "minmax":
        state = minmax_state(unet, params, registry, config, data)
    else:
        state = clipped_state(unet, params, registry, config, data, method)
    return QuantSetup(config, registry, state)
