"""PTQ base methods on the tiny random model: Q-Diffusion reconstruction (AdaRound + LSQ), split
quantization of the up blocks' skip concatenations, TDQ step tables in the jitted sampler, persistence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.naming import modules_by_name
from qlip_jax.ptq.calibration import calibrate, model_splits, nearest_rows
from qlip_jax.quant.fake_quant import adaround_fake_quant, adaround_init, fake_quant, rectified_sigmoid
from qlip_jax.quant.layers import QConv, _quantize_activation, quantize_weight
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint, save_quant_setup
from qlip_jax.ptq.reconstruction import ReconOptions, output_error
from qlip_jax.quant.registry import init_quant_state
from qlip_jax.quant.state import QuantArgs, QuantConfig
from qlip_jax.sampling.pipeline import Text2Image

CONFIG = QuantConfig(act_bits=(4, 6), weight_bits=4)
#: A short reconstruction that still converges on the tiny model (defaults are for real runs).
QDIFF_OPTS = dict(iters=40, batch=16, lr_weight=0.1, reg_weight=1.0, lr_act=0.01)


@pytest.fixture(scope="module")
def baselines(calib):
    pipe, data = calib
    return {m: calibrate(pipe, CONFIG, data, m) for m in ("minmax", "mse")}


@pytest.fixture(scope="module")
def qdiff(calib, baselines):
    pipe, data = calib
    return calibrate(pipe, CONFIG, data, "qdiff", init=baselines["mse"], **QDIFF_OPTS)


@pytest.fixture(scope="module")
def tdq(calib):
    pipe, data = calib
    return calibrate(pipe, CONFIG, data, "tdq")


def _err(pipe, data, setup, k):
    return output_error(pipe.unet, pipe.sd.params["unet"], setup.state, setup.registry, setup.config, data, k)


# ----------------------------------------------------------------------------------------------
# Q-Diffusion: AdaRound + LSQ


def test_qdiff_lowers_output_error_vs_minmax_and_mse(calib, baselines, qdiff):
    pipe, data = calib
    errors = {m: [_err(pipe, data, s, k) for k in range(CONFIG.num_quantized)]
              for m, s in {**baselines, "qdiff": qdiff}.items()}
    log = qdiff.info["reconstruction"]
    assert np.isfinite(log["rec_loss"]).all() and len(log["rec_loss"]) == QDIFF_OPTS["iters"]
    # lowest candidate (4-bit activations): strictly better than both base methods
    assert errors["qdiff"][0] < errors["mse"][0] < errors["minmax"][0], errors
    # and no worse at the other candidate (weights are shared across candidates)
    assert errors["qdiff"][1] < errors["mse"][1] * 1.02, errors
    assert qdiff.info["method"] == "qdiff" and qdiff.info["init"] == "mse"


def test_adaround_decision_is_folded_into_the_codes(calib, baselines, qdiff):
    """qdiff's learned rounding ends as integer codes (``w_round`` folded in): each code is within one
    step of round-to-nearest, some (at most the decisions flipped vs nearest) differ from it; the
    quantized layer reads ``w_code * w_scale``, and without codes or ``w_round`` rounds to nearest."""
    pipe, _ = calib
    layers = modules_by_name(pipe.sd.params["unet"])
    hi = 2.0 ** (CONFIG.weight_bits - 1) - 1
    changed = total = 0
    for info in qdiff.registry.layers:
        st = qdiff.state[info.name]
        kernel = np.asarray(layers[info.name]["kernel"])
        code = np.asarray(st["w_code"])
        assert "w_round" not in st and code.shape == kernel.shape and code.dtype == np.int8
        nearest = np.clip(np.round(kernel.astype(np.float64) / np.asarray(st["w_scale"], np.float64)), -hi - 1, hi)
        assert np.all(np.abs(code - nearest) <= 1)
        changed += int(np.sum(code != nearest))
        total += kernel.size
    flipped = qdiff.info["reconstruction"]["flipped_vs_nearest"]   # (counted on float32 quotients)
    assert 0 < changed < total / 2 and abs(changed - flipped) <= 0.01 * flipped, (changed, flipped)
    name = qdiff.registry.layers[1].name
    st, kernel = qdiff.state[name], jnp.asarray(layers[name]["kernel"])
    bits = jnp.float32(CONFIG.weight_bits)
    np.testing.assert_array_equal(quantize_weight(kernel * 3.0, st, bits),          # the kernel is not read
                                  np.asarray(st["w_code"], np.float32) * np.asarray(st["w_scale"]))
    plain = {k: v for k, v in st.items() if k != "w_code"}
    np.testing.assert_array_equal(quantize_weight(kernel, plain, bits),
                                  fake_quant(kernel, st["w_scale"], 0.0, bits, signed=True))


def test_adaround_primitives():
    @jax.jit  # (one program, not one per operation)
    def primitives(key):
        w = jax.random.normal(key, (3, 3, 4, 5)) * 0.1
        s = jnp.max(jnp.abs(w), axis=(0, 1, 2)) / 7.0
        bits = jnp.float32(4)
        up = ((w / s - jnp.floor(w / s)) >= 0.5).astype(jnp.int8)
        return (w, adaround_fake_quant(w, s, up, bits), fake_quant(w, s, 0.0, bits, signed=True),
                adaround_fake_quant(w, s, rectified_sigmoid(adaround_init(w, s)), bits))

    w, hard, nearest, soft = primitives(jax.random.key(0))
    np.testing.assert_allclose(hard, nearest, atol=1e-6)
    # the soft rounding starts at the float weight
    np.testing.assert_allclose(soft, w, atol=1e-5)
    with pytest.raises(ValueError, match="granularity"):
        ReconOptions(granularity="layer")


def test_lsq_gradients_reach_both_split_scales():
    cfg = QuantConfig(act_bits=(4,), weight_bits=4)
    x = jnp.concatenate([0.1 * jax.random.normal(jax.random.key(0), (2, 4, 4, 3)),
                         10.0 * jax.random.normal(jax.random.key(1), (2, 4, 4, 5))], axis=-1)

    def loss(sc, sk):
        q = QuantArgs(state={}, idx={}, config=cfg)
        y = _quantize_activation(x, sc, jnp.array([8.0]), jnp.zeros(2, jnp.int32), q,
                                 skip=(sk, jnp.array([8.0]), jnp.int32(3)))
        return jnp.sum((y - x) ** 2)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.array([0.01]), jnp.array([1.5]))  # (one program)
    assert all(bool(jnp.isfinite(v).all()) and float(jnp.abs(v).sum()) > 0 for v in g)


def test_calibrate_option_errors(calib):
    pipe, data = calib
    with pytest.raises(TypeError, match="unknown option"):
        calibrate(pipe, CONFIG, data, "mse", iters=3)
    with pytest.raises(ValueError, match="init"):
        calibrate(pipe, CONFIG, data, "qdiff", init="kl")


# ----------------------------------------------------------------------------------------------
# Split quantization of the skip concatenations


def test_split_quantization_synthetic_concat():
    """A conv whose input is [small-range, large-range] channels: two scales beat one."""
    cfg = QuantConfig(act_bits=(4, 6), weight_bits=8)
    a = 0.05 * jax.random.normal(jax.random.key(0), (4, 8, 8, 6))
    b = 20.0 * jax.random.normal(jax.random.key(1), (4, 8, 8, 10))
    x = jnp.concatenate([a, b], axis=-1)
    conv = QConv(8, (3, 3), padding=1, split=6)
    params = jax.jit(lambda k: conv.init(k, x)["params"])(jax.random.key(2))
    _, col = jax.jit(lambda p: conv.apply({"params": p}, x, mutable=["act_stats"]))(params)
    stats = {"layer": col["act_stats"]}
    from qlip_jax.quant.registry import LayerInfo, Registry
    reg = Registry((LayerInfo("layer", "conv", 1, 8),))
    single = init_quant_state({"layer": params}, reg, cfg, stats)["layer"]
    split = init_quant_state({"layer": params}, reg, cfg, stats, splits={"layer": 6})["layer"]
    assert int(split["split"]) == 6 and split["a_scale_skip"].shape == (2,)

    @jax.jit  # the error measurements as one program (op by op they compiled ~90 small ones)
    def errors(single, split):
        q = QuantArgs(state={}, idx={}, config=cfg)
        idx = jnp.zeros(4, jnp.int32)
        d_single = _quantize_activation(x, single["a_scale"], single["a_zero"], idx, q) - x
        d_split = _quantize_activation(x, split["a_scale"], split["a_zero"], idx, q,
                                       skip=(split["a_scale_skip"], split["a_zero_skip"], split["split"])) - x
        # the quantized layer itself uses the split state
        out = {n: conv.apply({"params": params}, x, QuantArgs(state={"": st}, idx={"": idx}, config=cfg))
               for n, st in (("single", single), ("split", split))}
        ref = conv.apply({"params": params}, x)
        return (jnp.mean(d_single ** 2), jnp.mean(d_split ** 2), jnp.mean(d_single[..., :6] ** 2),
                jnp.mean(d_split[..., :6] ** 2), jnp.mean((out["single"] - ref) ** 2),
                jnp.mean((out["split"] - ref) ** 2))

    err_single, err_split, small_single, small_split, out_single, out_split = map(float, errors(single, split))
    assert err_split < err_single
    assert small_split < 0.1 * small_single  # the small-range half is no longer crushed to zero
    assert out_split < out_single


def test_split_quantization_in_the_unet_up_blocks(calib, baselines):
    pipe, data = calib
    splits = model_splits(pipe, data.context.shape[1:])
    assert splits and all(n.startswith("up_blocks.") and n.endswith(("conv1", "conv_shortcut")) for n in splits)
    assert any(n.endswith("conv_shortcut") for n in splits)
    split_setup = baselines["minmax"]                       # split_concat=True is the default
    single_setup = calibrate(pipe, CONFIG, data, "minmax", split_concat=False)
    for name, c in splits.items():
        assert int(split_setup.state[name]["split"]) == c and "a_scale_skip" not in single_setup.state[name]

    @jax.jit
    def input_errors(split_state, single_state, x, t, c):
        """Quantization error of each split layer's real input, with two scales and with one."""
        inputs = {}

        def grab(next_fun, args, kwargs, context):
            mod = context.module
            if isinstance(mod, QConv) and context.method_name == "__call__" and mod.qname in splits:
                inputs[mod.qname] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            pipe.unet.apply({"params": pipe.sd.params["unet"]}, x, t, c)
        q = QuantArgs(state={}, idx={}, config=CONFIG)
        idx = jnp.zeros(x.shape[0], jnp.int32)
        out = {}
        for name, h in inputs.items():
            sp, si = split_state[name], single_state[name]
            e_split = jnp.mean((_quantize_activation(h, sp["a_scale"], sp["a_zero"], idx, q,
                                                     skip=(sp["a_scale_skip"], sp["a_zero_skip"],
                                                           sp["split"])) - h) ** 2)
            e_single = jnp.mean((_quantize_activation(h, si["a_scale"], si["a_zero"], idx, q) - h) ** 2)
            out[name] = e_single / e_split
        return out

    gains = {n: float(g) for n, g in input_errors(split_setup.state, single_setup.state, data.latents,
                                                    data.timesteps, data.context).items()}
    assert set(gains) == set(splits)
    assert all(g >= 0.999 for g in gains.values()), gains
    assert all(g > 1.0 for n, g in gains.items() if n.endswith("conv_shortcut")), gains


