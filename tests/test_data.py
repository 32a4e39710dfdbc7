"""Procedural scenes and the CLIP tokenizer built from open_clip's BPE file."""

import importlib.util

import numpy as np
import pytest

from qlip_jax.data.scenes import (BACKGROUNDS, COLORS, LEVELS, POSITIONS, SIZES, _CELL_CENTERS, Scene,
                                  SceneObject, caption_is_true, make_caption, object_coverage, prompt_set,
                                  render, sample_scene, scene_of, split_seeds, training_batch)
from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe, load_tokenizer


def test_deterministic_per_seed():
    a, b, c = sample_scene(7), sample_scene(7), sample_scene(8)
    assert a == b and a != c
    assert np.array_equal(render(a), render(b))
    ra, rb = np.random.default_rng(1), np.random.default_rng(1)
    assert make_caption(a, 4, ra) == make_caption(a, 4, rb)
    imgs1, caps1, _ = training_batch(3, 11, 4)
    imgs2, caps2, _ = training_batch(3, 11, 4)
    assert np.array_equal(imgs1, imgs2) and caps1 == caps2
    assert not np.array_equal(imgs1, training_batch(3, 12, 4)[0])


def test_captions_are_true_and_rendering_agrees():
    rng = np.random.default_rng(0)
    for seed in range(200):
        scene = sample_scene(seed)
        for level in LEVELS:
            cap = make_caption(scene, level, rng)
            assert cap.level == level and caption_is_true(cap, scene), (cap, scene)
        img = render(scene)
        occupied = {o.position for o in scene.objects}
        for obj, (jx, jy) in zip(scene.objects, scene.jitter):
            row, col = divmod(POSITIONS.index(obj.position), 3)
            cx, cy = int(_CELL_CENTERS[col] + jx), int(_CELL_CENTERS[row] + jy)
            if obj.fill == "solid" and obj.shape in ("circle", "square"):
                # the centre pixel has the object's colour unless a later object covers it
                covered = any(o.position == obj.position for o in scene.objects[scene.objects.index(obj) + 1:])
                if not covered:
                    assert np.abs(img[cy, cx].astype(int) - COLORS[obj.color]).max() <= 2
        for pos in POSITIONS:  # an empty cell's centre shows the background
            row, col = divmod(POSITIONS.index(pos), 3)
            if pos not in occupied and all(abs(POSITIONS.index(p) - POSITIONS.index(pos)) not in (1, 3)
                                           for p in occupied):
                px = img[int(_CELL_CENTERS[row]), int(_CELL_CENTERS[col])].astype(int)
                assert np.abs(px - BACKGROUNDS[scene.background]).max() <= 2
    # a false caption is caught
    scene = sample_scene(0)
    cap = make_caption(scene, 4, rng)
    other = next(b for b in BACKGROUNDS if b != scene.background)
    assert not caption_is_true(type(cap)(cap.text, 4, cap.objects, other, True), scene)


def test_level_2_one_object_captions_are_not_level_1_texts():
    """Level 2 claims to list every object: for a one-object scene it says "a single", so its text never
    reads like a level-1 caption (one object of a scene of 1-4); no other level says "single"."""
    rng = np.random.default_rng(3)
    one = sample_scene(7, n_objects=1)
    assert make_caption(one, 2, rng).text.endswith(f"a single {one.objects[0].color} {one.objects[0].shape}")
    texts = {level: set() for level in LEVELS}
    for seed in range(300):
        scene = sample_scene(seed)
        for level in LEVELS:
            cap = make_caption(scene, level, rng)
            texts[level].add(cap.text)
            assert ("single" in cap.text) == (level == 2 and len(scene.objects) == 1), cap
    assert not texts[1] & texts[2]


def test_object_coverage_matches_the_rendered_objects():
    """A lone solid circle covers about pi r^2 pixels, where the image shows its colour; the background
    and the empty cells are uncovered; coverage grows with the stated size."""
    areas = []
    for size in SIZES:
        scene = Scene((SceneObject("circle", "red", size, "solid", "center"),), "white", ((0.0, 0.0),))
        cov, img = object_coverage(scene), render(scene).astype(int)
        assert cov.shape == img.shape[:2] and cov.min() == 0.0 and cov.max() == 1.0
        r = SIZES[size] / 2
        assert abs(cov.sum() - np.pi * r * r) < 0.05 * np.pi * r * r, (size, cov.sum())
        red = np.abs(img - COLORS["red"]).max(axis=-1) <= 2
        assert np.array_equal(red, cov >= 0.99)
        areas.append(cov.sum())
    assert areas == sorted(areas)
    for seed in range(20):  # several objects: union of the covers, background pixels uncovered
        scene = sample_scene(seed)
        cov, img = object_coverage(scene), render(scene).astype(int)
        background = np.abs(img - BACKGROUNDS[scene.background]).max(axis=-1) == 0
        assert (cov[background & (cov > 0)] < 0.02).all()
        assert (cov[~background] > 0).all()
        # pooled to the 8x8 latent cells: each cell the mean of its 8x8 pixels
        cells = object_coverage(scene, cells=8)
        np.testing.assert_allclose(cells[2, 5], cov[16:24, 40:48].mean(), rtol=1e-6)
        np.testing.assert_allclose(cells.mean(), cov.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        object_coverage(scene, cells=7)


def test_prompt_sets_stable_disjoint_and_cover_levels():
    ev = prompt_set("eval")
    assert ev == prompt_set("eval") and len(ev) == 512 and ev[0].id == "eval-00000"
    seeds = {name: set(split_seeds(name)) for name in ("train", "calibration", "eval")}
    assert not (seeds["train"] & seeds["eval"]) and not (seeds["calibration"] & seeds["eval"])
    assert not (seeds["train"] & seeds["calibration"])
    for n_obj in ("single", "multi"):
        levels = {r.level for r in ev if (r.n_objects == 1) == (n_obj == "single")}
        assert levels == set(LEVELS)
    for r in ev[:50]:
        assert caption_is_true(r.caption, scene_of(r))
    richness = [len(r.text) for r in ev if r.level == 4]
    assert np.mean(richness) > 3 * np.mean([len(r.text) for r in ev if r.level == 0])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(convert_clip_bpe(find_clip_bpe(), str(tmp_path_factory.mktemp("tok"))))


def _open_clip_tokenizer():
    path = find_clip_bpe().replace("bpe_simple_vocab_16e6.txt.gz", "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # needs ftfy, regex, torch (test extra)
    return module.SimpleTokenizer()


def test_tokenizer_ids_equal_clip_bpe(tokenizer):
    texts = ["a large striped red star at the top left and a small blue circle", "Hello, World! 42",
             "ünïcödé café 😀", "a shape", "", "UPPER case   spaces", "red " * 120]
    ours = tokenizer(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ref = _open_clip_tokenizer()(texts).numpy()  # open_clip pads with 0, SD's tokenizer with EOS
    eos = tokenizer.eos_token_id
    assert eos == 49407 and tokenizer.bos_token_id == 49406 and len(tokenizer) == 49408
    for a, b in zip(ours, ref):
        a = np.asarray(a)
        n = int(np.argmax(b == eos)) + 1  # length up to the first EOS
        assert np.array_equal(a[:n], b[:n]) and (a[n:] == eos).all()
    assert len(ours[-1]) == 77 and ours[-1][-1] == eos  # truncated, still ends with EOS


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))
