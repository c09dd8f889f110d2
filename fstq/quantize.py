"""Symmetric integer quantisation (INT2/INT4, QSGD levels), its error model, and fp16 values.

A value ``v`` with scale ``s`` and ``q_max`` becomes the integer ``q = clip(round(v/s), -q_max,
q_max)``, sent as the *offset code* ``q + q_max`` in ``[0, 2*q_max]`` (so ``2*q_max + 1`` codes
fit in ``ceil(log2(2*q_max + 1))`` bits, and the top code of the field is invalid). The decoder
returns ``(code - q_max) * s`` computed in float32, and the encoder uses the very same function
to compute error-feedback residuals, so both sides agree bit for bit.

Rounding is to nearest (ties to even) or unbiased stochastic: ``q = floor(v/s + U)`` with
``U ~ Uniform[0, 1)`` drawn from the caller's generator, so ``E[q] = v/s`` inside the clip range.
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from fstq.config import Rounding
from fstq.errors import DecodeError

__all__ = [
    "FP16_BITS",
    "FP16_MAX",
    "QMAX",
    "absmax_scale",
    "dequantize_codes",
    "expected_sq_error",
    "fp16_from_bytes",
    "fp16_to_bytes",
    "half_bytes",
    "half_to_f32",
    "quantize_codes",
    "to_half",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

QMAX: dict[int, int] = {2: 1, 4: 7}  # symmetric q_max = 2**(b-1) - 1 (paper section 2.4)
FP16_BITS: Final = 16  # IEEE half: the unquantised width of every method
FP16_MAX = 65504.0  # largest finite IEEE half; larger magnitudes are clamped, never sent as inf
_LITTLE = sys.byteorder == "little"


def absmax_scale(values: F32, qmax: int) -> np.float32:
    """``max|v| / q_max`` in float32 (0 for an empty or all-zero input)."""
    if values.size == 0:
        return np.float32(0.0)
    amax = max(float(values.max()), -float(values.min()))
    return np.float32(np.float32(amax) / np.float32(qmax))


def quantize_codes(
    values: F32,
    scale: np.float32 | F32,
    qmax: int,
    rounding: Rounding,
    rng: np.random.Generator | None,
) -> U8:
    """Offset codes ``q + q_max`` of ``values`` at ``scale`` (scalar or per value).

    A zero scale maps everything to ``q = 0``. ``rng`` is required for stochastic rounding.
    """
    t = np.zeros(np.broadcast_shapes(values.shape, np.shape(scale)), dtype=np.float32)
    with np.errstate(over="ignore"):  # a tiny scale overflows to inf, clipped below
        np.divide(values, scale, out=t, where=np.asarray(scale) > 0)  # zero scale: q = 0
    if rounding == "stochastic":
        if rng is None:
            raise ValueError("stochastic rounding needs a generator")
        t += rng.random(t.shape, dtype=np.float32)
        np.floor(t, out=t)
    else:
        np.rint(t, out=t)
    np.clip(t, -qmax, qmax, out=t)
    t += qmax
    return t.astype(np.uint8)


def dequantize_codes(codes: U8, scale: np.float32 | F32, qmax: int) -> F32:
    """Values ``(code - q_max) * scale`` in float32; codes must already be ``<= 2*q_max``."""
    out = codes.astype(np.float32)
    out -= np.float32(qmax)
    with np.errstate(over="ignore"):  # a hostile scale may overflow: the decoder rejects inf
        out *= scale
    return out


def expected_sq_error(
    abs_values: F32, scale: np.float32 | F32, qmax: int, rounding: Rounding
) -> F32:
    """Per-value expected squared error of quantising ``|v|`` at ``scale`` (allocation model).

    Nearest: the exact RTN error ``(|v| - s*min(round(|v|/s), q_max))**2``. Stochastic: the
    variance ``s**2 * f * (1 - f)`` with ``f = frac(|v|/s)``, plus the clip error beyond
    ``q_max*s``. ``scale`` is a scalar or one per value; a zero scalar means all-zero values.
    """
    if np.ndim(scale) == 0 and scale <= 0:
        return np.square(abs_values)
    t = abs_values / scale
    if rounding == "nearest":
        np.rint(t, out=t)
        np.minimum(t, qmax, out=t)
        t *= scale
        np.subtract(abs_values, t, out=t)
        np.square(t, out=t)
        return t
    frac = t - np.floor(t)
    err = frac * (1 - frac)
    err *= scale * scale
    over = abs_values - np.float32(qmax) * scale
    out: F32 = np.where(t > qmax, over * over, err).astype(np.float32, copy=False)
    return out


_TORCH_MIN = 4096  # torch's F16C conversion wins above this size, numpy's low overhead below


def to_half(values: F32) -> npt.NDArray[np.float16]:
    """IEEE half of ``values`` (round to nearest even), clamped to the finite range."""
    clamped = np.clip(values, -FP16_MAX, FP16_MAX)
    if clamped.size < _TORCH_MIN:
        return clamped.astype(np.float16)
    half: npt.NDArray[np.int16] = (
        torch.from_numpy(clamped).to(torch.float16).view(torch.int16).numpy()
    )
    return half.view(np.float16)


def half_to_f32(half: npt.NDArray[np.float16]) -> F32:
    """Float32 values of IEEE halves (exact)."""
    if half.size < _TORCH_MIN:
        return half.astype(np.float32)
    bits = np.ascontiguousarray(half).view(np.int16)
    out: F32 = torch.from_numpy(bits).view(torch.float16).float().numpy()
    return out


def half_bytes(half: npt.NDArray[np.float16]) -> U8:
    """Little-endian bytes of IEEE halves."""
    return (half if _LITTLE else half.byteswap()).view(np.uint8)


def fp16_to_bytes(values: F32) -> U8:
    """Little-endian IEEE half bytes of ``values`` (clamped to the finite range)."""
    return half_bytes(to_half(values))


def fp16_from_bytes(buf: U8) -> F32:
    """Float32 values of little-endian IEEE half bytes; rejects inf/NaN."""
    if buf.size % 2:
        raise DecodeError("fp16 section has an odd number of bytes")
    raw = np.ascontiguousarray(buf).view("<i2").astype(np.int16, copy=True)
    # Exponent all ones = inf or NaN: never produced by the encoder.
    if bool(((raw & 0x7C00) == 0x7C00).any()):
        raise DecodeError("fp16 section holds inf or NaN")
    return half_to_f32(raw.view(np.float16))
