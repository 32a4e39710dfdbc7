"""The jitted text-to-image loop: parity with diffusers, one compilation, batch independence,
sharding, errors."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qlip_jax.ptq.calibration import calibrate_minmax
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image
from tiny_qlip import ZERO_SNR, with_scheduler

PROMPTS = ["a red star", "a large striped blue circle at the top left on a yellow background",
           "a shape", "two squares"]


STEPS = 3  # sampler steps of the shared samplers (the step-indexed guidance tests need at least 3)


@pytest.fixture(scope="module")
def setup(tiny_sd):
    """``(sd, W4 A4/A6/A8 min-max DDIM sampler)``, calibrated as tiny_qlip's ``tiny_quant_dir`` is (same
    programs as the other test files' tiny quantizer); its compiled programs serve every test here."""
    pipe = Text2Image(tiny_sd, "ddim", steps=STEPS)
    quant = calibrate_minmax(pipe, QuantConfig(act_bits=(4, 6, 8), weight_bits=4), ["a red star", "two blue squares"],
                             [0, 1], guidance=3.0)
    return tiny_sd, Text2Image(tiny_sd, "ddim", steps=STEPS, quant=quant)


def test_same_seed_same_image_and_fp_schedule_equals_float(setup):
    sd, pipe = setup
    emb = pipe.encode(PROMPTS[:2])
    a = pipe(emb, [3, 4], 3.0)
    b = pipe(emb, [3, 4], 3.0)
    assert a.dtype == np.uint8 and a.shape == (2, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, pipe(emb, [5, 4], 3.0))
    fp = pipe(emb, [3, 4], 3.0, pipe.uniform_schedule(2, "fp"))
    assert np.abs(fp.astype(int) - a.astype(int)).max() <= 1  # select path == float path
    low = pipe(emb, [3, 4], 3.0, pipe.uniform_schedule(2, 4))
    assert np.abs(low.astype(int) - a.astype(int)).mean() > 0.5


def test_one_compilation_for_many_schedules_and_prompts(setup):
    sd, pipe = setup
    rng = np.random.default_rng(0)
    k, steps, layers = pipe.quant.config.num_candidates, pipe.num_steps, len(pipe.quant.registry)
    pipe(pipe.encode(PROMPTS[:2]), [0, 1], 3.0, rng.integers(0, k, (2, steps, layers)))
    traces = pipe.trace_count
    for i in range(20):
        prompts = [f"a {c} {s}" for c, s in zip(rng.choice(["red", "blue", "green"], 2),
                                                 rng.choice(["star", "circle", "square"], 2))]
        sched = rng.integers(0, k, (2, steps, layers)).astype(np.int32)
        pipe(pipe.encode(prompts), rng.integers(0, 1000, 2), float(rng.uniform(1, 8)), sched)
    assert pipe.trace_count == traces


def test_with_params_reuses_the_compiled_loop_and_leaves_the_original(setup):
    """Other weights through ``with_params`` sample as a sampler built on them would, without a new
    trace, and the original sampler keeps its own weights."""
    sd, _ = setup
    pipe = Text2Image(sd, "ddim", steps=STEPS)
    before = pipe.generate(PROMPTS[:2], guidance=3.0)
    other = jax.tree.map(lambda x: x * 1.1, sd.params)
    swapped = pipe.with_params(other).generate(PROMPTS[:2], guidance=3.0)
    assert pipe.trace_count == 1
    fresh = Text2Image(dataclasses.replace(sd, params=other), "ddim", steps=STEPS)
    assert np.array_equal(swapped, fresh.generate(PROMPTS[:2], guidance=3.0))
    assert not np.array_equal(swapped, before)
    assert np.array_equal(pipe.generate(PROMPTS[:2], guidance=3.0), before)
    assert pipe.sd.params is sd.params


def test_batch_independence(setup):
    """Each row of a batch under its own random schedule equals that row sampled alone (1-row batch)."""
    sd, pipe = setup
    rng = np.random.default_rng(1)
    k, steps, layers = pipe.quant.config.num_candidates, pipe.num_steps, len(pipe.quant.registry)
    scheds = rng.integers(0, k, (2, steps, layers)).astype(np.int32)
    together = pipe(pipe.encode(PROMPTS[1:3]), [8, 9], 4.0, scheds)
    for row in range(2):
        alone = pipe(pipe.encode(PROMPTS[1 + row:2 + row]), [8 + row], 4.0, scheds[row:row + 1])
        np.testing.assert_allclose(together[row].astype(int), alone[0].astype(int), atol=1)


