"""Functional diffusion schedulers for ``jax.lax.scan``: DDIM, PNDM (PLMS) and DPM-Solver++(2M).

Design
------
diffusers' schedulers are stateful objects whose ``step`` branches in Python on "which step is this"
(counters, history lists, ``if prev_timestep >= 0``). Here that bookkeeping is done once, in numpy
float64, when the scheduler is built; the result is a pytree of per-step coefficient arrays, so one
step is an index ``coeffs.x[i]`` plus elementwise arithmetic, with ``i`` a traced int inside
``lax.scan``:

* :class:`SchedulerConfig` (frozen dataclass, static) mirrors diffusers' ``scheduler_config.json``.
* :func:`make_scheduler` ``(kind, config, num_inference_steps, eta=0.) ->`` :class:`Scheduler`, a
  ``flax.struct`` pytree: ``timesteps [T] int32``, the coefficient arrays ``coeffs`` (one small
  dataclass per kind) and static fields (``kind``, ``num_steps = T``, ``prediction_type``, ...).
* :func:`init_state` ``(sched, sample) -> state`` and
  :func:`step` ``(sched, state, i, model_output, sample, noise=None) -> (prev_sample, state)`` are
  pure functions; the multistep history (PLMS: previous outputs; DPM-Solver++: previous x0
  prediction) lives in the explicit ``state`` (zeros initially). ``i`` indexes ``timesteps``.
* Randomness is explicit: DDIM with ``eta > 0`` takes its fresh noise as the ``noise`` argument.
* :func:`add_noise` / :func:`velocity` are the forward process ``q(x_t | x_0)`` and the
  v-prediction target, for training.

A typical sampling loop::

    sched = make_scheduler("ddim", config, 25)
    def body(carry, i):
        x, state = carry
        eps = unet(x, sched.timesteps[i], ...)
        x, state = step(sched, state, i, eps, x, noise_i)
        return (x, state), None
    x = jax.random.normal(key, shape) * sched.init_noise_sigma
    (x, _), _ = jax.lax.scan(body, (x, init_state(sched, x)), jnp.arange(sched.num_steps))

``T = sched.num_steps`` is the length of the actual timestep array; it can differ from
``num_inference_steps`` (PNDM in PLMS mode evaluates the model ``N + 1`` times, repeating the second
timestep, exactly like diffusers).

Parity with diffusers is the reference behaviour, quirks included: DDIM and PLMS step from ``t`` to
``t - num_train_timesteps // num_inference_steps`` whatever the spacing (for "trailing"/"linspace"
with a step count that does not divide 1000 this is not exactly the next timestep of the array),
and a config key missing from the dict takes the default of the diffusers class that ``kind`` names
(e.g. ``timestep_spacing`` defaults to "leading" for DDIM/PNDM but "linspace" for DPM-Solver,
``set_alpha_to_one`` to True for DDIM but False for PNDM, ``clip_sample`` to True for DDIM).
Coefficients are computed in float64 from float64 ``alphas_cumprod`` (diffusers uses float32;
the difference is ~1e-6 relative) and stored as float32; a step computes in float32 (or wider if
the sample is wider) and returns the sample's dtype.

Shapes: ``sample``, ``model_output`` and ``noise`` share any shape ``[*S]`` (latents are NHWC,
``[B, H, W, C]``); the coefficients of a step are scalars shared by the whole batch.

PTQD variance absorption (:mod:`qlip_jax.ptq.ptqd`): PTQD treats the uncorrelated part of a
quantized model's output error as extra Gaussian noise already injected into ``x_prev`` (with
coefficient :func:`ddim_output_coefficient`) and removes that much variance from DDIM's own fresh
noise: :func:`ddim_absorbed_sigma` gives ``sigma'_i = sqrt(max(sigma_i^2 - c_i^2 var, 0))`` per
sample, and :func:`step` takes it as ``sigma=`` (a scalar or one value per sample). As in PTQD's
sampler, the corrected ``sigma'`` enters both the noise term and the direction coefficient
``sqrt(1 - a_prev - sigma'^2)`` (:func:`ddim_update` recomputes it at run time), while ``c_i`` is
the coefficient of the uncorrected step. DDIM keeps ``coeffs.variance`` (the DDPM posterior
variance) and ``coeffs.sigma = eta * sqrt(variance)`` as arrays for this. Deterministic samplers
(DDIM with ``eta = 0``, PLMS, DPM-Solver++) inject no noise, so there is nothing to absorb.

Zero terminal SNR (``rescale_betas_zero_snr``, Lin et al. 2024, arXiv:2305.08891) is implemented for
DDIM and DPM-Solver++ as diffusers does it (DPM-Solver keeps the last ``abar`` at ``2**-24``); PNDM
refuses it (diffusers' PNDM has no such option), and DDIM refuses an epsilon model on a grid that
visits the ``abar = 0`` step, where epsilon says nothing about ``x0``.

References: DDIM, Song et al. 2020 (arXiv:2010.02502); PNDM/PLMS, Liu et al. 2022
(arXiv:2202.09778); DPM-Solver++, Lu et al. 2022 (arXiv:2211.01095).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models.configs import META_KEYS, ConfigError
from qlip_jax.models.io import read_json

__all__ = [
    "SchedulerConfig", "Scheduler", "DDIMCoeffs", "PLMSCoeffs", "DPMSolverCoeffs",
    "DDIMState", "PLMSState", "DPMSolverState", "KINDS", "make_scheduler", "init_state", "step",
    "ddim_update", "ddim_output_coefficient", "ddim_absorbed_sigma", "add_noise", "velocity",
    "predicted_x0",
    "make_betas", "make_alphas_cumprod",
]

Array = jax.Array

#: canonical scheduler kinds (see :data:`_KIND_ALIASES` for the accepted spellings)
KINDS = ("ddim", "pndm", "dpmsolver++")
_KIND_ALIASES = {
    "ddim": "ddim", "ddimscheduler": "ddim",
    "pndm": "pndm", "plms": "pndm", "pndmscheduler": "pndm",
    "dpmsolver++": "dpmsolver++", "dpm++": "dpmsolver++", "dpmsolvermultistepscheduler": "dpmsolver++",
}

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Fields of diffusers' other beta-schedule schedulers (DDPM, Euler, LMS, Heun, KDPM2, UniPC, DEIS,
# LCM, TCD, DPM single-step, ...): accepted and ignored, since a scheduler_config.json often carries
# them; none of them changes DDIM / PLMS / DPM-Solver++ when the fields below are at their defaults.
_OTHER_CLASS_FIELDS = frozenset({
    "corrector_order", "disable_corrector", "dynamic_thresholding_ratio", "eta", "flow_shift",
    "interpolation_type", "original_inference_steps", "predict_x0", "predictor_order",
    "sample_max_value", "shift_terminal", "sigma_max", "sigma_min", "snr_shift_scale", "solver_p",
    "tau_func", "time_shift_type", "timestep_scaling", "timestep_type", "use_dynamic_shifting",
})
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")

# Defaults of the diffusers class each kind stands for, for keys a config may leave out.
_CLASS_DEFAULTS = {
    "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True},
    "pndm": {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False},
    "dpmsolver++": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
}


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Static scheduler config, read from a diffusers ``scheduler_config.json`` (field names as there).

    Fields set to ``None`` were absent from the file and resolve to the default of the diffusers
    class the scheduler ``kind`` names (see module docstring). The ``solver_*`` ... ``use_*`` fields
    only concern DPM-Solver and are validated only when building a ``"dpmsolver++"`` scheduler;
    ``skip_prk_steps`` only concerns PNDM. Fields of diffusers' other beta-schedule scheduler
    classes are accepted and ignored (a scheduler_config.json often carries them); any other key
    raises (probably a typo), and so does a value that would change the math in a way this module
    does not implement, with a :class:`~qlip_jax.models.configs.ConfigError` (a ``ValueError``)
    naming the field.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    skip_prk_steps: bool | None = None
    rescale_betas_zero_snr: bool = False
    # DPMSolverMultistepScheduler only
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False

    # fields that must have their "off" value (checked for every kind; these change the math)
    _MUST_BE = {"thresholding": False}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "scheduler config") -> SchedulerConfig:
        """Build from a diffusers scheduler config dict (``_class_name`` etc. are ignored)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | set(cls._MUST_BE) | _OTHER_CLASS_FIELDS
        unknown = sorted(k for k in d if k not in known and k not in META_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown scheduler config field(s) {unknown} (a typo? "
                              "fields of diffusers' beta-schedule schedulers are accepted)")
        for key, off in cls._MUST_BE.items():
            if d.get(key, off) != off:
                raise ConfigError(f"{source}: unsupported value {key}={d[key]!r} (only {off!r} is "
                                  "implemented)")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kwargs[f.name] = _check_type(f.name, d[f.name], f.type, source)
        if kwargs.get("lambda_min_clipped", 0.0) is None:  # diffusers' default, spelled null
            kwargs["lambda_min_clipped"] = -math.inf
        cfg = cls(**kwargs)
        cfg._validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str) -> SchedulerConfig:
        """Read a ``scheduler_config.json``."""
        return cls.from_dict(read_json(path), source=path)

    def to_dict(self) -> dict:
        """JSON-able dict in diffusers' field names (without ``_class_name``).

        The common fields are always written; fields left unset (None) are omitted, so diffusers
        applies its own class default, as when this config was read; the other fields are written
        only when they differ from the default.
        """
        always = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "steps_offset")
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in always or (v is not None and (f.default is None or v != f.default)):
                out[f.name] = v
        return out

    def _validate(self, source: str) -> None:
        def bad(name, why=""):
            raise ConfigError(f"{source}: unsupported value {name}={getattr(self, name)!r}{why}")

        if self.num_train_timesteps < 1:
            bad("num_train_timesteps", " (must be >= 1)")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            bad("beta_schedule", f" (supported: {', '.join(_BETA_SCHEDULES)})")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(f"{source}: trained_betas has {len(self.trained_betas)} values, "
                              f"num_train_timesteps={self.num_train_timesteps}")
        if self.prediction_type not in _PREDICTION_TYPES:
            bad("prediction_type", f" (supported: {', '.join(_PREDICTION_TYPES)})")
        if self.timestep_spacing is not None and self.timestep_spacing not in _SPACINGS:
            bad("timestep_spacing", f" (supported: {', '.join(_SPACINGS)})")
        if self.steps_offset < 0:
            bad("steps_offset", " (must be >= 0)")
        if not self.clip_sample_range > 0:
            bad("clip_sample_range", " (must be > 0)")
        b = self.betas()
        if self.rescale_betas_zero_snr:  # the rescaled schedule ends on beta = 1 (abar = 0) by design
            b = b[:-1]
        if not (np.all(b >= 0) and np.all(b < 1)):
            name = "trained_betas" if self.trained_betas is not None else "beta_end"
            raise ConfigError(f"{source}: betas outside [0, 1) (beta_start={self.beta_start}, "
                              f"beta_end={self.beta_end}); check {name}")

    def betas(self) -> np.ndarray:
        """Same as :func:`make_betas` (float64 ``[num_train_timesteps]``)."""
        return make_betas(self)

    def alphas_cumprod(self) -> np.ndarray:
        """Same as :func:`make_alphas_cumprod` (float64 ``[num_train_timesteps]``)."""
        return make_alphas_cumprod(self)

    def _validate_dpm(self, source: str = "scheduler config") -> None:
        def bad(name, why):
            raise ConfigError(f"{source}: unsupported value {name}={getattr(self, name)!r} for "
                              f"DPM-Solver++ ({why})")

        if self.algorithm_type != "dpmsolver++":
            bad("algorithm_type", "only 'dpmsolver++' is implemented")
        if self.solver_order not in (1, 2):
            bad("solver_order", "only 1 and 2 are implemented")
        if self.solver_type not in ("midpoint", "heun"):
            bad("solver_type", "supported: midpoint, heun")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            bad("final_sigmas_type", "supported: zero, sigma_min")
        if self.variance_type is not None:
            bad("variance_type", "models predicting a variance are not supported")
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                     "use_lu_lambdas", "use_flow_sigmas"):
            if getattr(self, name):
                bad(name, "only the plain (interpolated) sigma schedule is implemented")

    def resolved(self, name: str, kind: str) -> Any:
        """The value of ``name``, or the default of the diffusers class of ``kind`` if unset."""
        v = getattr(self, name)
        return _CLASS_DEFAULTS[_canonical_kind(kind)][name] if v is None else v


