"""Weight I/O without torch: safetensors with PyTorch names/layouts <-> Flax param trees.

One generic rule set converts every model of the family, because our Flax module paths mirror the
PyTorch module paths (:mod:`qlip_jax.naming`):

=================  ======================  ==========================================
Flax leaf          PyTorch key suffix      layout change
=================  ======================  ==========================================
``kernel`` (4-D)   ``weight``              ``[kh, kw, I, O]`` <- ``[O, I, kh, kw]``
``kernel`` (2-D)   ``weight``              ``[I, O]`` <- ``[O, I]``
``scale``          ``weight``              none (LayerNorm / GroupNorm)
``embedding``      ``weight``              none
``bias``           ``bias``                none
=================  ======================  ==========================================

Loading checks every key both ways (missing, unexpected, shape) and names the offending key and
file. Tensors are converted to float32 whatever dtype the file stores (fp16 variants load as-is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from qlip_jax.naming import flax_to_torch_path

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Files


def _weight_files(folder: str, stem: str, variant: str | None) -> list[str]:
    """Safetensors files of one component: single file or a sharded ``*.index.json``."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single = os.path.join(folder, name)
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    present = sorted(p for p in os.listdir(folder) if p.endswith((".safetensors", ".bin", ".json")))
    raise FileNotFoundError(
        f"no '{name}' (or its .index.json) in {folder}; files present: {present}. Only safetensors "
        "checkpoints are read (convert a .bin with diffusers' save_pretrained(safe_serialization=True)).")


def read_safetensors(folder: str, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder, e.g. ``stem='diffusion_pytorch_model'`` or ``'model'``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    tensors: dict[str, np.ndarray] = {}
    for path in _weight_files(folder, stem, variant):
        tensors.update(load_file(path))
    return tensors


def read_json(path: str) -> dict:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing config file: {path}")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Mapping) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Conversion


def flat_leaves(tree: Mapping) -> dict[tuple[str, ...], object]:
    flat = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))
            else:
                flat[path + (k,)] = v

    walk(tree, ())
    return flat


def _torch_key(path: tuple[str, ...], prefix: str) -> str:
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
        raise WeightLoadError(f"no PyTorch name for Flax leaf '{'/'.join(path)}'")
    return prefix + flax_to_torch_path(path[:-1]) + "." + _LEAF_TO_TORCH[leaf]


def _to_flax_layout(leaf: str, value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and value.ndim == 2:
        value = value.T
    if leaf == "kernel" and len(expected) == 2 and value.ndim == 4 and value.shape[:2] == (1, 1):
        value = value[0, 0]  # 1x1 conv stored for a linear layer (legacy VAE attention)
    return value


def torch_to_flax(tensors: Mapping[str, np.ndarray], abstract_params: Mapping, *, prefix: str = "",
                  ignore: Callable[[str], bool] = lambda k: False, source: str = "checkpoint",
                  dtype=np.float32) -> dict:
    """Build a Flax param tree shaped like ``abstract_params`` from PyTorch-named tensors.

    Args:
      tensors: ``{torch_key: array}`` as read from safetensors.
      abstract_params: the model's param tree (arrays or ``ShapeDtypeStruct``s), giving names and
        shapes; typically ``jax.eval_shape(model.init, ...)['params']``.
      prefix: prepended to every PyTorch key (``'text_model.'`` for CLIP).
      ignore: predicate for checkpoint keys that are allowed to be left unused (buffers).
      source: file or folder name for error messages.
      dtype: dtype of the returned arrays (None: as stored, e.g. float16 weights without a float32 copy
        for 16-bit compute).
    Raises:
      WeightLoadError naming every missing or unexpected key and the first shape mismatch.
    """
    flat = flat_leaves(abstract_params)
    wanted = {_torch_key(p, prefix): p for p in flat}
    missing = sorted(k for k in wanted if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in wanted and not ignore(k))
    if missing or unexpected:
        raise WeightLoadError(
            f"{source} does not match the model: {len(missing)} missing key(s) {missing[:8]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:8]}")
    out: dict = {}
    for key, path in wanted.items():
        expected = tuple(flat[path].shape)
        value = _to_flax_layout(path[-1], np.asarray(tensors[key]), expected)
        if tuple(value.shape) != expected:
            raise WeightLoadError(f"{source}: shape mismatch for '{key}': checkpoint has "
                                  f"{tuple(tensors[key].shape)}, the model expects {expected} "
                                  "(in Flax layout); is the config.json the right one?")
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = value if dtype is None else value.astype(dtype)
    return out


def flax_to_torch(params: Mapping, *, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: ``{torch_key: contiguous array}`` stored as ``dtype``
    (float16 halves a shipped checkpoint; loading converts back to float32)."""
    out = {}
    for path, value in flat_leaves(params).items():
        value = np.asarray(jax.device_get(value), np.float32).astype(dtype)
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel" and value.ndim == 2:
            value = value.T
        out[_torch_key(path, prefix)] = np.ascontiguousarray(value)
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
    save_file(dict(tensors), path, metadata={"format": "pt"})
