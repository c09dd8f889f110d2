"""Coding of a tensor's support (the flat indices it transmits), in the smallest of three codes.

Decision 9 asks for the smaller of a bitmap and delta-coded varints; a Golomb-Rice code of the
same gaps is the third candidate (it is within a few percent of the entropy of a random
support, where the bitmap and varints are 40-70% above it at typical densities):

* **bitmap**: ``ceil(n/8)`` bytes, bit ``i`` set iff index ``i`` is sent (LSB-first);
* **varint**: LEB128 of the gaps ``idx[0]``, ``idx[1]-idx[0]-1``, ... (gap minus one, so only
  strictly increasing indices can be expressed);
* **rice**: ``u8 r``, ``varint U``, then ``U`` bytes of unary quotients (``gap >> r`` zeros
  and a one per index, LSB-first) and ``ceil(k*r/8)`` bytes of ``r``-bit remainders;
* **complement**: the Rice code of the indices *not* sent (dense supports: a bitmap spends one
  bit per coordinate where the entropy ``H(k/n)`` is far less; format 2);
* **full**: every index, no bytes (format 2).

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
    "CODED_MODES",
    "MAX_RICE_PARAM",
    "IndexMode",
    "SupportChoice",
    "SupportCode",
    "choose_support_code",
    "decode_support",
    "encode_support",
    "rice_bits_per_index",
    "rice_bits_per_index_array",
    "support_gaps",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

MAX_RICE_PARAM = 30


class IndexMode(IntEnum):
    """How a tensor's support is coded (3 bits in the section header)."""

    EMPTY = 0  # nothing sent
    BITMAP = 1
    VARINT = 2
    RICE = 3
    COMPLEMENT = 4  # Rice code of the indices not sent
    FULL = 5  # every index sent


CODED_MODES = (IndexMode.VARINT, IndexMode.RICE, IndexMode.COMPLEMENT)  # index bytes in the head


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
    """Expected Rice bits per index of a random support of ``density`` (best parameter)."""
    return float(rice_bits_per_index_array(np.array([density]))[0])


def rice_bits_per_index_array(density: F64) -> F64:
    """:func:`rice_bits_per_index` of every density of an array.

    Gaps are geometric: ``P(gap >= g) = (1-p)**g``, so the unary part of parameter ``r``
    costs ``1 + q/(1-q)`` bits with ``q = (1-p)**(2**r)``, plus ``r`` remainder bits.
    """
    p = np.clip(density.astype(np.float64), 1e-12, 1.0)
    best = np.full(p.shape, np.inf)
    for r in range(MAX_RICE_PARAM + 1):
        q = (1 - p) ** (2.0**r)
        with np.errstate(divide="ignore", invalid="ignore"):
            bits = r + 1 + q / (1 - q)
        np.minimum(best, np.where(q < 1, bits, np.inf), out=best)
        if bool((q < 1e-3).all()):  # larger parameters only add remainder bits
            break
    out: F64 = np.where(p >= 1.0, 1.0, best)
    return out


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


def _best_rice(gaps: I64) -> tuple[int, int]:
    """``(size, parameter)`` of the smallest Rice code of ``gaps``."""
    return min((_rice_size(gaps, r)[1], r) for r in _rice_candidates(gaps))


def choose_support_code(
    support: I64, n: int, *, complement: I64 | None = None, extended: bool = True
) -> SupportChoice:
    """The code :func:`encode_support` uses for ``support``, with its exact size.

    ``complement`` (the indices not sent) may be given instead of computing it; with
    ``extended=False`` only format 1's codes (bitmap, varint, Rice) are candidates.
    """
    k = int(support.size) if complement is None else n - int(complement.size)
    if k == 0:
        return SupportChoice(IndexMode.EMPTY, 0)
    if extended and k == n:
        return SupportChoice(IndexMode.FULL, 0)
    best = SupportChoice(IndexMode.BITMAP, (n + 7) // 8)
    if 2 * k < n:  # sparse: code the indices (never shorter than the bitmap when dense)
        gaps = support_gaps(support)
        varint = _varint_total(gaps)
        if varint < best.nbytes:
            best = SupportChoice(IndexMode.VARINT, varint)
        size, r = _best_rice(gaps)
        if size < best.nbytes:
            best = SupportChoice(IndexMode.RICE, size, r)
    elif extended:  # dense: code the indices left out
        if complement is None:
            complement = _complement(support, n)
        size, r = _best_rice(support_gaps(complement))
        if size < best.nbytes:
            best = SupportChoice(IndexMode.COMPLEMENT, size, r)
    return best


def _complement(support: I64, n: int) -> I64:
    mask = np.ones(n, dtype=np.bool_)
    mask[support] = False
    return np.flatnonzero(mask)


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
    if mode is IndexMode.FULL:
        return SupportCode(mode, np.zeros(0, dtype=np.uint8), k)
    if mode is IndexMode.VARINT:
        return SupportCode(mode, varint_encode_array(support_gaps(support)), k)
    coded = _complement(support, n) if mode is IndexMode.COMPLEMENT else support
    gaps = support_gaps(coded)
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
    if mode == IndexMode.COMPLEMENT:
        left_out = _gaps_to_support(_rice_gaps(data), n)
        if left_out.size == n:
            raise DecodeError("complement support is empty (should have been coded as empty)")
        return _complement(left_out, n)
    if mode == IndexMode.FULL:
        if data.size or n == 0:
            raise DecodeError("full support with index bytes or of an empty tensor")
        return np.arange(n, dtype=np.int64)
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
