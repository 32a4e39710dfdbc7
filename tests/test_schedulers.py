"""Functional schedulers against diffusers' PyTorch schedulers, step by step over whole runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from qlip_jax.sampling.schedulers import SchedulerConfig, add_noise, init_state, make_scheduler, step

SD_V1 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
         "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
VARIANTS = {
    "sd_v1": SD_V1,
    "trailing_v": {**SD_V1, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linspace_linear": {**SD_V1, "timestep_spacing": "linspace", "beta_schedule": "linear",
                        "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0, "set_alpha_to_one": True},
}
TORCH = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
SHAPE = (2, 4, 4, 3)


def fake_model(x, i):
    """A deterministic stand-in for the UNet: depends on the sample and the step."""
    rng = np.random.default_rng(100 + i)
    return (0.1 * x + rng.standard_normal(SHAPE)).astype(np.float32)


def run_reference(kind, conf, steps, eta=0.0):
    extra = {"skip_prk_steps": True} if kind == "pndm" else {}
    ref = TORCH[kind].from_config({**conf, **extra})
    ref.set_timesteps(steps)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    xs, noises = [x], []
    for i, t in enumerate(ref.timesteps):
        kw = {}
        if kind == "ddim":
            noises.append(np.random.default_rng(500 + i).standard_normal(SHAPE).astype(np.float32))
            kw = {"eta": eta, "variance_noise": torch.from_numpy(noises[-1])}
        out = ref.step(torch.from_numpy(fake_model(x, i)), t, torch.from_numpy(x), **kw).prev_sample
        x = out.numpy()
        xs.append(x)
    return ref.timesteps.numpy(), xs, noises


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind,steps,eta", [("ddim", 10, 0.0), ("ddim", 10, 0.7), ("pndm", 12, 0.0),
                                           ("dpmsolver++", 12, 0.0)])
def test_matches_diffusers_step_by_step(kind, steps, eta, variant):
    conf = VARIANTS[variant]
    ts, ref_xs, noises = run_reference(kind, conf, steps, eta)
    sched = make_scheduler(kind, SchedulerConfig.from_dict(conf), steps, eta=eta)
    np.testing.assert_array_equal(np.asarray(sched.timesteps), ts)
    x = jnp.asarray(ref_xs[0])
    state = init_state(sched, x)
    for i in range(sched.num_steps):
        noise = jnp.asarray(noises[i]) if noises else None
        x, state = step(sched, state, i, jnp.asarray(fake_model(np.asarray(x), i)), x, noise)
        err = np.abs(np.asarray(x) - ref_xs[i + 1]).max() / np.abs(ref_xs[i + 1]).max()
        assert err <= 1e-5, (i, err)


def test_scan_with_traced_index_equals_python_loop():
    conf = SchedulerConfig.from_dict(SD_V1)
    sched = make_scheduler("pndm", conf, 8)
    outs = jnp.asarray(np.stack([np.random.default_rng(i).standard_normal(SHAPE) for i in range(sched.num_steps)]),
                       jnp.float32)
    x0 = jnp.ones(SHAPE)

    @jax.jit
    def scanned(x):
        def body(carry, i):
            x, st = carry
            return step(sched, st, i, outs[i], x), None
        return jax.lax.scan(body, (x, init_state(sched, x)), jnp.arange(sched.num_steps))[0][0]

    x, st = x0, init_state(sched, x0)
    for i in range(sched.num_steps):
        x, st = step(sched, st, i, outs[i], x)
    np.testing.assert_allclose(scanned(x0), x, rtol=1e-6, atol=1e-6)


def test_pndm_evaluates_once_more_than_requested():
    sched = make_scheduler("plms", SchedulerConfig.from_dict(SD_V1), 50)
    assert sched.num_steps == 51 and int(sched.timesteps[1]) == int(sched.timesteps[2])


def test_add_noise_matches_diffusers():
    conf = SchedulerConfig.from_dict(SD_V1)
    ref = DDIMScheduler(**SD_V1)
    x0, noise = np.ones(SHAPE, np.float32), np.full(SHAPE, 0.5, np.float32)
    t = np.array([0, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = add_noise(jnp.asarray(conf.alphas_cumprod(), jnp.float32), x0, noise, t)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_errors():
    conf = SchedulerConfig.from_dict(SD_V1)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler", conf, 10)
    with pytest.raises(ValueError, match="thresholding"):
        SchedulerConfig.from_dict({**SD_V1, "thresholding": True})
    with pytest.raises(ValueError, match="unknown scheduler config field"):
        SchedulerConfig.from_dict({**SD_V1, "beta_strat": 0.1})
    with pytest.raises(ValueError, match="prediction_type"):
        SchedulerConfig.from_dict({**SD_V1, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler("ddim", conf, 0)
