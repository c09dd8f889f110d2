"""Coding of a tensor's support (the flat indices it transmits), in the smallest of three codes.

Decision 9 asks for the smaller of a bitmap and delta-coded varints; a Golomb-Rice code of the
same gaps is the third candidate (it is within a few percent of the entropy of a random
support, where the bitmap and varints are 40-70% above it at typical densities):

* **bitmap**: ``ceil(n/8)`` bytes, bit ``i`` set iff index ``i`` is sent (LSB-first);
* **varint**: LEB128 of the gaps ``idx[0]``, ``idx[1]-idx[0]-1``, ... (gap minus one, so only
  strictly increasing indices can be expressed);
* **rice**: ``u8 r``, ``varint U``, then ``U`` bytes of unary quotients (``gap >> r`` zeros
  and a one per index, LSB-first) and ``ceil(k*r/8)`` bytes of ``r``-bit remainders.

The size of every candidate is computed exactly before choosing; ties prefer bitmap, then
varint. FSTQ and Top-k share this coder; every decoder check raises DecodeError.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from fstq.bitpack import (
    pack_uint,
    unpack_codes,
    unpack_uint,
    varint_decode_array,
    varint_encode_array,
    varint_size,
)
from fstq.bitpack import varint_sizes_total as _varint_total
from fstq.container import ByteReader
from fstq.errors import DecodeError

__all__ = [
    "MAX_RICE_PARAM",
    "IndexMode",
    "SupportChoice",
    "SupportCode",
    "choose_support_code",
    "decode_support",
    "encode_support",
    "rice_bits_per_index",
    "support_gaps",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

MAX_RICE_PARAM = 30


class IndexMode(IntEnum):
    """How a tensor's support is coded (2 bits in the section header)."""

    EMPTY = 0  # nothing sent
    BITMAP = 1
    VARINT = 2
    RICE = 3


@dataclass(frozen=True)
class SupportCode:
    """A coded support: its mode and bytes."""

    mode: IndexMode
    data: U8
    count: int  # number of indices coded


def support_gaps(support: I64) -> I64:
    """Gap-minus-one sequence of strictly increasing ``support`` (first element as is)."""
    gaps = np.diff(support, prepend=-1)
    gaps -= 1
    return gaps


def rice_bits_per_index(density: float) -> float:
    """Expected Rice bits per index of a random support of ``density`` (best parameter).

    Gaps are geometric: ``P(gap >= g) = (1-p)**g``, so the unary part of parameter ``r``
    costs ``1 + q/(1-q)`` bits with ``q = (1-p)**(2**r)``, plus ``r`` remainder bits.
    """
    p = min(max(density, 1e-12), 1.0)
    if p >= 1.0:
        return 1.0
    best = float("inf")
    for r in range(MAX_RICE_PARAM + 1):
        q = (1 - p) ** (2**r)
        best = min(best, r + 1 + q / (1 - q))
        if q < 1e-3:
            break
    return best


def _rice_candidates(gaps: I64) -> range:
    # The best parameter is near log2(mean gap * ln 2); sizes are compared exactly around it.
    mean = float(gaps.mean()) if gaps.size else 0.0
    centre = int(np.floor(np.log2(max(mean * 0.69, 1.0))))
    return range(max(0, centre - 1), min(MAX_RICE_PARAM, centre + 1) + 1)


def _rice_size(gaps: I64, r: int) -> tuple[int, int]:
    """``(unary_bytes, total_bytes)`` of the Rice code with parameter ``r``."""
    unary_bits = int(gaps.size) + int((gaps >> r).sum())
    unary = (unary_bits + 7) // 8
    return unary, 1 + varint_size(unary) + unary + (int(gaps.size) * r + 7) // 8


@dataclass(frozen=True)
class SupportChoice:
    """The smallest code of a support: its mode, exact byte size and Rice parameter."""

    mode: IndexMode
    nbytes: int
    rice_param: int = 0


