"""PTQD-style correction of the quantization noise of the UNet output (He et al., NeurIPS 2023).

Model
-----
For one sampler step ``s`` and quantized candidate ``k``, the quantized model output (the noise
prediction for an epsilon model; the output whatever the prediction type) is written as

    out_Q = out_FP + Delta,      Delta = k_sk * out_FP + r,      E[r] = b_sk  (per latent channel)

with ``k_sk`` the least-squares coefficient of ``Delta`` on ``out_FP`` (one per step and candidate,
pooled over pixels, channels and both guidance halves, with a per-channel intercept; clipped at 0
like PTQD's released sampler does, see :data:`MIN_K`) and ``r`` the part of the error uncorrelated
with the output. The sampler then uses

* **correlated part and bias**: ``out = (out_Q - b_sk) / (1 + k_sk)``, whose error is
  ``(r - b_sk) / (1 + k_sk)``;
* **residual variance**: that remaining error is treated as Gaussian noise of variance
  ``sigma_r^2 = Var(r_guided) / (1 + k_sk)^2`` already injected into ``x_prev`` with the DDIM factor
  ``c_t`` (:func:`~qlip_jax.sampling.schedulers.ddim_output_coefficient`), so the sampler's own fresh
  noise is reduced to ``sigma'_t = sqrt(max(sigma_t^2 - c_t^2 sigma_r^2, 0))``
  (:func:`~qlip_jax.sampling.schedulers.ddim_absorbed_sigma`). As in PTQD's sampler, ``sigma'_t`` also
  enters DDIM's direction coefficient ``sqrt(1 - a_prev - sigma'^2)``.

Which sampler gets what: only DDIM with ``eta > 0`` injects noise, so only it absorbs the residual
variance. Deterministic samplers (DDIM with ``eta = 0``, PLMS, DPM-Solver++) get the correlated
correction and the bias subtraction only; their residual noise stays uncorrected.

Classifier-free guidance: the sampler corrects the *guided* output. ``k`` and ``b`` are shared by the
two halves of a prompt, so correcting the guided output equals correcting each half
(``b + g (b - b) = b``). The residual of the guided output is ``(1 - g) r_u + g r_c``; its variance
depends on the guidance scale ``g`` (a traced input of the sampler) and on how the two halves' residuals
correlate, so calibration keeps ``Var(r_u)``, ``Var(r_c)`` and ``Cov(r_u, r_c)`` per step and candidate
(from the conditional and unconditional rows of the same latent, paired by
:func:`pair_guidance_halves`) and the sampler evaluates
``(1 - g)^2 V_u + 2 g (1 - g) C + g^2 V_c`` for its ``g``. Steps without paired rows assume perfectly
correlated halves (``C = V``), which absorbs the least variance.

Mixed precision
---------------
The correction is calibrated at uniform schedules (all layers at candidate ``k``). Under a QLIP
schedule, row ``b`` at step ``s`` has per-layer candidates ``idx [L]``; its correction is the mixture of
the per-candidate corrections weighted by each quantized candidate's share of the UNet's MACs,
``w_k = sum_l macs_l [idx_l == k] / sum_l macs_l`` (:func:`candidate_weights`):
``k = sum_k w_k k_sk``, ``b = sum_k w_k b_sk``, ``Var = sum_k w_k Var_sk`` (a first-order model in
which layers' quantization errors add up in proportion to their compute). It is exact at every
uniform schedule; full-precision layers carry no weight, so a schedule mixing float and quantized
layers gets a correction scaled down by its quantized MAC fraction, and a row with every layer at
full precision (``w = 0``) is left exactly untouched (output and noise std bit-identical).

Steps
-----
The arrays are per sampler step, ``[S, K]``, for the timestep array they were calibrated on
(``timesteps [S]`` is stored). :class:`~qlip_jax.sampling.pipeline.Text2Image` refuses a correction
calibrated for another step count or timestep grid (:func:`check_sampler`); calibrate it again for
that sampler (steps absent from the calibration data copy the nearest calibrated step), or drop it
with ``dataclasses.replace(setup, ptqd=None)``.

Where it lives: ``QuantSetup.ptqd`` (a :class:`PTQDCorrection` pytree, sibling of the per-layer
quantizer state; the sampler receives it as ``params["ptqd"]``, traced), fitted by
``calibrate(..., method="ptqd")`` and saved/loaded with the state by :mod:`qlip_jax.quant.persist`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.quant.calibration import CalibrationData, nearest_rows
from qlip_jax.quant.registry import Registry
from qlip_jax.quant.state import QuantArgs, QuantConfig
from qlip_jax.sampling import schedulers

#: Output pixels kept per calibration row for the fit (fixed positions spread uniformly).
DEFAULT_PIXELS = 1024

#: Lower bound of the fitted ``k``. As in PTQD's released sampler, which applies ``k`` only when it
#: is positive: for ``k < 0`` (the quantized output shrinks towards zero, as low activation widths
#: tend to make it) dividing by ``1 + k < 1`` amplifies the residual: on the tiny test model (W4A4
#: on the ``mse`` base, ``k ~ -0.15``) it raised the output error on held-out prompts from 0.44 to
#: 0.53 relative RMS. With ``k = 0`` the correction is the bias subtraction (``b`` = the mean error)
#: and the whole error's variance is absorbed.
MIN_K = 0.0

_FIELDS = ("timesteps", "k", "bias", "var_uncond", "var_cond", "cov")


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
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "PTQDCorrection":
        missing = set(_FIELDS) - set(d)
        if missing:
            raise ValueError(f"PTQD correction is missing {sorted(missing)}")
        return cls(**{f: jnp.asarray(d[f]) for f in _FIELDS})


# ----------------------------------------------------------------------------------------------
# Estimation (NumPy, float64)


def fit_linear(out_fp: np.ndarray, out_q: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares ``out_Q - out_FP = k * out_FP + b_c + r`` over samples ``[..., C]``.

    One slope ``k`` for all channels, one intercept ``b_c`` per channel (pooled within-channel
    regression). Returns ``(k, bias [C])``; ``k`` is clipped below at :data:`MIN_K`.
    """
    e = np.asarray(out_fp, np.float64).reshape(-1, np.shape(out_fp)[-1])
    d = np.asarray(out_q, np.float64).reshape(e.shape) - e
    ec, dc = e - e.mean(0), d - d.mean(0)
    den = float(np.sum(ec * ec))
    k = float(np.sum(ec * dc)) / den if den > 0 else 0.0
    k = max(k, MIN_K)
    return k, d.mean(0) - k * e.mean(0)


