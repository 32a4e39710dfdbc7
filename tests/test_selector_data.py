"""train/train_selector.py on the user's data (issue #37 items 3 and 5): its label caches in ``--work`` are
keyed by model, data source, quality target and sampler (a second model recomputes its labels), a selector
refuses another model and notes another step count, and quality targets the data cannot give are refused."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from tiny_qlip import STEPS, tiny_quant_dir, tiny_selector_dir  # noqa: F401  (fixtures)

from refusal import refused

from qlip_jax.errors import MismatchError
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint, save_quant_setup
from qlip_jax.selector.quality import QualityTargets
from qlip_jax.selector.selector import Selector

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
import train_selector  # noqa: E402

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("star", "circle", "square", "cat")]


def _data(tmp_path):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(ref / f"{i}.png")
    return str(prompts), str(ref)


def _other_model(tiny_sd_dir, tmp_path) -> str:
    """A copy of the tiny model with another UNet output bias (so its images, and labels, differ)."""
    other = str(tmp_path / "other-sd")
    shutil.copytree(tiny_sd_dir, other)
    path = os.path.join(other, "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + np.float32(0.5)
    save_file(tensors, path)
    return other


def _labels(work) -> dict[str, QualityTargets]:
    return {n: QualityTargets.load(os.path.join(work, n)) for n in sorted(os.listdir(work))
            if n.startswith("labels-train") and n.endswith(".npz")}


@pytest.mark.slow  # a whole program end to end
def test_a_second_model_in_the_same_work_recomputes_its_labels(tiny_sd_dir, tiny_sd, tiny_quant_dir, tmp_path,
                                                               monkeypatch):
    from qlip_jax.data.sources import FileSource
    from qlip_jax.models.sd import load_stable_diffusion

    # the label's scorer is not under test here (GIQA is, in test_giqa_target_*): the mean pixel value
    monkeypatch.setattr(train_selector, "quality_target",
                        lambda args, source: lambda images, records: images.astype(np.float64).mean(axis=(1, 2, 3)))
    prompts, ref = _data(tmp_path)
    other = _other_model(tiny_sd_dir, tmp_path)
    fp_a = model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"])
    sd_b = load_stable_diffusion(other)
    fp_b = model_fingerprint(sd_b.configs.unet, sd_b.params["unet"])
    assert fp_a != fp_b
    setup, _ = load_quant_setup(tiny_quant_dir, fp_a)
    quant_b = str(tmp_path / "quant-b")
    save_quant_setup(quant_b, setup, fp_b, {"method": "minmax"})
    work = str(tmp_path / "work")
    common = ["--prompts", prompts, "--reference", ref, "--work", work, "--out", str(tmp_path / "out"),
              "--train-prompts", "3", "--heldout", "2", "--steps", "2", "--size", "32", "--t2q-steps", "3",
              "--q2b-steps", "1", "--stop-at", "0", "--group-size", "1", "--first-fp-steps", "0", "--quiet"]
    assert train_selector.main(["--model", tiny_sd_dir, "--quant", tiny_quant_dir, *common]) == 0
    first = _labels(work)
    assert len(first) == 1
    (name_a, labels_a), = first.items()
    stamp = os.path.getmtime(os.path.join(work, name_a))
    assert train_selector.main(["--model", other, "--quant", quant_b, *common]) == 0
    both = _labels(work)
    assert len(both) == 2, sorted(os.listdir(work))          # not the first model's labels again
    (name_b, labels_b), = [(n, t) for n, t in both.items() if n != name_a]
    assert labels_a.texts == labels_b.texts                  # same prompts (the file's train split) ...
    assert labels_a.texts == [p.text for p in FileSource(prompts).prompts("train")[:3]]
    assert not np.allclose(labels_a.raw, labels_b.raw)      # ... but the other model's images
    assert train_selector.main(["--model", tiny_sd_dir, "--quant", tiny_quant_dir, *common]) == 0
    assert len(_labels(work)) == 2 and os.path.getmtime(os.path.join(work, name_a)) == stamp  # reused


def test_label_key_names_model_data_quality_and_sampler(tmp_path):
    from qlip_jax.data.sources import FileSource, SceneSource

    prompts, ref = _data(tmp_path)
    parse = lambda *extra: train_selector.build_parser().parse_args(  # noqa: E731
        ["--quant", "q", "--work", "w", "--out", "o", *extra])
    base = train_selector.label_key(parse(), "a" * 40, FileSource(prompts, ref))
    others = [train_selector.label_key(parse(), "b" * 40, FileSource(prompts, ref)),
              train_selector.label_key(parse(), "a" * 40, FileSource(prompts, ref, seed=1)),
              train_selector.label_key(parse(), "a" * 40, FileSource(prompts)),
              train_selector.label_key(parse(), "a" * 40, SceneSource()),
              train_selector.label_key(parse("--quality", "giqa-gmm"), "a" * 40, FileSource(prompts, ref)),
              train_selector.label_key(parse("--steps", "5"), "a" * 40, FileSource(prompts, ref)),
              train_selector.label_key(parse("--guidance", "3"), "a" * 40, FileSource(prompts, ref)),
              train_selector.label_key(parse("--real", "7"), "a" * 40, FileSource(prompts, ref))]
    assert base == train_selector.label_key(parse(), "a" * 40, FileSource(prompts, ref))
    assert len({base, *others}) == 1 + len(others)


def test_selector_refuses_another_model_and_notes_another_step_count(tiny_sd, tiny_sd_dir, tiny_selector_dir,
                                                                     tmp_path, capsys):
    from qlip_jax.cli import main

    fingerprint = model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"])
    for name, fp in (("mine", fingerprint), ("theirs", "0" * len(fingerprint))):
        folder = tmp_path / name
        shutil.copytree(tiny_selector_dir, folder)
        meta = json.loads((folder / "selector.json").read_text())
        meta["info"].update(model_fingerprint=fp, sampler={"scheduler": "ddim", "steps": 5})
        (folder / "selector.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError, match="was trained on another model"):
        Selector.load(str(tmp_path / "theirs"), tiny_sd)
    refused(main, ["sample", "--model", tiny_sd_dir, "--prompt", "x", "--precision", "qlip", "--selector",
                   tmp_path / "theirs", "--out", tmp_path / "g.png"], capsys,
            r"was trained on another model .*train a selector for this --model")
    sel = Selector.load(str(tmp_path / "mine"), tiny_sd)
    assert sel.steps_note(5) is None
    assert sel.steps_note(STEPS) == (f"note: this selector was trained for 5 sampler steps and is used at {STEPS}: "
                                     "its schedules were not trained for that count (train_selector.py --steps "
                                     f"{STEPS} trains one)")


def test_quality_targets_the_data_cannot_give_are_refused(tiny_sd_dir, tmp_path, capsys):
    prompts, ref = _data(tmp_path)
    npz = tmp_path / "stats.npz"
    np.savez(npz, mu=np.zeros(3), sigma=np.eye(3))
    base = ["--quant", tmp_path, "--work", tmp_path / "w", "--out", tmp_path / "s"]
    refused(train_selector.main, base + ["--model", tiny_sd_dir], capsys, "--model needs --prompts FILE")
    refused(train_selector.main, base + ["--prompts", prompts], capsys,
            "--quality giqa-knn with --prompts needs --reference DIR")
    refused(train_selector.main, base + ["--prompts", prompts, "--reference", npz], capsys,
            "holds Inception statistics; GIQA needs the real images' features")
    refused(train_selector.main, base + ["--prompts", prompts, "--reference", ref, "--quality", "alignment"],
            capsys, "--quality alignment needs the scene parser")
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "s")
