"""Calibration on a tiny random model: clipping searches beat min-max; quantizer state persistence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rms_rel_err

from qlip_jax.ptq.calibration import calibrate
from qlip_jax.ptq.persist import QuantStateMismatch, load_quant_setup, model_fingerprint, save_quant_setup
from qlip_jax.quant.state import QuantArgs, QuantConfig


@functools.partial(jax.jit, static_argnums=0)
def _unet_out(unet, params, x, t, c, qargs=None):
    """One compiled forward pass (reused by every method's state of the same structure)."""
    return unet.apply({"params": params}, x, t, c, qargs)


def _output_error(pipe, setup, data, k):
    """Relative RMS error of the quantized UNet output vs float, over the calibration data."""
    unet, params = pipe.unet, pipe.sd.params["unet"]
    x, t, c = data.latents, data.timesteps, data.context
    ref = _unet_out(unet, params, x, t, c)
    idx = jnp.full((len(x), len(setup.registry)), k, jnp.int32)
    out = _unet_out(unet, params, x, t, c, QuantArgs.from_indices(setup.state, idx, setup.registry.names,
                                                                  setup.config))
    return rms_rel_err(out, ref)


def test_calibration_data_spans_the_trajectory(calib):
    pipe, data = calib
    assert len(data) == 2 * 2 * pipe.num_steps  # prompts x CFG halves x steps
    assert set(np.unique(data.step_index)) == set(range(pipe.num_steps))
    assert data.is_cond.sum() == len(data) // 2


def test_mse_clipping_beats_minmax_at_low_bits(calib):
    pipe, data = calib
    config = QuantConfig(act_bits=(4, 6), weight_bits=4)
    errors = {m: [_output_error(pipe, calibrate(pipe, config, data, m), data, k) for k in range(2)]
              for m in ("minmax", "percentile", "mse")}
    assert errors["mse"][0] < errors["minmax"][0], errors
    assert errors["mse"][1] <= errors["minmax"][1] * 1.05, errors
    with pytest.raises(ValueError, match="unknown clipping method"):
        calibrate(pipe, config, data, "kl")


def test_quant_state_round_trip_and_model_tag(calib, tmp_path):
    pipe, data = calib
    setup = calibrate(pipe, QuantConfig(act_bits=(6, 8), weight_bits=4, quantize_attn_matmul=True), data)
    tag = model_fingerprint(pipe.sd.configs.unet, pipe.sd.params["unet"])
    save_quant_setup(str(tmp_path / "q"), setup, tag, {"method": "minmax"})
    loaded, info = load_quant_setup(str(tmp_path / "q"), tag)
    assert info["method"] == "minmax" and loaded.config == setup.config and loaded.registry == setup.registry
    for name in setup.state:
        for k in setup.state[name]:
            np.testing.assert_array_equal(loaded.state[name][k], setup.state[name][k])
    other = jax.tree.map(lambda p: p * 1.01, pipe.sd.params["unet"])
    with pytest.raises(QuantStateMismatch, match="calibrated for model"):
        load_quant_setup(str(tmp_path / "q"), model_fingerprint(pipe.sd.configs.unet, other))
