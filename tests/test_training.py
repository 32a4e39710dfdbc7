"""Pretraining and the scene parser: a few real steps on tiny configs, resume, alignment logic."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from refusal import refused
from safetensors.numpy import load_file

from qlip_jax.data.scenes import (Caption, SceneObject, StatedObject, make_caption, render, sample_scene,
                                   split_seeds)
from qlip_jax.metrics.parser import (ParsedScene, SceneParserNet, alignment_score, batch_labels,
                                     macro_f1, make_parser_step, parser_loss)
from qlip_jax.models.presets import preset
from qlip_jax.models.sd import configs_from_dicts, init_params
from qlip_jax.models.unet import UNet2DConditionModel
from qlip_jax.models.clip import CLIPTextModel
from qlip_jax.training.diffusion import diffusion_loss, make_diffusion_step


def test_diffusion_step_lowers_loss_on_a_fixed_batch():
    configs = configs_from_dicts(preset("tiny"))
    params = init_params(configs, jax.random.key(0))
    trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    tx = optax.adam(1e-3)
    state = {"params": trainable, "opt": jax.jit(tx.init)(trainable), "ema": trainable, "step": jnp.int32(0)}
    step = make_diffusion_step(UNet2DConditionModel(configs.unet), CLIPTextModel(configs.text), tx,
                               jnp.asarray(configs.scheduler.alphas_cumprod(), jnp.float32), 0.99)
    # batch 2, 10 steps (three seeds: the last loss 0.43 x the first; batch 8 and 15 steps cost more
    # and test the same)
    latents = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    ids = jnp.tile(jnp.arange(77, dtype=jnp.int32)[None], (2, 1))
    key = jax.random.key(2)  # same noise and timesteps every step: a pure optimisation check
    losses = []
    for _ in range(10):
        state, m = step(state, latents, ids, key)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state["step"]) == 10
    # EMA moved towards the params but is not equal to them
    diff = jax.jit(lambda e, p: jax.tree.map(lambda a, b: jnp.abs(a - b).max(), e, p))(state["ema"], state["params"])
    assert 0 < max(float(d) for d in jax.tree.leaves(diff))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _losses_and_pred(unet, text, params, latents, ids, key, ac, w, gamma, gamma_v, noisy, t):
    """Every :func:`diffusion_loss` variant the by-hand tests check, and the UNet's prediction on the
    test's own noisy input ``noisy`` at ``t``, as one program (run op by op they compiled hundreds of
    small ones). ``ac`` and the Min-SNR gammas are inputs, so both tests and both schedules of the
    v-prediction test run one compilation; identical UNet calls are computed once by XLA."""
    def loss(**kw):
        return diffusion_loss(unet, text, params, latents, ids, key, ac, **kw)[0]

    context, _ = text.apply({"params": params["text_encoder"]}, ids)
    return dict(
        pred=unet.apply({"params": params["unet"]}, noisy, t, context),
        plain=loss(), flat=loss(weights=jnp.full(w.shape, 3.0)), weighted=loss(weights=w),
        min_snr=loss(weights=w, min_snr_gamma=gamma), huge=loss(min_snr_gamma=1e30),  # 1e30 never binds
        v_only=loss(weights=w, v_weighting=True), both=loss(weights=w, min_snr_gamma=gamma, v_weighting=True),
        v_pred=loss(prediction_type="v_prediction"),
        v_min_snr=loss(min_snr_gamma=gamma_v, prediction_type="v_prediction"))


def test_weighted_diffusion_loss_by_hand():
    """Per-cell weights give the weighted mean over cells; Min-SNR-gamma scales each sample's error."""
    configs = configs_from_dicts(preset("tiny"))
    params = init_params(configs, jax.random.key(0))
    unet, text = UNet2DConditionModel(configs.unet), CLIPTextModel(configs.text)
    ac = jnp.asarray(configs.scheduler.alphas_cumprod(), jnp.float32)
    latents = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    ids = jnp.tile(jnp.arange(77, dtype=jnp.int32)[None], (2, 1))
    key = jax.random.key(2)
    # the per-cell squared error, computed here from the same noise and timesteps
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (2,), 0, ac.shape[0])
    noise = jax.random.normal(k_n, latents.shape)
    a = ac[t][:, None, None, None]
    w = np.array(jax.random.uniform(jax.random.key(3), (2, 16, 16)))
    w[0, :8] = 0.0  # cells with zero weight do not count at all
    # Min-SNR-gamma: each sample's error times min(SNR_t, gamma) / SNR_t; gamma below the larger SNR of
    # the two samples, so at least one is down-weighted
    snr = np.asarray(ac[t] / (1 - ac[t]), np.float64)
    gamma = float(0.5 * snr.max())
    got = _losses_and_pred(unet, text, params, latents, ids, key, ac, jnp.asarray(w), jnp.float32(gamma),
                           jnp.float32(2.0), jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise, t)
    got = {k: (np.asarray(v) if k == "pred" else float(v)) for k, v in got.items()}
    plain = got["plain"]
    np.testing.assert_allclose(got["flat"], plain, rtol=1e-6)
    sq = np.mean((np.asarray(got["pred"], np.float64) - np.asarray(noise, np.float64)) ** 2, axis=-1)
    np.testing.assert_allclose(got["weighted"], np.sum(w * sq) / np.sum(w), rtol=1e-4)
    np.testing.assert_allclose(plain, sq.mean(), rtol=1e-4)
    assert abs(got["weighted"] - plain) > 1e-4 * plain
    s = np.minimum(snr, gamma) / snr
    assert s.min() < 1.0
    np.testing.assert_allclose(got["min_snr"], np.sum(s[:, None, None] * w * sq) / np.sum(w), rtol=1e-4)
    np.testing.assert_allclose(got["huge"], plain, rtol=1e-6)
    # v weighting: times (SNR_t + 1) / SNR_t, and times Min-SNR's weight when both are on
    v = (snr + 1) / snr
    assert v.max() > 1.5  # one of the two timesteps is noisy enough for the weight to matter
    np.testing.assert_allclose(got["v_only"], np.sum(v[:, None, None] * w * sq) / np.sum(w), rtol=1e-4)
    np.testing.assert_allclose(got["both"], np.sum(s[:, None, None] * v[:, None, None] * w * sq) / np.sum(w),
                               rtol=1e-4)


