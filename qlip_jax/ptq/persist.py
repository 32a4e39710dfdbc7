"""Saving and loading a calibrated quantizer (:class:`QuantSetup`) with orbax, tagged with its model.

A quantizer state only means something for the weights it was calibrated on. Saving records a
fingerprint of the UNet (its config and a checksum of every parameter), the quant config, the
registry (names, kinds, MACs) and free-form metadata (method, calibration data); loading recomputes
the fingerprint of the model at hand and refuses a mismatch with a message naming both.

Folder layout: the orbax checkpoint (step 0) holds the activation quantizers and the metadata;
``weights.safetensors`` beside it holds the integer weight codes (:mod:`qlip_jax.quant.codes`), packed
two 4-bit codes per byte (``<layer>/w_code``, uint8, when ``weight_bits <= 4``; int8 otherwise), and
the per-channel scales (``<layer>/w_scale``, float32 ``[O]``); the metadata's ``weight_codes`` names
the file, the packing and each kernel's shape.

Old folders (no ``weight_codes``: the codes were recomputed from the float kernel at every call) load
when the UNet's params are given: their codes are computed once, exactly, with a one-line note on
stderr (re-save to store them). Without the params they are refused with a message saying so.

A setup with a PTQD correction (``setup.ptqd``) is saved as the tree ``{"state": ..., "ptqd": ...}``
with ``"has_ptqd": true`` in the metadata; other setups save the per-layer state tree alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import numpy as np
from safetensors.numpy import save_file

from qlip_jax.atomic import atomic_write
from qlip_jax.errors import BadFile, MismatchError, MissingFile, QlipInputError, describe
from qlip_jax.models.io import flat_leaves, load_safetensors_file, require_fields
from qlip_jax.quant.codes import CODE_KEY, add_weight_codes, has_codes, pack_int4, unpack_int4
from qlip_jax.quant.registry import LayerInfo, Registry
from qlip_jax.quant.state import QuantConfig, QuantSetup
from qlip_jax.training.checkpoint import Checkpointer

#: The safetensors file of a quantizer folder holding its integer weight codes and scales.
WEIGHTS_FILE = "weights.safetensors"
_WEIGHT_KEYS = (CODE_KEY, "w_scale")


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


def _split_weights(state: dict, bits: int) -> tuple[dict, dict[str, np.ndarray], dict]:
    """``(state without codes/scales, safetensors tensors, {layer: kernel shape})``."""
    rest, tensors, shapes = {}, {}, {}
    for name, st in state.items():
        rest[name] = {k: v for k, v in st.items() if k not in _WEIGHT_KEYS}
        if CODE_KEY not in st:
            continue
        code = np.ascontiguousarray(st[CODE_KEY], np.int8)  # safetensors writes the buffer in memory order
        shapes[name] = list(code.shape)
        tensors[f"{name}/{CODE_KEY}"] = pack_int4(code) if bits <= 4 else code
        tensors[f"{name}/w_scale"] = np.ascontiguousarray(st["w_scale"], np.float32)
    return rest, tensors, shapes


def save_quant_setup(directory: str, setup: QuantSetup, fingerprint: str, meta: dict | None = None) -> None:
    """Write ``setup`` under ``directory`` (an orbax checkpoint, step 0, and ``weights.safetensors``)
    with its model fingerprint. Its state must hold integer weight codes (as :func:`calibrate` makes)
    when ``weight_bits <= 8``."""
    bits = setup.config.weight_bits
    if bits <= 8 and not has_codes(setup.state):
        raise ValueError("the quantizer state has no integer weight codes ('w_code'); calibrate() makes them, "
                         "or add them with qlip_jax.quant.codes.add_weight_codes(state, unet_params, weight_bits)")
    state, tensors, shapes = _split_weights(setup.state, bits)
    info = {"model_fingerprint": fingerprint, "quant_config": setup.config.to_dict(),
            "registry": [[l.name, l.kind, l.macs, l.out_features] for l in setup.registry.layers],
            **(meta or {}), "has_ptqd": setup.ptqd is not None}
    if shapes:
        info["weight_codes"] = {"file": WEIGHTS_FILE, "packing": "int4x2" if bits <= 4 else "int8",
                                "shapes": shapes}
    tree = state if setup.ptqd is None else {"state": state, "ptqd": setup.ptqd.to_dict()}
    Checkpointer(directory, max_to_keep=1).save(0, tree, info)
    if shapes:
        with atomic_write(os.path.join(directory, WEIGHTS_FILE)) as tmp:
            save_file(tensors, tmp)


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


def _read_weights(directory: str, spec: dict, state: dict) -> dict:
    """``state`` with the codes (unpacked to int8) and scales of ``weights.safetensors`` merged in."""
    path = os.path.join(directory, spec["file"])
    if not os.path.isfile(path):
        raise MissingFile(path, f"the quantizer in {directory} names weight codes in {spec['file']}, which is "
                          "missing", "copy the whole folder or calibrate again")
    tensors = load_safetensors_file(path)
    out = dict(state)
    for name, shape in spec["shapes"].items():
        code = tensors[f"{name}/{CODE_KEY}"]
        code = unpack_int4(code, tuple(shape)) if spec["packing"] == "int4x2" else code.reshape(shape)
        out[name] = {**state.get(name, {}), CODE_KEY: code, "w_scale": tensors[f"{name}/w_scale"]}
    return out


def load_quant_setup(directory: str, fingerprint: str, unet_params: dict | None = None) -> tuple[QuantSetup, dict]:
    """Read a quantizer saved by :func:`save_quant_setup`; ``fingerprint`` is the model's at hand.

    ``unet_params``: the model's UNet params, needed only by an old folder without integer weight
    codes (they are computed from its float kernels, with a note).

    Raises :class:`QuantStateMismatch` if it was calibrated for another model, ValueError for an old
    folder without ``unet_params``.
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
        from qlip_jax.sampling.correction import PTQDCorrection

        state, correction = state["state"], PTQDCorrection.from_dict(state["ptqd"])
    if info.get("weight_codes"):
        state = _read_weights(directory, info["weight_codes"], state)
    elif config.weight_bits <= 8 and not has_codes(state):
        if unet_params is None:
            raise ValueError(f"the quantizer in {directory} is an old folder without integer weight codes; load it "
                             "with the UNet's params (load_quant_setup(dir, fingerprint, unet_params)) to convert "
                             "it, or calibrate again")
        state, n = add_weight_codes(state, unet_params, config.weight_bits)
        print(f"[qlip] note: {directory} stores no integer weight codes (old format); computed the {n} layers' "
              "codes once from the float kernels (exact round(W/s), AdaRound folded in); re-save to store them",
              file=sys.stderr)
    return QuantSetup(config, registry, state, ptqd=correction), info
