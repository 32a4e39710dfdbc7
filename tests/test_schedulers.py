"""Functional schedulers vs diffusers' PyTorch schedulers, step by step over whole runs.

Both sides run in float32 on the same latents and the same "model outputs" (a deterministic
function of the sample and the step: ``0.1 * x + R[i]``, ``R`` fixed random arrays), and both are
configured from the same dict (diffusers via ``from_config``). Our side runs as the pipeline does:
``jax.jit`` of a ``lax.scan`` over the traced step index. Each intermediate latent must match
diffusers' to <= 1e-5 relative (max abs error / max abs value; observed ~1e-6, the float64 vs
float32 noise schedule).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from qlip_jax.sampling import schedulers as S
from qlip_jax.sampling.schedulers import SchedulerConfig, init_state, make_scheduler, step

# Stable Diffusion v1's scheduler_config.json as shipped (no timestep_spacing key: each class
# applies its own default, "leading" for DDIM/PNDM and "linspace" for DPM-Solver)
SD_V1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "num_train_timesteps": 1000,
         "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
         "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False, "trained_betas": None}
TRAILING_V = {**SD_V1, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
# zero terminal SNR (Lin et al., 2024): rescaled betas, v-prediction, trailing timesteps (the first
# step is t = 999, where abar = 0)
ZERO_SNR = {**TRAILING_V, "rescale_betas_zero_snr": True}
LINSPACE_LINEAR = {**SD_V1, "timestep_spacing": "linspace", "beta_schedule": "linear", "beta_start": 0.0001,
                   "beta_end": 0.02, "steps_offset": 0, "set_alpha_to_one": True}

CASES = {  # id: (kind, config, num_inference_steps, eta)
    "ddim-sd_v1": ("ddim", SD_V1, 20, 0.0),
    "ddim-sd_v1-eta0.7": ("ddim", SD_V1, 15, 0.7),
    "ddim-trailing-v": ("ddim", TRAILING_V, 10, 0.0),
    "ddim-linspace-sample-clip-eta0.3": (
        "ddim", {**LINSPACE_LINEAR, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
        12, 0.3),
    "ddim-zero_snr": ("ddim", ZERO_SNR, 10, 0.0),
    "ddim-zero_snr-eta0.5": ("ddim", ZERO_SNR, 8, 0.5),
    "pndm-sd_v1": ("pndm", SD_V1, 20, 0.0),
    "pndm-trailing-v": ("pndm", TRAILING_V, 10, 0.0),
    "plms-linspace-7": ("plms", LINSPACE_LINEAR, 7, 0.0),
    "dpm-sd_v1": ("dpmsolver++", SD_V1, 20, 0.0),  # >= 15 steps: 2nd order up to the last step
    "dpm-leading-v": ("dpmsolver++", {**SD_V1, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
                      10, 0.0),
    "dpm-trailing": ("dpmsolver++", {**SD_V1, "timestep_spacing": "trailing"}, 12, 0.0),
    "dpm-zero_snr": ("dpmsolver++", ZERO_SNR, 12, 0.0),
    "dpm-heun-cosine-sigma_min": (
        "dpmsolver++", {**SD_V1, "beta_schedule": "squaredcos_cap_v2", "solver_type": "heun",
                        "final_sigmas_type": "sigma_min", "lower_order_final": False,
                        "lambda_min_clipped": -5.1}, 12, 0.0),
    "dpm-order1-sample": ("dpmsolver++", {**SD_V1, "solver_order": 1, "prediction_type": "sample"}, 8, 0.0),
}
TORCH = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "plms": PNDMScheduler,
         "dpmsolver++": DPMSolverMultistepScheduler}
# diffusers' DPM-Solver trips a NumPy 2 deprecation warning of its own (np.array(tensor, copy=False))
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHAPE = (2, 8, 8, 4)  # NHWC latents (schedulers are elementwise: the same layout on both sides)


def inputs(num_steps: int, seed: int = 0):
    """Initial latents [*S], per-step model offsets R [T, *S] and DDIM noise Z [T, *S]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    r = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)
    z = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)
    return x, r, z


def run_diffusers(kind, conf, steps, eta, x, r, z):
    """(timesteps, [x after each step]) from the diffusers scheduler."""
    ref = TORCH[kind].from_config(conf)
    ref.set_timesteps(steps)
    xt, traj = torch.from_numpy(x), []
    for i, t in enumerate(ref.timesteps):
        out = 0.1 * xt + torch.from_numpy(r[i])
        kw = {"eta": eta, "variance_noise": torch.from_numpy(z[i])} if kind == "ddim" else {}
        xt = ref.step(out, t, xt, **kw).prev_sample
        traj.append(xt.numpy())
    return ref.timesteps.numpy(), np.stack(traj)