def test_guidance_per_step(setup):
    """A ``[T]`` guidance array: constant equals the scalar; step ``i`` uses scale ``i``; an interval of
    timesteps; no recompilation between scalar and per-step scales."""
    sd, pipe = setup
    emb = pipe.encode(PROMPTS[:2])
    t = np.asarray(pipe.sched.timesteps)
    scalar = pipe(emb, [3, 4], 3.0)
    traces = pipe.trace_count
    assert np.array_equal(pipe(emb, [3, 4], np.full(pipe.num_steps, 3.0)), scalar)
    # the interval: guided at the timesteps <= the bound, the conditional prediction alone above it
    bound = int(t[2])
    np.testing.assert_array_equal(pipe.guidance_interval(3.0, bound), np.where(t <= bound, 3.0, 1.0))
    assert pipe.guidance_interval(3.0, bound)[:2].tolist() == [1.0, 1.0]
    assert np.array_equal(pipe(emb, [3, 4], pipe.guidance_interval(3.0, int(t.max()))), scalar)
    assert np.array_equal(pipe(emb, [3, 4], pipe.guidance_interval(3.0, int(t.min()) - 1)), pipe(emb, [3, 4], 1.0))
    interval = pipe(emb, [3, 4], pipe.guidance_interval(3.0, bound))
    assert np.abs(interval.astype(int) - scalar.astype(int)).mean() > 0.5
    assert pipe.trace_count == traces
    # step i's scale acts at step i: changing the last step's scale leaves every UNet input unchanged
    # and changes the image; changing step 1's leaves the inputs of steps 0-1 and changes step 2's
    base = np.full(pipe.num_steps, 3.0)
    img0, traj0 = pipe.trajectory(emb, [3, 4], base)
    last, step1 = base.copy(), base.copy()
    last[-1], step1[1] = 8.0, 8.0
    img1, traj1 = pipe.trajectory(emb, [3, 4], last)
    assert np.array_equal(traj0, traj1) and not np.array_equal(img0, img1)
    _, traj2 = pipe.trajectory(emb, [3, 4], step1)
    assert np.array_equal(traj0[:2], traj2[:2]) and not np.allclose(traj0[2], traj2[2])
    with pytest.raises(ValueError, match=rf"one per step \({pipe.num_steps}\)"):
        pipe(emb, [3, 4], np.full(pipe.num_steps + 1, 3.0))
    with pytest.raises(ValueError, match="finite"):
        pipe(emb, [3, 4], np.where(np.arange(pipe.num_steps) == 2, np.inf, 3.0))
    with pytest.raises(ValueError, match="max_timestep"):
        pipe.guidance_interval(3.0, -1)


def test_schedule_length_follows_actual_timesteps(tiny_sd):
    pndm = Text2Image(tiny_sd, "pndm", steps=5)
    assert pndm.num_steps == len(np.asarray(pndm.sched.timesteps)) == 6  # PLMS repeats one step


def test_errors(setup):
    sd, pipe = setup
    emb = pipe.encode(PROMPTS[:2])
    with pytest.raises(ValueError, match=r"expected \[B, T, L\]"):
        pipe(emb, [0, 1], 3.0, np.zeros((2, pipe.num_steps + 1, len(pipe.quant.registry)), np.int32))
    with pytest.raises(ValueError, match="out of the candidate set"):
        pipe(emb, [0, 1], 3.0, np.full((2, pipe.num_steps, len(pipe.quant.registry)), 9, np.int32))
    with pytest.raises(ValueError, match="non-empty list"):
        pipe.encode([])
    with pytest.raises(ValueError, match="finite"):
        pipe(emb, [0, 1], float("nan"))
    long = pipe.encode(["red " * 100])
    assert long.truncated == [True] and emb.truncated == [False, False]


