"""Q2B training on a tiny random model: the paper's loss goes down, lambda_bit trades bits for error,
gradients reach every Q2B parameter through the straight-through choice, and the training program
resumes from its checkpoint with identical state."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlip_jax.ptq.calibration import calibrate, collect_calibration_data
from qlip_jax.quant.registry import average_act_bits
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image
from qlip_jax.selector import Q2B, Q2BConfig, bit_penalty, hard_indices, ste_onehot
from qlip_jax.selector.training import make_q2b_loss, make_q2b_step, q2b_frozen

CONFIG = QuantConfig(act_bits=(4, 6, 8), weight_bits=8)
PROMPTS = ["a red star", "a large striped blue circle at the top left on a yellow background",
           "a shape", "two green squares"]


@pytest.fixture(scope="module")
def setup(tiny_sd):
    fp = Text2Image(tiny_sd, "ddim", steps=4)
    data = collect_calibration_data(fp, PROMPTS[:2], [0, 1], guidance=3.0)
    quant = calibrate(fp, CONFIG, data, "minmax")
    qpipe = Text2Image(tiny_sd, "ddim", steps=4, quant=quant)
    emb = fp.encode(PROMPTS)
    _, traj = fp.trajectory(emb, np.arange(len(PROMPTS)), 3.0)              # [T, B, h, w, c]
    T, L = qpipe.num_steps, len(quant.registry)
    cfg = Q2BConfig(num_layers=L, num_steps=T, group_size=2, first_fp_steps=1)
    b_idx = np.repeat(np.arange(len(PROMPTS)), T)
    s_idx = np.tile(np.arange(T), len(PROMPTS))
    batch = {"q": jnp.asarray(np.linspace(0.2, 0.8, len(PROMPTS))[b_idx], jnp.float32),
             "step": jnp.asarray(s_idx, jnp.int32), "t": jnp.asarray(np.asarray(fp.sched.timesteps)[s_idx]),
             "x_fp": jnp.asarray(traj[s_idx, b_idx]), "x_hat": jnp.asarray(traj[s_idx, b_idx]),
             "cond": emb.cond[b_idx], "uncond": jnp.broadcast_to(emb.uncond, emb.cond[b_idx].shape),
             "guidance": jnp.full(len(b_idx), 3.0, jnp.float32)}
    return qpipe, quant, cfg, batch


@pytest.fixture(scope="module")
def q2b_problem(setup):
    """Q2B's initial params, its probs function and one jitted Adam step on the paper's loss, shared by the
    tests below: ``lambda_bit`` is an input of the step (:func:`q2b_frozen`), so every lambda runs the one
    compiled program."""
    qpipe, quant, cfg, batch = setup
    q2b = Q2B(cfg)
    params = q2b.init(jax.random.key(0), jnp.zeros((1,)), cfg.num_steps)["params"]
    probs_fn = lambda p, q: q2b.apply({"params": p}, q, cfg.num_steps)       # noqa: E731
    loss = q2b_loss(setup, probs_fn)
    tx = optax.adam(0.2)
    frozen = lambda lam: q2b_frozen(qpipe.sd.params["unet"], quant, lam)     # noqa: E731
    return params, probs_fn, make_q2b_step(loss, tx), tx, frozen


def _train(setup, q2b_problem, lam, iters):
    """``iters`` Adam steps; the loss before the first and after the last (each step reports the loss at
    the params it starts from, so one more step reads it: one compiled program, nothing run op by op),
    and the average activation bits Q2B then assigns."""
    _, _, cfg, batch = setup
    params, probs_fn, step, tx, frozen = q2b_problem
    opt = tx.init(params)
    losses = []
    for i in range(iters + 1):
        updated, opt, metrics = step(params, opt, frozen(lam), batch)
        losses.append(float(metrics["loss"]))
        params = updated if i < iters else params
    fab = float(np.mean(average_act_bits(hard_indices(probs_fn(params, batch["q"][::cfg.num_steps]), cfg),
                                         CONFIG)))
    return losses[0], losses[-1], fab


def test_q2b_gradients_reach_every_parameter(setup, q2b_problem):
    """The step takes the gradient in two parts (each row's with respect to its own probabilities, then
    pulled back through ``probs_fn``): Adam's first moment after one step, ``0.1 g``, is ``jax.grad`` of the
    whole loss within float rounding, and that gradient is finite and not all zero for every parameter
    array (so Adam's first update, ``-lr * g / (|g| + eps)``, moves each)."""
    batch = setup[3]
    params, _, step, tx, frozen = q2b_problem
    updated, opt, metrics = step(params, tx.init(params), frozen(0.5), batch)
    assert np.isfinite(float(metrics["loss"]))
    loss = q2b_loss(setup, q2b_problem[1])
    (whole, _), grad = jax.jit(jax.value_and_grad(lambda p: loss(p, frozen(0.5), batch), has_aux=True))(params)
    assert abs(float(metrics["loss"]) - float(whole)) <= 1e-6 * abs(float(whole))
    for name in params:
        g = np.asarray(grad[name], np.float64)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
        np.testing.assert_allclose(np.asarray(opt[0].mu[name], np.float64) / 0.1, g, rtol=0,
                                   atol=1e-5 * np.abs(g).max(), err_msg=name)
        moved = np.asarray(updated[name]) - np.asarray(params[name])
        assert np.isfinite(moved).all() and np.abs(moved).max() > 0, name


def q2b_loss(setup, probs_fn):
    """The :class:`~qlip_jax.selector.training.Q2BLoss` of the shared step."""
    qpipe, quant, cfg, _ = setup
    penalty_fn = lambda probs: bit_penalty(probs, 1.0, 6 / 8) / (cfg.num_steps * cfg.num_layers)  # noqa: E731
    return make_q2b_loss(qpipe.unet, quant, probs_fn, ste_onehot, penalty_fn, cfg.low, cfg.med, cfg.high)


def test_q2b_training_lowers_loss_and_lambda_lowers_bits(setup, q2b_problem):
    first, last, fab_low_lambda = _train(setup, q2b_problem, 0.0, 25)
    assert last < first, (first, last)
    first_hi, last_hi, fab_high_lambda = _train(setup, q2b_problem, 5.0, 25)
    assert last_hi < first_hi, (first_hi, last_hi)
    # no bit cost: the error term pulls towards the high width; a large cost pulls towards the low one
    assert fab_high_lambda < fab_low_lambda - 0.5, (fab_low_lambda, fab_high_lambda)


@pytest.mark.slow  # a whole program end to end
def test_train_selector_resumes_with_identical_state(tiny_sd_dir, tiny_sd, setup, tmp_path, monkeypatch):
    """The real program, a few iterations: interrupted at 2 of 4 and resumed equals an uninterrupted run.
    (The labels' scorer is not under test: the mean pixel value stands in for GIQA.)"""
    import sys

    from PIL import Image
    from safetensors.numpy import load_file

    from qlip_jax.ptq.persist import model_fingerprint, save_quant_setup

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
    import train_selector
    from train_selector import main

    monkeypatch.setattr(train_selector, "quality_target",
                        lambda args, source: lambda images, records: images.astype(np.float64).mean(axis=(1, 2, 3)))
    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green", "yellow", "black")
                                  for s in ("star", "circle", "square", "cat")) + "\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(ref / "0.png")

    quant = setup[1]
    qdir = str(tmp_path / "quant")
    save_quant_setup(qdir, quant, model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"]),
                     {"method": "minmax"})
    common = ["--model", tiny_sd_dir, "--quant", qdir, "--prompts", str(prompts), "--reference", str(ref),
              "--train-prompts", "8", "--heldout", "4", "--steps", "4", "--t2q-steps", "20", "--q2b-steps", "4", "--batch", "2",
              "--rows-per-prompt", "2", "--group-size", "2", "--first-fp-steps", "1", "--size", "64",
              "--q2b-lr", "0.3", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    main(["--work", str(a), "--out", str(a / "out"), "--stop-at", "2", *common])
    assert not os.path.exists(a / "out" / "selector.json")          # interrupted: nothing exported
    main(["--work", str(a), "--out", str(a / "out"), *common])      # resumes at iteration 2
    main(["--work", str(b), "--out", str(b / "out"), *common])
    for name in ("q2b.safetensors", "t2q.safetensors"):
        pa, pb = load_file(str(a / "out" / name)), load_file(str(b / "out" / name))
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{name}:{k}")
    init = Q2B(Q2BConfig(num_layers=len(quant.registry), num_steps=4, group_size=2, first_fp_steps=1)).init(
        jax.random.key(1), jnp.zeros((1,)), 4)["params"]
    moved = load_file(str(a / "out" / "q2b.safetensors"))
    assert any(not np.allclose(moved[k], np.asarray(v)) for k, v in _flat(init).items()), "Q2B did not train"


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_q2b_checkpoints_resume_only_the_same_problem(setup):
    """A Q2B run in a shared --work folder resumes only a run with the same quantizer and settings."""
    import dataclasses
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
    from train_selector import build_parser, q2b_run_name

    quant = setup[1]
    base = ["--quant", "q", "--work", "w", "--out", "o"]
    name = q2b_run_name(build_parser().parse_args(base), quant, "qdiff")
    copy = dataclasses.replace(quant, state=jax.tree.map(np.array, quant.state), info={"moved": True})
    assert name == q2b_run_name(build_parser().parse_args(base), copy, "qdiff")   # same arrays, other object
    assert name.startswith("q2b-qdiff-full-lam")
    first = quant.registry.names[0]
    rescaled = {**quant.state, first: {**quant.state[first], "a_scale": quant.state[first]["a_scale"] * 1.01}}
    others = [q2b_run_name(build_parser().parse_args(base + ["--lambda-bit", "0.5"]), quant, "qdiff"),
              q2b_run_name(build_parser().parse_args(base + ["--ablation", "pq"]), quant, "qdiff"),
              q2b_run_name(build_parser().parse_args(base + ["--macs-weighted"]), quant, "qdiff"),
              q2b_run_name(build_parser().parse_args(base), quant, "ptqd"),
              q2b_run_name(build_parser().parse_args(base), dataclasses.replace(quant, state=rescaled), "qdiff")]
    assert len({name, *others}) == 1 + len(others)


def test_q2b_loss_sees_the_ptqd_corrected_output(setup):
    """With a PTQD base quantizer the loss compares float with the output the sampler uses,
    (eps_Q - b_t) / (1 + k_t), the step's tables picked per row."""
    from qlip_jax.sampling.correction import PTQDCorrection
    from qlip_jax.quant.state import QuantArgs, QuantSetup
    from qlip_jax.sampling.guidance import guided_output
    from qlip_jax.selector.training import choice_to_candidates

    qpipe, quant, cfg, batch = setup
    S, K, C = cfg.num_steps, CONFIG.num_quantized, batch["x_fp"].shape[-1]
    k = np.repeat(0.25 * np.arange(1, S + 1, dtype=np.float32)[:, None], K, axis=1)        # [S, K]
    bias = np.broadcast_to(0.05 * np.arange(C, dtype=np.float32), (S, K, C)).copy()       # [S, K, C]
    zeros = np.zeros((S, K), np.float32)
    corr = PTQDCorrection(jnp.asarray(qpipe.sched.timesteps, jnp.int32), jnp.asarray(k), jnp.asarray(bias),
                          jnp.asarray(zeros), jnp.asarray(zeros), jnp.asarray(zeros))
    with_ptqd = QuantSetup(quant.config, quant.registry, quant.state, quant.info, ptqd=corr)
    q2b = Q2B(cfg)
    params = q2b.init(jax.random.key(0), jnp.zeros((1,)), S)["params"]
    probs_fn = lambda p, q: q2b.apply({"params": p}, q, S)                                   # noqa: E731
    unet, unet_params = qpipe.unet, qpipe.sd.params["unet"]
    make = lambda setup_: make_q2b_loss(unet, setup_, probs_fn, ste_onehot,   # noqa: E731
                                        lambda probs: 0.0, cfg.low, cfg.med, cfg.high)

    @jax.jit
    def losses_and_outputs(params, unet_params, frozen_plain, frozen_ptqd, batch):
        """Both losses and, computed apart from the loss, the float and quantized guided outputs: one
        program (XLA shares the UNet evaluations the four results have in common)."""
        _, plain = make(quant)(params, frozen_plain, batch)
        _, corrected = make(with_ptqd)(params, frozen_ptqd, batch)
        probs = probs_fn(params, batch["q"])
        p_t = probs[jnp.arange(probs.shape[0]), batch["step"]]
        mix = choice_to_candidates(ste_onehot(p_t), cfg.low, cfg.med, cfg.high, K)
        step2 = jnp.concatenate([batch["step"], batch["step"]])
        q = QuantArgs.from_mix(frozen_plain["quant"], jnp.concatenate([mix, mix]), quant.registry.names, CONFIG,
                               step=step2)
        args = (batch["t"], batch["cond"], batch["uncond"], batch["guidance"])
        eps_fp = guided_output(unet, unet_params, batch["x_fp"], *args, None)
        eps_q = guided_output(unet, unet_params, batch["x_hat"], *args, q)
        return plain, corrected, eps_fp, eps_q

    plain, corrected, eps_fp, eps_q = losses_and_outputs(
        params, unet_params, q2b_frozen(unet_params, quant, 0.0), q2b_frozen(unet_params, with_ptqd, 0.0), batch)
    eps_fp, eps_q = np.asarray(eps_fp), np.asarray(eps_q)
    s = np.asarray(batch["step"])
    expected = (eps_q - bias[s, 0][:, None, None, :]) / (1.0 + k[s, 0])[:, None, None, None]
    np.testing.assert_allclose(float(plain["mse"]), np.mean((eps_fp - eps_q) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(corrected["mse"]), np.mean((eps_fp - expected) ** 2), rtol=1e-5)
    assert abs(float(corrected["mse"]) - float(plain["mse"])) > 1e-3 * float(plain["mse"])