@jax.jit
def run_scan(sched, x, r, z):
    """Our sampler loop as the pipeline runs it: lax.scan over a traced step index -> [T, *S]."""

    def body(carry, i):
        x, state = carry
        out = 0.1 * x + r[i]
        x, state = step(sched, state, i, out, x, z[i])
        return (x, state), x

    _, traj = jax.lax.scan(body, (x, init_state(sched, x)), jnp.arange(sched.num_steps))
    return traj


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_step_by_step(case):
    kind, conf, steps, eta = CASES[case]
    sched = make_scheduler(kind, SchedulerConfig.from_dict(conf), steps, eta=eta)
    x, r, z = inputs(sched.num_steps)
    ts, want = run_diffusers(kind, conf, steps, eta, x, r, z)
    np.testing.assert_array_equal(np.asarray(sched.timesteps), ts)
    assert sched.num_steps == len(ts) and sched.timesteps.dtype == jnp.int32
    got = np.asarray(run_scan(sched, jnp.asarray(x), jnp.asarray(r), jnp.asarray(z)))
    errs = [rel_err(got[i], want[i]) for i in range(len(ts))]
    assert max(errs) <= 1e-5, errs
    assert np.abs(want[-1] - x).max() > 0.1  # the run did move the latents


def test_eager_python_loop_equals_scan_and_reference():
    """Python-int ``i`` without jit gives the same run as the jitted scan (PLMS: the most state)."""
    kind, conf, steps, eta = CASES["pndm-sd_v1"]
    sched = make_scheduler(kind, conf, steps, eta=eta)  # a plain dict config works too
    x, r, z = inputs(sched.num_steps, seed=1)
    _, want = run_diffusers(kind, conf, steps, eta, x, r, z)
    xj = jnp.asarray(x)
    state = init_state(sched, xj)
    for i in range(sched.num_steps):
        xj, state = step(sched, state, i, 0.1 * xj + r[i], xj)
        assert rel_err(xj, want[i]) <= 1e-5, i
    scanned = run_scan(sched, jnp.asarray(x), jnp.asarray(r), jnp.asarray(z))
    assert rel_err(scanned[-1], xj) <= 1e-6  # (XLA fuses the jitted arithmetic differently)


def test_pndm_evaluates_the_model_once_more_than_requested():
    sched = make_scheduler("plms", SD_V1, 5)
    ts = np.asarray(sched.timesteps)
    assert sched.num_steps == 6 and sched.num_inference_steps == 5
    np.testing.assert_array_equal(ts, [801, 601, 601, 401, 201, 1])
    assert sched.init_noise_sigma == 1.0


def test_ddim_sigma_is_accessible_for_variance_corrections():
    conf = SchedulerConfig.from_dict(SD_V1)
    det = make_scheduler("ddim", conf, 10)
    anc = make_scheduler("ddim", conf, 10, eta=1.0)
    assert det.coeffs.sigma.shape == (10,) and not np.any(np.asarray(det.coeffs.sigma))
    np.testing.assert_allclose(np.asarray(anc.coeffs.sigma) ** 2, np.asarray(anc.coeffs.variance), rtol=1e-6)
    # the building block PTQD will call with a corrected sigma
    x0, eps, noise = jnp.ones(SHAPE), jnp.zeros(SHAPE), jnp.ones(SHAPE)
    np.testing.assert_allclose(S.ddim_update(x0, eps, 0.25, 0.5, noise), 1.0, rtol=1e-6)


def test_add_noise_and_velocity_match_diffusers():
    ref = DDIMScheduler.from_config(SD_V1)
    rng = np.random.default_rng(2)
    x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = np.array([0, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    conf = SchedulerConfig.from_dict(SD_V1)
    sched = make_scheduler("dpmsolver++", conf, 10)
    for src in (conf, sched, jnp.asarray(conf.alphas_cumprod(), jnp.float32)):
        assert rel_err(S.add_noise(src, x0, noise, t), want) <= 1e-5
        assert rel_err(S.velocity(src, x0, noise, t), want_v) <= 1e-5
    # jit with traced t, scalar t
    got = jax.jit(lambda t: S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), t))(jnp.asarray(t))
    assert rel_err(got, want) <= 1e-5
    assert S.add_noise(conf, x0[:1], noise[:1], 999).shape == (1,) + SHAPE[1:]