def _check_type(name: str, value: Any, annotation: str, source: str) -> Any:
    """Coerce/check a JSON value against the (string) annotation of a config field."""
    optional = "None" in annotation
    if value is None:
        if optional or name == "lambda_min_clipped":
            return None
        raise ConfigError(f"{source}: {name} must not be null")
    base = annotation.split("|")[0].strip()
    ok = True
    if base.startswith("tuple"):  # trained_betas: a list of numbers
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = tuple(float(v) for v in value) if ok else value
        base = "a list of numbers"
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: {name} must be {base}, got {value!r}")
    return value


def _canonical_kind(kind: str) -> str:
    k = _KIND_ALIASES.get(str(kind).lower()) if isinstance(kind, str) else None
    if k is None:
        raise ValueError(f"unknown scheduler kind {kind!r}; valid kinds: 'ddim', 'pndm' (alias "
                         f"'plms'), 'dpmsolver++'")
    return k


def _as_config(config: SchedulerConfig | Mapping) -> SchedulerConfig:
    if isinstance(config, SchedulerConfig):
        return config
    if isinstance(config, Mapping):
        return SchedulerConfig.from_dict(config)
    raise TypeError(f"expected a SchedulerConfig or a dict, got {type(config).__name__}")


# ----------------------------------------------------------------------------------------------
# Training noise schedule (numpy, float64)