def choose_support_code(support: I64, n: int) -> SupportChoice:
    """The code :func:`encode_support` uses for ``support``, with its exact size."""
    if support.size == 0:
        return SupportChoice(IndexMode.EMPTY, 0)
    gaps = support_gaps(support)
    best = SupportChoice(IndexMode.BITMAP, (n + 7) // 8)
    varint = _varint_total(gaps)
    if varint < best.nbytes:
        best = SupportChoice(IndexMode.VARINT, varint)
    for r in _rice_candidates(gaps):
        size = _rice_size(gaps, r)[1]
        if size < best.nbytes:
            best = SupportChoice(IndexMode.RICE, size, r)
    return best


def encode_support(support: I64, n: int, choice: SupportChoice | None = None) -> SupportCode:
    """Code strictly increasing flat indices ``support`` (all ``< n``) in the smallest mode.

    ``choice`` is :func:`choose_support_code`'s answer when the caller already has it.
    """
    choice = choice or choose_support_code(support, n)
    mode, k = choice.mode, int(support.size)
    if mode is IndexMode.EMPTY:
        return SupportCode(mode, np.zeros(0, dtype=np.uint8), 0)
    if mode is IndexMode.BITMAP:
        mask = np.zeros(n, dtype=np.bool_)
        mask[support] = True
        return SupportCode(mode, np.packbits(mask, bitorder="little"), k)
    gaps = support_gaps(support)
    if mode is IndexMode.VARINT:
        return SupportCode(mode, varint_encode_array(gaps), k)
    r = choice.rice_param
    unary_bytes, _ = _rice_size(gaps, r)
    bits = np.zeros(8 * unary_bytes, dtype=np.bool_)
    bits[np.cumsum((gaps >> r) + 1) - 1] = True  # q zeros, then a one
    parts = [
        np.array([r], dtype=np.uint8),
        varint_encode_array(np.array([unary_bytes], dtype=np.int64)),
        np.packbits(bits, bitorder="little"),
        pack_uint(gaps & ((1 << r) - 1), r),
    ]
    return SupportCode(mode, np.concatenate(parts), k)


def decode_support(mode: int, data: U8, n: int) -> I64:
    """Inverse of :func:`encode_support`: strictly increasing indices ``< n``."""
    if mode == IndexMode.EMPTY:
        if data.size:
            raise DecodeError("empty support with index bytes")
        return np.zeros(0, dtype=np.int64)
    if mode == IndexMode.BITMAP:
        bits = unpack_codes(data, n, 1)
        support = np.flatnonzero(bits.view(np.bool_))  # bits are 0/1: the bool view is exact
        if support.size == 0:
            raise DecodeError("bitmap support is empty (should have been coded as empty)")
        return support
    if mode == IndexMode.VARINT:
        return _gaps_to_support(varint_decode_array(data), n)
    if mode == IndexMode.RICE:
        return _gaps_to_support(_rice_gaps(data), n)
    raise DecodeError(f"unknown index mode {mode}")


def _rice_gaps(data: U8) -> I64:
    reader = ByteReader(data, int(data.size))
    r = reader.u8("rice parameter")
    if r > MAX_RICE_PARAM:
        raise DecodeError(f"rice parameter {r} out of range")
    unary_bytes = reader.varint("rice unary length", reader.remaining)
    unary = reader.take(unary_bytes, "rice quotients")
    ones = np.flatnonzero(np.unpackbits(unary, bitorder="little").view(np.bool_))
    if ones.size == 0 or int(ones[-1]) < 8 * (unary_bytes - 1):
        raise DecodeError("rice quotients empty or padded by a whole byte")
    quotients = np.diff(ones, prepend=-1) - 1
    remainders = unpack_uint(reader.take(reader.remaining, "rice remainders"), ones.size, r)
    return (quotients << r) | remainders


def _gaps_to_support(gaps: I64, n: int) -> I64:
    if gaps.size == 0:
        raise DecodeError("coded support is empty (should have been coded as empty)")
    if gaps.size > n or int(gaps.max()) >= n:
        raise DecodeError(f"coded support does not fit a tensor of {n} elements")
    # Each gap is < n and there are at most n of them, so the cumsum cannot overflow.
    support = np.cumsum(gaps + 1) - 1
    if int(support[-1]) >= n:
        raise DecodeError(f"support index {int(support[-1])} out of range for {n} elements")
    return support
