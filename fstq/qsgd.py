"""QSGD (Alistarh et al., 2017) sections: per-bucket L2 norm + stochastic levels.

A tensor is cut into buckets of ``bucket_size`` consecutive coordinates (the last one may be
short). With ``s = 2**(bits-1) - 1`` levels, coordinate ``v`` of a bucket with norm ``||b||``
becomes ``sign(v) * l`` with ``l`` in ``{0..s}``, ``l = floor(|v|*s/||b|| + U)`` (unbiased
stochastic rounding), and is sent as the offset code ``sign*l + s``: ``2s+1 = 2**bits - 1``
codes in ``bits`` bits, the same width as a sign bit plus ``bits-1`` level bits. Section::

    norms   f32 per bucket
    codes   ceil(n*bits/8) bytes, ``bits``-bit codes LSB-first
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fstq.accounting import PartCounter
from fstq.bitpack import pack_codes, packed_size, unpack_codes
from fstq.container import ByteReader, ByteWriter
from fstq.errors import DecodeError
from fstq.quantize import dequantize_codes, quantize_codes

__all__ = [
    "decode_qsgd_section",
    "encode_qsgd_section",
    "parse_qsgd_section",
    "qsgd_levels",
    "read_qsgd_params",
    "write_qsgd_params",
]

F32 = npt.NDArray[np.float32]

_FLT_MAX = float(np.finfo(np.float32).max)


def qsgd_levels(bits: int) -> int:
    """Number of positive levels ``s`` for a code of ``bits`` bits."""
    return (1 << (bits - 1)) - 1


def _buckets(x: F32, bucket: int) -> F32:
    nb = -(-x.size // bucket)
    if nb * bucket == x.size:
        return x.reshape(nb, bucket)
    padded = np.zeros(nb * bucket, dtype=np.float32)
    padded[: x.size] = x
    return padded.reshape(nb, bucket)


def _scales(norms: F32, s: int) -> F32:
    return (norms / np.float32(s)).astype(np.float32)[:, None]


def encode_qsgd_section(
    out: ByteWriter,
    parts: PartCounter,
    x: F32,
    bits: int,
    bucket: int,
    rng: np.random.Generator,
) -> F32:
    """Write one tensor's QSGD section; returns the decoded flat values."""
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    s = qsgd_levels(bits)
    b = _buckets(x, min(bucket, n))  # min: a short tensor never pads to a huge bucket
    norms = np.sqrt(np.einsum("ij,ij->i", b, b))
    if not np.isfinite(norms).all():  # float32 overflow of the sum of squares
        wide = np.sqrt(np.einsum("ij,ij->i", b.astype(np.float64), b.astype(np.float64)))
        norms = np.minimum(wide, _FLT_MAX).astype(np.float32)
    norms = norms.astype("<f4")
    scales = _scales(norms, s)
    codes = quantize_codes(b, scales, s, "stochastic", rng)
    parts.scales += out.raw(norms.view(np.uint8))
    parts.values += out.raw(pack_codes(codes.reshape(-1)[:n], bits))
    return dequantize_codes(codes, scales, s).reshape(-1)[:n]


def read_qsgd_params(reader: ByteReader, max_bucket: int) -> tuple[int, int]:
    """The ``(bits, bucket_size)`` QSGD parameters that follow the tensor table."""
    bits = reader.u8("qsgd bits")
    if not 2 <= bits <= 8:
        raise DecodeError(f"qsgd bits {bits} out of range")
    bucket = reader.varint("qsgd bucket size", max_bucket)
    if bucket < 1:
        raise DecodeError("qsgd bucket size 0")
    return bits, bucket


def write_qsgd_params(out: ByteWriter, bits: int, bucket: int) -> int:
    """Write the QSGD parameters; returns the bytes written."""
    return out.u8(bits) + out.varint(bucket)


def parse_qsgd_section(
    reader: ByteReader, n: int, bits: int, bucket: int, name: str
) -> tuple[F32, npt.NDArray[np.uint8]]:
    """Read and check one tensor's QSGD section: ``(bucket norms, codes)``."""
    if n == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    nb = -(-n // min(bucket, n))
    norms = reader.take(4 * nb, f"{name}: bucket norms").view("<f4").astype(np.float32)
    if not (np.isfinite(norms).all() and (norms >= 0).all()):
        raise DecodeError(f"{name}: invalid bucket norm")
    codes = unpack_codes(reader.take(packed_size(n, bits), f"{name}: codes"), n, bits)
    if int(codes.max()) > 2 * qsgd_levels(bits):
        raise DecodeError(f"{name}: QSGD code out of range")
    return norms, codes


def decode_qsgd_section(reader: ByteReader, n: int, bits: int, bucket: int, name: str) -> F32:
    """Read one tensor's QSGD section; returns its dense flat values."""
    norms, codes = parse_qsgd_section(reader, n, bits, bucket, name)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    s = qsgd_levels(bits)
    bucket = min(bucket, n)
    padded = np.full(norms.size * bucket, s, dtype=np.uint8)
    padded[:n] = codes
    return dequantize_codes(padded.reshape(-1, bucket), _scales(norms, s), s).reshape(-1)[:n]