def test_sharded_equals_unsharded(tiny_sd_dir):
    """4 host CPU devices (a fresh process: the device count is fixed at JAX start-up)."""
    code = f"""
import numpy as np, jax
from jax.sharding import Mesh
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.sampling.pipeline import Text2Image
assert jax.device_count() == 4, jax.devices()
sd = load_stable_diffusion({tiny_sd_dir!r})
prompts = {PROMPTS!r} + ['a green triangle']
one = Text2Image(sd, 'ddim', steps=4)
mesh = Mesh(np.array(jax.devices()), ('data',))
many = Text2Image(sd, 'ddim', steps=4, mesh=mesh)
a = one.generate(prompts, seed=3, guidance=3.0)
b = many.generate(prompts, seed=3, guidance=3.0)
print(np.abs(a.astype(int) - b.astype(int)).max())
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) <= 1


@pytest.mark.parametrize("kind,changes,rescale", [("ddim", {}, 0.0), ("pndm", {}, 0.0), ("dpmsolver++", {}, 0.0),
                                                  ("ddim", ZERO_SNR, 0.7), ("dpmsolver++", ZERO_SNR, 0.7)],
                         ids=["ddim", "pndm", "dpmsolver++", "ddim-zero_snr-rescale", "dpmsolver++-zero_snr-rescale"])
def test_end_to_end_parity_with_diffusers(tiny_sd, tiny_sd_dir, kind, changes, rescale):
    """Same folder, same initial latents: our jitted loop vs diffusers' StableDiffusionPipeline (with
    ``changes`` to the scheduler config on both sides, and diffusers' ``guidance_rescale``).

    Tolerance: the float paths agree to ~1e-5 relative (the UNet/VAE/CLIP parity tests); after
    uint8 rounding that can flip a pixel value by one level, never more.
    """
    import torch
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                           StableDiffusionPipeline)

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    cls = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}[kind]
    ref.scheduler = cls.from_config({**ref.scheduler.config, **changes})
    ref.set_progress_bar_config(disable=True)
    sd = with_scheduler(tiny_sd, changes)
    pipe = Text2Image(sd, kind, steps=5, guidance_rescale=rescale)
    latents = np.random.default_rng(0).standard_normal((2, *pipe.latent_shape)).astype(np.float32)
    prompts = PROMPTS[:2]
    ours = pipe(pipe.encode(prompts), [0, 1], 4.0, latents=latents)
    with torch.no_grad():
        theirs = ref(prompts, num_inference_steps=5, guidance_scale=4.0, output_type="np", guidance_rescale=rescale,
                     latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
    theirs = np.round(np.clip(theirs, 0, 1) * 255)
    diff = np.abs(ours.astype(np.float64) - theirs)
    assert diff.max() <= 1, diff.max()
    assert np.std(ours) > 5  # not a constant image
    if rescale:  # the rescale did something
        plain = Text2Image(sd, kind, steps=5)(pipe.encode(prompts), [0, 1], 4.0, latents=latents)
        assert np.abs(plain.astype(int) - ours.astype(int)).mean() > 0.5


def test_guidance_combine_matches_diffusers_rescale():
    """``combine``: plain guidance at rescale 0; diffusers' ``rescale_noise_cfg`` at rescale phi; one scale
    per sample."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from qlip_jax.sampling.guidance import combine

    rng = np.random.default_rng(0)
    u, c = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(combine(u, c, 3.0)), u + 3.0 * (c - u), rtol=1e-6)
    per_sample = np.asarray(combine(u, c, np.array([1.0, 5.0, 2.0], np.float32)))
    np.testing.assert_allclose(per_sample[0], c[0], rtol=1e-6)
    np.testing.assert_allclose(per_sample[1], u[1] + 5.0 * (c[1] - u[1]), rtol=1e-6)
    guided = u + 6.0 * (c - u)
    want = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(c), guidance_rescale=0.7).numpy()
    got = np.asarray(combine(u, c, 6.0, 0.7))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - guided).max() > 0.1
    with pytest.raises(ValueError, match="guidance_rescale"):
        Text2Image.__new__(Text2Image).__init__(None, guidance_rescale=1.5)


def test_image_size_must_suit_both_downsamplings(tiny_sd):
    """Height and width are held to the same multiple (VAE factor x UNet factor); a side that is only a
    multiple of the VAE's factor would give a latent the UNet cannot halve back, and is refused."""
    cfg = tiny_sd.configs
    f, m = cfg.vae.downsampling_factor, cfg.vae.downsampling_factor * cfg.unet.downsampling_factor
    assert m > f  # the tiny model has both downsamplings, so the bad sides below are multiples of f only
    side = cfg.unet.sample_size * f
    pipe = Text2Image(tiny_sd, "ddim", 2, height=side + m, width=side - m)
    assert pipe.latent_shape[:2] == ((side + m) // f, (side - m) // f)
    for height, width in ((side + f, side), (side, side + f)):
        with pytest.raises(ValueError, match=f"multiples of {m}"):
            Text2Image(tiny_sd, "ddim", 2, height=height, width=width)


def test_batch_invariant_images_equal_across_batch_sizes(setup):
    """``batch_invariant=True``: a prompt's image is bit-identical alone, in a batch of 3 and of 8 (other
    companions, other seeds), in W4A8 and under a random schedule mixing every candidate (float rows
    included); one compilation serves every batch size and schedule."""
    tiny_sd, shared = setup
    prompts = PROMPTS + ["a green triangle", "three stars", "a yellow circle", "a blue square"]
    quant = shared.quant  # W4, candidates A4/A6/A8 + float
    pipe = Text2Image(tiny_sd, "ddim", steps=STEPS, quant=quant, batch_invariant=True)
    rng = np.random.default_rng(0)
    shape = (8, pipe.num_steps, len(quant.registry))
    scheds = {"w4a8": pipe.uniform_schedule(8, 8),
              "random": rng.integers(0, quant.config.num_candidates, shape).astype(np.int32)}
    emb = {n: pipe.encode(prompts[8 - n:]) for n in (1, 3, 8)}   # the last prompt is in every batch
    for name, sched in scheds.items():
        images = {n: pipe(emb[n], np.arange(8 - n, 8), 3.0, sched[8 - n:]) for n in (1, 3, 8)}
        assert np.array_equal(images[1][0], images[3][-1]), name
        assert np.array_equal(images[1][0], images[8][-1]), name
        assert np.array_equal(images[3], images[8][-3:]), name
    assert pipe.trace_count == 1
    assert not np.array_equal(images[8][-1], pipe(emb[1], [7], 3.0, scheds["w4a8"][-1:])[0])
    with pytest.raises(ValueError, match="mesh"):
        Text2Image(tiny_sd, "ddim", steps=STEPS, batch_invariant=True, mesh=object())