def pair_guidance_halves(data: CalibrationData) -> tuple[np.ndarray, np.ndarray]:
    """``(uncond_rows [M], cond_rows [M])``: the rows of ``data`` that are the two guidance halves of
    the same latent (same step index, identical latents), each row used at most once."""
    pool: dict = {}
    for r in np.flatnonzero(~np.asarray(data.is_cond, bool)):
        pool.setdefault((int(data.step_index[r]), np.asarray(data.latents[r]).tobytes()), []).append(r)
    u, c = [], []
    for r in np.flatnonzero(np.asarray(data.is_cond, bool)):
        match = pool.get((int(data.step_index[r]), np.asarray(data.latents[r]).tobytes()))
        if match:
            u.append(match.pop(0))
            c.append(r)
    return np.asarray(u, np.int64), np.asarray(c, np.int64)


def fit_correction(out_fp: np.ndarray, out_q: np.ndarray, step_index: np.ndarray,
                   pairs: tuple[np.ndarray, np.ndarray], timesteps) -> PTQDCorrection:
    """Fit the tables from model outputs on calibration rows.

    Args:
      out_fp: ``[N, P, C]`` float outputs (``P`` sampled pixels per row).
      out_q: ``[K, N, P, C]`` quantized outputs at each uniform candidate.
      step_index: int ``[N]`` sampler step of each row.
      pairs: ``(uncond_rows, cond_rows)`` from :func:`pair_guidance_halves`.
      timesteps: ``[S]`` the sampler's timesteps; rows of steps without data copy the nearest step.
    """
    out_fp, out_q = np.asarray(out_fp, np.float64), np.asarray(out_q, np.float64)
    steps = np.asarray(step_index)
    n_steps, n_cand, channels = len(timesteps), out_q.shape[0], out_fp.shape[-1]
    if steps.min() < 0 or steps.max() >= n_steps:
        raise ValueError(f"calibration data has step indices {steps.min()}..{steps.max()} outside the "
                         f"sampler's 0..{n_steps - 1}")
    u_rows, c_rows = (np.asarray(p, np.int64) for p in pairs)
    calibrated = sorted(set(int(s) for s in steps))
    tables = {f: np.zeros((len(calibrated), n_cand) + ((channels,) if f == "bias" else ()))
              for f in _FIELDS[1:]}
    for j, s in enumerate(calibrated):
        rows = np.flatnonzero(steps == s)
        in_step = steps[u_rows] == s
        pu, pc = u_rows[in_step], c_rows[in_step]
        for kk in range(n_cand):
            k, b = fit_linear(out_fp[rows], out_q[kk, rows])
            resid = out_q[kk] - out_fp - k * out_fp - b          # [N, P, C] (rows of step s used)
            if len(pu):
                vu, vc = np.mean(resid[pu] ** 2), np.mean(resid[pc] ** 2)
                cov = np.mean(resid[pu] * resid[pc])
            else:  # no paired halves: assume perfectly correlated ones
                vu = vc = cov = np.mean(resid[rows] ** 2)
            for f, v in zip(_FIELDS[1:], (k, b, vu, vc, cov)):
                tables[f][j, kk] = v
    pick = np.searchsorted(calibrated, nearest_rows(calibrated, n_steps))
    return PTQDCorrection(timesteps=jnp.asarray(timesteps, jnp.int32),
                          **{f: jnp.asarray(v[pick], jnp.float32) for f, v in tables.items()})


