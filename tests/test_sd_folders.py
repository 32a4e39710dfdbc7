"""Real SD folders as users have them (issue #37 item 4), each written by diffusers/transformers'
``save_pretrained`` here: a transformers 5 tokenizer, fp16 variant files, a model_index.json with a
safety checker and a feature extractor, an SD 2.x-style pipeline (v-prediction, linear projection,
per-block heads, upcast attention, gelu text encoder), and a config we do not support."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import perturb_

from qlip_jax.data.tokenizer import load_tokenizer
from qlip_jax.models.configs import ConfigError
from qlip_jax.models.sd import load_stable_diffusion

TEXTS = ["a large striped red star at the top left and a small blue circle", "Hello, World! 42", "", "red " * 90]


def test_tokenizer_saved_by_transformers_5(tokenizer_dir, tmp_path):
    """transformers 5 writes tokenizer.json + tokenizer_config.json only; it loads, same ids."""
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    old, new = load_tokenizer(tokenizer_dir), load_tokenizer(str(tmp_path))
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert new(TEXTS, **kw)["input_ids"] == old(TEXTS, **kw)["input_ids"]
    assert new(["a red star"])["input_ids"] == [[49406, 320, 736, 1565, 49407]]
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def fp16_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD re-saved by diffusers in float16 with ``variant='fp16'``, with a (tiny random)
    safety checker and a feature extractor, as SD v1.4/v1.5 folders have them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    small = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=small, projection_dim=8,
                                                      vision_config={**small, "image_size": 32, "patch_size": 16}))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=checker,
                                                   feature_extractor=CLIPImageProcessor(),
                                                   requires_safety_checker=True)
    path = tmp_path_factory.mktemp("fp16")
    pipe.to(torch.float16).save_pretrained(path, variant="fp16")
    return str(path)


def test_fp16_variant_every_component(fp16_dir, tiny_sd):
    for f in ("unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
              "text_encoder/model.fp16.safetensors"):
        assert os.path.isfile(os.path.join(fp16_dir, f)), f
    # diffusers re-saved the tokenizer with transformers 5: tokenizer.json only
    assert sorted(os.listdir(os.path.join(fp16_dir, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    sd = load_stable_diffusion(fp16_dir, variant="fp16")
    # the float16 files hold the float32 weights rounded to float16, exactly; loaded back as float32
    want = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), tiny_sd.params)
    got_leaves, want_leaves = jax.tree.leaves(sd.params), jax.tree.leaves(want)
    assert jax.tree.structure(sd.params) == jax.tree.structure(want)
    assert all(g.dtype == np.float32 and np.array_equal(g, w) for g, w in zip(got_leaves, want_leaves))
    assert sd.configs == tiny_sd.configs
    # without the variant: one line naming the variant files and the option
    with pytest.raises(FileNotFoundError, match=r"has the variant\(s\) \['fp16'\].*--variant fp16"):
        load_stable_diffusion(fp16_dir)


def test_fp16_variant_mixture_and_absence(fp16_dir, tiny_sd_dir, tmp_path):
    """A component without variant files falls back to its plain files with a warning (as diffusers
    does); a folder with no variant file at all is refused."""
    mixed = tmp_path / "mixed"
    shutil.copytree(fp16_dir, mixed)
    shutil.rmtree(mixed / "vae")
    shutil.copytree(os.path.join(tiny_sd_dir, "vae"), mixed / "vae")
    with pytest.warns(UserWarning, match="no fp16 variant"):
        sd = load_stable_diffusion(str(mixed), variant="fp16")
    plain = load_stable_diffusion(tiny_sd_dir)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sd.params["vae"]),
                                                    jax.tree.leaves(plain.params["vae"])))
    with pytest.raises(FileNotFoundError, match="no component has 'fp16' variant files"):
        load_stable_diffusion(tiny_sd_dir, variant="fp16")


def test_model_index_with_safety_checker_and_feature_extractor(fp16_dir):
    """SD v1.4/v1.5's model_index.json lists a safety checker and a feature extractor (with their
    folders); both are ignored."""
    index = json.load(open(os.path.join(fp16_dir, "model_index.json")))
    assert index["safety_checker"][1] == "StableDiffusionSafetyChecker"
    assert index["feature_extractor"][1].startswith("CLIPImageProcessor")
    assert os.path.isdir(os.path.join(fp16_dir, "safety_checker"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every component has its fp16 files: no fall-back warning
        sd = load_stable_diffusion(fp16_dir, variant="fp16")
    assert set(sd.params) == {"unet", "vae", "text_encoder"}


def _sd2_pipeline(tokenizer_dir):
    """A tiny SD 2.x-style diffusers pipeline: v-prediction DDIM, linear proj_in/out, per-block head
    counts, upcast attention, a gelu text encoder with the legacy eos_token_id=2 (SD 2.1's)."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
        vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=24))
    for m, seed in ((unet, 0), (vae, 1), (text, 2)):
        perturb_(m.eval(), seed=seed)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    tok = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd2_style_folder_matches_diffusers(tokenizer_dir, tmp_path):
    from qlip_jax.sampling.pipeline import Text2Image

    ref = _sd2_pipeline(tokenizer_dir)
    ref.save_pretrained(tmp_path)
    sd = load_stable_diffusion(str(tmp_path))
    assert sd.configs.scheduler.prediction_type == "v_prediction" and sd.configs.unet.heads() == (2, 4)
    pipe = Text2Image(sd, "ddim", steps=4)
    latents = np.random.default_rng(0).standard_normal((2, *pipe.latent_shape)).astype(np.float32)
    prompts = ["a red star", "two blue squares"]
    ours = pipe(pipe.encode(prompts), [0, 1], 4.0, latents=latents)
    with torch.no_grad():
        theirs = ref(prompts, num_inference_steps=4, guidance_scale=4.0, output_type="np",
                     latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
    theirs = np.round(np.clip(theirs, 0, 1) * 255)
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 1  # uint8 rounding may flip one level
    assert np.std(ours) > 5


def test_unsupported_config_is_refused_naming_the_field(tiny_sd_dir, tmp_path):
    """E.g. an SDXL-style UNet (added time/text embedding): refused by field, not a traceback."""
    shutil.copytree(tiny_sd_dir, tmp_path / "m")
    path = tmp_path / "m" / "unet" / "config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "addition_embed_type": "text_time"}))
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'"):
        load_stable_diffusion(str(tmp_path / "m"))
    path.write_text(json.dumps({**conf, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}))
    with pytest.raises(ConfigError, match="mid_block_type"):
        load_stable_diffusion(str(tmp_path / "m"))


def test_program_variant_option(fp16_dir, tmp_path, capsys):
    """``qlip sample --variant fp16`` reads the fp16 files; without it the error names the option."""
    from PIL import Image
    from refusal import refused

    from qlip_jax.cli import main

    argv = ["sample", "--model", fp16_dir, "--prompt", "a red star", "--steps", "2"]
    refused(main, argv + ["--out", str(tmp_path / "no.png")], capsys, "--variant fp16")
    assert not (tmp_path / "no.png").exists()
    assert main(argv + ["--variant", "fp16", "--out", str(tmp_path / "a.png")]) == 0
    img = np.asarray(Image.open(tmp_path / "a.png"))
    assert img.shape[1] == 64 and img.std() > 1


def test_sharded_fp16_variant(tiny_unet_dir, tmp_path):
    """diffusers names sharded variant files ``<stem>.fp16-0000k-of-0000n.safetensors`` with the index
    ``<stem>.safetensors.index.fp16.json``; they load, equal to the unsharded weights rounded to fp16."""
    from diffusers import UNet2DConditionModel

    from qlip_jax.models.unet import load_unet

    UNet2DConditionModel.from_pretrained(tiny_unet_dir).to(torch.float16).save_pretrained(
        tmp_path, variant="fp16", max_shard_size="100KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _, got = load_unet(str(tmp_path), "fp16")
    _, full = load_unet(tiny_unet_dir)
    assert all(np.array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)))
