"""Integer weight codes: the stored form of a quantized kernel.

A conv/linear layer's quantized kernel is ``w_code * w_scale``: ``w_code`` (int8, kernel-shaped, values
in the signed ``weight_bits`` grid) and ``w_scale [O]`` (float32, per output channel). The codes are
computed once, when calibration ends (or when an old quantizer folder is loaded), exactly:

* round to nearest: ``clip(round(W / s), lo, hi)`` with ``W / s`` evaluated in float64 (for float32
  ``W`` and ``s`` the float64 quotient is close enough to the real one that rounding it, half to even as
  ``jnp.round``, gives the exact decision);
* AdaRound (a ``w_round`` 0/1 decision in the state): ``clip(floor(W / s) + w_round, lo, hi)`` with
  ``W / s`` the correctly rounded float32 quotient (NumPy's IEEE division, backend-independent): the
  decision was learned against float32 quotients, and where ``W / s`` lies within half a float32 ulp
  below an integer ``n`` (the weight on a grid point) the float32 floor is ``n`` and the float64 floor
  ``n - 1``, a whole step away from the weight. ``w_round`` is then dropped (folded into the codes).

Before this, the codes were recomputed from the float kernel at every call as ``round(W / s)`` in
float32, which XLA on CPU evaluates as ``W * (1 / s)``: a few codes landed one step off the formula,
and another backend could round others. The quantized layers now read ``w_code * w_scale`` and never
round a float kernel at run time (:func:`qlip_jax.quant.layers.quantize_weight`); the float kernel is
still used by the full-precision candidate.

Storage: codes of at most 4 bits are packed two per byte (:func:`pack_int4`), wider ones stored as
int8, in a safetensors file beside the per-channel scales (:mod:`qlip_jax.ptq.persist`).
"""

from __future__ import annotations

import numpy as np

from qlip_jax.naming import modules_by_name

#: Quantizer-state key of a layer's integer weight codes (int8, kernel-shaped).
CODE_KEY = "w_code"


def code_range(bits: int) -> tuple[int, int]:
    """Signed symmetric grid ``[-2^(b-1), 2^(b-1) - 1]`` (as :func:`~qlip_jax.quant.fake_quant.int_range`)."""
    hi = 2 ** (int(bits) - 1) - 1
    return -hi - 1, hi


def weight_codes(kernel, scale, bits: int, rounding=None) -> np.ndarray:
    """Exact integer codes ``int8`` of ``kernel [..., O]`` on the per-channel grid ``scale [O]``.

    ``rounding``: optional AdaRound decision (kernel-shaped, 0/1): ``floor(W / s) + rounding``
    instead of round to nearest. Round to nearest in float64, AdaRound's floor on the correctly rounded
    float32 quotient (see the module docstring).
    """
    if int(bits) > 8:
        raise ValueError(f"integer weight codes are int8; weight_bits={bits} does not fit (use at most 8)")
    w = np.asarray(kernel, np.float32)
    s = np.asarray(scale, np.float32)
    if s.shape != w.shape[-1:]:
        raise ValueError(f"weight scale must have shape [O={w.shape[-1]}], got {s.shape}")
    if rounding is None:
        q = np.round(w.astype(np.float64) / s.astype(np.float64))  # half to even, as jnp.round
    else:
        r = np.asarray(rounding)
        if r.shape != w.shape or not np.all((r == 0) | (r == 1)):
            raise ValueError("AdaRound decision w_round must be kernel-shaped with values 0 or 1 (a hard "
                             "decision; soft values exist only during reconstruction)")
        q = np.floor(w / s).astype(np.float64) + r
    lo, hi = code_range(bits)
    return np.clip(q, lo, hi).astype(np.int8)


def has_codes(state: dict) -> bool:
    """True if every conv/linear layer of ``state`` (those with ``w_scale``) has integer codes."""
    return all(CODE_KEY in st for st in state.values() if "w_scale" in st)


def add_weight_codes(state: dict, unet_params: dict, bits: int) -> tuple[dict, int]:
    """``state`` with ``w_code`` for every conv/linear layer that lacks it (``w_round`` folded in and
    dropped), computed from the UNet's float kernels. Returns ``(new state, layers converted)``; the
    input is not modified, and is returned itself when every layer already has its codes."""
    layers = None
    out, converted = {}, 0
    for name, st in state.items():
        if "w_scale" not in st or CODE_KEY in st:
            out[name] = st
            continue
        if layers is None:
            layers = modules_by_name(unet_params)
        if name not in layers:
            raise KeyError(f"the UNet params have no layer '{name}' of the quantizer state")
        d = {k: v for k, v in st.items() if k != "w_round"}
        d[CODE_KEY] = weight_codes(layers[name]["kernel"], st["w_scale"], bits, st.get("w_round"))
        out[name] = d
        converted += 1
    return (out if converted else state), converted  # nothing to add: the same state object


def strip_weight_codes(state: dict) -> dict:
    """``state`` without codes (for methods that learn ``w_scale``/``w_round`` again from the kernel)."""
    return {n: {k: v for k, v in st.items() if k != CODE_KEY} for n, st in state.items()}


# ----------------------------------------------------------------------------------------------
# 4-bit packing


def pack_int4(codes) -> np.ndarray:
    """Signed 4-bit codes (any shape, values in ``[-8, 7]``) -> ``uint8 [ceil(n / 2)]``, two per byte:
    element ``2i`` in the low nibble of byte ``i``, element ``2i + 1`` in the high nibble (two's
    complement nibbles; an odd count is padded with 0)."""
    c = np.asarray(codes).ravel()
    if c.size and (c.min() < -8 or c.max() > 7):
        raise ValueError(f"4-bit codes must be in [-8, 7], got [{c.min()}, {c.max()}]")
    nib = (c.astype(np.int16) & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``int8`` codes of ``shape``."""
    p = np.asarray(packed, np.uint8).ravel()
    n = int(np.prod(shape))
    if p.size != (n + 1) // 2:
        raise ValueError(f"{p.size} packed bytes cannot hold {n} 4-bit codes of shape {tuple(shape)}")
    nib = np.stack([p & 0xF, p >> 4], axis=1).ravel()[:n].astype(np.int8)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8).reshape(shape)
