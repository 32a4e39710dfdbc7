"""Functional diffusion schedulers: DDIM, PNDM (PLMS) and DPM-Solver++(2M).

Every quantity that depends on the step is precomputed in NumPy (float64, then float32) into arrays
of a :class:`Scheduler` pytree, so a step is a pure function of a *traced* step index ``i``, usable
inside ``lax.scan``:

    sched = make_scheduler("ddim", SchedulerConfig.from_json(path), num_inference_steps=25)
    state = init_state(sched, x)
    x, state = step(sched, state, i, model_output, x, noise)   # for i in range(T)

``sched.timesteps [T]`` are the model's timesteps, in evaluation order; ``T`` is their actual number
(PLMS without Runge-Kutta warm-up evaluates the model ``N + 1`` times for ``N`` requested steps).
The timestep grids, the PLMS warm-up and the DPM-Solver++ update follow diffusers'
``DDIMScheduler``, ``PNDMScheduler`` (``skip_prk_steps=True``) and ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, ``solver_order=2``, midpoint, ``final_sigmas_type="zero"``), and
match them step by step (``tests/test_schedulers.py``).

DDIM keeps its per-step noise std ``sigma [T]`` explicit, so a variance correction (PTQD) can add to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ddim", "pndm", "dpmsolver++")
_ALIASES = {"plms": "pndm", "dpm++": "dpmsolver++", "dpmsolver": "dpmsolver++"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers ``scheduler_config.json`` that define the noise schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    #: fields other diffusers schedulers write; accepted if they hold a value we reproduce
    _MUST_BE = {
        "clip_sample": (False,), "thresholding": (False,), "rescale_betas_zero_snr": (False,),
        "skip_prk_steps": (True,), "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
        "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
        "lower_order_final": (True,), "final_sigmas_type": ("zero",), "euler_at_final": (False,),
        "variance_type": (None,), "lambda_min_clipped": (-float("inf"),), "timestep_type": ("discrete",),
    }
    #: fields with no effect on what we compute (thresholding is off, no SDE variants)
    _IGNORED = frozenset({"_class_name", "_diffusers_version", "clip_sample_range", "sample_max_value",
                          "dynamic_thresholding_ratio", "interpolation_type", "flow_shift",
                          "use_dynamic_shifting", "shift_terms", "time_shift_type"})

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in cls._MUST_BE and k not in cls._IGNORED)
        if unknown:
            raise ValueError(f"unknown scheduler config field(s): {unknown}")
        for k, allowed in cls._MUST_BE.items():
            if k in d and d[k] not in allowed:
                raise ValueError(f"unsupported scheduler config value {k}={d[k]!r} (supported: {allowed})")
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        cfg = cls(**kw)
        if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and cfg.trained_betas is None:
            raise ValueError(f"unsupported beta_schedule '{cfg.beta_schedule}'")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type '{cfg.prediction_type}' (epsilon, v_prediction)")
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing '{cfg.timestep_spacing}'")
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "SchedulerConfig":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"missing scheduler config: {path}") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def betas(self) -> np.ndarray:
        """``[num_train_timesteps]`` float64 betas."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float64)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])

    def alphas_cumprod(self) -> np.ndarray:
        """``[num_train_timesteps]`` float64 ``prod_{s<=t} (1 - beta_s)``."""
        return np.cumprod(1.0 - self.betas())


@flax.struct.dataclass
class Scheduler:
    """Precomputed per-step arrays (``[T]`` or ``[T, k]``) for one kind and step count."""

    timesteps: jax.Array
    coef: dict
    kind: str = flax.struct.field(pytree_node=False)
    prediction_type: str = flax.struct.field(pytree_node=False)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


# ----------------------------------------------------------------------------------------------
# Timestep grids (diffusers' set_timesteps)


def _grid(cfg: SchedulerConfig, n: int, count: int) -> np.ndarray:
    """``count`` timesteps for ``n`` requested steps, descending, per ``timestep_spacing``."""
    big = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, big - 1, count).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = big // count
        return (np.arange(0, count) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    ratio = big / n
    return np.round(np.arange(big, 0, -ratio)).astype(np.int64) - 1


def _check_steps(cfg: SchedulerConfig, n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1 or n > cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be an int in [1, {cfg.num_train_timesteps}], got {n}")


def _f32(**arrays) -> dict:
    return {k: jnp.asarray(np.asarray(v, np.float64), jnp.float32) for k, v in arrays.items()}


def _make_ddim(cfg: SchedulerConfig, n: int, eta: float) -> Scheduler:
    ac = cfg.alphas_cumprod()
    ts = _grid(cfg, n, n)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    prev = ts - cfg.num_train_timesteps // n
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    # sigma_t = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))   (DDIM paper, eq. 16)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    coef = _f32(sqrt_a=np.sqrt(a), sqrt_1ma=np.sqrt(1 - a), sqrt_a_prev=np.sqrt(a_prev),
                dir=np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0.0)), sigma=sigma)
    return Scheduler(jnp.asarray(ts, jnp.int32), coef, "ddim", cfg.prediction_type)


_PLMS_WEIGHTS = np.array([  # weights of (current, last, 2nd last, 3rd last) stored outputs
    [1, 0, 0, 0], [0.5, 0.5, 0, 0], [1.5, -0.5, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24]])


