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

Bare parameters (``class_embedding``, ``logit_scale`` of CLIP) keep their name and layout.

Loading checks every key both ways (missing, unexpected, shape) and names the offending key and
file. Tensors are converted to float32 whatever dtype the file stores (fp16 variants load as-is).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from qlip_jax.atomic import atomic_write
from qlip_jax.atomic import write_json as _atomic_write_json
from qlip_jax.errors import BadFile, MismatchError, MissingFile, describe
from qlip_jax.naming import flax_to_torch_path

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
#: bare parameters (``nn.Parameter`` attributes in PyTorch): the leaf name is the key's last part
_RAW_LEAVES = frozenset({"class_embedding", "logit_scale"})


class WeightLoadError(MismatchError):
    """A checkpoint does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Files


def _variant_name(stem: str, variant: str | None) -> str:
    """``diffusion_pytorch_model[.fp16].safetensors`` (diffusers' ``_add_variant``)."""
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def _files_named(folder: str, name: str, variant: str | None) -> list[str] | None:
    """The file ``name`` or the shards its index lists, or None. Sharded variants are indexed as
    ``<stem>.safetensors.index.<variant>.json`` (diffusers/transformers) or ``<name>.index.json``."""
    single = os.path.join(folder, name)
    if os.path.isfile(single):
        return [single]
    indices = [single + ".index.json"]
    if variant:
        indices.append(os.path.join(folder, name.replace(f".{variant}.safetensors",
                                                         f".safetensors.index.{variant}.json")))
    for index in indices:
        if os.path.isfile(index):
            weight_map = require_fields(read_json(index), ("weight_map",), index)["weight_map"]
            if not isinstance(weight_map, dict):
                raise BadFile(index, "\"weight_map\" is not an object", "re-export the checkpoint")
            return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    return None


def variants_present(folder: str, stem: str) -> list[str]:
    """Variant names (``fp16``, ...) of ``stem`` safetensors files in ``folder``."""
    pat = re.compile(re.escape(stem) + r"\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors$")
    found = {m.group(1) for p in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := pat.match(p))}
    return sorted(found)


def _weight_files(folder: str, stem: str, variant: str | None) -> list[str]:
    """Safetensors files of one component: single file or a sharded ``*.index.json``.

    With ``variant`` (e.g. ``'fp16'``) the variant files are read; a component without them falls back
    to its plain files with a warning, as diffusers does for a pipeline with a mixture."""
    name = _variant_name(stem, variant)
    files = _files_named(folder, name, variant)
    if files is not None:
        return files
    if variant:
        plain = _files_named(folder, _variant_name(stem, None), None)
        if plain is not None:
            warnings.warn(f"{folder} has no {variant} variant ('{name}'); loading its "
                          f"'{_variant_name(stem, None)}' instead", stacklevel=3)
            return plain
    present = sorted(p for p in os.listdir(folder) if p.endswith((".safetensors", ".bin", ".json")))
    others = [v for v in variants_present(folder, stem) if v != variant]
    if others:
        raise MissingFile(
            os.path.join(folder, name),
            f"no '{name}' in {folder}, but it has the variant(s) {others} "
            f"({', '.join(_variant_name(stem, v) for v in others)})",
            f"load with variant={others[0]!r} (programs: --variant {others[0]})")
    raise MissingFile(
        os.path.join(folder, name), f"no '{name}' (or its .index.json) in {folder}; files present: {present}",
        "only safetensors checkpoints are read (convert a .bin with diffusers' "
        "save_pretrained(safe_serialization=True))")


def load_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file; a missing, truncated or corrupt file raises
    :class:`~qlip_jax.errors.MissingFile` / :class:`~qlip_jax.errors.BadFile` naming it."""
    if not os.path.isfile(path):
        raise MissingFile(path, f"missing weights file: {path}", "restore the file or export the folder again")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError) on bad bytes
        raise BadFile(path, f"unreadable safetensors file, truncated or corrupt ({describe(e)})",
                      "restore the file or export the folder again") from e


def require_fields(obj, fields, path: str, what: str = "") -> dict:
    """``obj`` if it is a JSON object with every one of ``fields``; else :class:`BadFile` naming ``path``
    and the missing fields."""
    if not isinstance(obj, dict):
        raise BadFile(path, f"expected a JSON object{what}, got {type(obj).__name__}",
                      "restore the file or export the folder again")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise BadFile(path, f"missing field(s) {missing}{what}", "restore the file or export the folder again")
    return obj


def read_safetensors(folder: str, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder, e.g. ``stem='diffusion_pytorch_model'`` or ``'model'``."""
    if not os.path.isdir(folder):
        raise MissingFile(folder, f"model folder not found: {folder}", "check the path")
    tensors: dict[str, np.ndarray] = {}
    for path in _weight_files(folder, stem, variant):
        tensors.update(load_safetensors_file(path))
    return tensors


def read_json(path: str):
    """The parsed JSON of ``path``; a missing or invalid file raises :class:`~qlip_jax.errors.MissingFile` /
    :class:`~qlip_jax.errors.BadFile` naming it (and the line of a syntax error)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise MissingFile(folder, f"model folder not found: {folder}", "check the path")
    if not os.path.isfile(path):
        raise MissingFile(path, f"missing config file: {path}", "restore the file or export the folder again")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(path, f"invalid JSON ({e})", "fix the file or export the folder again") from None


def write_json(path: str, obj: Mapping) -> None:
    _atomic_write_json(path, obj, indent=2, sort_keys=False)


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
    if leaf in _RAW_LEAVES:
        return prefix + flax_to_torch_path(path)
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


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """``tensors`` to ``path`` atomically (:func:`qlip_jax.atomic.atomic_write`)."""
    with atomic_write(path) as tmp:
        save_file(dict(tensors), tmp, metadata={"format": "pt"} if metadata is None else metadata)