def make_betas(config: SchedulerConfig | Mapping) -> np.ndarray:
    """``beta_t`` of the training forward process, float64 ``[num_train_timesteps]``.

    With ``rescale_betas_zero_snr`` the schedule is rescaled to zero terminal SNR (Lin et al., 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1; diffusers' DDIM and
    DPM-Solver do the same): ``sqrt(abar)`` is shifted so its last value is 0 and scaled so its first
    is unchanged. The last step then has ``beta = 1``, ``abar = 0``: its input is pure noise, so the
    model must take everything it predicts there from the caption.
    """
    c = _as_config(config)
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, np.float64)
    elif c.beta_schedule == "linear":
        betas = np.linspace(c.beta_start, c.beta_end, n, dtype=np.float64)
    elif c.beta_schedule == "scaled_linear":  # SD: linear in sqrt(beta)
        betas = np.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:
        # squaredcos_cap_v2 (Nichol & Dhariwal 2021): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2),
        # beta_i = 1 - alpha_bar((i+1)/n) / alpha_bar(i/n), capped at 0.999
        s = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return _rescale_zero_terminal_snr(betas) if c.rescale_betas_zero_snr else betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """``betas [n]`` -> betas whose ``sqrt(abar)`` is ``(sqrt(abar) - last) * first / (first - last)``."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def make_alphas_cumprod(config: SchedulerConfig | Mapping) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)``, float64 ``[num_train_timesteps]``."""
    return np.cumprod(1.0 - make_betas(config))


# ----------------------------------------------------------------------------------------------
# Pytrees


@flax.struct.dataclass
class DDIMCoeffs:
    """Per-step DDIM arrays, each ``[T]`` float32 (step ``i`` goes from ``t = timesteps[i]`` to
    ``t_prev = t - num_train_timesteps // num_inference_steps``)."""

    alpha_t: Array      # abar_t
    alpha_prev: Array   # abar_{t_prev}; for t_prev < 0: 1 if set_alpha_to_one else abar_0
    variance: Array     # DDPM posterior variance (DDIM eq. 16 with eta = 1)
    sigma: Array        # eta * sqrt(variance): std of the fresh noise added at step i


