"""Flax CLIPModel (both towers, projections, logit scale) against transformers, the CLIP image
preprocessing against CLIPImageProcessor, and the CLIP score as torchmetrics computes it."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import rel_err

from qlip_jax.metrics.clip_score import ClipScorer, clip_score_from_pairs
from qlip_jax.models.clip import CLIPModel, load_clip
from qlip_jax.models.configs import ConfigError

# the last caption has > 77 tokens: cut as torchmetrics does
CAPTIONS = ["a red star", "two large blue squares on a gray background", "a photo of a cat " * 20]


def _images(seed=0):
    """Three uint8 images of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in ((40, 56, 3), (32, 32, 3), (71, 45, 3))]


@pytest.fixture(scope="module")
def ref(tiny_clip_dir):
    return (transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval(),
            transformers.CLIPProcessor.from_pretrained(tiny_clip_dir))


def test_clip_model_parity(tiny_clip_dir, ref):
    """Vision and text towers, projected embeddings and logit scale within 1e-4 of transformers."""
    model_t, _ = ref
    config, params = load_clip(tiny_clip_dir)
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(0, 49000, (2, 77))
    ids[:, 0] = 49406
    ids[0, 6:], ids[1, 11:] = 49407, 49407
    mask = np.ones_like(ids)
    model = CLIPModel(config)
    pix_t, ids_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids)
    with torch.no_grad():
        out = model_t(input_ids=ids_t, pixel_values=pix_t, attention_mask=torch.from_numpy(mask))
        vision, text_tower = model_t.vision_model(pixel_values=pix_t), model_t.text_model(input_ids=ids_t)
    v_hidden, v_pooled = model.apply({"params": params}, jnp.asarray(pixels),
                                     method=lambda m, x: m.vision_model(x))
    t_hidden, t_pooled = model.apply({"params": params}, jnp.asarray(ids), method=lambda m, x: m.text_model(x))
    assert rel_err(v_hidden, vision.last_hidden_state.numpy()) <= 1e-4
    assert rel_err(v_pooled, vision.pooler_output.numpy()) <= 1e-4
    assert rel_err(t_hidden, text_tower.last_hidden_state.numpy()) <= 1e-4
    assert rel_err(t_pooled, text_tower.pooler_output.numpy()) <= 1e-4
    image, text, logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    assert rel_err(image, out.image_embeds.numpy()) <= 1e-4
    assert rel_err(text, out.text_embeds.numpy()) <= 1e-4
    assert rel_err(logits, out.logits_per_text.numpy()) <= 1e-4
    assert np.isclose(float(params["logit_scale"]), model_t.logit_scale.item(), rtol=0, atol=0)
    assert abs(float(params["logit_scale"]) - 2.6592) > 1e-3  # perturbed, so the check means something


def test_preprocessing_matches_clip_image_processor(tiny_clip_dir, ref):
    _, processor = ref
    scorer = ClipScorer(tiny_clip_dir)
    images = _images()
    ours = scorer.pixels(images)
    theirs = np.stack([processor(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
                       for im in images])
    assert ours.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_clip_score_as_torchmetrics(tiny_clip_dir, ref):
    """torchmetrics' recipe (processor with padding, ids cut to 77, get_*_features, normalise,
    100 * cos, mean, clamp at 0) computed with transformers, against ours."""
    model_t, processor = ref
    images = _images(2)
    scorer = ClipScorer(tiny_clip_dir, batch=2)  # 3 images: one full batch and a padded one
    with torch.no_grad():
        pix = processor(images=images, return_tensors="pt")["pixel_values"]
        txt = processor(text=CAPTIONS, return_tensors="pt", padding=True)
        img_f = model_t.get_image_features(pixel_values=pix)
        txt_f = model_t.get_text_features(input_ids=txt["input_ids"][:, :77],
                                          attention_mask=txt["attention_mask"][:, :77])
        img_f = getattr(img_f, "pooler_output", img_f)
        txt_f = getattr(txt_f, "pooler_output", txt_f)
    img_f = (img_f / img_f.norm(dim=-1, keepdim=True)).numpy()
    txt_f = (txt_f / txt_f.norm(dim=-1, keepdim=True)).numpy()
    want = 100 * (img_f * txt_f).sum(-1)
    got = scorer.pair_scores(images, CAPTIONS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert scorer(images, CAPTIONS) == pytest.approx(max(float(want.mean()), 0.0), abs=1e-3)
    assert clip_score_from_pairs([-3.0, 1.0]) == 0.0 and clip_score_from_pairs([-1.0, 5.0]) == 2.0
    assert scorer.logit_scale == pytest.approx(float(model_t.logit_scale.exp()), rel=1e-6)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        scorer.pair_scores(images, CAPTIONS[:2])


def test_another_architecture_is_refused(tiny_clip_dir, tmp_path):
    """A text-only tower, or another model type, gets one line naming what is needed."""
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2)).save_pretrained(tmp_path / "t")
    with pytest.raises(ConfigError, match=r"not a transformers CLIPModel \(model_type='clip_text_model'"):
        load_clip(str(tmp_path / "t"))
    shutil.copytree(tiny_clip_dir, tmp_path / "s")
    conf = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**conf, "model_type": "siglip",
                                                            "architectures": ["SiglipModel"]}))
    with pytest.raises(ConfigError, match="architectures=\\['SiglipModel'\\].*needs a CLIPModel folder"):
        ClipScorer(str(tmp_path / "s"))
