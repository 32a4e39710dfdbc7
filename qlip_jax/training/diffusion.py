"""Losses and jitted train steps for pretraining a (miniature) Stable Diffusion from scratch.

Two stages, as latent diffusion is trained:

1. the VAE alone: L1 + L2 reconstruction plus a small KL term towards N(0, I);
2. the UNet and the CLIP text encoder jointly on the frozen VAE's (scaled) latents, with the
   epsilon-prediction objective ``|| eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) ||^2``
   (or the v-prediction one, target ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``),
   ``t`` uniform over the training timesteps, and caption dropout (the empty prompt) so
   classifier-free guidance works at sampling time; optionally weighted per latent cell (e.g. towards
   the cells objects cover, so a small object is not outweighed by the background).

Each step is a pure function ``(state, batch, key) -> (state, metrics)``; the state is a dict of
pytrees (params, optimizer state, EMA params, step) that the checkpointer saves whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qlip_jax.memory import accumulate_value_and_grad, check_micro_batch
from qlip_jax.models.clip import CLIPTextModel
from qlip_jax.models.unet import UNet2DConditionModel
from qlip_jax.models.vae import AutoencoderKL
from qlip_jax.sampling.schedulers import add_noise, velocity
from qlip_jax.training.checkpoint import ema_update


def vae_loss(vae: AutoencoderKL, params, images: jax.Array, key: jax.Array, kl_weight: float):
    """``images [B, H, W, 3]`` in ``[-1, 1]`` -> (loss, metrics)."""
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean((recon - images) ** 2)
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = l1 + l2 + kl_weight * kl
    return loss, {"loss": loss, "l1": l1, "kl": kl}


def make_vae_step(vae: AutoencoderKL, tx: optax.GradientTransformation, kl_weight: float):
    """Jitted ``(state, images, key) -> (state, metrics)``; state = {params, opt, step}."""

    @jax.jit
    def step(state, images, key):
        grads, metrics = jax.grad(lambda p: vae_loss(vae, p, images, key, kl_weight), has_aux=True)(
            state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

    return step


def diffusion_loss(unet: UNet2DConditionModel, text: CLIPTextModel, params, latents: jax.Array,
                   ids: jax.Array, key: jax.Array, alphas_cumprod: jax.Array, weights: jax.Array | None = None,
                   min_snr_gamma: float | None = None, v_weighting: bool = False,
                   prediction_type: str = "epsilon"):
    """Epsilon- or v-prediction MSE. ``latents [B, h, w, c]`` (already scaled), ``ids [B, 77]`` int.

    ``prediction_type`` (static): ``"epsilon"`` (target the noise) or ``"v_prediction"`` (target
    ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``, Salimans & Ho, 2022; the model a zero-terminal-SNR
    schedule needs, since at ``a_t = 0`` the noise is the input itself and says nothing of ``x0``).

    ``weights [B, h, w]`` (optional, >= 0): the loss is the weighted mean of the squared error over
    cells, ``sum w * |eps - eps_theta|^2 / (c * sum w)``; all-equal weights give the plain mean.
    ``min_snr_gamma`` (optional, static): Min-SNR-gamma weighting (Hang et al., 2023): each sample's
    error is further multiplied by ``min(SNR_t, gamma) / SNR_t``, ``SNR_t = a_t / (1 - a_t)``, so the
    low-noise steps count less; it depends on the timestep only, so unlike ``weights`` it leaves the
    minimiser (the posterior mean of the noise at each step) unchanged. For v-prediction the weight is
    ``min(SNR_t, gamma) / (SNR_t + 1)`` (the paper's form for v), 0 at a zero-SNR step.
    ``v_weighting`` (static): each sample's error is further multiplied by ``(SNR_t + 1) / SNR_t``, which
    makes the loss that of v-prediction (Salimans & Ho, 2022) for the same noise-predicting model: in
    terms of the predicted clean latent the plain loss weighs step ``t`` by ``SNR_t``, v by ``SNR_t + 1``,
    so the noisiest steps, where only the caption can say what goes where, count about ``1 / SNR_t``
    times more (x137 at ``t = 961`` for SD's schedule) and the cleanest about as before. A weight of the
    timestep only: the minimiser is unchanged. Only for epsilon prediction (v-prediction's loss is
    that already).
    """
    k_t, k_n = jax.random.split(key)
    b = latents.shape[0]
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(k_n, latents.shape)
    w = jnp.ones(latents.shape[:3], jnp.float32) if weights is None else weights
    per_sample = weighted_errors(unet, text, params, latents, ids, t, noise, alphas_cumprod, w, min_snr_gamma,
                                 v_weighting, prediction_type)
    loss = jnp.sum(per_sample) / jnp.sum(w)
    return loss, {"loss": loss}


def weighted_errors(unet: UNet2DConditionModel, text: CLIPTextModel, params, latents: jax.Array, ids: jax.Array,
                    t: jax.Array, noise: jax.Array, alphas_cumprod: jax.Array, w: jax.Array,
                    min_snr_gamma: float | None = None, v_weighting: bool = False,
                    prediction_type: str = "epsilon") -> jax.Array:
    """``[B]`` per-sample ``sum_cells w * |target - pred|^2`` (mean over channels), SNR-weighted, at the
    drawn timesteps ``t [B]`` and noise ``[B, h, w, c]``: the numerator of :func:`diffusion_loss`, a sum
    over rows, so it splits into micro-batches."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if v_weighting and prediction_type != "epsilon":
        raise ValueError("v_weighting turns the epsilon loss into v-prediction's; with "
                         "prediction_type='v_prediction' the loss is that already")
    noisy = add_noise(alphas_cumprod, latents, noise, t)
    context, _ = text.apply({"params": params["text_encoder"]}, ids)
    pred = unet.apply({"params": params["unet"]}, noisy, t, context)
    target = noise if prediction_type == "epsilon" else velocity(alphas_cumprod, latents, noise, t)
    sq = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)   # [B, h, w]
    per_sample = jnp.sum(w * sq, axis=(1, 2))                            # [B]
    a = alphas_cumprod[t]                                                # [B]
    snr = a / (1.0 - a)                                                  # [B]
    if min_snr_gamma is not None:
        per_sample = per_sample * jnp.minimum(snr, min_snr_gamma) / (
            snr if prediction_type == "epsilon" else snr + 1.0)
    if v_weighting:
        per_sample = per_sample * (snr + 1.0) / snr
    return per_sample


def make_diffusion_step(unet: UNet2DConditionModel, text: CLIPTextModel,
                        tx: optax.GradientTransformation, alphas_cumprod: jax.Array, ema_decay: float,
                        min_snr_gamma: float | None = None, v_weighting: bool = False,
                        prediction_type: str = "epsilon", micro_batch: int | None = None):
    """Jitted ``(state, latents, ids, key, weights=None) -> (state, metrics)``; state = {params, opt, ema,
    step}; ``weights [B, h, w]``, ``min_snr_gamma``, ``v_weighting`` and ``prediction_type`` as in
    :func:`diffusion_loss`.

    ``params``/``ema`` are ``{'unet': ..., 'text_encoder': ...}``. ``micro_batch`` (a divisor of ``B``):
    accumulate the gradient over micro-batches of that many rows (the timesteps and noise are drawn for
    the whole batch first, so the step is the full-batch one to float rounding).
    """

    @jax.jit
    def step(state, latents, ids, key, weights=None):
        n = check_micro_batch(latents.shape[0], micro_batch, "pretraining batch")
        if n == 1:
            loss = lambda p: diffusion_loss(unet, text, p, latents, ids, key, alphas_cumprod, weights,  # noqa: E731
                                            min_snr_gamma, v_weighting, prediction_type)
            grads, metrics = jax.grad(loss, has_aux=True)(state["params"])
        else:
            k_t, k_n = jax.random.split(key)
            t = jax.random.randint(k_t, latents.shape[:1], 0, alphas_cumprod.shape[0])
            noise = jax.random.normal(k_n, latents.shape)
            w = jnp.ones(latents.shape[:3], jnp.float32) if weights is None else weights
            total = jnp.sum(w)

            def part(p, rows):  # this micro-batch's share of the loss, times n (accumulation averages)
                lat, i, tt, nz, ww = rows
                return n * jnp.sum(weighted_errors(unet, text, p, lat, i, tt, nz, alphas_cumprod, ww, min_snr_gamma,
                                                   v_weighting, prediction_type)) / total

            loss, grads = accumulate_value_and_grad(part, state["params"], (latents, ids, t, noise, w), n)
            metrics = {"loss": loss}
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # EMA warm-up (as in diffusers' EMAModel): decay ramps up from 0 over the first steps
        n = state["step"] + 1
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        return {"params": params, "opt": opt, "ema": ema_update(state["ema"], params, decay),
                "step": n}, metrics

    return step
