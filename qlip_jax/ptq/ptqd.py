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
``w_k = sum_l macs_l [idx_l == k] / sum_l macs_l`` (:func:`~qlip_jax.sampling.correction.candidate_weights`):
``k = sum_k w_k k_sk``, ``b = sum_k w_k b_sk``, ``Var = sum_k w_k Var_sk`` (a first-order model in
which layers' quantization errors add up in proportion to their compute). It is exact at every
uniform schedule; full-precision layers carry no weight, so a schedule mixing float and quantized
layers gets a correction scaled down by its quantized MAC fraction, and a row with every layer at
full precision (``w = 0``) is left exactly untouched (output and noise std bit-identical).

Steps
-----
The arrays are per sampler step, ``[S, K]``, for the timestep array they were calibrated on
(``timesteps [S]`` is stored). :class:`~qlip_jax.sampling.pipeline.Text2Image` refuses a correction
calibrated for another step count or timestep grid (:func:`~qlip_jax.sampling.correction.check_sampler`); calibrate it again for
that sampler (steps absent from the calibration data copy the nearest calibrated step), or drop it
with ``dataclasses.replace(setup, ptqd=None)``.

Where it lives: ``QuantSetup.ptqd`` (a :class:`~qlip_jax.sampling.correction.PTQDCorrection` pytree, sibling of the per-layer
quantizer state; the sampler receives it as ``params["ptqd"]``, traced), fitted by
``calibrate(..., method="ptqd")`` and saved/loaded with the state by :mod:`qlip_jax.ptq.persist`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.ptq.calibration import CalibrationData, nearest_rows
from qlip_jax.quant.registry import Registry
from qlip_jax.quant.state import QuantArgs, QuantConfig
from qlip_jax.sampling.correction import FIELDS, PTQDCorrection

#: Output pixels kept per calibration row for the fit (fixed positions spread uniformly).
DEFAULT_PIXELS = 1024

#: Lower bound of the fitted ``k``. As in PTQD's released sampler, which applies ``k`` only when it
#: is positive: for ``k < 0`` (the quantized output shrinks towards zero, as low activation widths
#: tend to make it) dividing by ``1 + k < 1`` amplifies the residual: on the tiny test model (W4A4
#: on the ``mse`` base, ``k ~ -0.15``) it raised the output error on held-out prompts from 0.44 to
#: 0.53 relative RMS. With ``k = 0`` the correction is the bias subtraction (``b`` = the mean error)
#: and the whole error's variance is absorbed.
MIN_K = 0.0


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
              for f in FIELDS[1:]}
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
            for f, v in zip(FIELDS[1:], (k, b, vu, vc, cov)):
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
