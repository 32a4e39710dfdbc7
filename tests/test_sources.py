"""Data sources: every prompt-file format, the seeded split, reference folders and statistics, the scenes
as a source, and one clear error per bad input."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from qlip_jax.data.images import fid_resize
from qlip_jax.data.sources import (SPLITS, DataError, FileSource, SceneSource, load_reference_images, open_source,
                                   read_captions)

CAPTIONS = [f"caption number {i}" for i in range(40)]


def _texts(source, split):
    return [p.text for p in source.prompts(split)]


def test_plain_text_split_is_seeded_disjoint_and_complete(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(CAPTIONS[:20] + ["", "   "] + ["  two   spaces\there "] + CAPTIONS[20:]) + "\n")
    src = FileSource(str(path), seed=3)
    parts = {s: _texts(src, s) for s in SPLITS}
    assert sorted(sum(parts.values(), [])) == sorted(CAPTIONS + ["two spaces here"])  # blanks dropped, spaces
    # 41 captions: eval round(25%), calibration round(12.5%), train the rest
    assert [len(parts[s]) for s in SPLITS] == [26, 5, 10]
    again = FileSource(str(path), seed=3)
    assert all(_texts(again, s) == parts[s] for s in SPLITS)
    other = FileSource(str(path), seed=4)
    assert _texts(other, "eval") != parts["eval"]
    ids = [p.id for p in src.prompts("train")]
    assert ids[0].startswith("prompts-") and len(set(ids)) == len(ids)
    # within a split, file order is kept
    order = {c: i for i, c in enumerate(CAPTIONS)}
    ev = [order[t] for t in parts["eval"] if t in order]
    assert ev == sorted(ev)
    d = src.describe()
    assert d["kind"] == "files" and d["seed"] == 3 and d["sizes"] == {"train": 26, "calibration": 5, "eval": 10}
    path.write_text("\n".join(CAPTIONS))
    assert FileSource(str(path), seed=3).describe()["prompts_sha256"] != d["prompts_sha256"]


def test_jsonl_and_csv_caption_columns(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "text": c}) for i, c in enumerate(CAPTIONS[:6])) + "\n\n")
    assert [c for _, c in read_captions(str(jl))] == CAPTIONS[:6]  # 'text' found without being named
    jl.write_text("\n".join(json.dumps({"prompt_en": c, "caption": "no"}) for c in CAPTIONS[:6]))
    assert [c for _, c in read_captions(str(jl), "prompt_en")] == CAPTIONS[:6]
    with pytest.raises(DataError, match=r"p.jsonl line 1: no caption column \('cap'\); its columns are "
                                        r"\['caption', 'prompt_en'\].*--caption-column"):
        read_captions(str(jl), "cap")
    cs = tmp_path / "p.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows([[f"{i}.png", c] for i, c in enumerate(CAPTIONS[:5])] + [["x.png", 'with, a "comma"']])
    assert [c for _, c in read_captions(str(cs))] == CAPTIONS[:5] + ['with, a "comma"']
    with open(cs, "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "desc"], ["0.png", "a cat"]])
    with pytest.raises(DataError, match=r"p.csv header: no caption column \(any of 'caption', 'text', 'prompt'\); "
                                        r"its columns are \['desc', 'file_name'\]"):
        FileSource(str(cs))


def test_coco_captions_keep_an_images_captions_together(tmp_path):
    anns = [{"id": 100 + k, "image_id": k // 5, "caption": f"image {k // 5} caption {k % 5}"} for k in range(50)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in range(10)], "annotations": anns}))
    src = FileSource(str(path), seed=0)
    seen = {}
    for s in SPLITS:
        for t in _texts(src, s):
            seen.setdefault(t.split(" caption")[0], set()).add(s)
    assert len(seen) == 10 and all(len(v) == 1 for v in seen.values())  # each image in one split only
    assert sum(len(src.prompts(s)) for s in SPLITS) == 50
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(CAPTIONS[:4]))
    assert [c for _, c in read_captions(str(lst))] == CAPTIONS[:4]
    lst.write_text(json.dumps({"captions": CAPTIONS}))
    with pytest.raises(DataError, match="COCO captions"):
        read_captions(str(lst))
    path.write_text(json.dumps({"annotations": [{"image_id": 1, "text": "x"}]}))
    with pytest.raises(DataError, match=r"annotations\[0\] has no 'caption'"):
        read_captions(str(path))


def test_empty_or_missing_prompt_file(tmp_path):
    for name, content in (("e.txt", ""), ("b.txt", "\n  \n\t\n"), ("e.jsonl", ""), ("e.csv", "caption\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=f"prompt file .*{name} has no captions"):
            FileSource(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        FileSource(str(tmp_path / "nope.txt"))
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="at least 3"):
        FileSource(str(tmp_path / "two.txt"))


def test_fid_resize_crops_the_center_and_keeps_colors():
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :32], img[:, 96:] = (255, 0, 0), (255, 0, 0)
    img[:, 32:96] = (0, 200, 0)  # the central square
    out = fid_resize(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out == (0, 200, 0)).all()
    tall = np.full((30, 20, 3), 77, np.uint8)  # upscaled: short side 20 -> 32
    assert (fid_resize(tall, 32) == 77).all()


def _reference_folder(path):
    path.mkdir()
    (path / "sub").mkdir()
    Image.fromarray(np.full((40, 60, 3), 10, np.uint8)).save(path / "a.png")
    Image.fromarray(np.full((100, 80, 3), 200, np.uint8)).save(path / "sub" / "b.JPG", quality=100)
    Image.fromarray(np.full((50, 50), 128, np.uint8)).save(path / "c.webp", lossless=True)  # grayscale
    (path / "d.png").write_bytes(b"not a png")
    (path / "notes.txt").write_text("ignored")
    return path


def test_reference_folder_any_format_and_size(tmp_path):
    ref = _reference_folder(tmp_path / "ref")
    (tmp_path / "p.txt").write_text("\n".join(CAPTIONS[:8]))
    src = FileSource(str(tmp_path / "p.txt"), reference=str(ref))
    images = src.reference_images(32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8  # a.png, c.webp, sub/b.JPG; d.png skipped
    np.testing.assert_allclose(images.reshape(3, -1).mean(1), [10, 128, 200], atol=1.5)
    assert src.reference_images(16, limit=2).shape == (2, 16, 16, 3)
    batches = list(src.reference_batches(32, batch=2))
    assert [b.shape[0] for b in batches] == [2, 1] and np.array_equal(np.concatenate(batches), images)
    assert src.reference_stats() is None and src.describe()["reference"]["files"] == 4


def test_reference_folder_without_a_readable_image(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(CAPTIONS[:8]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    (bad / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match=r"reference folder .*bad has no readable image .*unreadable file\(s\), "
                                        r"e.g. \['x.png'\]"):
        FileSource(str(tmp_path / "p.txt"), reference=str(bad))
    with pytest.raises(DataError, match="no readable image"):
        load_reference_images(str(bad), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable image"):
        FileSource(str(tmp_path / "p.txt"), reference=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="reference not found"):
        FileSource(str(tmp_path / "p.txt"), reference=str(tmp_path / "nope"))


def test_reference_statistics_npz(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(CAPTIONS[:8]))
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(6), rng.standard_normal((6, 6))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=a @ a.T)
    src = FileSource(str(tmp_path / "p.txt"), reference=str(tmp_path / "ref.npz"))
    stats = src.reference_stats()
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, a @ a.T)
    assert src.reference_images(32) is None and len(src.describe()["reference"]["sha256"]) == 16
    np.savez(tmp_path / "bad.npz", mean=mu, cov=a)
    with pytest.raises(DataError, match=r"bad.npz has keys \['cov', 'mean'\]; Inception statistics need 'mu' and "
                                        "'sigma'"):
        FileSource(str(tmp_path / "p.txt"), reference=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=a[:3])
    with pytest.raises(DataError, match=r"must be \[D\] and \[D, D\]"):
        FileSource(str(tmp_path / "p.txt"), reference=str(tmp_path / "shape.npz"))


def test_scene_source_wraps_the_prompt_sets_and_parser():
    from qlip_jax.data.scenes import prompt_set, render, scene_of

    src = open_source()
    assert isinstance(src, SceneSource) and src.describe()["kind"] == "scenes"
    assert [r.text for r in src.prompts("calibration")] == [r.text for r in prompt_set("calibration")]
    records = src.prompts("eval")[:6]
    images = src.reference_images(64, limit=6)
    assert np.array_equal(images[2], render(scene_of(records[2]), 64))
    align = src.scorers()["alignment"]
    own = align(images, records)
    shifted = align(np.roll(images, 1, axis=0), records)
    assert own.shape == (6,) and own.mean() > 0.9 and own.mean() > shifted.mean() + 0.2
    with pytest.raises(ValueError, match="--reference needs --prompts"):
        open_source(reference="somewhere")
