"""Flax UNet: parity with diffusers, weight I/O round trip, quantized path, one compilation, errors."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_UNET, perturb_, rel_err, rms_rel_err
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file

from qlip_jax.models.configs import ConfigError, UNetConfig
from qlip_jax.models.io import WeightLoadError
from qlip_jax.models.unet import UNet2DConditionModel, load_unet, save_unet, unet_registry
from qlip_jax.quant.registry import init_quant_state
from qlip_jax.quant.state import QuantArgs, QuantConfig


def _inputs(batch=2, hw=16, ctx=(7, 24), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, hw, hw, 4)).astype(np.float32)
    c = rng.standard_normal((batch, *ctx)).astype(np.float32)
    t = np.array([10, 700, 999, 1][:batch])
    return x, t, c


@functools.lru_cache(maxsize=None)
def _float_apply(cfg, dtype=jnp.float32):
    """One jitted float UNet ``(params, x, t, c) -> out`` per config and compute dtype, shared by the
    tests of this module (one compilation per input shape instead of an op-by-op run)."""
    model = UNet2DConditionModel(cfg, dtype=dtype)
    return jax.jit(lambda params, x, t, c: model.apply({"params": params}, x, t, c))


def _torch_out(unet, x, t, c):
    with torch.no_grad():
        y = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(c))
    return y.sample.numpy().transpose(0, 2, 3, 1)


def test_parity_sd_v1_layout(tiny_unet_dir):
    cfg, params = load_unet(tiny_unet_dir)
    x, t, c = _inputs()
    ours = _float_apply(cfg)(params, x, t, c)
    ref = _torch_out(TorchUNet.from_pretrained(tiny_unet_dir).eval(), x, t, c)
    assert rel_err(ours, ref) <= 1e-4


def test_parity_linear_projection_per_block_heads_depth(tmp_path):
    """SD-v2-style options: linear proj_in/out, per-block heads, 2 transformer layers, 3 levels."""
    torch.manual_seed(1)
    unet = TorchUNet(**{**TINY_UNET, "block_out_channels": (16, 32, 32), "layers_per_block": 2,
                        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        "attention_head_dim": (2, 4, 4), "use_linear_projection": True,
                        "transformer_layers_per_block": 2, "flip_sin_to_cos": False, "freq_shift": 1}).eval()
    perturb_(unet, seed=1)
    unet.save_pretrained(tmp_path)
    cfg, params = load_unet(str(tmp_path))
    x, t, c = _inputs(batch=3, seed=1)
    ours = _float_apply(cfg)(params, x, t, c)
    assert rel_err(ours, _torch_out(unet, x, t, c)) <= 1e-4


def test_parity_without_mid_block(tmp_path):
    """BK-SDM's UNets have ``mid_block_type: null``: no mid block, and none in the registry."""
    torch.manual_seed(2)
    unet = TorchUNet(**{**TINY_UNET, "mid_block_type": None}).eval()
    perturb_(unet, seed=2)
    unet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mid_block_type"] is None
    cfg, params = load_unet(str(tmp_path))
    assert "mid_block" not in params
    x, t, c = _inputs(seed=3)
    ours = _float_apply(cfg)(params, x, t, c)
    assert rel_err(ours, _torch_out(unet, x, t, c)) <= 1e-4
    assert not any(n.startswith("mid_block") for n in unet_registry(cfg, (16, 16), (7, 24)).names)


