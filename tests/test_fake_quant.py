"""Fake quantization with traced bits: NumPy reference, gradients, exact float, BitOPs by hand."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.quant.fake_quant import fake_quant, fake_quant_or_float, minmax_weight_scale
from qlip_jax.quant.layers import QConv, QDense
from qlip_jax.quant.registry import LayerInfo, Registry, average_act_bits, bitops, build_registry
from qlip_jax.quant.state import QuantArgs, QuantConfig


def np_fake_quant(x, scale, zero, bits, signed):
    """Textbook uniform quantizer in NumPy (float32)."""
    if signed:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0 ** bits - 1
    zero = np.round(zero)
    q = np.clip(np.round(x / scale) + zero, lo, hi)
    return ((q - zero) * scale).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_matches_numpy_reference_for_every_bit_width(signed):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (64, 33)).astype(np.float32)
    scale = rng.uniform(0.01, 0.2, (33,)).astype(np.float32)
    zero = np.float32(0.0 if signed else 7.3)
    f = jax.jit(lambda x, s, z, b: fake_quant(x, s, z, b, signed=signed))
    for bits in (2, 3, 4, 5, 6, 8, 10, 12, 16):
        got = np.asarray(f(x, scale, zero, jnp.float32(bits)))
        want = np_fake_quant(x, scale, zero, bits, signed)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        # the grid really has 2^bits levels (fewer distinct values at low bits)
        assert len(np.unique(np.round(got[:, 0] / scale[0]))) <= 2 ** bits


def test_bits_are_traced_one_compilation():
    x = jnp.linspace(-1, 1, 101)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(bits):
        return fake_quant(x, jnp.float32(2 / 255), 0.0, bits, signed=True)

    errs = [float(jnp.abs(f(jnp.float32(b)) - x).max()) for b in (2, 4, 6, 8, 12)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


def test_full_precision_is_a_select_not_rounding():
    x = jax.random.normal(jax.random.key(0), (1000,)) * 1e3
    out = fake_quant_or_float(x, jnp.float32(0.1), 0.0, jnp.float32(32), False, signed=True)
    assert bool((out == x).all())
    out = fake_quant_or_float(x, jnp.float32(0.1), 0.0, jnp.float32(4), True, signed=True)
    assert bool((out == x).all())
    out = fake_quant_or_float(x, jnp.float32(0.1), 0.0, jnp.float32(4), False, signed=True)
    assert not bool((out == x).all())


def test_ste_and_lsq_gradients():
    x = jnp.array([-3.0, -0.26, 0.04, 0.51, 2.9])
    s, bits = jnp.float32(0.1), jnp.float32(4)  # signed 4-bit grid: [-8, 7] * 0.1 = [-0.8, 0.7]
    gx = jax.grad(lambda x: fake_quant(x, s, 0.0, bits, signed=True).sum())(x)
    np.testing.assert_allclose(gx, [0, 1, 1, 1, 0])  # clipped straight-through
    gs = jax.grad(lambda s: fake_quant(x, s, 0.0, bits, signed=True).sum())(s)
    # LSQ: round(x/s) - x/s inside the range, the clip bound outside
    v = np.asarray(x) / 0.1
    inside = (v >= -8) & (v <= 7)
    want = np.where(inside, np.round(v) - v, np.clip(v, -8, 7)).sum()
    np.testing.assert_allclose(gs, want, rtol=1e-5)


def test_quantized_layer_grads_finite_nonzero():
    cfg = QuantConfig(act_bits=(4, 8), weight_bits=4)
    model = QConv(6, (3, 3), padding=1)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = model.init(jax.random.key(0), x)["params"]
    state = {"": {"w_scale": minmax_weight_scale(params["kernel"], 4),
                  "a_scale": jnp.array([0.5, 0.03]), "a_zero": jnp.array([8.0, 128.0])}}

    def loss(p, st):
        q = QuantArgs(state=st, idx={"": jnp.array([0, 1])}, config=cfg)
        return jnp.sum(model.apply({"params": p}, x, q) ** 2)

    gp, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, state)   # one program, not 120 eager ones
    for g in jax.tree_util.tree_leaves((gp, gs)):
        assert bool(jnp.isfinite(g).all())
    assert float(jnp.abs(gp["kernel"]).sum()) > 0
    assert float(jnp.abs(gs[""]["w_scale"]).sum()) > 0
    assert float(jnp.abs(gs[""]["a_scale"]).min()) > 0  # both candidates are used by a row


def test_bitops_two_layer_by_hand():
    cfg = QuantConfig(act_bits=(4, 8), weight_bits=4)

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):  # x [B, 8, 8, 4]
            h = QConv(6, (3, 3), padding=1, name="conv")(x)  # 8*8 * 3*3*4 * 6 = 13824 MACs
            return QDense(5, name="fc")(h.reshape(h.shape[0], 64, 6))  # 64 * 6 * 5 = 1920 MACs

    reg = build_registry(Two(), jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32))
    assert reg.names == ("conv", "fc")
    assert [l.macs for l in reg.layers] == [13824, 1920]
    # two steps: step 0 conv@A4, fc@A8; step 1 both full precision (32 x 32)
    sched = jnp.array([[[0, 1], [2, 2]]])
    by_hand = (13824 * 4 * 4 + 1920 * 4 * 8) + (13824 + 1920) * 32 * 32
    assert float(bitops(sched, reg, cfg)[0]) == by_hand
    assert float(bitops(sched, reg, cfg, evaluations_per_step=2)[0]) == 2 * by_hand
    assert float(average_act_bits(sched, cfg)[0]) == (4 + 8 + 32 + 32) / 4
    w = np.array([13824, 1920]) / (13824 + 1920)
    mac_avg = ((4 * w[0] + 8 * w[1]) + 32) / 2
    np.testing.assert_allclose(average_act_bits(sched, cfg, reg, mac_weighted=True)[0], mac_avg, rtol=1e-6)


def test_matmul_bitops_count_activation_bits_twice():
    cfg = QuantConfig(act_bits=(6,), weight_bits=4)
    reg = Registry((LayerInfo("a.qk", "matmul", 10), LayerInfo("a.to_q", "linear", 10)))
    assert float(bitops(jnp.zeros((1, 1, 2), jnp.int32), reg, cfg)[0]) == 10 * 6 * 6 + 10 * 4 * 6


def test_config_and_index_errors():
    with pytest.raises(ValueError, match="bit width 1"):
        QuantConfig(act_bits=(1, 8))
    with pytest.raises(ValueError, match="at least one"):
        QuantConfig(act_bits=())
    cfg = QuantConfig(act_bits=(6, 8))
    with pytest.raises(ValueError, match="not a candidate"):
        cfg.index_of(7)
    assert cfg.index_of("fp") == 2 and cfg.index_of(8) == 1
    with pytest.raises(ValueError, match="out of the candidate set"):
        QuantArgs.from_indices({}, np.array([[0, 3]]), ("a", "b"), cfg)
    with pytest.raises(ValueError, match=r"shape \[B, L=2\]"):
        QuantArgs.from_indices({}, np.array([0, 1]), ("a", "b"), cfg)
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"act_bits": [8], "weigth_bits": 4})
