"""train/calibrate.py with ``--prompts FILE``: it calibrates on the file's calibration split (the same state
as calibrating on those prompts directly), records the data source, and refuses another model without it."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from refusal import refused

from qlip_jax.data.sources import FileSource
from qlip_jax.ptq.calibration import calibrate, collect_calibration_data
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.state import QuantConfig
from qlip_jax.sampling.pipeline import Text2Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _calibrate_main():
    spec = importlib.util.spec_from_file_location("calibrate_program", os.path.join(ROOT, "train", "calibrate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow  # a whole program end to end
def test_calibrate_on_the_prompt_files_calibration_split(tiny_sd, tiny_sd_dir, tmp_path, capsys):
    main = _calibrate_main()
    prompts = tmp_path / "captions.jsonl"
    prompts.write_text("\n".join(f'{{"caption": "a {c} shape number {i}"}}' for i, c in
                                 enumerate(["red", "blue", "green", "gray"] * 4)))
    common = ["--model", tiny_sd_dir, "--method", "minmax", "--act-bits", "8", "--weight-bits", "8",
              "--steps", "2", "--keep-steps", "2", "--guidance", "3", "--seed", "5"]
    out = tmp_path / "q"
    assert main(common + ["--prompts", str(prompts), "--calib-prompts", "2", "--out", str(out)]) == 0
    setup, info = load_quant_setup(str(out), model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"]))
    src = FileSource(str(prompts))
    assert info["data"] == src.describe() and info["calibration_prompts"] == 2
    # the same state as calibrating directly on the first two calibration-split captions
    texts = [p.text for p in src.prompts("calibration")[:2]]
    pipe = Text2Image(tiny_sd, "ddim", 2)
    data = collect_calibration_data(pipe, texts, 5 + np.arange(2), 3.0, 2)
    want = calibrate(pipe, QuantConfig(act_bits=(8,), weight_bits=8), data, "minmax")
    got_leaves, want_leaves = jax.tree.leaves(setup.state), jax.tree.leaves(want.state)
    assert len(got_leaves) == len(want_leaves) > 0
    assert all(np.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got_leaves, want_leaves))
    refused(main, common + ["--out", tmp_path / "r"], capsys, "--model needs --prompts FILE")
    assert not (tmp_path / "r").exists()

    # PTQD from that folder: its state unchanged (no base calibration), a correction fitted on top
    ptqd_common = [a if a != "minmax" else "ptqd" for a in common] + ["--prompts", str(prompts), "--calib-prompts",
                                                                       "2"]
    assert main(ptqd_common + ["--init-from", str(out), "--out", str(tmp_path / "p")]) == 0
    ptqd, pinfo = load_quant_setup(str(tmp_path / "p"), model_fingerprint(tiny_sd.configs.unet,
                                                                         tiny_sd.params["unet"]))
    assert pinfo["init_from"] == str(out) and pinfo["init"] == "minmax" and ptqd.ptqd is not None
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ptqd.state), got_leaves))
    refused(main, [a if a != "8" else "6" for a in ptqd_common] + ["--init-from", out, "--out", tmp_path / "r"],
            capsys, r"--init-from .* is W8A\[8\] without --attn-matmul, not W6A\[6\]")
