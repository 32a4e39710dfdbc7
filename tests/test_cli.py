"""The `qlip sample` and `qlip demo` commands on a tiny random model folder (with a tiny min-max quantizer
and a random-parameter selector, tests/tiny_qlip.py)."""

import csv

import numpy as np
import pytest
from PIL import Image
from tiny_qlip import STEPS, tiny_quant_dir, tiny_selector_dir  # noqa: F401  (fixtures)

from refusal import refused

from qlip_jax.cli import main


CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("star", "circle", "square", "cat")]


def _prompt_file(tmp_path) -> str:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return str(path)


def test_sample_writes_a_captioned_grid(tiny_sd_dir, tiny_quant_dir, tmp_path):
    """Two prompts at W4A8 from a quantizer folder: the sampler the other tests of this file compile (the
    same steps, batch and quantizer), so it comes from the run's compile cache."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", tiny_sd_dir, "--prompt", "a red star", "--prompt", "a blue circle",
                 "--steps", str(STEPS), "--guidance", "3", "--precision", "w4a8", "--quant", tiny_quant_dir,
                 "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[1] == 2 * 64 and img.std() > 1  # two 32px tiles upscaled x2


def test_sample_prompt_file_and_no_silent_scene_calibration(tiny_sd_dir, tmp_path, capsys):
    """``--prompts FILE``: without ``--prompt`` the first ``--n`` evaluation prompts of the file are sampled,
    and a min-max quantizer for another model is calibrated on the file's calibration split; without
    ``--prompts`` (and ``--quant``) a quantized precision on another model is refused."""
    from qlip_jax.data.sources import FileSource

    path = _prompt_file(tmp_path)
    base = ["sample", "--model", tiny_sd_dir, "--steps", str(STEPS), "--precision", "w8a8"]
    assert main(base + ["--prompts", path, "--n", "2", "--calib-prompts", "3", "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr()
    want = [p.text for p in FileSource(path).prompts("eval")[:2]]
    assert out.out.splitlines()[:2] == [f"average activation bits 8.00: {p}" for p in want]
    assert f"min-max calibration of W8A[8] on 2 prompts of {path}" in out.err  # 16 captions: 2 calibration
    refused(main, base + ["--prompt", "a red star", "--out", tmp_path / "b.png"], capsys,
            r"no quantizer for --precision w8a8 on this --model; pass --quant DIR .* or --prompts FILE")
    refused(main, ["sample", "--model", tiny_sd_dir, "--out", tmp_path / "c.png"], capsys,
            "no prompt given; give --prompt TEXT .* or --prompts FILE")
    refused(main, ["sample", "--model", tiny_sd_dir, "--prompts", path, "--n", "0", "--out", tmp_path / "c.png"],
            capsys, "--n must be >= 1, got 0")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    refused(main, ["sample", "--model", tiny_sd_dir, "--prompt", "x", "--out", out], capsys, "exists")
    assert out.read_bytes() == b"precious"
    refused(main, ["sample", "--model", tiny_sd_dir, "--prompt", "x", "--precision", "int4", "--out",
                   tmp_path / "a.png"], capsys, "--precision must be")
    bad = tmp_path / "sched.npy"
    np.save(bad, np.zeros((3, 5), np.int32))
    refused(main, ["sample", "--model", tiny_sd_dir, "--prompt", "x", "--steps", "3", "--precision", bad,
                   "--prompts", _prompt_file(tmp_path), "--calib-prompts", "1", "--out", tmp_path / "b.png"], capsys, r"sched.npy: the schedule has 5 layer")
    refused(main, ["sample", "--model", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "c.png"], capsys,
            "model folder not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "keep.png", "sched.npy"]


# ----------------------------------------------------------------------------------------------
# qlip sample --precision qlip / SCHEDULE.json / --quant, and qlip demo (tiny quantizer and selector)


def _tiny_selector(tiny_sd, folder):
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.selector.selector import Selector

    sel = Selector.load(folder, tiny_sd)
    return sel, Text2Image(tiny_sd, "ddim", STEPS, quant=sel.quant)


def test_sample_qlip_prints_each_prompts_bits(tiny_sd, tiny_sd_dir, tiny_selector_dir, tmp_path, capsys):
    from qlip_jax.quant.registry import average_act_bits

    prompts = ["a shape", "a large striped blue circle at the top left on a yellow background"]
    out = tmp_path / "qlip.png"
    assert main(["sample", "--model", tiny_sd_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--steps",
                 str(STEPS), "--guidance", "3", "--precision", "qlip", "--selector", tiny_selector_dir,
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out) and np.asarray(Image.open(out)).shape[1] == 2 * 64
    sel, pipe = _tiny_selector(tiny_sd, tiny_selector_dir)
    q, sched = sel.predict(pipe, pipe.encode(prompts))
    fab = np.asarray(average_act_bits(sched, sel.quant.config))
    assert lines[:2] == [f"average activation bits {fab[i]:.2f}, predicted quality {q[i]:.3f}: {prompts[i]}"
                         for i in range(2)]
    assert all(4 <= f <= 8 for f in fab)


def test_sample_json_schedule_and_quantizer_choice(tiny_sd, tiny_sd_dir, tiny_quant_dir, tmp_path, capsys,
                                                    monkeypatch):
    import qlip_jax.cli as cli
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
    from qlip_jax.selector.schedule_io import save_schedule_json

    setup, _ = load_quant_setup(tiny_quant_dir, model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"]))
    sched = np.full((STEPS, len(setup.registry)), setup.config.index_of(6), np.int32)
    sched[0] = setup.config.fp_index                   # first step in float, then 6 bits
    path = tmp_path / "s.json"
    save_schedule_json(path, sched, setup.registry, setup.config, prompt="a red star")
    fab = f"average activation bits {(32 + 6 * (STEPS - 1)) / STEPS:.2f}: a red star"
    # two prompts (as in the other tests of this file: one compiled sampler serves them all); the schedule
    # applies to both, and the first line is the first prompt's
    base = ["sample", "--model", tiny_sd_dir, "--prompt", "a red star", "--prompt", "a blue circle", "--steps",
            str(STEPS), "--guidance", "3"]
    assert main(base + ["--precision", str(path), "--quant", tiny_quant_dir, "--out", str(tmp_path / "j.png")]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == fab and "min-max" not in out.err
    refused(main, base + ["--precision", "w4a12", "--quant", tiny_quant_dir, "--out", str(tmp_path / "x.png")],
            capsys, r"has no W4A12")
    # no usable shipped state: min-max calibration of the widths the JSON records
    monkeypatch.setattr(cli, "shipped_quant_dir", lambda: str(tmp_path / "assets" / "quant"))
    prompts = _prompt_file(tmp_path)
    assert main(base + ["--precision", str(path), "--prompts", prompts, "--calib-prompts", "1",
                        "--out", str(tmp_path / "k.png")]) == 0
    out = capsys.readouterr()
    assert f"min-max calibration of W4A[4, 6, 8] on 1 prompts of {prompts}" in out.err
    assert out.out.splitlines()[0] == fab
    # a shipped state with the width is used for wXaY; one without it falls back (the model is loaded first)
    monkeypatch.setattr(cli, "shipped_quant_dir", lambda: tiny_quant_dir)
    assert main(base + ["--precision", "W4A8", "--out", str(tmp_path / "u.png")]) == 0
    out = capsys.readouterr()
    assert "using the shipped quantizer state (minmax, W4A[4, 6, 8])" in out.err and "min-max" not in out.err
    assert out.out.splitlines()[0] == "average activation bits 8.00: a red star"


def test_qlip_needs_a_selector(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    import qlip_jax.cli as cli

    refused(main, ["sample", "--model", tiny_sd_dir, "--prompt", "x", "--precision", "qlip", "--selector",
                   str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")], capsys, "no QLIP selector at .*nope")
    monkeypatch.setattr(cli, "shipped_selector_dir", lambda: str(tmp_path / "assets" / "selector"))
    monkeypatch.setattr(cli, "shipped_quant_dir", lambda: str(tmp_path / "assets" / "quant"))
    refused(main, ["sample", "--prompt", "x", "--precision", "qlip", "--out", str(tmp_path / "a.png")], capsys,
            "shipped QLIP selector is missing .*train/train_selector.py")
    refused(main, ["demo", "--out", str(tmp_path / "demo")], capsys,
            "shipped quantizer state is missing .*train/calibrate.py")
    (tmp_path / "q").mkdir()
    refused(main, ["demo", "--quant", str(tmp_path / "q"), "--out", str(tmp_path / "demo")], capsys,
            "shipped QLIP selector is missing .*--selector DIR")
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # a whole program end to end
def test_demo_on_the_tiny_model(tiny_sd_dir, tiny_quant_dir, tiny_selector_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", tiny_sd_dir, "--quant", tiny_quant_dir, "--selector", tiny_selector_dir, "--n", "4",
            "--steps", str(STEPS), "--guidance", "3", "--batch", "4", "--ref-n", "4", "--inception", "off",
            "--cache", str(tmp_path / "cache"), "--quiet", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = [l for l in printed.splitlines() if l.startswith("| ")]
    assert [l.split(" | ")[0][2:] for l in table[1:]] == ["FP", "W4A4 (minmax)", "W4A6 (minmax)", "W4A8 (minmax)",
                                                          "QLIP (lambda 0.1)"]
    assert table[1].startswith("| FP | 1.0000 |") and " inf | 1.000 |" in table[1]
    assert "report: " + str(out / "report.md") in printed and "samples.png" in printed
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["FP", "W4A4 (minmax)", "W4A6 (minmax)", "W4A8 (minmax)",
                                           "QLIP (lambda 0.1)"]
    assert float(rows[0]["psnr"]) == np.inf and float(rows[0]["bitops_rel"]) == 1.0
    assert [float(r["fab"]) for r in rows[1:4]] == pytest.approx([4, 6, 8])
    # a non-empty --out is refused before any work, and what is there is kept
    (out / "notes.txt").write_text("mine")
    refused(main, argv, capsys, "not empty; pass --overwrite")
    assert (out / "notes.txt").read_text() == "mine"