def pixel_positions(height: int, width: int, pixels: int = DEFAULT_PIXELS) -> np.ndarray:
    """``[P]`` flat pixel positions, ``P = min(pixels, height * width)``, spread uniformly."""
    n = height * width
    return np.unique(np.round(np.linspace(0, n - 1, min(pixels, n))).astype(np.int64))


@functools.lru_cache(maxsize=16)
def _sampled_outputs(unet, config: QuantConfig, names: tuple[str, ...]):
    """Jitted ``fp(params, x, t, c, pix)`` and ``quant(params, state, x, t, c, step, k, pix)``: the
    float / uniform-candidate-``k`` UNet outputs at flat pixel positions ``pix``, ``[B, P, C]``."""
    def sample(out, pix):
        return out.reshape(out.shape[0], -1, out.shape[-1])[:, pix].astype(jnp.float32)

    @jax.jit
    def fp(params, x, t, c, pix):
        return sample(unet.apply({"params": params}, x, t, c), pix)

    @jax.jit
    def quant(params, state, x, t, c, step, k, pix):
        idx = jnp.full((x.shape[0], len(names)), k, jnp.int32)
        q = QuantArgs.from_indices(state, idx, names, config, step=step, quantized_only=True)
        return sample(unet.apply({"params": params}, x, t, c, q), pix)

    return fp, quant


def model_outputs(unet, params: dict, state: dict, registry: Registry, config: QuantConfig,
                  data: CalibrationData, pixels: int = DEFAULT_PIXELS,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Float and quantized (each uniform candidate) UNet outputs on ``data`` at :func:`pixel_positions`:
    ``(out_fp [N, P, C], out_q [K, N, P, C])`` (step tables read each row's ``step_index``)."""
    fp, quant = _sampled_outputs(unet, config, registry.names)
    pix = jnp.asarray(pixel_positions(*data.latents.shape[1:3], pixels))
    steps = jnp.asarray(data.step_index, jnp.int32)
    outs_fp, outs_q = [], []
    for i in range(0, len(data), batch_size):
        sl = slice(i, i + batch_size)
        x, t, c = data.latents[sl], data.timesteps[sl], data.context[sl]
        outs_fp.append(np.asarray(fp(params, x, t, c, pix)))
        outs_q.append(np.stack([np.asarray(quant(params, state, x, t, c, steps[sl], jnp.int32(k), pix))
                                for k in range(config.num_quantized)]))
    return np.concatenate(outs_fp), np.concatenate(outs_q, axis=1)


def calibrate_correction(pipe, setup, data: CalibrationData, pixels: int = DEFAULT_PIXELS,
                         batch_size: int = 32) -> PTQDCorrection:
    """PTQD tables for quantizer ``setup`` (a :class:`~qlip_jax.quant.state.QuantSetup`) of ``pipe``'s
    UNet, for ``pipe``'s timesteps, from the calibration ``data`` (both guidance halves)."""
    out_fp, out_q = model_outputs(pipe.unet, pipe.sd.params["unet"], setup.state, setup.registry,
                                  setup.config, data, pixels, batch_size)
    return fit_correction(out_fp, out_q, data.step_index, pair_guidance_halves(data),
                          np.asarray(pipe.sched.timesteps))


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
