"""Integer weight codes (qlip_jax/quant/codes.py): computed exactly once, stored packed two 4-bit codes
per byte, read by the quantized layers; old quantizer folders converted (with a note) or refused."""

import os

import numpy as np
import pytest

from qlip_jax.naming import modules_by_name
from qlip_jax.ptq.calibration import calibrate
from qlip_jax.quant.codes import pack_int4, strip_weight_codes, unpack_int4, weight_codes
from qlip_jax.ptq.persist import WEIGHTS_FILE, load_quant_setup, model_fingerprint, save_quant_setup
from qlip_jax.quant.state import QuantConfig
from qlip_jax.training.checkpoint import Checkpointer


def _nearest64(kernel, scale, bits):
    hi = 2 ** (bits - 1) - 1
    return np.clip(np.round(np.asarray(kernel, np.float64) / np.asarray(scale, np.float64)), -hi - 1, hi)


def test_pack_int4_round_trip_and_layout():
    rng = np.random.default_rng(0)
    for shape in [(7,), (3, 3, 5, 4), (1,), (0,), (2, 16)]:
        codes = rng.integers(-8, 8, shape).astype(np.int8)
        packed = pack_int4(codes)
        assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
        np.testing.assert_array_equal(unpack_int4(packed, shape), codes)
    # element 2i in the low nibble, 2i + 1 in the high one, two's complement
    np.testing.assert_array_equal(pack_int4(np.array([1, -1, -8, 7, 3])), [0xF1, 0x78, 0x03])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8]))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(np.zeros(3, np.uint8), (7, 2))


def test_codes_are_exact_stored_packed_and_survive_save_load(calib, tmp_path, capsys):
    """Every weight of the tiny model: the code is round(W / s) in float64 (so |W - code * s| <= s / 2
    unless clipped); saved, the codes take half a byte each beside float32 scales and load back equal;
    an old folder (no codes) is refused without the UNet's params and converted, with a note, with them."""
    pipe, data = calib
    params = pipe.sd.params["unet"]
    setup = calibrate(pipe, QuantConfig((4, 8), 4), data, "mse")
    layers = modules_by_name(params)
    n_codes = n_scales = 0
    for info in setup.registry.layers:
        st = setup.state[info.name]
        w, s, code = (np.asarray(layers[info.name]["kernel"], np.float64), np.asarray(st["w_scale"], np.float64),
                      np.asarray(st["w_code"]))
        np.testing.assert_array_equal(code, _nearest64(w, s, 4), err_msg=info.name)
        inside = (code > -8) & (code < 7)
        assert np.all(np.abs(w - code * s)[inside] <= (s / 2 * np.ones_like(w))[inside]), info.name
        n_codes, n_scales = n_codes + code.size, n_scales + s.size
    tag = model_fingerprint(pipe.sd.configs.unet, params)
    folder = str(tmp_path / "q")
    save_quant_setup(folder, setup, tag, {"method": "mse"})
    size = os.path.getsize(os.path.join(folder, WEIGHTS_FILE))
    assert n_codes / 2 + 4 * n_scales <= size <= n_codes / 2 + 4 * n_scales + 64 * 1024, size
    loaded, info = load_quant_setup(folder, tag)
    assert info["weight_codes"]["packing"] == "int4x2"
    for name, st in setup.state.items():
        for k, v in st.items():
            np.testing.assert_array_equal(np.asarray(loaded.state[name][k]), np.asarray(v), err_msg=f"{name} {k}")
    # 8-bit codes are stored one per byte and load back in the kernel's layout (a transposed code array
    # was once written in memory order and came back scrambled)
    setup8 = calibrate(pipe, QuantConfig((8,), 8), data, "minmax")
    save_quant_setup(str(tmp_path / "q8"), setup8, tag, {"method": "minmax"})
    loaded8, info8 = load_quant_setup(str(tmp_path / "q8"), tag)
    assert info8["weight_codes"]["packing"] == "int8"
    for name, st in setup8.state.items():
        if "w_code" in st:
            np.testing.assert_array_equal(np.asarray(loaded8.state[name]["w_code"]), np.asarray(st["w_code"]), name)
    # an old folder: the state without codes (scales and activation quantizers), no weight_codes entry
    old = str(tmp_path / "old")
    meta = {k: v for k, v in info.items() if k != "weight_codes"}
    Checkpointer(old, max_to_keep=1).save(0, strip_weight_codes(setup.state), meta)
    with pytest.raises(ValueError, match="old folder without integer weight codes"):
        load_quant_setup(old, tag)
    capsys.readouterr()
    converted, _ = load_quant_setup(old, tag, params)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "old format" in note[0]
    for name, st in setup.state.items():
        if "w_code" in st:
            np.testing.assert_array_equal(converted.state[name]["w_code"], st["w_code"])
    with pytest.raises(ValueError, match="no integer weight codes"):
        save_quant_setup(str(tmp_path / "bad"), converted.__class__(setup.config, setup.registry,
                                                                   strip_weight_codes(setup.state)), tag)


def test_weight_codes_fold_adaround_and_reject_soft_decisions():
    w = np.array([[0.26, -0.26, 0.74, 1.0]], np.float32)
    s = np.full(4, 0.5, np.float32) / 1.0
    np.testing.assert_array_equal(weight_codes(w, s, 4), [[1, -1, 1, 2]])           # 0.52 -> 1, 1.48 -> 1
    np.testing.assert_array_equal(weight_codes(w, s, 4, np.array([[0, 1, 1, 0]])), [[0, 0, 2, 2]])
    np.testing.assert_array_equal(weight_codes(w * 100, s, 4), [[7, -8, 7, 7]])         # clipped to the grid
    with pytest.raises(ValueError, match="0 or 1"):
        weight_codes(w, s, 4, np.full(w.shape, 0.5))
    with pytest.raises(ValueError, match="at most 8"):
        weight_codes(w, s, 16)


def test_shipped_quantizer_codes_equal_the_adaround_formula():
    """The shipped (old-format, qdiff) quantizer: converted on load, every code equals
    ``clip(floor(W / s) + w_round)`` from the float kernel and its stored decision, the quotient the
    correctly rounded float32 one (the float64 floor is one lower only where W / s is within half a
    float32 ulp below an integer: the weight on a grid point, where AdaRound learned against n)."""
    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir
    from qlip_jax.models.sd import load_stable_diffusion

    sd = load_stable_diffusion(default_model_dir())
    params = sd.params["unet"]
    setup, info = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, params), params)
    raw, _ = Checkpointer(shipped_quant_dir(), max_to_keep=1).restore()
    layers = modules_by_name(params)
    total = 0
    for name, st in raw.items():
        if "w_scale" not in st:
            continue
        w, s = np.asarray(layers[name]["kernel"], np.float32), np.asarray(st["w_scale"], np.float32)
        want = np.clip(np.floor(w / s) + np.asarray(st["w_round"]), -8, 7)
        np.testing.assert_array_equal(setup.state[name]["w_code"], want, err_msg=name)
        f64 = np.floor(w.astype(np.float64) / s.astype(np.float64))
        near = np.abs(w.astype(np.float64) / s - np.round(w.astype(np.float64) / s)) < 1e-6
        assert np.all((f64 == np.floor(w / s)) | near), name
        assert "w_round" not in setup.state[name]
        total += w.size
    assert total > 5_000_000
