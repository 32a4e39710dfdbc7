"""Memory: weights are arguments of every jitted step (never constants), chunked attention and remat are
exact, micro-batched steps equal full-batch ones, and ``--memory-budget`` picks a micro-batch that fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.memory import constant_bytes
from qlip_jax.models.presets import preset
from qlip_jax.models.sd import configs_from_dicts, init_params
from qlip_jax.models.unet import UNet2DConditionModel
from qlip_jax.programs import ProgramSettings, abstract_sd, program_steps

SMALL = ProgramSettings(steps=2, act_bits=(4, 8, 10), sample_batch=1, calib_prompts=1, recon_batch=1,
                        label_batch=1, q2b_batch=1, rows_per_prompt=1, pretrain_batch=1)


def _configs(width: int, levels: int = 1):
    """The ``tiny`` preset with its UNet channels multiplied by ``width``; ``levels=1``: only its first
    (cross-attention) level, half the layers to trace."""
    d = preset("tiny")
    u = d["unet"]
    u["block_out_channels"] = [c * width for c in u["block_out_channels"]][:levels]
    u["down_block_types"], u["up_block_types"] = u["down_block_types"][:levels], u["up_block_types"][-levels:]
    return configs_from_dicts(d)


def _param_bytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def test_constants_do_not_grow_with_the_weights():
    """Each program's step lowered for the tiny UNet and one of twice its width: the program's literal
    constants stay the same size while the UNet params grow ~4x; a step that closes over the weights (the
    control) grows by their full size, so the measure does catch closed-over weights."""
    narrow, wide = _configs(1), _configs(2)
    grow = _param_bytes(abstract_sd(wide).params["unet"]) - _param_bytes(abstract_sd(narrow).params["unet"])
    assert grow > 100_000
    programs = ("sampling", "reconstruction", "q2b", "pretraining")
    consts = [{k: constant_bytes(f.lower(*a)) for k, (f, a) in program_steps(c, SMALL, programs).items()}
              for c in (narrow, wide)]
    assert set(consts[0]) == set(programs)
    for name in programs:
        assert consts[1][name] - consts[0][name] < 0.01 * grow, (name, consts)

    def closed_over(configs):
        unet, params = UNet2DConditionModel(configs.unet), init_params(configs, jax.random.key(0))["unet"]
        x, c = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 77, configs.text.hidden_size))
        return constant_bytes(jax.jit(lambda x: unet.apply({"params": params}, x, jnp.zeros((1,), jnp.int32), c))
                              .lower(x))

    assert closed_over(wide) - closed_over(narrow) > 0.9 * grow


@pytest.fixture(scope="module")
def unet_inputs():
    """The one-level tiny UNet (16x16 latents: 256 tokens), its random params, and a batch of 2."""
    configs = _configs(1)
    params = init_params(configs, jax.random.key(0))["unet"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), params)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    c = jax.random.normal(jax.random.key(2), (2, 77, configs.text.hidden_size))
    return configs, params, (x, jnp.array([10, 700]), c)


def _quant_args(configs, params, attn_matmul: bool):
    """Per-row candidates (row 0 at 4 bits, row 1 at 8) of a min-max quantizer of every layer."""
    from qlip_jax.models.unet import unet_registry
    from qlip_jax.quant.registry import init_quant_state
    from qlip_jax.quant.state import QuantArgs, QuantConfig

    cfg = QuantConfig(act_bits=(4, 8), weight_bits=8, quantize_attn_matmul=attn_matmul)
    reg = unet_registry(configs.unet, (16, 16), (77, configs.text.hidden_size), attn_matmul)
    state = init_quant_state(params, reg, cfg)
    return QuantArgs.from_indices(state, jnp.array([[0] * len(reg), [1] * len(reg)], jnp.int32), reg.names, cfg)


@pytest.mark.parametrize("quantized", [None, "layers", "attn_matmul"])
def test_chunked_attention_equals_full(unet_inputs, quantized):
    """Query chunks of 48 (256 tokens: 5 full chunks and a padded one) give the full attention's UNet
    output within 1e-5, float and fake-quantized (including the QK^T/AV products' per-row quantizers)."""
    configs, params, (x, t, c) = unet_inputs
    q = None if quantized is None else _quant_args(configs, params, quantized == "attn_matmul")
    run = lambda m: jax.jit(lambda p, x, t, c, q: m.apply({"params": p}, x, t, c, q))(params, x, t, c, q)  # noqa: E731
    full = np.asarray(run(UNet2DConditionModel(configs.unet)))
    chunked = np.asarray(run(UNet2DConditionModel(configs.unet, attention_chunk=48)))
    assert np.abs(full).max() > 0.1
    np.testing.assert_allclose(chunked, full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_chunked_attention_keeps_the_calibration_taps(unet_inputs):
    """A float pass recording ``act_stats`` runs the full product, so the QK^T/AV ranges are the same."""
    configs, params, (x, t, c) = unet_inputs
    stats = lambda m: m.apply({"params": params}, x, t, c, mutable=["act_stats"])[1]  # noqa: E731
    a = stats(UNet2DConditionModel(configs.unet))
    b = stats(UNet2DConditionModel(configs.unet, attention_chunk=48))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_remat_changes_no_gradient(unet_inputs):
    """``remat`` (per down/up/mid block) leaves every param gradient within 1e-6 (relative to the largest)."""
    configs, params, (x, t, c) = unet_inputs

    def grads(unet):
        loss = lambda p: jnp.mean(unet.apply({"params": p}, x, t, c) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    g0 = grads(UNet2DConditionModel(configs.unet))
    g1 = grads(UNet2DConditionModel(configs.unet, remat="nothing_saveable"))
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6 * scale, rtol=0)


def _recon_setup(configs, params, micro_batch: int, remat: str = ""):
    """A one-step Q-Diffusion reconstruction step (block granularity, W8A4/A8) and its arguments."""
    from qlip_jax.models.unet import unet_registry
    import optax

    from qlip_jax.ptq.reconstruction import ReconOptions, init_variables, make_recon_step
    from qlip_jax.quant.registry import init_quant_state
    from qlip_jax.quant.state import QuantConfig

    cfg = QuantConfig(act_bits=(4, 8), weight_bits=4)
    reg = unet_registry(configs.unet, (16, 16), (77, configs.text.hidden_size))
    state = init_quant_state(params, reg, cfg)
    opts = ReconOptions(iters=10, batch=4, micro_batch=micro_batch, warmup=0.0, remat=remat)
    var = init_variables(state, params, reg, cfg, opts)
    tx = optax.sgd(1.0)   # the update is the gradient itself (Adam's first step would amplify rounding to +-lr)
    return make_recon_step(UNet2DConditionModel(configs.unet), cfg, reg.names, opts, tx), var, tx.init(var), state


def _ulp(params) -> float:
    """Two float32 ulps of the largest parameter: an update read back as ``new - old`` carries the rounding
    of the stored parameter itself, whatever the gradient's accuracy."""
    return 2 * float(np.spacing(np.abs(np.asarray(params, np.float32)).max()))


def test_micro_batched_reconstruction_step_equals_full_batch(unet_inputs):
    """One block-wise reconstruction step on 4 samples: in micro-batches of 1, and with the UNet's blocks
    rematerialised (the replayed units' errors are sown from inside the remat'd blocks), equal to the
    plain full-batch step within 1e-5."""
    configs, params, (x, t, c) = unet_inputs
    x, t, c = jnp.concatenate([x, -x]), jnp.concatenate([t, t + 100]), jnp.concatenate([c, c[::-1]])   # 4 rows
    out = []
    for mb, remat in ((0, ""), (1, ""), (0, "nothing_saveable")):
        step, var, opt, state = _recon_setup(configs, params, mb, remat)
        out.append(step(var, opt, params, state, jnp.float32(3.0), x, t, c, None))
    v0, _, rec0, reg0 = out[0]
    assert float(rec0) > 0
    for v1, _, rec1, reg1 in out[1:]:
        np.testing.assert_allclose(float(rec1), float(rec0), rtol=1e-5)
        np.testing.assert_allclose(float(reg1), float(reg0), rtol=1e-5)
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(var)]
        d0 = [np.asarray(a) - np.asarray(s) for a, s in zip(jax.tree.leaves(v0), jax.tree.leaves(var))]
        d1 = [np.asarray(b) - np.asarray(s) for b, s in zip(jax.tree.leaves(v1), jax.tree.leaves(var))]
        scale = max(float(np.abs(d).max()) for d in d0)
        assert scale > 0
        for path, a, b, s in zip(paths, d0, d1, jax.tree.leaves(var)):
            if "a_scale" in path:
                # NOT checked: LSQ's step-size gradient sums round(x / s) - x / s over the inputs, and an input
                # that float reassociation (another batch split, a replayed block) moves across a rounding
                # boundary changes it by a discrete amount; measured up to 10% on the smaller of a layer's two
                # entries (issue #40's note). The rounding variables, weight scales and losses are held to 1e-5.
                continue
            np.testing.assert_allclose(b, a, atol=1e-5 * scale + _ulp(s), rtol=0, err_msg=path)


def test_micro_batched_q2b_step_equals_full_batch(unet_inputs):
    import optax

    from qlip_jax.models.unet import unet_registry
    from qlip_jax.quant.registry import init_quant_state
    from qlip_jax.quant.state import QuantConfig, QuantSetup
    from qlip_jax.selector import Q2B, Q2BConfig, bit_penalty, ste_onehot
    from qlip_jax.selector.training import make_q2b_loss, make_q2b_step, q2b_frozen

    configs, params, (x, t, c) = unet_inputs
    cfg = QuantConfig(act_bits=(4, 6, 8), weight_bits=8)
    reg = unet_registry(configs.unet, (16, 16), (77, configs.text.hidden_size))
    quant = QuantSetup(cfg, reg, init_quant_state(params, reg, cfg))
    T, L = 3, len(reg)
    q2b_cfg = Q2BConfig(num_layers=L, num_steps=T, group_size=2, first_fp_steps=0)
    q2b = Q2B(q2b_cfg)
    q2b_params = q2b.init(jax.random.key(0), jnp.zeros((1,)), T)["params"]
    probs_fn = lambda p, q: q2b.apply({"params": p}, q, T)  # noqa: E731
    loss = make_q2b_loss(UNet2DConditionModel(configs.unet), quant, probs_fn, ste_onehot,
                         lambda probs: bit_penalty(probs, 1.0, 0.75) / (T * L), 0, 1, 2)
    tx = optax.sgd(1.0)   # the update is the gradient itself
    batch = {"q": jnp.array([0.2, 0.9, 0.5, 0.7]), "step": jnp.array([0, 1, 2, 1], jnp.int32),
             "t": jnp.array([900, 500, 100, 500]), "x_fp": jnp.concatenate([x, x[::-1]]),
             "x_hat": jnp.concatenate([x, x[::-1]]) * 1.1, "cond": jnp.concatenate([c, c]),
             "uncond": jnp.concatenate([c[::-1], c[::-1]]) * 0.5, "guidance": jnp.full((4,), 3.0)}
    frozen = q2b_frozen(params, quant, 0.1)
    (p0, _, m0), (p1, _, m1) = (make_q2b_step(loss, tx, mb)(q2b_params, tx.init(q2b_params), frozen, batch)
                                for mb in (None, 2))
    assert float(m0["mse"]) > 0
    for k in ("loss", "mse", "penalty"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5)
    d0 = [np.asarray(a) - np.asarray(s) for a, s in zip(jax.tree.leaves(p0), jax.tree.leaves(q2b_params))]
    d1 = [np.asarray(b) - np.asarray(s) for b, s in zip(jax.tree.leaves(p1), jax.tree.leaves(q2b_params))]
    scale = max(float(np.abs(d).max()) for d in d0)
    assert scale > 0
    for a, b, s in zip(d0, d1, jax.tree.leaves(q2b_params)):
        np.testing.assert_allclose(b, a, atol=1e-5 * scale + _ulp(s), rtol=0)


def test_memory_budget_picks_a_micro_batch_that_fits(tmp_path):
    """benchmarks/memory.py's function on the one-level tiny preset: peaks are positive and grow with the rows;
    ``--memory-budget`` between the 1-row and the full-batch peak of the pretraining step picks a smaller
    micro-batch whose compiled peak (measured again) is within the budget."""
    import argparse
    import importlib.util
    import pathlib

    from qlip_jax.memory import GIB, peak_bytes
    from qlip_jax.programs import micro_batch_for

    spec = importlib.util.spec_from_file_location(
        "memory_bench", pathlib.Path(__file__).parent.parent / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    configs = _configs(1)     # half the layers of the tiny preset: the budget logic, at half the compile time
    settings = ProgramSettings(steps=2, pretrain_batch=8, calib_prompts=2)
    rows = bench.measure(configs, settings, ("calibration", "pretraining"))
    assert [r["program"] for r in rows] == ["calibration", "pretraining"]
    assert all(r["peak"] >= r["arguments"] > 0 for r in rows)
    full = rows[1]["peak"]
    one = bench.measure(configs, settings.with_micro("pretraining", 1), ("pretraining",))[0]["peak"]
    assert one < full
    budget = (one + full) / 2 / GIB
    args = argparse.Namespace(memory_budget=budget, micro_batch=0)
    mb = micro_batch_for(args, configs, "pretraining", settings, log=lambda m: None)
    assert 1 <= mb < 8
    fn, fargs = program_steps(configs, settings.with_micro("pretraining", mb), ("pretraining",))["pretraining"]
    assert peak_bytes(fn.lower(*fargs).compile()) <= budget * GIB


def test_default_micro_batch_only_for_sd_size_unets(monkeypatch):
    """The default micro-batches (no compile: the rule alone) split the reconstruction, Q2B and pretraining
    batches of the SD v1.4 UNet (tests/data/sd-v1-4, 1280 channels) and nothing for any preset (the
    embedded mini-sd model included); ``--micro-batch`` overrides the default, and ``--micro-batch`` of the
    whole batch runs it whole."""
    import argparse
    import pathlib

    from qlip_jax.models import io
    from qlip_jax.models.presets import PRESETS
    from qlip_jax.programs import PROGRAMS, SD_MICRO_BATCH, default_micro_batch, micro_batch_for, rows_of

    root = pathlib.Path(__file__).parent / "data" / "sd-v1-4"
    sd = configs_from_dicts({"unet": io.read_json(root / "unet" / "config.json"),
                             "vae": io.read_json(root / "vae" / "config.json"),
                             "text_encoder": io.read_json(root / "text_encoder" / "config.json"),
                             "scheduler": io.read_json(root / "scheduler" / "scheduler_config.json")})
    assert max(sd.unet.block_out_channels) == 1280
    s = ProgramSettings()
    assert [rows_of(p, s) for p in PROGRAMS] == [8, 32, 8, 32, 32, 64]
    want = {"sampling": 0, "calibration": 0, "reconstruction": 1, "t2q-labels": 0, "q2b": 1, "pretraining": 1}
    assert {p: default_micro_batch(p, sd.unet, rows_of(p, s)) for p in PROGRAMS} == want
    assert {p: s.micro_for(p, sd.unet) for p in PROGRAMS} == {
        "sampling": 8, "calibration": 32, "reconstruction": 1, "t2q-labels": 32, "q2b": 1, "pretraining": 1}
    # one row is already a whole batch of one; a cap the batch does not divide: the largest divisor below it
    assert default_micro_batch("q2b", sd.unet, 1) == 0
    monkeypatch.setitem(SD_MICRO_BATCH, "q2b", 4)
    assert [default_micro_batch("q2b", sd.unet, r) for r in (32, 6, 3)] == [4, 3, 0]
    monkeypatch.undo()
    for name in PRESETS:
        unet = configs_from_dicts(preset(name)).unet
        assert max(unet.block_out_channels) < 512, name
        assert all(default_micro_batch(p, unet, rows_of(p, s)) == 0 for p in PROGRAMS), name
        assert all(s.micro_for(p, unet) == rows_of(p, s) for p in PROGRAMS), name

    said = []

    def pick(configs, program, micro_batch):
        args = argparse.Namespace(memory_budget=None, micro_batch=micro_batch)
        return micro_batch_for(args, configs, program, s, log=said.append)

    assert [pick(sd, p, 0) for p in ("reconstruction", "q2b", "pretraining", "calibration")] == [1, 1, 1, 32]
    assert len(said) == 3 and said[0].startswith("[memory] reconstruction: micro-batch 1 of 8 (default"), said
    said.clear()
    assert [pick(sd, p, 2) for p in ("reconstruction", "q2b", "pretraining")] == [2, 2, 2]
    assert [pick(sd, p, 64) for p in ("reconstruction", "q2b", "pretraining")] == [8, 32, 64]
    assert s.with_micro("q2b", 8).micro_for("q2b", sd.unet) == 8
    assert s.with_micro("pretraining", 64).micro_for("pretraining", sd.unet) == 64
    tiny = configs_from_dicts(preset("tiny"))
    assert [pick(tiny, p, 0) for p in ("reconstruction", "q2b", "pretraining")] == [8, 32, 64]
    assert said == []
    with pytest.raises(ValueError, match="divisor"):
        pick(sd, "reconstruction", 3)