def test_save_then_diffusers_loads(tiny_unet_dir, tmp_path):
    cfg, params = load_unet(tiny_unet_dir)
    save_unet(str(tmp_path), cfg, params)
    reloaded = TorchUNet.from_pretrained(str(tmp_path)).eval()
    x, t, c = _inputs(seed=2)
    ours = _float_apply(cfg)(params, x, t, c)
    assert rel_err(ours, _torch_out(reloaded, x, t, c)) <= 1e-4
    # byte-identical tensors after a full round trip
    a, b = load_file(f"{tiny_unet_dir}/diffusion_pytorch_model.safetensors"), load_file(
        f"{tmp_path}/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def quant_setup(tiny_unet_dir):
    cfg, params = load_unet(tiny_unet_dir)
    model = UNet2DConditionModel(cfg)
    x, t, c = _inputs()
    _, stats = jax.jit(lambda p, *a: model.apply({"params": p}, *a, mutable=["act_stats"]))(params, x, t, c)
    return cfg, params, model, (x, t, c), stats["act_stats"]


def _quant_apply(model, reg, qcfg):
    """``(run, traces)``: jitted ``run(params, state, idx [B, L], x, t, c)`` and how many times it was traced
    (``traces[0]``)."""
    traces = [0]

    @jax.jit
    def run(params, state, idx, x, t, c):
        traces[0] += 1
        return model.apply({"params": params}, x, t, c, QuantArgs.from_indices(state, idx, reg.names, qcfg))

    return run, traces


@pytest.fixture(scope="module")
def quant_runs(quant_setup):
    """``(registry, {weight_bits: (config, state, run, traces)})``: min-max W8 and W4, activation candidates
    A4/A6/A8/A16 + float, the attention matmuls quantized too; each ``run`` is compiled once (batch 2) for
    every test of the module."""
    cfg, params, model, inputs, stats = quant_setup
    reg = unet_registry(cfg, (16, 16), (7, 24), quantize_attn_matmul=True)
    runs = {}
    for wbits in (8, 4):
        qcfg = QuantConfig(act_bits=(4, 6, 8, 16), weight_bits=wbits, quantize_attn_matmul=True)
        state = jax.jit(lambda p, s, q=qcfg: init_quant_state(p, reg, q, s))(params, stats)  # one program
        runs[wbits] = (qcfg, state, *_quant_apply(model, reg, qcfg))
    return reg, runs


def test_full_precision_exact_and_error_grows_as_bits_shrink(quant_setup, quant_runs):
    cfg, params, model, inputs, stats = quant_setup
    reg, runs = quant_runs
    float_out = _float_apply(cfg)(params, *inputs)
    errors = {}
    for wbits in (8, 4):
        qcfg, state, run, _ = runs[wbits]
        fp = run(params, state, jnp.full((2, len(reg)), qcfg.fp_index, jnp.int32), *inputs)
        assert bool((fp == float_out).all()), "full precision must be bit-exact"
        for k, abits in enumerate(qcfg.act_bits):
            errors[wbits, abits] = rms_rel_err(run(params, state, jnp.full((2, len(reg)), k, jnp.int32), *inputs),
                                               float_out)
    # W8A8 min-max: a few % RMS noise on this random, untrained net (W8 alone ~2.5%, A8 alone ~4%;
    # each 2 fewer bits multiply it by ~4, as uniform quantization noise should)
    assert errors[8, 8] < 0.06, errors
    for wbits in (8, 4):
        seq = [errors[wbits, a] for a in (16, 8, 6, 4)]
        assert seq == sorted(seq), (wbits, seq)
    assert errors[8, 4] > 4 * errors[8, 16]  # at W8 the activation bits dominate the error
    assert errors[4, 16] > errors[8, 16]


def test_one_compilation_across_bit_assignments_and_mixed_rows(quant_setup, quant_runs):
    """W4, the attention matmuls quantized too (the program the test above compiles, shared)."""
    cfg, params, model, inputs, stats = quant_setup
    reg, runs = quant_runs
    qcfg, state, run, traces = runs[4]
    x, t, c = inputs

    rng = np.random.default_rng(0)
    outs = []
    for i in range(6):
        idx = rng.integers(0, qcfg.num_candidates, (2, len(reg))).astype(np.int32)
        outs.append(run(params, state, jnp.asarray(idx), x, t, c))
        if i == 0:
            assert traces[0] == 1  # traced here, or by another test of the module
    fp = np.full((1, len(reg)), qcfg.fp_index, np.int32)
    low = np.zeros((1, len(reg)), np.int32)
    both = run(params, state, jnp.asarray(np.concatenate([fp, low])), x, t, c)
    assert traces[0] == 1  # no new trace for other bit assignments and mixed rows
    assert not np.allclose(outs[0], outs[1])
    # a row's output depends on its own indices only: rerun rows alone, 1-row batch, separate jit
    alone_run = jax.jit(lambda p, s, i, *a: model.apply({"params": p}, *a, QuantArgs.from_indices(
        s, i, reg.names, qcfg)))
    for row, idx in ((0, fp), (1, low)):
        alone = alone_run(params, state, jnp.asarray(idx), x[row:row + 1], t[row:row + 1], c[row:row + 1])
        np.testing.assert_allclose(both[row], alone[0], rtol=0, atol=1e-5)


def test_registry_names_are_diffusers_paths_and_macs(tiny_unet_dir, quant_setup):
    cfg, params, *_ = quant_setup
    reg = unet_registry(cfg, (16, 16), (7, 24), quantize_attn_matmul=True)
    torch_keys = set(load_file(f"{tiny_unet_dir}/diffusion_pytorch_model.safetensors"))
    weight_layers = [l for l in reg.layers if l.kind != "matmul"]
    # every conv/linear of the UNet is in the registry, under its diffusers name
    weight_modules = {k[:-len(".weight")] for k in torch_keys if k.endswith(".weight")
                      and load_file(f"{tiny_unet_dir}/diffusion_pytorch_model.safetensors")[k].ndim in (2, 4)}
    assert {l.name for l in weight_layers} == weight_modules
    assert reg.names[0] == "time_embedding.linear_1" and reg.names[-1] == "conv_out"
    conv_in = reg.layers[reg.index("conv_in")]
    assert conv_in.macs == 16 * 16 * 3 * 3 * 4 * 32
    qk = reg.layers[reg.index("down_blocks.0.attentions.0.transformer_blocks.0.attn2.qk")]
    assert qk.kind == "matmul" and qk.macs == 4 * 256 * 7 * 8  # heads x queries x keys x head_dim


def test_bad_inputs_name_the_problem(tiny_unet_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_unet(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_unet_dir, bad)
    conf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**conf, "num_wings": 2}))
    with pytest.raises(ConfigError, match="num_wings"):
        load_unet(str(bad))
    (bad / "config.json").write_text(json.dumps({**conf, "class_embed_type": "timestep"}))
    with pytest.raises(ConfigError, match="class_embed_type"):
        load_unet(str(bad))
    (bad / "config.json").write_text(json.dumps(conf))
    tensors = load_file(str(bad / "diffusion_pytorch_model.safetensors"))
    tensors["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightLoadError, match="conv_in.weight"):
        load_unet(str(bad))
    del tensors["conv_in.weight"]
    save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightLoadError, match="missing key.*conv_in.weight"):
        load_unet(str(bad))
    os.remove(bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_unet(str(bad))


def test_bfloat16_compute_without_touching_params(quant_setup):
    cfg, params, model, (x, t, c), stats = quant_setup
    ref = _float_apply(cfg)(params, x, t, c)
    out = _float_apply(cfg, jnp.bfloat16)(params, x, t, c)
    assert out.dtype == jnp.bfloat16 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert rms_rel_err(out.astype(jnp.float32), ref) < 0.05
