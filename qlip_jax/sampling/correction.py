"""The PTQD correction as the sampler applies it: the tables (:class:`PTQDCorrection`, a pytree) and the
traced functions that correct a step's model output and absorb its residual variance.

The model behind the tables, how they are fitted and how mixed-precision rows mix them are described in
:mod:`qlip_jax.ptq.ptqd`, which estimates them by running the model; this module only reads them, so
the sampler depends on it and not on the calibration that produced them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.quant.registry import Registry
from qlip_jax.sampling import schedulers

#: The tables, in the order they are stored.
FIELDS = ("timesteps", "k", "bias", "var_uncond", "var_cond", "cov")


@flax.struct.dataclass
class PTQDCorrection:
    """PTQD correction tables of one quantizer (a pytree of arrays; nothing static).

    Attributes:
      timesteps: int32 ``[S]`` the sampler timesteps the tables were calibrated for.
      k: ``[S, K]`` correlation coefficient of the output error on the float output.
      bias: ``[S, K, C]`` mean of the residual ``r`` per latent channel.
      var_uncond, var_cond: ``[S, K]`` variance of ``r`` on unconditional / conditional rows.
      cov: ``[S, K]`` covariance of the two halves' residuals at the same latent.
    """

    timesteps: jax.Array
    k: jax.Array
    bias: jax.Array
    var_uncond: jax.Array
    var_cond: jax.Array
    cov: jax.Array

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.k)[0])

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "PTQDCorrection":
        missing = set(FIELDS) - set(d)
        if missing:
            raise ValueError(f"PTQD correction is missing {sorted(missing)}")
        return cls(**{f: jnp.asarray(d[f]) for f in FIELDS})


def summary(corr: PTQDCorrection) -> dict:
    """JSON-able overview (per candidate, over steps) for ``QuantSetup.info``."""
    k = np.asarray(corr.k)
    return {"steps": corr.num_steps, "k_mean": k.mean(0).round(5).tolist(),
            "k_min": k.min(0).round(5).tolist(), "k_max": k.max(0).round(5).tolist(),
            "bias_abs_mean": np.abs(np.asarray(corr.bias)).mean((0, 2)).round(5).tolist(),
            "var_cond_mean": np.asarray(corr.var_cond).mean(0).tolist()}


# ----------------------------------------------------------------------------------------------
# Application (JAX, traced)


def check_sampler(corr: PTQDCorrection, sched: schedulers.Scheduler) -> None:
    """Raise a clear error if ``corr`` was calibrated for another step count or timestep grid."""
    want, got = np.asarray(sched.timesteps), np.asarray(corr.timesteps)
    if want.shape != got.shape or not np.array_equal(want, got):
        raise ValueError(
            f"the PTQD correction was calibrated for a {got.shape[0]}-step sampler (timesteps "
            f"{got.tolist()[:6]}...), not this {sched.kind} sampler's {want.shape[0]} steps "
            f"({want.tolist()[:6]}...); calibrate method 'ptqd' for this sampler, or drop the "
            f"correction with dataclasses.replace(setup, ptqd=None)")


def mac_shares(registry: Registry) -> np.ndarray:
    """float32 ``[L]``: each quantized layer's share of the UNet's MACs (sums to 1), the weights that
    mix the per-candidate tables of rows whose layers run at different widths."""
    macs = np.asarray(registry.macs(), np.float64)
    return (macs / macs.sum()).astype(np.float32)


def mix_weights(mix: jax.Array, mac_share: jax.Array) -> jax.Array:
    """``[B, K]`` MAC share of each quantized candidate, from each layer's weights over the candidates
    ``mix [B, L, K]`` (one-hot rows, or Q2B's straight-through choice); ``mac_share [L]`` sums to 1."""
    return jnp.einsum("blk,l->bk", mix.astype(jnp.float32), jnp.asarray(mac_share, jnp.float32))


def candidate_weights(idx: jax.Array, mac_share: jax.Array, num_quantized: int) -> jax.Array:
    """:func:`mix_weights` of the rows of ``idx [B, L]`` (full-precision layers, index ``K``, count nowhere)."""
    return mix_weights(jax.nn.one_hot(idx, num_quantized + 1, dtype=jnp.float32)[..., :num_quantized], mac_share)


def _at(table: jax.Array, step: jax.Array, weights: jax.Array) -> jax.Array:
    """Rows ``table[step]`` (``[S, K, ...]`` at ``step [B]``) mixed by ``weights [B, K]`` -> ``[B, ...]``."""
    return jnp.einsum("bk,bk...->b...", weights, table[step].astype(jnp.float32))


def _rows(step, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(step, jnp.int32), (batch,))


def correct_output(corr: PTQDCorrection, step, weights: jax.Array, out: jax.Array) -> jax.Array:
    """``(out - b) / (1 + k)`` per row, with the row's mixed ``k, b`` (:func:`candidate_weights`).

    ``step``: scalar or int ``[B]`` sampler step; ``weights [B, K]``; ``out [B, ..., C]``. Rows with no
    quantized weight (``sum_k w_k = 0``) are returned unchanged, bit for bit.
    """
    b = out.shape[0]
    step = _rows(step, b)
    k = _at(corr.k, step, weights)                                        # [B]
    bias = _at(corr.bias, step, weights)                                  # [B, C]
    per_row = lambda v: v.reshape((b,) + (1,) * (out.ndim - v.ndim) + v.shape[1:])  # noqa: E731
    corrected = (out.astype(jnp.float32) - per_row(bias)) / per_row(1.0 + k)
    active = per_row(jnp.sum(weights, axis=-1) > 0)
    return jnp.where(active, corrected.astype(out.dtype), out)


def residual_variance(corr: PTQDCorrection, step, weights: jax.Array, guidance) -> jax.Array:
    """``[B]`` variance of the corrected guided output's residual noise,
    ``sum_k w_k ((1 - g)^2 V_u + 2 g (1 - g) C + g^2 V_c) / (1 + k)^2`` (0 for full-precision rows)."""
    step = _rows(step, weights.shape[0])
    g = jnp.asarray(guidance, jnp.float32)
    var = ((1.0 - g) ** 2 * corr.var_uncond + 2.0 * g * (1.0 - g) * corr.cov + g ** 2 * corr.var_cond)
    k = _at(corr.k, step, weights)
    return jnp.maximum(_at(var, step, weights), 0.0) / (1.0 + k) ** 2


def sampler_correction(corr: PTQDCorrection, sched: schedulers.Scheduler, step, idx: jax.Array,
                       out: jax.Array, guidance, mac_share, num_quantized: int):
    """What the sampler calls once per step: ``(corrected out [B, h, w, C], sigma [B] or None)``.

    ``idx [B, L]``: the step's candidate per layer and row; ``out``: the guided model output;
    ``mac_share [L]``: each layer's share of the UNet's MACs. ``sigma`` is DDIM's absorbed noise std
    when the scheduler is DDIM with ``eta > 0`` (pass it to :func:`~qlip_jax.sampling.schedulers.step`),
    else None (deterministic samplers: correlated correction and bias only).
    """
    weights = candidate_weights(idx, mac_share, num_quantized)
    out = correct_output(corr, step, weights, out)
    if sched.kind != "ddim" or sched.eta <= 0:
        return out, None
    return out, schedulers.ddim_absorbed_sigma(sched, step, residual_variance(corr, step, weights, guidance))
