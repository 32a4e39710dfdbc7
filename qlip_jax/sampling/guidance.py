"""Classifier-free guidance: one UNet call on the unconditional and conditional halves, combined.

Used by the jitted sampling loop (:mod:`qlip_jax.sampling.pipeline`), the Q2B loss
(:mod:`qlip_jax.selector.training`) and the denoising probe, so that all three guide the same way.
The model output may be epsilon, v or x0 (whatever the scheduler's ``prediction_type`` is): guidance
is the same linear combination of the two predictions.

``guidance_rescale`` (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", Sec. 3.4; diffusers' ``guidance_rescale``): the guided output is rescaled to the standard
deviation of the conditional one and mixed back, ``phi * rescaled + (1 - phi) * guided``. It keeps a
large guidance scale from over-saturating images, which matters most for zero-terminal-SNR models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def combine(out_uncond: Array, out_cond: Array, scale, rescale: float = 0.0) -> Array:
    """Guided output ``[B, ...]`` from the unconditional and conditional ones ``[B, ...]``.

    ``scale``: a scalar or ``[B]`` (one per sample); ``rescale``: ``phi`` in ``[0, 1]`` (static; 0 is
    plain guidance). The standard deviations are per sample over all other axes, unbiased (as diffusers'
    ``torch.std``).
    """
    scale = jnp.asarray(scale, out_cond.dtype)
    scale = scale.reshape(scale.shape + (1,) * (out_cond.ndim - scale.ndim)) if scale.ndim else scale
    guided = out_uncond + scale * (out_cond - out_uncond)
    if rescale == 0.0:
        return guided
    axes = tuple(range(1, out_cond.ndim))
    std_cond = jnp.std(out_cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return rescale * guided * (std_cond / std_guided) + (1.0 - rescale) * guided


def guided_output(unet, unet_params, x: Array, t, cond: Array, uncond: Array, scale, q=None,
                  rescale: float = 0.0) -> Array:
    """The classifier-free-guided model output, float32 ``[B, h, w, c]``.

    ``x [B, h, w, c]``; ``t`` one timestep for the batch (scalar) or ``[B]``; ``cond, uncond [B, M, D]``;
    ``scale`` scalar or ``[B]``; ``q``: the quantizer arguments of the UNet call (None: float), already
    for the doubled batch ``[2B]`` (unconditional half first); ``rescale`` as in :func:`combine`.
    """
    t = jnp.asarray(t)
    out = unet.apply({"params": unet_params}, jnp.concatenate([x, x]),
                     t if t.ndim == 0 else jnp.concatenate([t, t]), jnp.concatenate([uncond, cond]), q)
    out_u, out_c = jnp.split(out.astype(jnp.float32), 2)
    return combine(out_u, out_c, scale, rescale)