@flax.struct.dataclass
class PLMSCoeffs:
    """Per-step PLMS arrays (``[T]`` unless noted); see :func:`_plms_coeffs`."""

    alpha_t: Array          # abar of the step's source timestep
    alpha_prev: Array       # abar of the step's target timestep
    weights: Array          # [T, 4] weights on (output_i, history[0], history[1], history[2])
    push: Array             # bool: output_i enters the history
    save_sample: Array      # bool: remember the input sample (step 0)
    use_saved_sample: Array  # bool: step from the remembered sample instead (step 1)


@flax.struct.dataclass
class DPMSolverCoeffs:
    """Per-step DPM-Solver++ arrays, each ``[T]`` float32.

    ``x_next = sample_coeff * x + d0_coeff * x0_i + d1_coeff * (x0_i - x0_{i-1})`` (``d1_coeff = 0``
    for first-order steps); ``alpha_s, sigma_s`` convert the model output at step ``i`` into the
    data prediction ``x0_i``.
    """

    alpha_s: Array
    sigma_s: Array
    sample_coeff: Array
    d0_coeff: Array
    d1_coeff: Array
    order: Array  # int32, 1 or 2 (informative)


@flax.struct.dataclass
class Scheduler:
    """A scheduler with precomputed per-step coefficients (built by :func:`make_scheduler`).

    Attributes:
      timesteps: ``[T]`` int32, the training timestep of each model evaluation, in order.
      coeffs: :class:`DDIMCoeffs`, :class:`PLMSCoeffs` or :class:`DPMSolverCoeffs`.
      alphas_cumprod: ``[num_train_timesteps]`` float32, ``abar_t`` (forward process).
      kind: ``"ddim"``, ``"pndm"`` or ``"dpmsolver++"`` (static).
      num_steps: ``T`` (static).
      num_inference_steps: the requested step count ``N`` (static).
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (static).
      eta: DDIM eta (static; 0 for the others).
      clip_sample_range: DDIM clips its x0 prediction to ``[-r, r]``; None: no clipping (static).
      init_noise_sigma: std of the initial latents (1 for these schedulers).
    """

    timesteps: Array
    coeffs: Union[DDIMCoeffs, PLMSCoeffs, DPMSolverCoeffs]
    alphas_cumprod: Array
    kind: str = flax.struct.field(pytree_node=False)
    num_steps: int = flax.struct.field(pytree_node=False)
    num_inference_steps: int = flax.struct.field(pytree_node=False)
    prediction_type: str = flax.struct.field(pytree_node=False)
    eta: float = flax.struct.field(pytree_node=False, default=0.0)
    clip_sample_range: float | None = flax.struct.field(pytree_node=False, default=None)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)


@flax.struct.dataclass
class DDIMState:
    """DDIM is single-step: no state."""


@flax.struct.dataclass
class PLMSState:
    """``history [3, *S]``: the last outputs that entered the history, most recent first;
    ``saved_sample [*S]``: the input sample of step 0 (step 1 restarts from it)."""

    history: Array
    saved_sample: Array


@flax.struct.dataclass
class DPMSolverState:
    """``prev_x0 [*S]``: the previous step's data prediction ``x0_{i-1}``."""

    prev_x0: Array


# ----------------------------------------------------------------------------------------------
# Timesteps (numpy replicas of diffusers' set_timesteps)


def _spaced_timesteps(c: SchedulerConfig, spacing: str, n: int) -> np.ndarray:
    """DDIM/PNDM grid of ``n`` training timesteps, descending."""
    m = c.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, m - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (m // n))[::-1].astype(np.int64) + c.steps_offset
    # trailing: evenly spaced from the end, t = round(m - k m / n) - 1
    return np.round(np.arange(m, 0, -m / n)).astype(np.int64) - 1


def _dpm_timesteps(c: SchedulerConfig, spacing: str, n: int, lambdas: np.ndarray) -> np.ndarray:
    """DPM-Solver's grid: ``n + 1`` points from the (lambda-clipped) last timestep down to 0, the
    final 0 dropped (the last step lands on sigma = 0 / sigma_min instead)."""
    m = c.num_train_timesteps
    # timesteps whose logSNR lambda_t falls below lambda_min_clipped are never visited
    last = m - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped))
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1].astype(np.int64) + c.steps_offset
    return np.round(np.arange(last, 0, -m / n)).astype(np.int64) - 1


def _check_timesteps(ts: np.ndarray, c: SchedulerConfig, kind: str, n: int) -> None:
    if ts.size == 0 or ts.min() < 0 or ts.max() >= c.num_train_timesteps:
        raise ValueError(f"{kind} with {n} steps and this config gives timesteps {ts.tolist()} outside "
                         f"[0, {c.num_train_timesteps}) (check steps_offset / timestep_spacing)")


# ----------------------------------------------------------------------------------------------
# Building