# ----------------------------------------------------------------------------------------------
# TDQ


def test_tdq_tables_differ_across_steps_and_fill_missing_steps(calib, tdq, baselines):
    pipe, data = calib
    s = pipe.num_steps
    varying = 0
    for name, st in tdq.state.items():
        assert st["a_scale"].shape == (s, CONFIG.num_quantized) and st["a_zero"].shape == (s, CONFIG.num_quantized)
        assert st["w_scale"].ndim == 1
        a = np.asarray(st["a_scale"])
        varying += bool(np.max(np.abs(a - a[:1]) / a[:1]) > 0.05)
    assert varying > len(tdq.state) // 2, varying
    assert _err(pipe, data, tdq, 0) < _err(pipe, data, baselines["minmax"], 0)
    np.testing.assert_array_equal(nearest_rows([0, 3], 5), [0, 0, 3, 3, 3])
    # steps 0 and 3 only, each row twice: the full data's row count, so the statistics passes run the
    # programs the fixture compiled (duplicated rows leave the calibrated steps' set unchanged)
    rows = np.flatnonzero(np.isin(data.step_index, [0, 3]))
    part_data = data.subset(np.concatenate([rows, rows]))
    assert len(part_data) == len(data) and set(part_data.step_index) == {0, 3}
    part = calibrate(pipe, CONFIG, part_data, "tdq")
    for st in part.state.values():
        a = np.asarray(st["a_scale"])
        np.testing.assert_array_equal(a[1], a[0])
        np.testing.assert_array_equal(a[2], a[3])


