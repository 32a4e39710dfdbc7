"""The prepared quantized forward (qlip_jax/quant/prepare.py): same values as the layers' own path, bit
for bit, in a program without per-layer conditionals or duplicated convolutions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.quant.state import QuantArgs, QuantConfig
from qlip_jax.sampling import guidance


@pytest.fixture(scope="module")
def setup(tiny_sd):
    """The tiny UNet; quantizers with split skip halves, quantized attention matmuls and per-step
    (TDQ) ``[S, K]`` scale tables next to ``[K]`` zero points; inputs."""
    from qlip_jax.models.unet import unet_registry
    from qlip_jax.quant.calibration import model_splits
    from qlip_jax.quant.registry import init_quant_state
    from qlip_jax.quant.state import QuantSetup
    from qlip_jax.sampling.pipeline import Text2Image

    pipe = Text2Image(tiny_sd, "ddim", steps=4)
    emb = pipe.encode(["a red star", "a blue circle", "two green squares"])
    config = QuantConfig(act_bits=(4, 6, 8), weight_bits=4, quantize_attn_matmul=True)
    registry = unet_registry(tiny_sd.configs.unet, pipe.latent_shape[:2], emb.cond.shape[1:], True)
    state = init_quant_state(tiny_sd.params["unet"], registry, config, None,
                             model_splits(pipe, emb.cond.shape[1:]))
    ramp = 0.5 + 0.5 * np.arange(4, dtype=np.float32)[:, None]              # [S=4, 1]
    state = {n: {k: (v[None] * ramp if k in ("a_scale", "b_scale", "a_scale_skip") else v) for k, v in s.items()}
             for n, s in state.items()}
    assert any("a_scale_skip" in s for s in state.values()) and any("b_scale" in s for s in state.values())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, *pipe.latent_shape)), jnp.float32)
    return pipe, QuantSetup(config, registry, state), x, emb


def _guided_fn(pipe, quant, x, emb, prepared: bool, monkeypatch):
    """Jitted ``(idx [B, L], step [B]) -> guided_output`` of the tiny UNet, prepared or through the
    layers' own path (per-layer lookups and ``lax.cond``)."""
    if not prepared:
        monkeypatch.setattr(guidance, "apply_quantized", lambda fn, q: fn(q))
    cond, uncond = emb.cond, jnp.broadcast_to(emb.uncond, emb.cond.shape)

    @jax.jit
    def run(params, state, idx, step):
        q = QuantArgs.from_indices(state, jnp.concatenate([idx, idx]), quant.registry.names, quant.config,
                                   step=jnp.concatenate([step, step]))
        return guidance.guided_output(pipe.unet, params, x, 500, cond, uncond, 3.0, q)

    def call(idx, step):
        out = np.asarray(run(pipe.sd.params["unet"], quant.state, jnp.asarray(idx), jnp.asarray(step)))
        return out

    return call


def test_same_values_bit_for_bit(setup, monkeypatch):
    """Uniform, all-float and mixed rows (rows that disagree on float weights at a layer: two share a
    pattern, one has its own), at different steps of the step tables."""
    pipe, quant, x, emb = setup
    L, fp = len(quant.registry), quant.config.fp_index
    rng = np.random.default_rng(1)
    mixed = rng.integers(0, fp + 1, (3, L)).astype(np.int32)
    mixed[1] = mixed[0]
    mixed[2, :5] = fp
    cases = [(np.full((3, L), 1, np.int32), [0, 0, 0]), (np.full((3, L), fp, np.int32), [1, 1, 1]),
             (mixed, [3, 2, 0])]
    new = _guided_fn(pipe, quant, x, emb, True, monkeypatch)
    got = [new(idx, step) for idx, step in cases]
    old = _guided_fn(pipe, quant, x, emb, False, monkeypatch)
    for (idx, step), a in zip(cases, got):
        b = old(idx, step)
        assert np.array_equal(a, b), np.abs(a - b).max()
    monkeypatch.undo()
    assert np.abs(got[2] - new(mixed, [0, 0, 0])).max() > 1e-4              # the step tables are read
    assert np.abs(got[0] - got[1]).max() > 1e-3                             # quantization is on


def test_program_has_no_branches_and_one_op_per_layer(setup):
    """The lowered quantized UNet call has no conditional and as many convolutions and matmuls as the
    float one (the layers' own path: one ``case`` per weight layer and three copies of its op)."""
    pipe, quant, x, emb = setup
    cond, uncond = emb.cond, jnp.broadcast_to(emb.uncond, emb.cond.shape)
    idx = jnp.zeros((6, len(quant.registry)), jnp.int32)

    def text(q):
        return jax.jit(lambda p, s, i: guidance.guided_output(
            pipe.unet, p, x, 500, cond, uncond, 3.0,
            None if q is None else QuantArgs.from_indices(s, i, quant.registry.names, quant.config, step=0))
        ).lower(pipe.sd.params["unet"], quant.state, idx).as_text()

    fp, qt = text(None), text(True)
    for op in ("stablehlo.convolution", "stablehlo.dot_general"):
        assert qt.count(op) == fp.count(op) > 0, op
    assert "stablehlo.case" not in qt and qt.count("stablehlo.while") == 1