def make_scheduler(kind: str, config: SchedulerConfig | Mapping, num_inference_steps: int, *,
                   eta: float = 0.0) -> Scheduler:
    """Precompute a scheduler for ``num_inference_steps`` steps.

    Args:
      kind: ``"ddim"``, ``"pndm"`` (alias ``"plms"``; always PLMS mode, i.e. ``skip_prk_steps=True``)
        or ``"dpmsolver++"`` (DPM-Solver++(2M); the DPM fields of the config apply). diffusers class
        names (``"DDIMScheduler"``, ...) are accepted too.
      config: a :class:`SchedulerConfig` or a diffusers config dict.
      num_inference_steps: requested ``N``; ``T = result.num_steps`` is the actual count.
      eta: DDIM stochasticity in ``[0, 1]`` (0: deterministic DDIM, 1: DDPM-like). Must be 0 for the
        other kinds.

    Raises:
      ValueError: unknown kind (the message lists the valid ones), unsupported config value (the
        message names the field), bad step count or eta.
    """
    k = _canonical_kind(kind)
    c = _as_config(config)
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= c.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be an int in [1, {c.num_train_timesteps}], got {n!r}")
    n = int(n)
    eta = float(eta)
    if k != "ddim" and eta != 0.0:
        raise ValueError(f"eta={eta} is only meaningful for DDIM, not {k}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")

    abar = make_alphas_cumprod(c)  # float64
    spacing = c.resolved("timestep_spacing", k)
    clip = None
    if k == "ddim":
        ts = _spaced_timesteps(c, spacing, n)
        _check_timesteps(ts, c, k, n)
        if c.prediction_type == "epsilon" and np.any(abar[ts] == 0.0):
            raise ConfigError(f"scheduler config: DDIM with {n} '{spacing}' steps visits timestep "
                              f"{int(ts[abar[ts] == 0.0][0])}, where abar = 0 (rescale_betas_zero_snr): an "
                              "epsilon prediction says nothing about x0 there; use prediction_type="
                              "'v_prediction' (as zero terminal SNR requires) or another timestep_spacing")
        coeffs = _ddim_coeffs(c, abar, ts, n, eta)
        if c.resolved("clip_sample", k):
            clip = float(c.clip_sample_range)
    elif k == "pndm":
        if c.rescale_betas_zero_snr:
            raise ConfigError("scheduler config: rescale_betas_zero_snr=True is not available for PNDM "
                              "(diffusers' PNDMScheduler has no such option and would silently sample with "
                              "another schedule than the model was trained with); use DDIM or DPM-Solver++")
        if c.skip_prk_steps is False:
            raise ConfigError("scheduler config: unsupported value skip_prk_steps=False (only PLMS "
                              "mode, skip_prk_steps=True as Stable Diffusion uses, is implemented)")
        if c.prediction_type == "sample":
            raise ConfigError("scheduler config: unsupported value prediction_type='sample' for PNDM "
                              "(diffusers' PNDM supports epsilon and v_prediction)")
        desc = _spaced_timesteps(c, spacing, n)
        _check_timesteps(desc, c, k, n)
        # PLMS without Runge-Kutta warm-up evaluates the second timestep twice:
        # [t_0, t_1, t_1, t_2, ..., t_{N-1}]  (N + 1 model evaluations)
        ts = np.concatenate([desc[:1], desc[1:2], desc[1:]])
        coeffs = _plms_coeffs(c, abar, ts, n)
    else:
        c._validate_dpm()
        if c.rescale_betas_zero_snr:  # as diffusers: near 0 but not 0, so the first sigma is finite
            abar = abar.copy()
            abar[-1] = 2.0 ** -24
        lambdas = 0.5 * (np.log(abar) - np.log1p(-abar))  # logSNR/2 = log(alpha_t / sigma_t)
        ts = _dpm_timesteps(c, spacing, n, lambdas)
        _check_timesteps(ts, c, k, n)
        coeffs = _dpm_coeffs(c, abar, ts)
    return Scheduler(
        timesteps=jnp.asarray(ts, jnp.int32), coeffs=coeffs,
        alphas_cumprod=jnp.asarray(abar, jnp.float32), kind=k, num_steps=int(len(ts)),
        num_inference_steps=n, prediction_type=c.prediction_type, eta=eta, clip_sample_range=clip)


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _final_alpha(c: SchedulerConfig, abar: np.ndarray, kind: str) -> float:
    """``abar`` past the end of the chain (``t_prev < 0``)."""
    return 1.0 if c.resolved("set_alpha_to_one", kind) else float(abar[0])


def _ddim_coeffs(c: SchedulerConfig, abar: np.ndarray, ts: np.ndarray, n: int, eta: float) -> DDIMCoeffs:
    prev = ts - c.num_train_timesteps // n
    a_t = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], _final_alpha(c, abar, "ddim"))
    # DDIM eq. (16): sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    sigma = eta * np.sqrt(variance)
    return DDIMCoeffs(*_f32(a_t, a_prev, variance, sigma))