def test_tdq_sampler_compiles_once_and_images_are_finite(tiny_sd, calib, tdq):
    pipe, _ = calib
    qpipe = Text2Image(tiny_sd, "ddim", steps=4, quant=tdq)
    emb = qpipe.encode(["a red star", "a green circle"])
    low = qpipe.uniform_schedule(2, 4)
    rng = np.random.default_rng(0)
    mixed = rng.integers(0, CONFIG.num_candidates, low.shape).astype(np.int32)
    imgs = [qpipe(emb, [0, 1], 3.0, sched) for sched in (low, mixed, qpipe.uniform_schedule(2, "fp"))]
    assert qpipe.trace_count == 1
    for im in imgs:
        assert im.shape == (2, 32, 32, 3) and im.dtype == np.uint8 and im.std() > 0
    assert not np.array_equal(imgs[0], imgs[2])


def test_step_table_without_step_raises(calib, tdq):
    pipe, data = calib
    idx = jnp.zeros((2, len(tdq.registry)), jnp.int32)
    q = QuantArgs.from_indices(tdq.state, idx, tdq.registry.names, CONFIG)
    with pytest.raises(ValueError, match="step index"):
        pipe.unet.apply({"params": pipe.sd.params["unet"]}, data.latents[:2], data.timesteps[:2],
                        data.context[:2], q)


# ----------------------------------------------------------------------------------------------


def test_qdiff_and_tdq_states_round_trip(calib, qdiff, tdq, tmp_path):
    pipe, data = calib
    tag = model_fingerprint(pipe.sd.configs.unet, pipe.sd.params["unet"])
    for method, setup in (("qdiff", qdiff), ("tdq", tdq)):
        save_quant_setup(str(tmp_path / method), setup, tag, {"method": method})
        loaded, info = load_quant_setup(str(tmp_path / method), tag)
        assert info["method"] == method and loaded.registry == setup.registry
        assert jax.tree.structure(loaded.state) == jax.tree.structure(setup.state)
        for name in setup.state:
            for k, v in setup.state[name].items():
                got = np.asarray(loaded.state[name][k])
                assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v), (name, k)
                np.testing.assert_array_equal(got, v)
