"""Per-row quantizer parameters computed once per UNet call (``QuantArgs.from_indices(prepare=True)``,
the sampler's default) give the same bits as each layer looking its rows up itself (the layers' own
path, the code before), and the activation quantizer equals a NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.ptq.calibration import calibrate_minmax
from qlip_jax.quant.layers import _quantize_activation, _quantize_prepared
from qlip_jax.quant.state import QuantArgs, QuantConfig, prepare_rows, unpack_row
from qlip_jax.sampling.pipeline import Text2Image

STEPS = 3
PROMPTS = ["a red star", "two blue squares", "a shape", "a large green circle"]


@pytest.fixture(scope="module")
def quant(tiny_sd):
    pipe = Text2Image(tiny_sd, "ddim", steps=STEPS)
    return calibrate_minmax(pipe, QuantConfig(act_bits=(4, 6, 8), weight_bits=4), ["a red star", "two blue squares"],
                            [0, 1], guidance=3.0)


def _tdq_split(state: dict) -> dict:
    """Every activation quantizer as an ``[S, K]`` step table (TDQ), and every conv/linear input split
    at channel 3 with its own skip quantizer (Q-Diffusion's split-concat), values all different."""
    out = {}
    for name, st in state.items():
        d = dict(st)
        for sk, zk in (("a_scale", "a_zero"), ("b_scale", "b_zero")):
            if sk in d:
                d[sk] = d[sk][None] * jnp.asarray([1.0, 0.7, 1.3])[:, None]
                d[zk] = d[zk][None] + jnp.asarray([0.0, 1.0, -2.0])[:, None]
        if "w_scale" in d:
            d["a_scale_skip"], d["a_zero_skip"] = d["a_scale"] * 1.7 + 1e-3, d["a_zero"] + 3.0
            d["split"] = jnp.int32(3)
        out[name] = d
    return out


def _schedules(pipe: Text2Image) -> dict:
    """W4A8 for every row; and random candidates per row, step and layer with a full-precision row and
    rows mixing float and quantized layers in one batch (the weight layers' mixed-rows branch)."""
    k, layers = pipe.quant.config.num_candidates, len(pipe.quant.registry)
    rand = np.random.default_rng(0).integers(0, k, (len(PROMPTS), pipe.num_steps, layers)).astype(np.int32)
    rand[0] = k - 1
    rand[1, 1, :5] = k - 1
    return {"w4a8": pipe.uniform_schedule(len(PROMPTS), 8), "random": rand}


@pytest.mark.parametrize("variant", ["minmax", "tdq_split"])
def test_sampler_bit_identical_to_the_layers_own_path(tiny_sd, quant, variant):
    if variant == "tdq_split":
        quant = dataclasses.replace(quant, state=_tdq_split(quant.state))
    own = Text2Image(tiny_sd, "ddim", STEPS, quant=quant)
    own.prepare_rows = False
    prepared = Text2Image(tiny_sd, "ddim", STEPS, quant=quant)
    assert prepared.prepare_rows  # the sampler's default
    emb = own.encode(PROMPTS)
    images = []
    for name, sched in _schedules(own).items():
        img_a, lat_a = own.trajectory(emb, [0, 1, 2, 3], 3.0, sched)
        img_b, lat_b = prepared.trajectory(emb, [0, 1, 2, 3], 3.0, sched)
        assert np.array_equal(img_a, img_b), (variant, name)
        assert np.array_equal(lat_a, lat_b), (variant, name)
        images.append(img_a)
    assert not np.array_equal(*images)  # the schedule matters: the comparison is not vacuous


def _reference(x, s, z, bits, fp):
    """NumPy float32, element by element: ``(clip(round(x * (1 / s)) + round(z), 0, 2^b - 1) - round(z)) * s``
    (XLA CPU's evaluation of the layers' ``x / s``), the input itself where ``fp``."""
    x = np.asarray(x, np.float32)
    r = np.float32(1.0) / s
    v = x * r
    zp = z + (np.rint(z) - z)
    q = np.minimum(np.maximum(v + (np.rint(v) - v) + zp, np.float32(0.0)), np.exp2(bits) - np.float32(1.0))
    return np.where(fp, x, (q - zp) * s)


def test_prepared_activation_quantizer_matches_reference_and_layer_path():
    cfg = QuantConfig(act_bits=(4, 8, 32), weight_bits=4)   # 32: float activations, quantized weights
    k = cfg.num_quantized
    rng = np.random.default_rng(1)
    scale = np.asarray([0.11, 0.013, 0.05], np.float32)
    zero = np.asarray([3.4, 120.6, 7.0], np.float32)
    state = {"l": {"a_scale": jnp.asarray(scale), "a_zero": jnp.asarray(zero)}}
    idx = np.asarray([0, 1, 2, 3, 1], np.int32)                  # 3: the full-precision candidate
    x = (rng.normal(size=(5, 4, 4, 6)) * 3).astype(np.float32)
    q = QuantArgs.from_indices(state, idx[:, None], ("l",), cfg, prepare=True)
    rows = unpack_row(q.prepared["l"], 5)
    got = np.asarray(jax.jit(lambda x: _quantize_prepared(x, rows, "a"))(x))
    kk = np.minimum(idx, k - 1)
    bits = cfg.act_bits_table()[idx]
    fp = (idx == cfg.fp_index) | (bits >= 32)
    want = _reference(x, scale[kk][:, None, None, None], zero[kk][:, None, None, None],
                      np.where(fp, 8.0, bits).astype(np.float32)[:, None, None, None], fp[:, None, None, None])
    assert np.array_equal(got, want)
    own = jax.jit(lambda x: _quantize_activation(x, state["l"]["a_scale"], state["l"]["a_zero"], jnp.asarray(idx),
                                                 dataclasses.replace(q, prepared=None)))(x)
    assert np.array_equal(got, np.asarray(own))
    assert np.array_equal(got[3], x[3]) and np.array_equal(got[2], x[2])   # fp and A32 rows pass through
    assert not np.array_equal(got[0], x[0])


def test_prepare_rows_needs_the_step_for_step_tables():
    cfg = QuantConfig(act_bits=(4, 8), weight_bits=4)
    state = {"l": {"a_scale": jnp.ones((3, 2)), "a_zero": jnp.zeros((3, 2))}}
    with pytest.raises(ValueError, match="step"):
        prepare_rows(state, jnp.zeros((2, 1), jnp.int32), ("l",), cfg, None)


def test_from_mix_and_the_default_do_not_prepare():
    cfg = QuantConfig(act_bits=(4, 8), weight_bits=4)
    state = {"l": {"a_scale": jnp.ones(2), "a_zero": jnp.zeros(2)}}
    assert QuantArgs.from_indices(state, jnp.zeros((2, 1), jnp.int32), ("l",), cfg).prepared is None
    assert QuantArgs.from_mix(state, jnp.ones((2, 1, 2)) / 2, ("l",), cfg).prepared is None