# Adams-Bashforth weights on (e_i, e_{i-1}, e_{i-2}, e_{i-3}) by number of history entries used.
_AB_WEIGHTS = {
    1: (1.0, 0.0, 0.0, 0.0),
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _plms_coeffs(c: SchedulerConfig, abar: np.ndarray, ts: np.ndarray, n: int) -> PLMSCoeffs:
    """Unroll diffusers' PNDM ``step_plms`` (skip_prk_steps=True) into per-step arrays.

    With ``delta = num_train_timesteps // N`` and outputs ``e_i`` of the model at ``ts[i]``:

    * step 0: plain transfer ``x_0 -> x(t - delta)`` with ``e_0`` (a first-order/DDIM step); the
      input sample is remembered and ``e_0`` enters the history.
    * step 1 (same timestep ``ts[1]`` as step 2): a second-order restart, from the *remembered*
      step-0 sample, over ``ts[1] + delta -> ts[1]`` with ``(e_0 + e_1) / 2``. ``e_1`` does **not**
      enter the history.
    * step i >= 2: ``e_i`` enters the history and the Adams-Bashforth combination of the last
      2, 3, then 4 history entries drives ``t -> t - delta``.
    """
    delta = c.num_train_timesteps // n
    final = _final_alpha(c, abar, "pndm")
    a_t, a_prev, weights, push, save, use_saved = [], [], [], [], [], []
    history = 0  # entries in the history *before* this step
    for i, t in enumerate(ts.tolist()):
        if i == 1:
            src, dst, w = t + delta, t, (0.5, 0.5, 0.0, 0.0)  # average of e_1 and e_0
        else:
            history += 1
            src, dst, w = t, t - delta, _AB_WEIGHTS[min(history, 4)]
        if src >= c.num_train_timesteps:
            raise ValueError(f"PLMS restart step reads timestep {src} >= num_train_timesteps")
        a_t.append(abar[src])
        a_prev.append(abar[dst] if dst >= 0 else final)
        weights.append(w)
        push.append(i != 1)
        save.append(i == 0)
        use_saved.append(i == 1)
    return PLMSCoeffs(*_f32(a_t, a_prev, weights), push=jnp.asarray(push), save_sample=jnp.asarray(save),
                      use_saved_sample=jnp.asarray(use_saved))


def _dpm_coeffs(c: SchedulerConfig, abar: np.ndarray, ts: np.ndarray) -> DPMSolverCoeffs:
    """DPM-Solver++ multistep coefficients (DPM-Solver++ paper, Alg. 2 / eqs. for 2M).

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` at the
    grid points ``s = ts[i]`` and ``t`` = the next grid point (``sigma = 0`` or ``sigma_min`` after the
    last), ``h = lambda_t - lambda_s``:

    * first order (= DDIM on x0):  ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^-h) x0_s``
    * second order, ``r = h_prev / h``, ``D1 = (x0_s - x0_prev) / r``:
        midpoint: ``x_t = ... + 0.5 alpha_t (1 - e^-h) D1``
        heun:     ``x_t = ... + alpha_t ((e^-h - 1)/h + 1) D1``
    """
    T = len(ts)
    alpha = np.sqrt(abar[ts])
    sigma = np.sqrt(1.0 - abar[ts])
    if c.final_sigmas_type == "zero":
        alpha_end, sigma_end = 1.0, 0.0
    else:  # sigma_min: the smallest training noise level
        alpha_end, sigma_end = math.sqrt(abar[0]), math.sqrt(1.0 - abar[0])
    alpha = np.append(alpha, alpha_end)   # [T + 1], index i + 1 is the target of step i
    sigma = np.append(sigma, sigma_end)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at sigma = 0

    final_low = c.euler_at_final or (c.lower_order_final and T < 15) or c.final_sigmas_type == "zero"
    sample_coeff, d0, d1, order = np.zeros(T), np.zeros(T), np.zeros(T), np.ones(T, np.int32)
    for i in range(T):
        a_t, s_t, s_s = alpha[i + 1], sigma[i + 1], sigma[i]
        # e^{-h} = (alpha_s / sigma_s) / (alpha_t / sigma_t): finite (0) even for sigma_t = 0
        exp_neg_h = (alpha[i] / s_s) * (s_t / a_t)
        sample_coeff[i] = s_t / s_s
        d0[i] = a_t * (1.0 - exp_neg_h)
        second = c.solver_order == 2 and i > 0 and not (i == T - 1 and final_low)
        if second:
            h = lam[i + 1] - lam[i]
            r = (lam[i] - lam[i - 1]) / h
            if c.solver_type == "midpoint":
                d1[i] = 0.5 * a_t * (1.0 - exp_neg_h) / r
            else:  # heun
                d1[i] = a_t * ((exp_neg_h - 1.0) / h + 1.0) / r
            order[i] = 2
    return DPMSolverCoeffs(*_f32(alpha[:-1], sigma[:-1], sample_coeff, d0, d1),
                           order=jnp.asarray(order))


# ----------------------------------------------------------------------------------------------
# Stepping


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def init_state(sched: Scheduler, sample: Array):
    """Initial (zero) multistep state for samples shaped like ``sample [*S]``."""
    dt = _compute_dtype(sample.dtype)
    if sched.kind == "ddim":
        return DDIMState()
    if sched.kind == "pndm":
        return PLMSState(history=jnp.zeros((3,) + sample.shape, dt), saved_sample=jnp.zeros(sample.shape, dt))
    return DPMSolverState(prev_x0=jnp.zeros(sample.shape, dt))


def _x0_and_eps(prediction_type: str, out: Array, x: Array, sqrt_a: Array, sqrt_1ma: Array):
    """Model output -> (x0 prediction, eps prediction), using ``x = sqrt(a) x0 + sqrt(1 - a) eps``."""
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a, out
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x
    x0 = out  # "sample"
    return x0, (x - sqrt_a * x0) / sqrt_1ma


def ddim_direction_coefficient(alpha_prev: Array, sigma: Array) -> Array:
    """DDIM's "direction pointing to x_t" factor ``sqrt(1 - a_prev - sigma^2)`` (broadcasting).

    Clamped at 0: where ``1 - a_prev - sigma^2`` is 0 up to rounding (eta = 1 from a zero-SNR step) a
    negative rounding error would give NaN.
    """
    return jnp.sqrt(jnp.maximum(1.0 - alpha_prev - sigma ** 2, 0.0))


def ddim_update(x0: Array, eps: Array, alpha_prev: Array, sigma: Array, noise: Array | None) -> Array:
    """DDIM eq. (12): ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z``.

    ``x0, eps, noise [*S]``; ``alpha_prev, sigma`` scalars. ``noise=None`` means no noise term.
    """
    x_prev = jnp.sqrt(alpha_prev) * x0 + ddim_direction_coefficient(alpha_prev, sigma) * eps
    return x_prev if noise is None else x_prev + sigma * noise


def step(sched: Scheduler, state, i, model_output: Array, sample: Array, noise: Array | None = None,
         sigma: Array | None = None):
    """One denoising step ``x_{timesteps[i]} -> x_{next}``.

    Args:
      sched: from :func:`make_scheduler` (may be a jit argument or a closed-over constant).
      state: from :func:`init_state` or the previous :func:`step`.
      i: int index into ``sched.timesteps`` (a traced int inside ``lax.scan`` is fine). Steps must
        be taken in order ``0 .. T-1`` (the state carries history).
      model_output: ``[*S]`` the model's prediction at ``(sample, timesteps[i])`` (epsilon, v or
        x0 per ``sched.prediction_type``; with guidance already applied).
      sample: ``[*S]`` the current latents ``x_t``.
      noise: ``[*S]`` standard normal noise, required for DDIM with ``eta > 0``; ignored otherwise.
      sigma: DDIM only: the std of the fresh noise instead of ``coeffs.sigma[i]``, a scalar or one
        value per sample ``[B]`` (``S = [B, ...]``), e.g. :func:`ddim_absorbed_sigma` (PTQD).

    Returns:
      ``(prev_sample [*S] in sample's dtype, new_state)``.
    """
    dt = _compute_dtype(sample.dtype)
    x, out = sample.astype(dt), model_output.astype(dt)
    if sigma is not None and sched.kind != "ddim":
        raise ValueError(f"a noise std (sigma=) only applies to DDIM, not {sched.kind}")
    if sched.kind == "ddim":
        prev, new_state = _ddim_step(sched, i, out, x, noise, sigma), state
    elif sched.kind == "pndm":
        prev, new_state = _plms_step(sched, state, i, out, x)
    elif sched.kind == "dpmsolver++":
        prev, new_state = _dpm_step(sched, state, i, out, x)
    else:  # pragma: no cover - make_scheduler only builds the kinds above
        raise ValueError(f"unknown scheduler kind {sched.kind!r}")
    return prev.astype(sample.dtype), new_state


def _ddim_step(sched: Scheduler, i, out: Array, x: Array, noise: Array | None,
               sigma: Array | None = None) -> Array:
    c: DDIMCoeffs = sched.coeffs
    dt = x.dtype
    if sigma is None:
        sigma = c.sigma[i].astype(dt)
    else:  # scalar or [B] -> broadcastable against [B, ...]
        sigma = jnp.asarray(sigma, dt)
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma
    a_t = c.alpha_t[i].astype(dt)
    # DDIM eq. (12), "predicted x0" from the model output
    x0, eps = _x0_and_eps(sched.prediction_type, out, x, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t))
    if sched.clip_sample_range is not None:  # (eps stays the unclipped prediction, as in diffusers)
        x0 = jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
    if sched.eta > 0:
        if noise is None:
            raise ValueError(f"DDIM with eta={sched.eta} needs `noise` (standard normal, like sample)")
        noise = noise.astype(dt)
    else:
        noise = None  # sigma = 0: deterministic DDIM
    return ddim_update(x0, eps, c.alpha_prev[i].astype(dt), sigma, noise)