def _make_pndm(cfg: SchedulerConfig, n: int) -> Scheduler:
    ac = cfg.alphas_cumprod()
    base = _grid(cfg, n, n)[::-1]                                         # ascending
    if cfg.timestep_spacing == "trailing":
        base = np.round(np.arange(cfg.num_train_timesteps, 0, -cfg.num_train_timesteps / n))[::-1].astype(np.int64) - 1
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]       # N + 1 evaluations
    ratio = cfg.num_train_timesteps // n
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    count = np.arange(len(ts))
    # Step 1 re-does step 0 from the first sample with the average of both outputs (the PLMS
    # warm-up without Runge-Kutta): it goes from t + ratio to t.
    t_eff = np.where(count == 1, ts + ratio, ts)
    prev = np.where(count == 1, ts, ts - ratio)
    a = ac[t_eff]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    # x_prev = sqrt(a_prev / a) x - (a_prev - a) / (a sqrt(1 - a_prev) + sqrt(a (1 - a) a_prev)) eps
    denom = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
    coef = _f32(x=np.sqrt(a_prev / a), eps=(a_prev - a) / denom, sqrt_a=np.sqrt(a), sqrt_1ma=np.sqrt(1 - a),
                weights=_PLMS_WEIGHTS[np.minimum(count, 4)], use_first=(count == 1), push=(count != 1))
    return Scheduler(jnp.asarray(ts, jnp.int32), coef, "pndm", cfg.prediction_type)


def _make_dpm(cfg: SchedulerConfig, n: int) -> Scheduler:
    ac = cfg.alphas_cumprod()
    big = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, big - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = big // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        ts = np.arange(big, 0, -big / n).round().astype(np.int64) - 1
    sig_all = np.sqrt((1 - ac) / ac)
    sig = np.concatenate([np.interp(ts, np.arange(big), sig_all), [0.0]])  # final sigma: zero
    alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)                                # +inf at the end
    c_x, c_0, c_1 = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        em1 = np.expm1(-h) if np.isfinite(h) else -1.0                     # exp(-h) - 1
        c_x[i] = sigma[i + 1] / sigma[i]
        first_order = i == 0 or i == n - 1  # warm-up, and the final step to sigma = 0
        if first_order:
            c_0[i] = -alpha[i + 1] * em1
        else:  # 2M midpoint: D1 = (m0 - m1) / r0, r0 = h_prev / h
            r0 = (lam[i] - lam[i - 1]) / h
            c_0[i] = -alpha[i + 1] * em1 - 0.5 * alpha[i + 1] * em1 / r0
            c_1[i] = 0.5 * alpha[i + 1] * em1 / r0
    coef = _f32(x=c_x, m0=c_0, m1=c_1, alpha=alpha[:-1], sigma=sigma[:-1])
    return Scheduler(jnp.asarray(ts, jnp.int32), coef, "dpmsolver++", cfg.prediction_type)


def make_scheduler(kind: str, config: SchedulerConfig, num_inference_steps: int, eta: float = 0.0) -> Scheduler:
    """Precompute a scheduler. ``kind``: ``ddim``, ``pndm`` (alias ``plms``) or ``dpmsolver++``.

    ``eta`` (DDIM only): 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
    """
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown scheduler '{kind}'; choose one of {KINDS} (or 'plms')")
    _check_steps(config, num_inference_steps)
    if eta != 0.0 and kind != "ddim":
        raise ValueError("eta is a DDIM parameter; the other schedulers are deterministic")
    if kind == "ddim":
        return _make_ddim(config, num_inference_steps, float(eta))
    if kind == "pndm":
        return _make_pndm(config, num_inference_steps)
    return _make_dpm(config, num_inference_steps)


# ----------------------------------------------------------------------------------------------
# Stepping


def init_state(sched: Scheduler, sample: jax.Array) -> dict:
    """Multistep memory: PLMS keeps 3 past outputs and the first sample, DPM++ the last x0."""
    z = jnp.zeros_like(sample, jnp.float32)
    if sched.kind == "pndm":
        return {"ets": jnp.stack([z, z, z]), "first": z}
    if sched.kind == "dpmsolver++":
        return {"m1": z}
    return {}


def _split_output(sched: Scheduler, output, sample, sqrt_a, sqrt_1ma):
    """``(eps, x0)`` from the model output per ``prediction_type``."""
    if sched.prediction_type == "v_prediction":
        return sqrt_a * output + sqrt_1ma * sample, sqrt_a * sample - sqrt_1ma * output
    return output, (sample - sqrt_1ma * output) / sqrt_a


def step(sched: Scheduler, state: dict, i: jax.Array, model_output: jax.Array, sample: jax.Array,
         noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """One reverse step from ``sample`` (``x`` at ``timesteps[i]``) -> ``(x_prev, state)``.

    ``model_output`` has ``sample``'s shape; ``noise`` (same shape) is used by DDIM with eta > 0.
    """
    c = jax.tree.map(lambda a: a[i], sched.coef)
    out = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    if sched.kind == "ddim":
        eps, x0 = _split_output(sched, out, x, c["sqrt_a"], c["sqrt_1ma"])
        prev = c["sqrt_a_prev"] * x0 + c["dir"] * eps
        if noise is not None:
            prev = prev + c["sigma"] * noise
        return prev, state
    if sched.kind == "pndm":
        w, ets = c["weights"], state["ets"]
        e = w[0] * out + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]
        base = jnp.where(c["use_first"], state["first"], x)
        if sched.prediction_type == "v_prediction":
            e = c["sqrt_a"] * e + c["sqrt_1ma"] * base
        prev = c["x"] * base - c["eps"] * e
        pushed = jnp.stack([out, ets[0], ets[1]])
        new = {"ets": jnp.where(c["push"], pushed, ets), "first": jnp.where(i == 0, x, state["first"])}
        return prev, new
    # dpmsolver++ 2M
    _, x0 = _split_output(sched, out, x, c["alpha"], c["sigma"])
    prev = c["x"] * x + c["m0"] * x0 + c["m1"] * state["m1"]
    return prev, {"m1": x0}


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process ``q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; ``t [B]`` int."""
    a = alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
