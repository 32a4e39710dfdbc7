"""PTQD-style correction: the fit on synthetic errors, the corrected UNet output on held-out prompts,
the jitted sampler (exact at full precision, one compilation), DDIM variance absorption, persistence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.ptq import ptqd
from qlip_jax.sampling import correction
from qlip_jax.ptq.calibration import calibrate, collect_calibration_data
from qlip_jax.ptq.persist import QuantStateMismatch, load_quant_setup, model_fingerprint, save_quant_setup
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling import schedulers as S
from qlip_jax.sampling.pipeline import Text2Image
from tiny_qlip import ZERO_SNR, with_scheduler

CONFIG = QuantConfig(act_bits=(4, 6), weight_bits=4)
CALIB_PROMPTS = ["a red star", "two blue squares on a gray background"]
HELD_PROMPTS = ["a green circle", "three yellow triangles"]
SD_V1 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
         "clip_sample": False}


@pytest.fixture(scope="module")
def calib(calib):
    """The session's float DDIM 4-step sampler and its calibration data (``CALIB_PROMPTS``, seeds 0 and 1,
    guidance 3: the conftest fixture, collected once per session), and their PTQD setup."""
    pipe, data = calib
    # PTQD on the cheap min-max base (the default base, qdiff, only changes the state it starts from)
    return pipe, data, calibrate(pipe, CONFIG, data, "ptqd", init="minmax")


def _zero_tables(setup):
    """``setup`` with all-zero PTQD tables (= no correction) for the same timesteps: the sampler runs it
    in the compilation of the corrected setup."""
    return dataclasses.replace(setup, ptqd=jax.tree.map(jnp.zeros_like, setup.ptqd).replace(
        timesteps=setup.ptqd.timesteps))


# ----------------------------------------------------------------------------------------------
# Estimation


def test_fit_recovers_known_k_bias_and_residual_moments():
    rng = np.random.default_rng(0)
    n, p, c = 64, 128, 4
    k_true, b_true = 0.2, np.array([0.1, -0.05, 0.3, 0.0])
    eps = rng.standard_normal((n, p, c))
    # residual noise std 0.1, halves' noise correlated with rho = 0.5 (rows 2j: uncond, 2j+1: cond)
    shared, own = rng.standard_normal((n // 2, p, c)), rng.standard_normal((n, p, c))
    noise = 0.1 * (np.sqrt(0.5) * np.repeat(shared, 2, axis=0) + np.sqrt(0.5) * own)
    eps_q = (1 + k_true) * eps + b_true + noise
    k, b = ptqd.fit_linear(eps, eps_q)
    assert abs(k - k_true) < 0.005
    np.testing.assert_allclose(b, b_true, atol=0.005)

    # per step and candidate: two steps of the sampler's three, the third copies its nearest
    steps = np.repeat([0, 2], n // 2)
    pairs = (np.arange(0, n, 2), np.arange(1, n, 2))
    out_q = np.stack([eps_q, eps + 0.5 * eps_q - 0.5 * eps])          # candidate 1: k = 0.1, b / 2
    corr = ptqd.fit_correction(eps, out_q, steps, pairs, timesteps=[901, 501, 101])
    assert corr.k.shape == (3, 2) and corr.bias.shape == (3, 2, 4) and corr.cov.shape == (3, 2)
    np.testing.assert_allclose(corr.k, [[0.2, 0.1]] * 3, atol=0.01)
    np.testing.assert_allclose(corr.bias[:, 0], np.broadcast_to(b_true, (3, 4)), atol=0.01)
    np.testing.assert_allclose(corr.bias[:, 1], np.broadcast_to(b_true / 2, (3, 4)), atol=0.01)
    np.testing.assert_allclose(corr.var_uncond[:, 0], 0.01, rtol=0.1)
    np.testing.assert_allclose(corr.var_cond[:, 0], 0.01, rtol=0.1)
    np.testing.assert_allclose(corr.cov[:, 0], 0.005, rtol=0.15)
    np.testing.assert_array_equal(corr.k[1], corr.k[0])                # step 1: nearest is step 0
    assert corr.num_steps == 3 and list(np.asarray(corr.timesteps)) == [901, 501, 101]

    # the guided residual variance the sampler absorbs, at a uniform candidate 0, guidance g
    g, w = 3.0, jnp.array([[1.0, 0.0]])
    v = corr.var_uncond[0, 0] * (1 - g) ** 2 + 2 * g * (1 - g) * corr.cov[0, 0] + g ** 2 * corr.var_cond[0, 0]
    np.testing.assert_allclose(correction.residual_variance(corr, 0, w, g), v / (1 + corr.k[0, 0]) ** 2, rtol=1e-5)
    # a shrinking quantized output (k < 0) is not amplified: k = 0, bias = the mean error
    k_neg, b_neg = ptqd.fit_linear(eps, 0.8 * eps + b_true)
    assert k_neg == 0.0
    np.testing.assert_allclose(b_neg, b_true, atol=0.01)


def test_mixed_precision_weights_are_mac_shares():
    share = jnp.array([0.5, 0.3, 0.2])
    idx = jnp.array([[2, 2, 2], [0, 0, 0], [0, 1, 2], [1, 2, 2]])       # K = 2 quantized, 2 = fp
    np.testing.assert_allclose(correction.candidate_weights(idx, share, 2),
                               [[0, 0], [1, 0], [0.5, 0.3], [0, 0.5]], atol=1e-7)
    corr = correction.PTQDCorrection(timesteps=jnp.array([1]), k=jnp.array([[1.0, 3.0]]),
                               bias=jnp.array([[[1.0, 1.0], [3.0, 3.0]]]), var_uncond=jnp.ones((1, 2)),
                               var_cond=jnp.ones((1, 2)), cov=jnp.ones((1, 2)))
    out = jnp.full((4, 2, 2, 2), 10.0)
    got = correction.correct_output(corr, 0, correction.candidate_weights(idx, share, 2), out)
    np.testing.assert_array_equal(got[0], out[0])                        # full precision: untouched
    np.testing.assert_allclose(got[1], (10 - 1) / 2)                     # uniform candidate 0
    np.testing.assert_allclose(got[2], (10 - 1.4) / (1 + 1.4))           # 0.5 * cand0 + 0.3 * cand1
    np.testing.assert_allclose(got[3], (10 - 1.5) / 2.5)                 # half the MACs quantized


def test_correction_lowers_output_error_on_held_out_prompts(calib):
    pipe, data, setup = calib
    held = collect_calibration_data(pipe, HELD_PROMPTS, [5, 6], guidance=3.0)
    out_fp, out_q = ptqd.model_outputs(pipe.unet, pipe.sd.params["unet"], setup.state, setup.registry,
                                       CONFIG, held)
    w = jnp.zeros((len(held), CONFIG.num_quantized)).at[:, 0].set(1.0)   # lowest candidate (A4)
    fixed = np.asarray(correction.correct_output(setup.ptqd, jnp.asarray(held.step_index), w, jnp.asarray(out_q[0])))

    def rel(a):
        return float(np.sqrt(np.mean((a - out_fp) ** 2) / np.mean(out_fp ** 2)))

    before, after = rel(out_q[0]), rel(fixed)
    assert after < before, (before, after)
    # the systematic part of the error (its mean per step and channel) is mostly removed
    mean_err = [np.abs(np.mean((a - out_fp)[held.step_index == s], axis=(0, 1))).mean()
                for a in (out_q[0], fixed) for s in range(pipe.num_steps)]
    assert np.mean(mean_err[pipe.num_steps:]) < 0.5 * np.mean(mean_err[:pipe.num_steps]), mean_err
    assert setup.info["method"] == "ptqd" and setup.info["init"] == "minmax"


def test_ptqd_options_and_reuse_of_a_calibrated_base(calib):
    pipe, data, setup = calib
    base = dataclasses.replace(setup, ptqd=None, info={"method": "minmax"})
    again = calibrate(pipe, CONFIG, data, "ptqd", init=base)
    assert again.state is base.state and again.info["init"] == "minmax"
    for f in ("k", "bias", "var_cond", "cov"):
        np.testing.assert_allclose(getattr(again.ptqd, f), getattr(setup.ptqd, f), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="ptqd init"):
        calibrate(pipe, CONFIG, data, "ptqd", init="ptqd")
    with pytest.raises(TypeError, match="unknown option"):
        calibrate(pipe, CONFIG, data, "ptqd", init=base, iters=3)


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_compiles_once_and_all_fp_schedule_is_exact(tiny_sd, calib):
    _, _, setup = calib
    pipe = Text2Image(tiny_sd, "ddim", steps=4, eta=0.5, quant=setup)   # eta > 0: variance absorbed too
    emb = pipe.encode(["a red star", "a green circle"])
    fp = pipe.uniform_schedule(2, "fp")
    low = pipe.uniform_schedule(2, 4)
    mixed = np.random.default_rng(0).integers(0, CONFIG.num_candidates, low.shape).astype(np.int32)
    half = low.copy()
    half[:, :, ::2] = CONFIG.fp_index                                    # float and A4 layers mixed
    imgs = {name: pipe(emb, [0, 1], g, s)
            for name, s, g in (("fp", fp, 3.0), ("low", low, 3.0), ("mixed", mixed, 5.0), ("half", half, 2.0))}
    # the tables are traced inputs: all-zero tables (= no correction) run in the same compilation
    pipe.quant = _zero_tables(setup)
    uncorrected = {name: pipe(emb, [0, 1], 3.0, s) for name, s in (("fp", fp), ("low", low))}
    assert pipe.trace_count == 1
    assert not np.array_equal(imgs["low"], uncorrected["low"])          # the correction acts
    # full-precision rows: identity correction and unchanged noise std -> bit-exact images, equal to
    # the uncorrected sampler's and to the float sampler's (no schedule)
    np.testing.assert_array_equal(imgs["fp"], uncorrected["fp"])
    np.testing.assert_array_equal(imgs["fp"], pipe(emb, [0, 1], 3.0))
    for im in imgs.values():
        assert im.shape == (2, 32, 32, 3) and im.std() > 0


def test_ddim_absorbed_sigma_reduces_the_injected_noise():
    sched = S.make_scheduler("ddim", SD_V1, 10, eta=1.0)
    i = 3
    c = sched.coeffs
    a_t, a_prev, sigma = (float(np.asarray(v[i], np.float64)) for v in (c.alpha_t, c.alpha_prev, c.sigma))
    coef = np.sqrt(1 - a_prev - sigma ** 2) - np.sqrt(a_prev * (1 - a_t) / a_t)
    np.testing.assert_allclose(S.ddim_output_coefficient(sched, i), coef, rtol=1e-5)
    var = jnp.array([0.0, 0.01, 0.05, 1e6])
    got = np.asarray(S.ddim_absorbed_sigma(sched, i, var))
    want = np.sqrt(np.maximum(sigma ** 2 - coef ** 2 * np.asarray(var, np.float64), 0.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == np.asarray(c.sigma[i]) and got[3] == 0.0 and got[0] > got[1] > got[2] > 0
    # the step uses one std per sample: noise term and direction coefficient
    rng = np.random.default_rng(0)
    x, out, z = (jnp.asarray(rng.standard_normal((4, 3, 3, 2)), jnp.float32) for _ in range(3))
    x_prev, _ = S.step(sched, S.init_state(sched, x), i, out, x, z, sigma=jnp.asarray(got))
    x0 = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
    for r in range(4):
        want_r = S.ddim_update(x0[r], out[r], a_prev, float(got[r]), z[r])
        np.testing.assert_allclose(x_prev[r], want_r, rtol=1e-5, atol=1e-5)
    default, _ = S.step(sched, S.init_state(sched, x), i, out, x, z)
    np.testing.assert_array_equal(x_prev[0], default[0])                   # var 0: the plain step
    dpm = S.make_scheduler("dpmsolver++", SD_V1, 10)
    with pytest.raises(ValueError, match="only applies to DDIM"):
        S.step(dpm, S.init_state(dpm, x), 0, out, x, sigma=jnp.ones(4))
    # deterministic samplers get no noise std from the PTQD sampler hook
    corr = correction.PTQDCorrection(timesteps=dpm.timesteps, k=jnp.zeros((10, 1)), bias=jnp.zeros((10, 1, 2)),
                               var_uncond=jnp.ones((10, 1)), var_cond=jnp.ones((10, 1)), cov=jnp.ones((10, 1)))
    _, none = correction.sampler_correction(corr, dpm, 0, jnp.zeros((4, 3), jnp.int32), out, 3.0,
                                      jnp.full(3, 1 / 3), 1)
    assert none is None


def test_round_trip_refused_on_another_model_and_step_count(tiny_sd, calib, tmp_path):
    pipe, _, setup = calib
    tag = model_fingerprint(pipe.sd.configs.unet, pipe.sd.params["unet"])
    save_quant_setup(str(tmp_path / "ptqd"), setup, tag, {"method": "ptqd"})
    loaded, info = load_quant_setup(str(tmp_path / "ptqd"), tag)
    assert info["method"] == "ptqd" and info["has_ptqd"] and loaded.registry == setup.registry
    assert set(loaded.state) == set(setup.state)                        # layer names only
    for f, v in setup.ptqd.to_dict().items():
        got = np.asarray(getattr(loaded.ptqd, f))
        assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v), f
        np.testing.assert_array_equal(got, v)
    assert jax.tree.structure(loaded.state) == jax.tree.structure(setup.state)
    other = jax.tree.map(lambda p: p * 1.01, pipe.sd.params["unet"])
    with pytest.raises(QuantStateMismatch, match="calibrated for model"):
        load_quant_setup(str(tmp_path / "ptqd"), model_fingerprint(pipe.sd.configs.unet, other))
    with pytest.raises(ValueError, match="calibrated for a 4-step sampler"):
        Text2Image(tiny_sd, "ddim", steps=5, quant=loaded)
    with pytest.raises(ValueError, match="calibrated for a 4-step sampler"):
        Text2Image(tiny_sd, "dpmsolver++", steps=4, quant=loaded)     # same count, other timesteps


def test_zero_terminal_snr_v_prediction_model(tiny_sd):
    """PTQD on a v-prediction model with zero terminal SNR (the first DDIM step at abar = 0): the fitted
    tables are finite, the correction lowers the held-out output error, the output coefficient is v's
    (``-sqrt(a_prev)`` at abar_t = 0, where the epsilon form divides by zero), and the corrected eta = 1
    sampler gives finite images that differ from the uncorrected ones."""
    sd = with_scheduler(tiny_sd, ZERO_SNR)
    pipe = Text2Image(sd, "ddim", steps=4, eta=1.0)
    assert float(pipe.sched.coeffs.alpha_t[0]) == 0.0
    data = collect_calibration_data(pipe, CALIB_PROMPTS, [0, 1], guidance=3.0)
    setup = calibrate(pipe, CONFIG, data, "ptqd", init="minmax")
    for f, v in setup.ptqd.to_dict().items():
        assert np.isfinite(np.asarray(v)).all(), f
    held = collect_calibration_data(pipe, HELD_PROMPTS, [5, 6], guidance=3.0)
    out_fp, out_q = ptqd.model_outputs(pipe.unet, sd.params["unet"], setup.state, setup.registry, CONFIG, held)
    w = jnp.zeros((len(held), CONFIG.num_quantized)).at[:, 0].set(1.0)
    fixed = np.asarray(correction.correct_output(setup.ptqd, jnp.asarray(held.step_index), w, jnp.asarray(out_q[0])))
    err = [float(np.mean((a - out_fp) ** 2)) for a in (out_q[0], fixed)]
    assert err[1] < err[0], err
    a_prev = float(pipe.sched.coeffs.alpha_prev[0])
    np.testing.assert_allclose(S.ddim_output_coefficient(pipe.sched, 0), -np.sqrt(a_prev), rtol=1e-6)
    quantized = Text2Image(sd, "ddim", steps=4, eta=1.0, quant=setup)
    emb = quantized.encode(HELD_PROMPTS)
    low = quantized.uniform_schedule(2, 4)
    corrected = quantized(emb, [0, 1], 3.0, low)
    quantized.quant = _zero_tables(setup)                               # no correction, same compilation
    plain = quantized(emb, [0, 1], 3.0, low)
    assert np.isfinite(corrected).all() and corrected.std() > 0
    assert not np.array_equal(corrected, plain)