def ddim_output_coefficient(sched: Scheduler, i) -> Array:
    """``c_i``: the factor with which the model output enters ``x_prev`` in DDIM step ``i`` (scalar).

    From :func:`ddim_update` with the step's own ``sigma_i`` and the predictions of
    :func:`_x0_and_eps` (``d``: :func:`ddim_direction_coefficient`): ``d - sqrt(a_prev (1 - a_t) / a_t)``
    for epsilon, ``d sqrt(a_t) - sqrt(a_prev (1 - a_t))`` for v, ``sqrt(a_prev) - d sqrt(a_t / (1 - a_t))``
    for sample prediction. x0 clipping (``clip_sample``) is ignored (it only ever shrinks the effect).
    """
    if sched.kind != "ddim":
        raise ValueError(f"ddim_output_coefficient needs a DDIM scheduler, not {sched.kind}")
    c: DDIMCoeffs = sched.coeffs
    a_t, a_prev, sigma = c.alpha_t[i], c.alpha_prev[i], c.sigma[i]
    d = ddim_direction_coefficient(a_prev, sigma)
    if sched.prediction_type == "epsilon":
        return d - jnp.sqrt(a_prev * (1.0 - a_t) / a_t)
    if sched.prediction_type == "v_prediction":
        return d * jnp.sqrt(a_t) - jnp.sqrt(a_prev * (1.0 - a_t))
    return jnp.sqrt(a_prev) - d * jnp.sqrt(a_t / (1.0 - a_t))


