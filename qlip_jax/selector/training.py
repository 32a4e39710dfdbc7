"""Training the selector: T2Q by regression, then Q2B by output matching with a bit penalty.

T2Q: ``min || T2Q(pooled) - q ||^2`` over the training prompts' normalised quality labels.

Q2B (the paper's objective), with UNet, text encoder, T2Q and the base method's quantizer state frozen:

    L = || eps_FP(x_t, t) - eps_Q(x^_t, t) ||^2 + lambda_bit * (b_high * sum_k p_high + b_med * sum_k p_med)

``x_t`` is the float trajectory's latent at step ``t``; ``x^_t`` the latent of the trajectory sampled
with the current (hard) schedule from the same seed, so the selector sees the drift its own choices
cause (``trajectory="fp"`` uses ``x_t`` for both, a cheaper departure). Both noise predictions are the
guided ones (the sampler's actual update direction). The choice inside the UNet is the
straight-through one-hot of ``(p_low, p_med, p_high)``: the forward pass runs exactly the argmax
candidate; the backward pass sees ``x_q = sum_c w_c Q_c(x)`` and so gets ``dL/dw_c = <dL/dx_q, Q_c(x)>``
(:meth:`QuantArgs.from_mix`).

The bit penalty is averaged instead of summed over the ``T x L`` choices and divided by ``b_high``
(so ``lambda_bit`` is on the scale of the per-element MSE and does not depend on the model's depth or
step count: ``lambda_paper = lambda_bit / (T * L * b_high)``); ``macs_weighted`` weights each layer by
its share of the MACs instead (BitOPs-aware).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qlip_jax.memory import check_micro_batch, rows_value_and_grad
from qlip_jax.sampling import correction
from qlip_jax.quant.state import QuantArgs
from qlip_jax.sampling.guidance import guided_output


def fit_t2q(apply_fn: Callable, params, pooled: np.ndarray, target: np.ndarray, steps: int = 2000,
            lr: float = 1e-3, batch: int = 64, seed: int = 0, weight_decay: float = 1e-4):
    """Adam(W) MSE regression of ``apply_fn(params, pooled [B, D]) -> q [B]`` on ``target [N]``.

    Returns ``(params, losses [steps])``; minibatches are drawn with ``seed``.
    """
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.05), weight_decay=weight_decay)
    opt = tx.init(params)
    x, y = jnp.asarray(pooled, jnp.float32), jnp.asarray(target, jnp.float32)

    @jax.jit
    def step(params, opt, x, y, idx):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((apply_fn(p, x[idx]) - y[idx]) ** 2))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        params, opt, loss = step(params, opt, x, y, rng.integers(0, len(y), min(batch, len(y))))
        losses.append(float(loss))
    return params, np.asarray(losses)


def choice_to_candidates(w: jax.Array, low: int, med: int, high: int, num_quantized: int) -> jax.Array:
    """``w [..., 3]`` weights of (low, med, high) -> ``[..., K]`` weights over the quantized candidates."""
    eye = jnp.eye(num_quantized, dtype=w.dtype)
    return w[..., 0:1] * eye[low] + w[..., 1:2] * eye[med] + w[..., 2:3] * eye[high]


def q2b_frozen(unet_params, quant, lambda_bit: float) -> dict:
    """The frozen inputs of the Q2B loss, passed to the jitted step as an argument (never closed over):
    ``{'unet': UNet params, 'quant': quantizer state, 'ptqd': PTQD correction or None, 'lambda_bit': float32
    scalar}``. ``lambda_bit`` is traced, so a sweep over it (the paper's trade-off curve) runs one program."""
    return {"unet": unet_params, "quant": quant.state, "ptqd": quant.ptqd,
            "lambda_bit": jnp.asarray(lambda_bit, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Q2BLoss:
    """The Q2B loss split where the selector's parameters enter it.

    ``probs_fn(params, q [B]) -> probs [B, T, L, 3]``; ``rows(probs, frozen, batch) -> (loss, metrics)``: the
    rest (schedule, UNet passes, MSE, penalty), in which each row reads only its own probabilities.
    Calling it, ``loss(params, frozen, batch)``, is the whole loss.
    """

    probs_fn: Callable
    rows: Callable

    def __call__(self, params, frozen, batch):
        return self.rows(self.probs_fn(params, batch["q"]), frozen, batch)


def make_q2b_loss(unet, quant, probs_fn: Callable, ste_fn: Callable, penalty_fn: Callable,
                  low: int, med: int, high: int) -> Q2BLoss:
    """``loss(q2b_params, frozen, batch) -> (loss, metrics)`` for one batch of rows (a :class:`Q2BLoss`).

    ``frozen`` is :func:`q2b_frozen` (UNet params, quantizer state, PTQD tables, ``lambda_bit``; only ``quant``'s static
    config, registry and whether it has a PTQD correction are read from ``quant`` here).
    ``batch``: ``q [B]`` (T2Q's prediction), ``step [B]`` (int step index), ``t [B]`` (its timestep),
    ``x_fp, x_hat [B, h, w, c]``, ``cond, uncond [B, M, D]``, ``guidance [B]``.
    ``probs_fn(params, q) -> [B, T, L, 3]``; ``ste_fn(probs) -> [.., 3]`` straight-through one-hot;
    ``penalty_fn(probs) -> scalar`` the bit penalty (a mean over the rows).

    With a PTQD base quantizer (``quant.ptqd``) the quantized output is corrected as the sampler
    corrects it (:func:`qlip_jax.sampling.correction.correct_output`, the tables mixed by each row's MAC share
    per candidate, through the straight-through choice), so Q2B learns against what sampling runs.
    """
    cfg, names = quant.config, quant.registry.names
    share = None if quant.ptqd is None else correction.mac_shares(quant.registry)

    def rows_loss(probs, frozen, batch):                                      # probs [B, T, L, 3]
        rows = jnp.arange(probs.shape[0])
        p_t = probs[rows, batch["step"]]                                      # [B, L, 3]
        mix = choice_to_candidates(ste_fn(p_t), low, med, high, cfg.num_quantized)  # [B, L, K]
        q = QuantArgs.from_mix(frozen["quant"], jnp.concatenate([mix, mix]), names, cfg,
                               step=jnp.concatenate([batch["step"], batch["step"]]))
        eps_fp = guided_output(unet, frozen["unet"], batch["x_fp"], batch["t"], batch["cond"], batch["uncond"],
                               batch["guidance"], None)
        eps_q = guided_output(unet, frozen["unet"], batch["x_hat"], batch["t"], batch["cond"], batch["uncond"],
                              batch["guidance"], q)
        if share is not None:
            eps_q = correction.correct_output(frozen["ptqd"], batch["step"], correction.mix_weights(mix, share), eps_q)
        mse = jnp.mean((jax.lax.stop_gradient(eps_fp) - eps_q) ** 2)
        pen = penalty_fn(probs)
        loss = mse + frozen["lambda_bit"] * pen
        return loss, {"loss": loss, "mse": mse, "penalty": pen}

    return Q2BLoss(probs_fn, rows_loss)


def make_q2b_step(loss: Q2BLoss, tx: optax.GradientTransformation, micro_batch: int | None = None,
                  mesh: Mesh | None = None):
    """Jitted ``(params, opt, frozen, batch) -> (params, opt, metrics)``.

    ``frozen`` (:func:`q2b_frozen`) and ``batch`` are arguments of the compiled step. With
    ``micro_batch`` (a divisor of the batch's rows) the rows' part of the loss runs over micro-batches of
    that many rows (the loss is a mean over rows: the same step to float rounding).

    The gradient is taken in two parts: each row's gradient with respect to its own probabilities
    ``[B, T, L, 3]`` (rows split over the devices, no sum across rows), then those gathered on every device
    of ``mesh`` and pulled back through ``probs_fn`` there. So the sum over rows runs in one fixed order
    on each device, and the step is the same bit for bit whatever the processes and devices the rows
    were split over (an all-reduce would sum in an order that depends on them; Adam turns such
    differences of near-zero gradients into visible parameter differences).
    """
    pin = (lambda x: x) if mesh is None else (
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec())))

    @jax.jit
    def step(params, opt, frozen, batch):
        n = check_micro_batch(batch["q"].shape[0], micro_batch, "Q2B batch")
        q = pin(batch["q"])
        probs, pull = jax.vjp(lambda p: loss.probs_fn(p, q), params)
        (_, metrics), g_probs = rows_value_and_grad(lambda pr, b: loss.rows(pr, frozen, b), probs, batch, n,
                                                    has_aux=True)
        g, = pull(pin(g_probs))
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, metrics

    return step