def test_v_prediction_loss_by_hand():
    """v-prediction targets v = sqrt(a) eps - sqrt(1 - a) x0; Min-SNR's weight for it is min(SNR, gamma) /
    (SNR + 1); at abar = 0 (zero terminal SNR) the target is -x0 and everything stays finite;
    v weighting on top of v-prediction is refused."""
    configs = configs_from_dicts(preset("tiny"))
    params = init_params(configs, jax.random.key(0))
    unet, text = UNet2DConditionModel(configs.unet), CLIPTextModel(configs.text)
    latents = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    ids = jnp.tile(jnp.arange(77, dtype=jnp.int32)[None], (2, 1))
    key = jax.random.key(2)
    k_t, k_n = jax.random.split(key)
    noise = np.asarray(jax.random.normal(k_n, latents.shape), np.float64)
    x0 = np.asarray(latents, np.float64)
    w = jnp.ones((2, 16, 16), jnp.float32)  # (the weighted variants are test_weighted_diffusion_loss_by_hand's)
    for ac in (jnp.asarray(configs.scheduler.alphas_cumprod(), jnp.float32), jnp.zeros((1000,), jnp.float32)):
        t = jax.random.randint(k_t, (2,), 0, ac.shape[0])
        a = np.asarray(ac[t], np.float64)[:, None, None, None]
        noisy = jnp.asarray(np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, jnp.float32)
        out = _losses_and_pred(unet, text, params, latents, ids, key, ac, w, jnp.float32(1.0), jnp.float32(2.0),
                               noisy, t)
        pred = np.asarray(out["pred"], np.float64)
        sq = np.mean((pred - (np.sqrt(a) * noise - np.sqrt(1 - a) * x0)) ** 2, axis=-1)
        got = float(out["v_pred"])
        np.testing.assert_allclose(got, sq.mean(), rtol=1e-4)
        eps_loss = float(out["plain"])
        assert abs(eps_loss - got) > 1e-3 * got  # another target
        snr = a[:, 0, 0, 0] / (1 - a[:, 0, 0, 0])
        s = np.minimum(snr, 2.0) / (snr + 1)
        min_snr = float(out["v_min_snr"])
        np.testing.assert_allclose(min_snr, np.sum(s[:, None, None] * sq) / sq.size, rtol=1e-4, atol=1e-9)
    assert min_snr == 0.0 and np.isfinite(got)  # abar = 0: SNR 0, Min-SNR's weight 0
    with pytest.raises(ValueError, match="v_weighting"):
        diffusion_loss(unet, text, params, latents, ids, key, ac, v_weighting=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(unet, text, params, latents, ids, key, ac, prediction_type="sample")


@pytest.mark.slow  # a whole program end to end
def test_pretrain_zero_terminal_snr_exports_a_model_that_samples(tmp_path):
    """--prediction-type v_prediction --zero-terminal-snr: the exported scheduler config says so (DDIM class,
    trailing), the folder loads and samples finite images from t = 999; inconsistent flags are refused."""
    import json

    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.sampling.pipeline import Text2Image
    from train.pretrain import main

    common = ["--preset", "tiny", "--vae-steps", "1", "--vae-batch", "2", "--num-scenes", "8", "--batch", "2",
              "--steps", "2", "--sample-every", "0", "--quiet"]
    for bad in (["--zero-terminal-snr"], ["--prediction-type", "v_prediction", "--v-weighting"]):
        with pytest.raises(SystemExit):
            main(["--work", str(tmp_path / "bad"), "--out", str(tmp_path / "bad_out"), *common, *bad])
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    refused = [["--vae-crop", c] for c in ("3", "64", "-2")]  # tiny's VAE downsamples by 2, sees 32x32 images
    refused += [["--single-object-share", p] for p in ("0", "1", "1.5")]
    for bad in refused:
        with pytest.raises(SystemExit):
            main(["--work", str(tmp_path / "bad"), "--out", str(tmp_path / "bad_out"), *common, *bad])
    assert not (tmp_path / "bad").exists()
    main(["--work", str(tmp_path / "w"), "--out", str(out), *common, "--prediction-type", "v_prediction",
          "--zero-terminal-snr", "--vae-crop", "16", "--single-object-share", "0.5"])
    with open(out / "scheduler" / "scheduler_config.json") as f:
        sched = json.load(f)
    assert sched["_class_name"] == "DDIMScheduler" and sched["rescale_betas_zero_snr"] is True
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    with open(out / "qlip_training.json") as f:
        info = json.load(f)
    assert info["prediction_type"] == "v_prediction" and info["zero_terminal_snr"] is True
    assert info["vae_crop"] == 16 and info["single_object_share"] == 0.5
    sd = load_stable_diffusion(str(out))
    pipe = Text2Image(sd, "ddim", 4)
    assert int(pipe.sched.timesteps[0]) == 999 and float(pipe.sched.alphas_cumprod[999]) == 0.0
    images = pipe.generate(["a red star", "a shape"], seed=0, guidance=3.0)
    assert images.shape[0] == 2 and images.dtype == np.uint8 and images.std() > 0  # (NaN latents: one flat value)


@pytest.mark.slow  # a whole program end to end
def test_pretrain_resumes_with_identical_state(tmp_path, capsys):
    """Interrupted + resumed equals uninterrupted, with the object-weighted and Min-SNR losses on (the
    coverage cache is written by the first run and read by the resume); --export-on-stop exports the
    checkpoint's EMA weights; a negative gamma is refused."""
    import json
    import os
    import shutil

    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.training import Checkpointer
    from train.pretrain import main

    common = ["--preset", "tiny", "--vae-steps", "2", "--vae-batch", "4", "--num-scenes", "32",
              "--batch", "4", "--steps", "4", "--ckpt-every", "2", "--sample-every", "0", "--object-weight", "4",
              "--object-weight-captions", "exhaustive", "--small-caption-weight", "2", "--min-snr-gamma", "5",
              "--v-weighting", "--quiet"]
    main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_out"), "--stop-at", "2", *common])
    assert not (tmp_path / "a_out").exists()  # interrupted: nothing exported yet
    # --export-on-stop at the checkpoint's step: no training, the checkpoint's EMA weights exported
    main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_mid"), "--stop-at", "2", "--export-on-stop",
          *common])
    state, _ = Checkpointer(str(tmp_path / "a" / "diffusion")).restore(step=2)
    mid = load_stable_diffusion(str(tmp_path / "a_mid"))
    for part in ("unet", "text_encoder"):
        ours, saved = jax.tree.leaves(mid.params[part]), jax.tree.leaves(state["ema"][part])
        assert len(ours) == len(saved) > 0
        assert all(np.array_equal(np.asarray(a), np.asarray(b).astype(np.float16)) for a, b in zip(ours, saved)), part
    assert mid.info["stopped_at"] == 2 and mid.info["diffusion_steps"] == 4
    # the export trained nothing: only the first invocation's time is training time
    assert len(mid.info["wall_clock_minutes"]["invocations"]) == 1
    assert len(json.load(open(tmp_path / "a" / "wall_clock.json"))) == 1
    refused(main, ["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_bad"), "--stop-at", "1",
                   "--export-on-stop", *common], capsys, "past --stop-at 1")
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_bad"), "--export-on-stop", *common])
    main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_out"), *common])  # resumes at 2
    main(["--work", str(tmp_path / "b"), "--out", str(tmp_path / "b_out"), *common])
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"),
                       ("vae", "diffusion_pytorch_model")):
        a = load_file(str(tmp_path / "a_out" / part / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b_out" / part / f"{name}.safetensors"))
        assert all(np.array_equal(a[k], b[k]) for k in a), part
    assert len(list((tmp_path / "a").glob("coverage_32x*.npy"))) == 1
    # a truncated latest checkpoint: the run says so in one line, resumes from the earlier step (2) and ends
    # with the uninterrupted run's weights; the unreadable step is kept aside, nothing is deleted
    shutil.copytree(tmp_path / "b", tmp_path / "t")
    for f in (tmp_path / "t" / "diffusion" / "4" / "state").rglob("d/*"):
        os.truncate(f, f.stat().st_size // 2)
    capsys.readouterr()
    main(["--work", str(tmp_path / "t"), "--out", str(tmp_path / "t_out"), *common])
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[checkpoint]")]
    assert len(notes) == 1 and "step 4" in notes[0] and "falling back to step 2" in notes[0], notes
    assert (tmp_path / "t" / "diffusion" / "4.unreadable").is_dir()
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = load_file(str(tmp_path / "t_out" / part / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b_out" / part / f"{name}.safetensors"))
        assert all(np.array_equal(a[k], b[k]) for k in a), part
    with open(tmp_path / "a_out" / "qlip_training.json") as f:
        info = json.load(f)
    assert len(info["wall_clock_minutes"]["invocations"]) == 2  # the first run and the resume
    assert info["object_weight"] == 4.0 and info["min_snr_gamma"] == 5.0 and info["v_weighting"] is True
    assert info["object_weight_captions"] == "exhaustive" and info["small_caption_weight"] == 2.0
    # refused: a negative gamma, a caption restriction of no object weight, a non-positive caption weight
    for bad in (["--min-snr-gamma", "-1"], ["--object-weight", "0"], ["--small-caption-weight", "0"]):
        with pytest.raises(SystemExit):
            main(["--work", str(tmp_path / "c"), "--out", str(tmp_path / "c_out"), *common, *bad])
    assert not (tmp_path / "c").exists()


def test_random_crops_are_windows_of_their_images():
    from train.pretrain import random_crops

    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    crops, offsets = random_crops(images, 32, np.random.default_rng(1))
    assert crops.shape == (6, 32, 32, 3) and offsets.shape == (6, 2)
    assert offsets.min() >= 0 and offsets.max() <= 32 and len({tuple(o) for o in offsets}) > 1
    for im, crop, (y, x) in zip(images, crops, offsets):
        np.testing.assert_array_equal(crop, im[y:y + 32, x:x + 32])
    again, _ = random_crops(images, 32, np.random.default_rng(1))
    np.testing.assert_array_equal(again, crops)  # seeded: a resumed run crops as the uninterrupted one
    whole, offsets = random_crops(images, 64, np.random.default_rng(2))
    np.testing.assert_array_equal(whole, images)
    np.testing.assert_array_equal(offsets, 0)


def test_draw_scene_ids_single_object_share():
    """The share of single-object scenes is the one asked for, every draw is a scene of the right kind,
    draws are seeded; without a share, the uniform draw of earlier runs (same ids for the same rng)."""
    from qlip_jax.data.scenes import train_object_counts
    from train.pretrain import draw_scene_ids

    counts = train_object_counts(400)
    assert set(np.unique(counts)) == {1, 2, 3, 4}
    seeds = split_seeds("train")
    assert [len(sample_scene(seeds[i]).objects) for i in range(20)] == list(counts[:20])
    ids = draw_scene_ids(np.random.default_rng(3), counts, 4000, 0.7)
    single = counts[ids] == 1
    assert abs(single.mean() - 0.7) < 0.03 and abs((counts == 1).mean() - 0.25) < 0.06
    assert len(np.unique(ids[single])) > 0.8 * (counts == 1).sum()  # spread over all single-object scenes
    assert set(counts[ids[~single]]) == {2, 3, 4}
    np.testing.assert_array_equal(draw_scene_ids(np.random.default_rng(3), counts, 4000, 0.7), ids)
    np.testing.assert_array_equal(draw_scene_ids(np.random.default_rng(5), counts, 64, None),
                                  np.random.default_rng(5).integers(0, len(counts), 64))
    with pytest.raises(ValueError, match="one object and of several"):
        draw_scene_ids(np.random.default_rng(0), np.full(10, 2), 4, 0.5)


def test_batch_weights_only_for_captions_that_list_every_object():
    """``exhaustive``: levels 2-4 keep their scene's object weights, levels 0-1 and dropped captions weigh 1."""
    from train.pretrain import batch_weights

    rng = np.random.default_rng(0)
    scene = sample_scene(7)
    captions = [make_caption(scene, level, rng) for level in range(5)] * 2
    dropped = np.array([False] * 5 + [True] * 5)
    weights = 1.0 + rng.random((3, 8, 8)).astype(np.float32)
    ids = np.array([2] * 10)
    everything = batch_weights(weights, ids, captions, dropped, "all")
    assert np.array_equal(everything, np.broadcast_to(weights[2], (10, 8, 8)))
    some = batch_weights(weights, ids, captions, dropped, "exhaustive")
    assert some.dtype == weights.dtype
    for i, c in enumerate(captions):
        kept = c.exhaustive and not dropped[i]
        assert kept == (i in (2, 3, 4)), (i, c.text)
        assert np.array_equal(some[i], weights[2] if kept else np.ones((8, 8), np.float32)), i
    assert batch_weights(None, ids, captions, dropped, "exhaustive") is None
    # small_caption_weight: a kept caption stating a small or medium object scales its whole map
    stated = lambda *sizes: Caption("t", 3, tuple(StatedObject("star", "red", z) for z in sizes), None, True)  # noqa: E731
    captions = [stated("small"), stated("large", "medium"), stated("large"), stated(None), stated("small")]
    dropped = np.array([False, False, False, False, True])
    ones = np.ones((1, 8, 8), np.float32)
    got = batch_weights(ones, np.zeros(5, int), captions, dropped, "all", small_caption_weight=3.0)
    np.testing.assert_array_equal(got[:, 0, 0], [3.0, 3.0, 1.0, 1.0, 1.0])
    assert got.dtype == np.float32 and (got == got[:, :1, :1]).all()


def test_pretrain_init_parts_takes_only_the_named_parts(tmp_path, tiny_sd_dir, tiny_sd, capsys):
    """``--init-from X --init-parts vae``: X's VAE as-is, a fresh UNet and text encoder (seed 0's init)."""
    from qlip_jax.models.sd import load_stable_diffusion
    from train.pretrain import main

    common = ["--preset", "tiny", "--init-from", tiny_sd_dir, "--vae-steps", "0", "--num-scenes", "8",
              "--steps", "0", "--sample-every", "0", "--quiet"]
    main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--init-parts", "vae", *common])
    out = load_stable_diffusion(str(tmp_path / "out"))
    fresh = init_params(configs_from_dicts(preset("tiny")), jax.random.key(0))
    f16 = lambda tree: [np.asarray(x, np.float16) for x in jax.tree.leaves(tree)]  # the export's dtype
    for part, want, other in (("vae", tiny_sd.params["vae"], fresh["vae"]),
                              ("unet", fresh["unet"], tiny_sd.params["unet"]),
                              ("text_encoder", fresh["text_encoder"], tiny_sd.params["text_encoder"])):
        got = f16(out.params[part])
        assert all(np.array_equal(g, w) for g, w in zip(got, f16(want))), part
        assert not all(np.array_equal(g, o) for g, o in zip(got, f16(other))), part
    assert out.info["init_from"]["parts"] == ["vae"]
    refused(main, ["--work", str(tmp_path / "w2"), "--out", str(tmp_path / "out2"), "--init-parts", "unet", *common],
            capsys, "--init-parts leaves it out")
    assert not (tmp_path / "out2").exists()


def test_seeds_in_chain_finds_every_diffusion_run():
    """The continuation warning's source: the seeds of the diffusion runs a record continues (a run with
    no diffusion steps, like a VAE-only one, draws no diffusion batches)."""
    from train.pretrain import seeds_in_chain

    vae_only = {"seed": 9, "diffusion_steps": 0}
    first = {"seed": 0, "diffusion_steps": 100, "init_from": {"parts": ["vae"], "record": vae_only}}
    second = {"seed": 5, "diffusion_steps": 50, "init_from": {"parts": ["unet"], "record": first}}
    assert seeds_in_chain(second) == {0, 5} and seeds_in_chain(first) == {0}
    assert seeds_in_chain(vae_only) == set() and seeds_in_chain(None) == set()


def test_parser_training_lowers_loss():
    net = SceneParserNet(width=8)
    scenes = [sample_scene(s) for s in range(16)]
    images, labels = np.stack([render(s) for s in scenes]), batch_labels(scenes)
    # init, optimiser state and first loss as programs (op by op they compiled ~200 small ones)
    params = jax.jit(lambda k, x: net.init(k, x)["params"])(jax.random.key(0), images[:1])
    tx = optax.adam(3e-3)
    opt = jax.jit(tx.init)(params)
    step = make_parser_step(net, tx)
    first = float(jax.jit(lambda p, x, y: parser_loss(net.apply({"params": p}, x), y))(params, images, labels))
    for _ in range(10):  # (three seeds: below 0.025 x the first loss after 10 steps)
        params, opt, loss = step(params, opt, images, labels)
    assert float(loss) < 0.5 * first


def test_alignment_score_by_hand():
    red_star = SceneObject(shape="star", color="red", size="large", fill="striped", position="top left")
    blue_circle = SceneObject(shape="circle", color="blue", size="small", fill="solid", position="bottom right")
    img = ParsedScene((red_star, blue_circle), "yellow")
    exact = Caption("...", 4, (StatedObject("star", "red", "large", "striped", "top left"),
                               StatedObject("circle", "blue", "small", "solid", "bottom right")), "yellow", True)
    assert alignment_score(exact, img) == 1.0
    # one wrong color out of 5 + 5 + 1 stated attributes
    wrong = Caption("...", 4, (StatedObject("star", "green", "large", "striped", "top left"),
                               exact.objects[1]), "yellow", True)
    assert alignment_score(wrong, img) == pytest.approx(10 / 11)
    # "a red star" (not exhaustive): the extra circle is not penalised
    assert alignment_score(Caption("a red star", 1, (StatedObject("star", "red"),), None, False), img) == 1.0
    # "a red star" claimed as the only object (level 2): one extra object costs one point
    assert alignment_score(Caption("a red star", 2, (StatedObject("star", "red"),), None, True), img) == \
        pytest.approx(2 / 3)
    assert alignment_score(Caption("an image", 0, (), None, False), ParsedScene((), "gray")) == 1.0
    assert alignment_score(Caption("a shape", 0, (StatedObject(),), None, False), ParsedScene((), "gray")) == 0.0


def test_macro_f1():
    t = np.array([[1, 0], [0, 1], [1, 1]])
    assert macro_f1(t, t) == 1.0
    assert macro_f1(t, np.array([[1, 0], [0, 0], [1, 1]])) == pytest.approx((1.0 + 2 / 3) / 2)


def test_small_preset_shares_the_vae_and_halves_the_trained_parts():
    """``mini-sd-s`` (and ``mini-sd-m``, ``mini-sd-t``) take a trained ``mini-sd`` VAE (``--init-from ... --init-parts vae``): same VAE
    param shapes; its UNet and text encoder are smaller; and ``preset`` hands out independent copies
    (a variant must not reach back into its base)."""
    def abstract(name):  # ShapeDtypeStructs only: nothing is initialised
        configs = configs_from_dicts(preset(name))
        return jax.eval_shape(lambda k: init_params(configs, k), jax.random.key(0))

    def n_params(tree):
        return sum(a.size for a in jax.tree.leaves(tree))

    big, small = abstract("mini-sd"), abstract("mini-sd-s")
    assert jax.tree.map(lambda a: a.shape, small["vae"]) == jax.tree.map(lambda a: a.shape, big["vae"])
    for part in ("unet", "text_encoder"):
        assert n_params(small[part]) < 0.6 * n_params(big[part]), (part, n_params(small[part]), n_params(big[part]))
    # mini-sd-m: mini-sd-s's text encoder and VAE, a UNet between the two
    medium = abstract("mini-sd-m")
    for part in ("vae", "text_encoder"):
        assert jax.tree.map(lambda a: a.shape, medium[part]) == jax.tree.map(lambda a: a.shape, small[part])
    assert n_params(small["unet"]) < n_params(medium["unet"]) < n_params(big["unet"])
    # mini-sd-t: mini-sd's text encoder and VAE, a UNet between mini-sd-s's and mini-sd-m's
    text = abstract("mini-sd-t")
    for part in ("vae", "text_encoder"):
        assert jax.tree.map(lambda a: a.shape, text[part]) == jax.tree.map(lambda a: a.shape, big[part])
    assert n_params(small["unet"]) < n_params(text["unet"]) < n_params(medium["unet"])
    mutated = preset("mini-sd-s")
    mutated["vae"]["block_out_channels"][0] = 1
    assert preset("mini-sd")["vae"]["block_out_channels"][0] == 16


def test_preset_variant_refuses_a_field_its_base_lacks():
    from qlip_jax.models.presets import _variant
    assert _variant("tiny", unet={"norm_num_groups": 4})["unet"]["norm_num_groups"] == 4
    with pytest.raises(ValueError, match=r"no unet field\(s\) \['block_out_channel'\]"):
        _variant("tiny", unet={"block_out_channel": [8, 16]})


def test_vae_window_error_accepts_exactly_the_multiples_of_the_factor_up_to_the_image_side():
    vae = configs_from_dicts(preset("mini-sd")).vae  # factor 8, 64x64 images
    assert [s for s in range(-8, 80) if vae.window_error(s) is None] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert "factor 8" in vae.window_error(30) and "got 72" in vae.window_error(72)


def test_grid_sampler_reuses_its_compiled_loop(tmp_path, tokenizer_dir):
    """The periodic sample grids trace the sampler once; new params change the images, not the program."""
    from PIL import Image

    from qlip_jax.data.tokenizer import load_tokenizer
    from train.pretrain import GridSampler

    configs = configs_from_dicts(preset("tiny"))
    grid = GridSampler(configs, load_tokenizer(tokenizer_dir), ["a red star", "a shape"], 3.0)
    pngs = []
    for i in range(2):
        path = tmp_path / f"step{i}.png"
        grid(init_params(configs, jax.random.key(i)), str(path))
        pngs.append(np.asarray(Image.open(path)))
    assert grid.sampler.trace_count == 1
    assert pngs[0].shape == pngs[1].shape and not np.array_equal(pngs[0], pngs[1])
