"""Bit packing of small integer codes and LEB128 varints, vectorised with numpy.

Conventions (the wire format depends on them):

* Fixed-width codes are packed LSB-first: code ``i`` occupies bits ``[i*w, (i+1)*w)`` of the
  little-endian bit stream, so the first code of a byte sits in its lowest bits. Padding bits of
  the last byte are zero, and decoders reject non-zero padding.
* Varints are unsigned LEB128: 7 payload bits per byte, low group first, high bit set on every
  byte but the last. Decoders accept only the canonical (shortest) form.

Every decoder here raises :class:`~fstq.errors.DecodeError` on malformed input.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt

from fstq.errors import DecodeError

__all__ = [
    "MAX_VARINT_BYTES",
    "pack_codes",
    "pack_uint",
    "packed_size",
    "unpack_codes",
    "unpack_uint",
    "varint_decode_array",
    "varint_encode_array",
    "varint_size",
    "varint_sizes_total",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

MAX_VARINT_BYTES = 5  # values < 2**35: every count and index of the format fits (limits < 2**31)
_LITTLE = sys.byteorder == "little"


def packed_size(count: int, width: int) -> int:
    """Bytes taken by ``count`` codes of ``width`` bits."""
    return (count * width + 7) // 8


def pack_codes(codes: U8, width: int) -> U8:
    """Pack ``codes`` (each ``< 2**width``, ``1 <= width <= 8``) LSB-first into bytes."""
    if not 1 <= width <= 8:
        raise ValueError(f"width must be in 1..8, got {width}")
    count = int(codes.size)
    if width == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if width == 1:
        return np.packbits(codes.astype(bool, copy=False), bitorder="little")
    per = 8 // width if 8 % width == 0 else 0
    if per and _LITTLE:
        # Fast path: view groups of `per` codes as one machine word and fold them together.
        padded = _pad_to(codes, per)
        if width == 4:
            w16 = padded.view(np.uint16)
            return ((w16 | (w16 >> 4)) & 0xFF).astype(np.uint8)
        w32 = padded.view(np.uint32)  # width == 2
        return ((w32 | (w32 >> 6) | (w32 >> 12) | (w32 >> 18)) & 0xFF).astype(np.uint8)
    # Generic path (odd widths such as QSGD with 3 bits): explode to bits and repack.
    bits = np.unpackbits(codes.reshape(-1, 1), axis=1, bitorder="little")[:, :width]
    out = np.packbits(bits.reshape(-1), bitorder="little")
    assert out.size == packed_size(count, width)
    return out


def unpack_codes(buf: U8, count: int, width: int) -> U8:
    """Inverse of :func:`pack_codes`; checks the length and that padding bits are zero."""
    if buf.size != packed_size(count, width):
        raise DecodeError(
            f"packed {width}-bit section has {buf.size} bytes, expected {packed_size(count, width)}"
        )
    _check_padding(buf, count, width)
    if width == 8:
        return buf
    if width == 1:
        return np.unpackbits(buf, count=count, bitorder="little")
    per = 8 // width if 8 % width == 0 else 0
    if per and _LITTLE:
        if width == 4:
            w16 = buf.astype(np.uint16)
            out = ((w16 | (w16 << 4)) & 0x0F0F).view(np.uint8)
        else:
            w32 = buf.astype(np.uint32)
            out = ((w32 | (w32 << 6) | (w32 << 12) | (w32 << 18)) & 0x03030303).view(np.uint8)
        return out[:count]
    bits = np.unpackbits(buf, count=count * width, bitorder="little").reshape(count, width)
    weights = (1 << np.arange(width, dtype=np.uint8)).astype(np.uint8)
    codes: U8 = (bits * weights).sum(axis=1, dtype=np.uint8)
    return codes


def pack_uint(values: I64, width: int) -> U8:
    """Pack non-negative ints ``< 2**width`` (``0 <= width <= 32``) LSB-first."""
    if width <= 8:
        return pack_codes(values.astype(np.uint8), width) if width else np.zeros(0, np.uint8)
    shifts = np.arange(width, dtype=np.int64)
    bits = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_uint(buf: U8, count: int, width: int) -> I64:
    """Inverse of :func:`pack_uint`; checks the length and that padding bits are zero."""
    if width == 0:
        if buf.size:
            raise DecodeError("zero-width section with bytes")
        return np.zeros(count, dtype=np.int64)
    if width <= 8:
        return unpack_codes(buf, count, width).astype(np.int64)
    if buf.size != packed_size(count, width):
        raise DecodeError(f"packed {width}-bit section has {buf.size} bytes")
    _check_padding(buf, count, width)
    bits = np.unpackbits(buf, count=count * width, bitorder="little").reshape(count, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


def _pad_to(codes: U8, multiple: int) -> U8:
    rem = (-codes.size) % multiple
    arr = np.ascontiguousarray(codes, dtype=np.uint8)
    if rem:
        arr = np.concatenate([arr, np.zeros(rem, dtype=np.uint8)])
    return arr


def _check_padding(buf: U8, count: int, width: int) -> None:
    used = (count * width) % 8
    if used and buf.size and int(buf[-1]) >> used:
        raise DecodeError("non-zero padding bits in a packed section")


# --------------------------------------------------------------------------------------------
# LEB128 varints


def varint_size(value: int) -> int:
    """Bytes of the LEB128 encoding of a non-negative int."""
    if value < 0:
        raise ValueError("varints are unsigned")
    return max(1, (value.bit_length() + 6) // 7)


def _varint_lengths(values: I64) -> I64:
    lengths = np.ones(values.shape, dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += values >= (1 << (7 * j))
    return lengths


def varint_sizes_total(values: I64) -> int:
    """Total bytes of the LEB128 encodings of ``values`` (non-negative, ``< 2**35``)."""
    if values.size == 0:
        return 0
    if int(values.max()) < 128:
        return int(values.size)
    return int(_varint_lengths(values).sum())


def varint_encode_array(values: I64) -> U8:
    """LEB128-encode non-negative ``values`` (``< 2**35``) back to back."""
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    vmax = int(values.max())
    if int(values.min()) < 0 or vmax >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError("varint value out of range")
    if vmax < 128:
        return values.astype(np.uint8)
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max())):
        sel = lengths > j
        group = (values[sel] >> (7 * j)) & 0x7F
        cont = (lengths[sel] > j + 1).astype(np.int64) << 7
        out[starts[sel] + j] = (group | cont).astype(np.uint8)
    return out


def varint_decode_array(buf: U8) -> I64:
    """Decode a buffer holding only whole canonical LEB128 varints (``< 2**35`` each)."""
    if buf.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = buf >= 0x80
    if not last.any():
        return buf.astype(np.int64)
    if last[-1]:
        raise DecodeError("varint stream ends inside a varint")
    ends = np.flatnonzero(~last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise DecodeError("varint longer than the format allows")
    # Canonical form: a multi-byte varint never ends in a zero group.
    if bool(((lengths > 1) & (buf[ends] == 0)).any()):
        raise DecodeError("non-canonical (overlong) varint")
    pos = np.arange(buf.size, dtype=np.int64) - np.repeat(starts, lengths)
    contrib = (buf & 0x7F).astype(np.int64) << (7 * pos)
    return np.add.reduceat(contrib, starts)