def ddim_absorbed_sigma(sched: Scheduler, i, output_var: Array) -> Array:
    """PTQD's noise std of DDIM step ``i`` when the model output carries extra noise of variance
    ``output_var`` (any shape, e.g. ``[B]`` per sample): ``sqrt(max(sigma_i^2 - c_i^2 var, 0))`` with
    ``c_i`` from :func:`ddim_output_coefficient`. Exactly ``sigma_i`` where ``output_var == 0``.
    Returns ``output_var``'s shape (float32); pass it to :func:`step` as ``sigma``.
    """
    var = jnp.asarray(output_var, jnp.float32)
    sigma = sched.coeffs.sigma[i]
    coef = ddim_output_coefficient(sched, i)
    reduced = jnp.sqrt(jnp.maximum(sigma ** 2 - coef ** 2 * var, 0.0))
    return jnp.where(var > 0, reduced, sigma)


def _plms_step(sched: Scheduler, state: PLMSState, i, out: Array, x: Array):
    c: PLMSCoeffs = sched.coeffs
    dt = x.dtype
    h = state.history
    w = c.weights[i].astype(dt)
    # linear multistep combination (PNDM Sec. 3): e' = sum_k w_k e_{i-k}
    e = w[0] * out + w[1] * h[0] + w[2] * h[1] + w[3] * h[2]
    x_src = jnp.where(c.use_saved_sample[i], state.saved_sample, x)
    a_t, a_prev = c.alpha_t[i].astype(dt), c.alpha_prev[i].astype(dt)
    if sched.prediction_type == "v_prediction":  # (the combined v is converted, as in diffusers)
        e = jnp.sqrt(a_t) * e + jnp.sqrt(1.0 - a_t) * x_src
    # PNDM eq. (9), the transfer x_t -> x_prev with noise estimate e (algebraically the DDIM eta=0
    # step, written without cancellation):
    #   x_prev = sqrt(a_prev / a_t) x_t
    #            - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))
    denom = a_t * jnp.sqrt(1.0 - a_prev) + jnp.sqrt(a_t * (1.0 - a_t) * a_prev)
    prev = jnp.sqrt(a_prev / a_t) * x_src - (a_prev - a_t) / denom * e
    pushed = jnp.concatenate([out[None], h[:2]], axis=0)
    new_state = PLMSState(history=jnp.where(c.push[i], pushed, h),
                          saved_sample=jnp.where(c.save_sample[i], x, state.saved_sample))
    return prev, new_state


def _dpm_step(sched: Scheduler, state: DPMSolverState, i, out: Array, x: Array):
    c: DPMSolverCoeffs = sched.coeffs
    dt = x.dtype
    # DPM-Solver++ integrates the data prediction x0 (Lu et al. 2022, eq. 9 / Alg. 2)
    x0, _ = _x0_and_eps(sched.prediction_type, out, x, c.alpha_s[i].astype(dt), c.sigma_s[i].astype(dt))
    prev = (c.sample_coeff[i].astype(dt) * x + c.d0_coeff[i].astype(dt) * x0
            + c.d1_coeff[i].astype(dt) * (x0 - state.prev_x0))
    return prev, DPMSolverState(prev_x0=x0)


# ----------------------------------------------------------------------------------------------
# Forward process (training)


def _abar_at(config_or_sched, t, ndim: int, dtype) -> Array:
    if isinstance(config_or_sched, Scheduler):
        abar = config_or_sched.alphas_cumprod
    elif isinstance(config_or_sched, (SchedulerConfig, Mapping)):
        abar = jnp.asarray(make_alphas_cumprod(config_or_sched), jnp.float32)
    else:  # an alphas_cumprod array [num_train_timesteps]
        abar = jnp.asarray(config_or_sched)
    a = abar[jnp.asarray(t)].astype(dtype)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))  # [B] -> [B, 1, 1, 1]


def add_noise(config_or_sched, x0: Array, noise: Array, t) -> Array:
    """Forward process ``q(x_t | x0)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
      config_or_sched: a :class:`SchedulerConfig` (or dict), a :class:`Scheduler`, or an
        ``alphas_cumprod [num_train_timesteps]`` array (e.g. ``jnp.asarray(config.alphas_cumprod())``
        built once outside a jitted train step).
      x0, noise: ``[B, ...]``.
      t: int training timesteps, ``[B]`` (one per sample) or a scalar.
    """
    dt = _compute_dtype(x0.dtype)
    a = _abar_at(config_or_sched, t, x0.ndim, dt)
    return (jnp.sqrt(a) * x0.astype(dt) + jnp.sqrt(1.0 - a) * noise.astype(dt)).astype(x0.dtype)


def velocity(config_or_sched, x0: Array, noise: Array, t) -> Array:
    """v-prediction target ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (shapes as add_noise)."""
    dt = _compute_dtype(x0.dtype)
    a = _abar_at(config_or_sched, t, x0.ndim, dt)
    return (jnp.sqrt(a) * noise.astype(dt) - jnp.sqrt(1.0 - a) * x0.astype(dt)).astype(x0.dtype)


def predicted_x0(sched: Scheduler, model_output: Array, sample: Array, t) -> Array:
    """The clean sample a model output stands for at training timesteps ``t`` (``[B]`` or a scalar):
    ``x0`` from ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` per ``sched.prediction_type``;
    ``model_output, sample [B, ...]``."""
    dt = _compute_dtype(sample.dtype)
    a = _abar_at(sched, t, sample.ndim, dt)
    x0, _ = _x0_and_eps(sched.prediction_type, model_output.astype(dt), sample.astype(dt), jnp.sqrt(a),
                        jnp.sqrt(1.0 - a))
    return x0
