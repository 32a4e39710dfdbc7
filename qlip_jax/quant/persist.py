"""Saving and loading a calibrated quantizer (:class:`QuantSetup`) with orbax, tagged with its model.

A quantizer state only means something for the weights it was calibrated on. Saving records a
fingerprint of the UNet (its config and a checksum of every parameter), the quant config, the
registry (names, kinds, MACs) and free-form metadata (method, calibration data); loading recomputes
the fingerprint of the model at hand and refuses a mismatch with a message naming both.

A setup with a PTQD correction (``setup.ptqd``) is saved as the tree ``{"state": ..., "ptqd": ...}``
with ``"has_ptqd": true`` in the metadata; other setups save the per-layer state tree alone, as before.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from qlip_jax.errors import BadFile, MismatchError, MissingFile, QlipInputError, describe
from qlip_jax.models.io import flat_leaves, require_fields
from qlip_jax.quant.registry import LayerInfo, Registry
from qlip_jax.quant.state import QuantConfig, QuantSetup
from qlip_jax.training.checkpoint import Checkpointer


def model_fingerprint(unet_config, unet_params: dict) -> str:
    """Short hex digest of a UNet: its config and the bytes of every parameter, in path order (any
    config with ``to_dict`` and nested dict of arrays: train_selector digests a quantizer with it)."""
    h = hashlib.sha256(json.dumps(unet_config.to_dict(), sort_keys=True).encode())
    for path, value in sorted(flat_leaves(unet_params).items()):
        h.update("/".join(path).encode())
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(value), np.float32)).tobytes())
    return h.hexdigest()[:16]


class QuantStateMismatch(MismatchError):
    """A quantizer state loaded onto a model it was not calibrated for."""


def save_quant_setup(directory: str, setup: QuantSetup, fingerprint: str, meta: dict | None = None) -> None:
    """Write ``setup`` under ``directory`` (an orbax checkpoint, step 0) with its model fingerprint."""
    info = {"model_fingerprint": fingerprint, "quant_config": setup.config.to_dict(),
            "registry": [[l.name, l.kind, l.macs, l.out_features] for l in setup.registry.layers],
            **(meta or {}), "has_ptqd": setup.ptqd is not None}
    tree = setup.state if setup.ptqd is None else {"state": setup.state, "ptqd": setup.ptqd.to_dict()}
    Checkpointer(directory, max_to_keep=1).save(0, tree, info)


def read_quant_info(directory: str) -> dict:
    """The checked metadata of a quantizer saved by :func:`save_quant_setup` (no model needed: callers
    check it before loading one)."""
    if not os.path.isdir(directory):
        raise MissingFile(directory, f"no quantizer state at {directory}", "make one with train/calibrate.py")
    ckpt = Checkpointer(directory, max_to_keep=1)
    if ckpt.latest_step() is None:
        raise MissingFile(directory, f"no quantizer state in {directory} (no saved step)",
                          "make one with train/calibrate.py")
    try:
        info = ckpt.restore_meta()
    except Exception as e:  # orbax: a truncated or corrupt file surfaces as many exception types
        raise BadFile(directory, f"unreadable quantizer state metadata ({describe(e)})",
                      "calibrate it again with train/calibrate.py") from e
    return require_fields(info, ("model_fingerprint", "quant_config", "registry"), directory, " in its metadata")


def load_quant_setup(directory: str, fingerprint: str) -> tuple[QuantSetup, dict]:
    """Read a quantizer saved by :func:`save_quant_setup`; ``fingerprint`` is the model's at hand.

    Raises :class:`QuantStateMismatch` if it was calibrated for another model.
    """
    info = read_quant_info(directory)
    ckpt = Checkpointer(directory, max_to_keep=1)
    if info.get("model_fingerprint") != fingerprint:
        raise QuantStateMismatch(
            f"the quantizer state in {directory} was calibrated for model {info.get('model_fingerprint')}, "
            f"not for this model ({fingerprint}); calibrate it again for this model")
    config = QuantConfig.from_dict(info["quant_config"])
    registry = Registry(tuple(LayerInfo(*row) for row in info["registry"]))
    try:
        state, _ = ckpt.restore(step=ckpt.latest_step())  # one step: no fallback to try
    except QlipInputError:
        raise
    except Exception as e:
        raise BadFile(directory, f"unreadable quantizer state, truncated or corrupt ({describe(e)})",
                      "calibrate it again with train/calibrate.py") from e
    correction = None
    if info.get("has_ptqd"):
        from qlip_jax.quant.ptqd import PTQDCorrection

        state, correction = state["state"], PTQDCorrection.from_dict(state["ptqd"])
    return QuantSetup(config, registry, state, ptqd=correction), info
