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
    sd = pipe.sd
    data = collect_calibration_data(pipe, prompts, seeds, guidance, num_steps_kept)
    registry = unet_registry(sd.configs.unet, pipe.latent_shape[:2], data.context.shape[1:],
                             config.quantize_attn_matmul)
    return QuantSetup(config, registry, minmax_state(pipe.unet, sd.params["unet"], registry, config, data))
