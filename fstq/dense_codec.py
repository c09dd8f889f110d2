"""Dense sections: every value raw, little-endian fp32 or IEEE fp16 (no per-tensor header)."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from fstq.accounting import PartCounter
from fstq.container import ByteReader, ByteWriter, Method
from fstq.errors import DecodeError
from fstq.quantize import FP16_BITS, fp16_from_bytes, fp16_to_bytes

__all__ = ["DENSE_WIDTHS", "decode_dense_section", "encode_dense_section"]

F32 = npt.NDArray[np.float32]

FP32_BITS: Final = 32
DENSE_WIDTHS: Final = {Method.DENSE_FP32: FP32_BITS, Method.DENSE_FP16: FP16_BITS}


def encode_dense_section(out: ByteWriter, parts: PartCounter, x: F32, width: int) -> None:
    """Write ``x`` as raw fp32 (``width=32``) or fp16 (``width=16``, clamped to +-65504)."""
    data = x.astype("<f4", copy=False).view(np.uint8) if width == FP32_BITS else fp16_to_bytes(x)
    parts.values += out.raw(data)


def decode_dense_section(reader: ByteReader, n: int, width: int, name: str) -> F32:
    """Read ``n`` raw values; rejects NaN/Inf (the encoder never emits them)."""
    raw = reader.take(n * width // 8, f"{name}: dense values")
    if width == FP16_BITS:
        return fp16_from_bytes(raw)
    values = raw.view("<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise DecodeError(f"{name}: dense values hold NaN or Inf")
    return values