def test_any_shape_and_dtype():
    sched = make_scheduler("dpmsolver++", SD_V1, 4)
    for shape in [(5,), (1, 2, 3, 4, 2)]:
        x = jnp.ones(shape)
        y, st = step(sched, init_state(sched, x), 0, x, x)
        assert y.shape == shape and st.prev_x0.shape == shape
    xb = jnp.ones(SHAPE, jnp.bfloat16)
    y, _ = jax.jit(lambda x, i: step(sched, init_state(sched, x), i, x, x))(xb, 0)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_config_json_roundtrip(tmp_path):
    d = {**SD_V1, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
         # fields of other scheduler classes at values that change nothing for us
         "use_karras_sigmas": False, "interpolation_type": "linear", "timestep_type": "discrete",
         "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "thresholding": False}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(d))
    conf = SchedulerConfig.from_json(str(path))
    assert conf.prediction_type == "v_prediction" and conf.steps_offset == 1 and conf.skip_prk_steps is True
    assert SchedulerConfig.from_dict(json.loads(json.dumps(conf.to_dict()))) == conf
    assert conf.resolved("set_alpha_to_one", "ddim") is False
    bare = SchedulerConfig.from_dict({"num_train_timesteps": 1000})
    assert bare.resolved("timestep_spacing", "ddim") == "leading"
    assert bare.resolved("timestep_spacing", "dpmsolver++") == "linspace"
    assert "timestep_spacing" not in bare.to_dict()  # unset stays unset (diffusers' class default)
    np.testing.assert_allclose(SchedulerConfig.from_dict({**SD_V1, "trained_betas": conf.betas().tolist()})
                               .alphas_cumprod(), conf.alphas_cumprod())


@pytest.mark.parametrize("bad,field", [
    ({"thresholding": True}, "thresholding"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"steps_offset": "1"}, "steps_offset"),
    ({"beta_strat": 0.001}, "beta_strat"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"beta_end": 1.5}, "beta_end"),
])
def test_unsupported_config_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig.from_dict({**SD_V1, **bad})


@pytest.mark.parametrize("kind,bad,field", [
    ("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmsolver++", {"solver_order": 3}, "solver_order"),
    ("dpmsolver++", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("dpmsolver++", {"variance_type": "learned_range"}, "variance_type"),
    ("dpmsolver++", {"final_sigmas_type": "max"}, "final_sigmas_type"),
    ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
    ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ("pndm", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_unsupported_values_for_the_chosen_kind(kind, bad, field):
    conf = SchedulerConfig.from_dict({**SD_V1, **bad})  # irrelevant to other kinds: accepted
    make_scheduler("ddim", conf, 10)
    with pytest.raises(ValueError, match=field):
        make_scheduler(kind, conf, 10)


def test_zero_terminal_snr_schedule():
    """The rescaled schedule is diffusers' (float32 there), ends on abar = 0 and keeps abar_0; DDIM refuses an
    epsilon model on a grid that visits the zero-SNR step, and accepts it on one that does not."""
    conf = SchedulerConfig.from_dict(ZERO_SNR)
    abar, plain = conf.alphas_cumprod(), SchedulerConfig.from_dict(TRAILING_V).alphas_cumprod()
    assert abar[-1] == 0.0 and plain[-1] > 4e-3
    assert abar[0] == pytest.approx(plain[0], rel=1e-12)
    assert np.all(np.diff(abar) < 0)
    ref = DDIMScheduler.from_config(ZERO_SNR)
    np.testing.assert_allclose(abar, ref.alphas_cumprod.numpy(), atol=1e-6)
    # DPM-Solver, as diffusers, keeps the last abar just above 0 so its first sigma is finite
    dpm = make_scheduler("dpmsolver++", conf, 10)
    assert float(dpm.alphas_cumprod[-1]) == 2.0 ** -24 and int(dpm.timesteps[0]) == 999
    assert SchedulerConfig.from_dict(conf.to_dict()) == conf and conf.to_dict()["rescale_betas_zero_snr"] is True
    eps = {**ZERO_SNR, "prediction_type": "epsilon"}
    with pytest.raises(ValueError, match=r"timestep 999.*abar = 0.*v_prediction"):
        make_scheduler("ddim", eps, 10)
    assert int(make_scheduler("ddim", {**eps, "timestep_spacing": "leading"}, 10).timesteps[0]) == 901
    # eta = 1 from the zero-SNR step: the direction coefficient sqrt(1 - a_prev - sigma^2) is 0 up to
    # rounding (diffusers' float32 gets ~1e-4 there, so no step-by-step parity); it must stay finite
    sched = make_scheduler("ddim", conf, 8, eta=1.0)
    x, r, z = inputs(sched.num_steps)
    got = np.asarray(run_scan(sched, jnp.asarray(x), jnp.asarray(r), jnp.asarray(z)))
    _, want = run_diffusers("ddim", ZERO_SNR, 8, 1.0, x, r, z)
    assert np.all(np.isfinite(got)) and rel_err(got[-1], want[-1]) < 1e-3


def test_bad_arguments():
    conf = SchedulerConfig.from_dict(SD_V1)
    with pytest.raises(ValueError, match=r"unknown scheduler kind 'euler'.*valid kinds.*ddim.*pndm.*dpmsolver\+\+"):
        make_scheduler("euler", conf, 10)
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_scheduler("ddim", conf, n)
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("pndm", conf, 10, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("ddim", conf, 10, eta=1.5)
    sched = make_scheduler("ddim", conf, 10, eta=0.5)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        step(sched, init_state(sched, x), 0, x, x)
    with pytest.raises(ValueError, match="steps_offset"):  # leading + offset runs past t = 999
        make_scheduler("ddim", {**SD_V1, "steps_offset": 200}, 5)
