"""Issue #37's acceptance run: the QLIP chain on a user's own model and data, through the programs' own
``main(argv)``.

The user's folder is a tiny random SD v1 re-saved by diffusers in float16 (``variant='fp16'``) without a
safety checker (``model_index.json`` then holds ``"safety_checker": [null, null]``); the data are a 64-line
caption file and a folder of reference PNGs of mixed sizes. Calibrate (min-max, and Q-Diffusion with a
handful of reconstruction iterations) -> train the selector (GIQA over Inception features of the reference
folder) -> evaluate (FP, W4A8, QLIP: FID, sFID, CLIP score with a tiny random CLIP folder, PSNR, BitOPs,
FAB) -> ``qlip sample --precision qlip``. Each step's output is checked for values.
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
STEPS, GUIDANCE = 3, 3.0
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
THINGS = ("star", "circle", "square", "cat", "house", "tree", "boat", "car")


def _program(path: str):
    """A program's ``main`` loaded from its file (train/ and eval/ are scripts, not packages)."""
    sys.path.insert(0, os.path.dirname(path))
    return runpy.run_path(path)["main"]


@pytest.fixture(scope="module")
def user_world(tiny_sd_dir, tmp_path_factory):
    """``(model folder, caption file, reference folder)`` as a user brings them."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    root = tmp_path_factory.mktemp("user")
    model = root / "sd-fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(model, variant="fp16")
    captions = root / "captions.txt"
    captions.write_text("\n".join(f"a {c} {t} on a plain background" for c in COLOURS for t in THINGS) + "\n")
    ref = root / "photos"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):   # any sizes: the FID convention resizes and centre-crops them
        h, w = int(rng.integers(24, 80)), int(rng.integers(24, 80))
        base = rng.integers(0, 256, 3)
        img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(ref / f"{i:02d}.png")
    return str(model), str(captions), str(ref)


@pytest.mark.slow  # the whole chain, four programs
def test_own_model_and_data_end_to_end(user_world, tiny_clip_dir, tmp_path, capsys):
    import jax

    from qlip_jax.cli import main as qlip
    from qlip_jax.data.sources import FileSource
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint, read_quant_info
    from qlip_jax.quant.registry import average_act_bits
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.selector.selector import Selector

    model, captions, ref = user_world
    with open(os.path.join(model, "model_index.json")) as f:
        assert json.load(f)["safety_checker"] == [None, None]
    assert os.path.exists(os.path.join(model, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    sd = load_stable_diffusion(model, variant="fp16")
    fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"])
    user = ["--model", model, "--variant", "fp16", "--prompts", captions]
    sampler = ["--steps", str(STEPS), "--guidance", str(GUIDANCE)]

    # 1. calibrate: min-max, then Q-Diffusion (2 reconstruction iterations) from the same prompts
    calibrate = _program(os.path.join(HERE, "..", "train", "calibrate.py"))
    q = {m: str(tmp_path / "quant" / m) for m in ("minmax", "qdiff")}
    base = [*user, *sampler, "--act-bits", "4", "6", "8", "--weight-bits", "4", "--calib-prompts", "2",
            "--keep-steps", "2"]
    assert calibrate([*base, "--method", "minmax", "--out", q["minmax"]]) == 0
    assert calibrate([*base, "--method", "qdiff", "--recon-iters", "2", "--recon-batch", "2",
                      "--out", q["qdiff"]]) == 0
    states = {}
    for m, folder in q.items():
        info = read_quant_info(folder)
        assert info["model_fingerprint"] == fingerprint and info["method"] == m
        assert info["quant_config"]["act_bits"] == [4, 6, 8] and info["quant_config"]["weight_bits"] == 4
        setup, _ = load_quant_setup(folder, fingerprint, sd.params["unet"])
        scales = np.concatenate([np.ravel(np.asarray(s["a_scale"])) for s in setup.state.values()])
        assert np.isfinite(scales).all() and (scales > 0).all()
        states[m] = setup
    # the reconstruction moved the weights' rounding away from round-to-nearest somewhere
    codes = lambda s: np.concatenate([np.ravel(np.asarray(v["w_code"])) for v in s.state.values()])  # noqa: E731
    assert (codes(states["qdiff"]) != codes(states["minmax"])).any()
    assert read_quant_info(q["qdiff"])["recon"]["iters"] == 2

    # 2. the selector: GIQA (KNN) over Inception pool features of the reference photos, a few iterations
    train_selector = _program(os.path.join(HERE, "..", "train", "train_selector.py"))
    sel_dir = str(tmp_path / "selector")
    assert train_selector([*user, "--reference", ref, *sampler, "--quant", q["minmax"], "--work",
                           str(tmp_path / "work"), "--out", sel_dir, "--quality", "giqa-knn", "--train-prompts", "8",
                           "--heldout", "4", "--t2q-steps", "20", "--q2b-steps", "3", "--batch", "2",
                           "--rows-per-prompt", "2", "--group-size", "1", "--first-fp-steps", "1", "--quiet"]) == 0
    with open(os.path.join(sel_dir, "selector.json")) as f:
        info = json.load(f)["info"]
    assert info["model_fingerprint"] == fingerprint and info["quality"] == "giqa-knn"
    assert info["data"]["prompts"] == os.path.abspath(captions)
    assert info["data"]["reference"]["files"] == 12
    assert info["quality_target"]["kind"] == "giqa-knn" and info["quality_target"]["features"] == "inception-v3-pool"
    assert np.isfinite(info["t2q"]["train_mse"]) and 4 <= info["heldout_fab_mean"] <= 8
    assert info["sampler"]["steps"] == STEPS

    # 3. evaluate FP, W4A8 and QLIP on the evaluation split against the reference photos
    evaluate = _program(os.path.join(HERE, "..", "eval", "evaluate.py"))
    out = tmp_path / "report"
    assert evaluate([*user, "--reference", ref, "--clip", tiny_clip_dir, "--quant", q["minmax"], "--selector",
                     sel_dir, "--settings", "W4A8", "--n", "4", *sampler, "--batch", "4", "--ref-n", "12",
                     "--cache", str(tmp_path / "cache"), "--grid-prompts", "2", "--out", str(out), "--quiet"]) == 0
    with open(out / "report.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows)[:2] == ["FP", "W4A8 (minmax)"] and len(rows) == 3
    qlip_row = rows[list(rows)[2]]
    assert qlip_row["kind"] == "qlip"
    for r in rows.values():
        assert float(r["fid"]) > 0 and float(r["sfid"]) > 0                # 4 images against 12 photos
        assert 0 <= float(r["clip_score"]) <= 100
    assert float(rows["FP"]["psnr"]) == np.inf and np.isfinite(float(rows["W4A8 (minmax)"]["psnr"]))
    assert float(rows["FP"]["fab"]) == 32 and float(rows["W4A8 (minmax)"]["fab"]) == 8
    assert 4 <= float(qlip_row["fab"]) <= 8
    assert float(rows["FP"]["bitops_rel"]) == 1 and 0 < float(rows["W4A8 (minmax)"]["bitops_rel"]) < 1

    # 4. qlip sample --precision qlip: each prompt's bits are the selector's for it
    capsys.readouterr()
    png = tmp_path / "qlip.png"
    assert qlip(["sample", *user, "--n", "2", *sampler, "--precision", "qlip", "--selector", sel_dir,
                 "--out", str(png)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(png) and os.path.getsize(png) > 0
    texts = [p.text for p in FileSource(captions).prompts("eval")[:2]]
    sel = Selector.load(sel_dir, sd)
    pipe = Text2Image(sd, "ddim", STEPS, quant=sel.quant)
    qual, sched = sel.predict(pipe, pipe.encode(texts))
    fab = np.asarray(average_act_bits(jax.numpy.asarray(sched), sel.quant.config))
    assert lines[:2] == [f"average activation bits {fab[i]:.2f}, predicted quality {qual[i]:.3f}: {texts[i]}"
                         for i in range(2)]
