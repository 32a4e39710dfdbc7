"""The `qlip sample` command on a tiny random model folder."""

import numpy as np
import pytest
from PIL import Image

from qlip_jax.cli import main


def test_sample_writes_a_captioned_grid(tiny_sd_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", tiny_sd_dir, "--prompt", "a red star", "--prompt", "a blue circle",
                 "--steps", "3", "--precision", "w8a8", "--calib-prompts", "2", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[1] == 2 * 64 and img.std() > 1  # two 32px tiles upscaled x2


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_sd_dir, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit, match="exists"):
        main(["sample", "--model", tiny_sd_dir, "--prompt", "x", "--out", str(out)])
    assert out.read_bytes() == b"precious"
    with pytest.raises(SystemExit, match="--precision must be"):
        main(["sample", "--model", tiny_sd_dir, "--prompt", "x", "--precision", "int4", "--out", str(tmp_path / "a.png")])
    bad = tmp_path / "sched.npy"
    np.save(bad, np.zeros((3, 5), np.int32))
    with pytest.raises(ValueError, match=r"expected \[B, T, L\]"):
        main(["sample", "--model", tiny_sd_dir, "--prompt", "x", "--steps", "3", "--precision", str(bad),
              "--calib-prompts", "1", "--out", str(tmp_path / "b.png")])
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "c.png")])
