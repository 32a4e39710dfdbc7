"""Flax VAE and CLIP text encoder: parity with diffusers / transformers, round trips, errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import perturb_, rel_err
from diffusers import AutoencoderKL as TorchVAE
from safetensors.numpy import load_file, save_file

from qlip_jax.models.clip import CLIPTextModel, load_text_encoder, save_text_encoder
from qlip_jax.models.configs import ConfigError
from qlip_jax.models.io import WeightLoadError
from qlip_jax.models.vae import AutoencoderKL, encode_images, load_vae, rename_legacy_keys, save_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = TorchVAE(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                   layers_per_block=1).eval()
    perturb_(vae)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def _vae_outputs(vae_fn, x):
    """(mean, logvar, decode(mean)) of a diffusers VAE, NHWC numpy."""
    with torch.no_grad():
        post = vae_fn.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        dec = vae_fn.decode(post.mean).sample
    t = lambda a: a.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return t(post.mean), t(post.logvar), t(dec)


def test_vae_parity_and_round_trip(vae_dir, tmp_path):
    cfg, params = load_vae(vae_dir)
    model = AutoencoderKL(cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    dec = model.apply({"params": params}, mean, method=model.decode)
    ref = _vae_outputs(TorchVAE.from_pretrained(vae_dir).eval(), x)
    for ours, theirs in zip((mean, logvar, dec), ref):
        assert rel_err(ours, theirs) <= 1e-4
    save_vae(str(tmp_path), cfg, params)
    again = _vae_outputs(TorchVAE.from_pretrained(str(tmp_path)).eval(), x)
    for a, b in zip(ref, again):
        assert rel_err(b, a) <= 1e-6


def test_encode_images(vae_dir):
    """uint8 images -> posterior means in batches: the encoder's mean of the images scaled to [-1, 1],
    whatever the batch size."""
    cfg, params = load_vae(vae_dir)
    model = AutoencoderKL(cfg)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    mean, _ = model.apply({"params": params}, images.astype(np.float32) / 127.5 - 1.0, method=model.encode)
    for batch in (5, 2):  # one call; calls of 2, 2, 1
        got = encode_images(cfg, params, images, batch)
        assert got.dtype == np.float32 and got.shape == mean.shape
        np.testing.assert_allclose(got, np.asarray(mean), rtol=1e-5, atol=1e-5)


def test_vae_legacy_attention_names(vae_dir, tmp_path):
    tensors = load_file(f"{vae_dir}/diffusion_pytorch_model.safetensors")
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in tensors.items()}
    assert any("proj_attn" in k for k in legacy)
    assert rename_legacy_keys(legacy).keys() == tensors.keys()
    shutil.copy(f"{vae_dir}/config.json", tmp_path / "config.json")
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _, a = load_vae(vae_dir)
    _, b = load_vae(str(tmp_path))
    assert np.array_equal(a["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                          b["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"])


@pytest.mark.parametrize("eos", [2, 49407])
def test_clip_parity_and_round_trip(eos, tmp_path):
    """eos 2: SD v1's legacy config (pool at argmax id); 49407: pool at the first EOS token."""
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, vocab_size=49408, eos_token_id=eos)
    ref_model = transformers.CLIPTextModel(cfg).eval()
    perturb_(ref_model)
    ref_model.save_pretrained(tmp_path / "a")
    config, params = load_text_encoder(str(tmp_path / "a"))
    ids = np.random.default_rng(0).integers(0, 49000, (2, 77))
    ids[:, 0] = 49406
    ids[0, 5:] = 49407
    ids[1, 9:] = 49407
    hidden, pooled = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids))
    assert rel_err(hidden, ref.last_hidden_state.numpy()) <= 1e-4
    assert rel_err(pooled, ref.pooler_output.numpy()) <= 1e-4
    np.testing.assert_allclose(pooled[0], hidden[0, 5], rtol=0, atol=0)  # EOS position
    save_text_encoder(str(tmp_path / "b"), config, params)
    assert all(k.startswith("text_model.") for k in load_file(str(tmp_path / "b" / "model.safetensors")))
    with torch.no_grad():
        again = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "b")).eval()(torch.from_numpy(ids))
    assert rel_err(again.pooler_output.numpy(), ref.pooler_output.numpy()) <= 1e-6


def test_errors(vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_encoder(str(tmp_path / "missing"))
    shutil.copytree(vae_dir, tmp_path / "v")
    conf = json.loads((tmp_path / "v" / "config.json").read_text())
    (tmp_path / "v" / "config.json").write_text(json.dumps({**conf, "latent_chanels": 4}))
    with pytest.raises(ConfigError, match="latent_chanels"):
        load_vae(str(tmp_path / "v"))
    (tmp_path / "v" / "config.json").write_text(json.dumps(conf))
    tensors = load_file(str(tmp_path / "v" / "diffusion_pytorch_model.safetensors"))
    tensors["decoder.conv_out.bias"] = np.zeros(5, np.float32)
    save_file(tensors, str(tmp_path / "v" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightLoadError, match="decoder.conv_out.bias"):
        load_vae(str(tmp_path / "v"))
