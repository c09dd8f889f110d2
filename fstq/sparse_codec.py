"""Per-tensor sections of the sparse methods (FSTQ mixed precision and Top-k).

Given per-coordinate *levels* (FSTQ: 0 pruned, 1 INT2, 2 INT4, 3 fp16; Top-k: 0 or 1 = fp16),
one tensor's section is::

    head     varint  (index_bytes << 2) | IndexMode   (index_bytes 0 for EMPTY and BITMAP)
    index    nothing | bitmap of ceil(n/8) bytes | varint gaps | Rice-coded gaps (index_coding)
    tags     ceil(k/4) bytes: 2-bit tag per sent coordinate, 0 INT2, 1 INT4, 2 fp16  [FSTQ only]
    scales   f32 INT2 scale if any INT2, then f32 INT4 scale if any INT4             [FSTQ only]
    int2     ceil(k2/4) bytes of 2-bit offset codes (q + 1)                          [FSTQ only]
    int4     ceil(k4/2) bytes of 4-bit offset codes (q + 7)                          [FSTQ only]
    fp16     2 bytes per fp16 coordinate, little-endian IEEE half

Values of each width appear in support order. Counts are derived (support -> k, tags -> k2/k4/
k16), never stored twice, so there is nothing to disagree. The INT scale of a width is chosen
by the allocation (:mod:`fstq.allocation`) or, given none, is the absmax of the coordinates
assigned that width over q_max (decision 7); values beyond ``q_max * scale`` clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from fstq.accounting import PartCounter
from fstq.bitpack import pack_codes, packed_size, unpack_codes, varint_size
from fstq.config import Rounding
from fstq.container import ByteReader, ByteWriter
from fstq.errors import DecodeError
from fstq.index_coding import (
    IndexMode,
    SupportChoice,
    choose_support_code,
    decode_support,
    encode_support,
    rice_bits_per_index,
)
from fstq.quantize import (
    FP16_BITS,
    QMAX,
    absmax_scale,
    dequantize_codes,
    fp16_from_bytes,
    half_bytes,
    half_to_f32,
    quantize_codes,
    to_half,
)

__all__ = [
    "EMPTY_SECTION_BYTES",
    "FSTQ_WIDTHS",
    "INT2_BITS",
    "INT4_BITS",
    "SCALE_BYTES",
    "TAG_BITS",
    "TOPK_WIDTHS",
    "SparsePlan",
    "SparseSection",
    "decode_section",
    "encode_section",
    "estimated_bytes",
    "parse_section",
    "plan",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

INT2_BITS: Final = 2  # paper section 2.4: the two integer widths of the ladder
INT4_BITS: Final = 4
FSTQ_WIDTHS: Final = (0, INT2_BITS, INT4_BITS, FP16_BITS)  # value bits per level; tag = level-1
TOPK_WIDTHS: Final = (0, FP16_BITS)  # Top-k sends fp16 values, untagged
TAG_BITS: Final = 2  # three precisions (INT2, INT4, fp16) need two bits; tag 3 is invalid
SCALE_BYTES: Final = 4  # one float32 scale per INT width a section uses
EMPTY_SECTION_BYTES: Final = 1  # an empty section is its one-byte head (mode EMPTY)
# Sizing a plan from a sample (estimated_bytes): a head varint is at most 3 bytes for the index
# sections of LoRA-sized tensors (< 2**19 bytes); a varint gap takes a 2nd byte from 2**7 and a
# 3rd from 2**14.
_HEAD_BYTES_ESTIMATE: Final = 3.0
_VARINT_2ND_BYTE_GAP: Final = 1 << 7
_VARINT_3RD_BYTE_GAP: Final = 1 << 14


@dataclass
class SparsePlan:
    """What one tensor's section will hold, with its exact byte sizes.

    The support is only materialised when sizing needs it (varint may beat the bitmap) or at
    encoding time: budget fitting sizes many candidate plans.
    """

    levels: U8
    counts: tuple[int, int, int]  # INT2, INT4, fp16 coordinates
    code: SupportChoice
    tagged: bool
    _support: I64 | None = None

    @property
    def mode(self) -> IndexMode:
        return self.code.mode

    @property
    def index_bytes(self) -> int:
        return self.code.nbytes

    @property
    def n(self) -> int:
        return int(self.levels.size)

    @property
    def k(self) -> int:
        return sum(self.counts)

    @property
    def support(self) -> I64:
        if self._support is None:
            self._support = np.flatnonzero(self.levels != 0)
        return self._support

    @property
    def head_bytes(self) -> int:
        return varint_size(_head_value(self.mode, self.index_bytes))

    @property
    def tag_bytes(self) -> int:
        return packed_size(self.k, TAG_BITS) if self.tagged else 0

    @property
    def scale_bytes(self) -> int:
        k2, k4, _ = self.counts
        return SCALE_BYTES * ((k2 > 0) + (k4 > 0))

    @property
    def value_bytes(self) -> int:
        k2, k4, k16 = self.counts
        return packed_size(k2, INT2_BITS) + packed_size(k4, INT4_BITS) + packed_size(k16, FP16_BITS)

    @property
    def elastic(self) -> int:
        """Bytes that grow with the number of steps taken (not bitmaps, heads or scales)."""
        coded = self.index_bytes if self.mode in (IndexMode.VARINT, IndexMode.RICE) else 0
        return coded + self.tag_bytes + self.value_bytes

    @property
    def total(self) -> int:
        return (
            self.head_bytes
            + self.index_bytes
            + self.tag_bytes
            + self.scale_bytes
            + self.value_bytes
        )


def estimated_bytes(
    counts: tuple[float, float, float], n: int, *, tagged: bool
) -> tuple[float, float]:
    """Section ``(total, elastic)`` bytes for coordinate counts, support assumed random.

    Used to size plans from a sample: gaps of a random support are geometric with mean
    ``n/k`` (a varint needs a second byte with probability ``(1 - k/n)**128``; Rice codes
    follow :func:`~fstq.index_coding.rice_bits_per_index`).
    """
    k2, k4, k16 = counts
    k = k2 + k4 + k16
    if k <= 0:
        return float(EMPTY_SECTION_BYTES), 0.0
    p = min(1.0, k / max(n, 1))
    varint = 1 + (1 - p) ** _VARINT_2ND_BYTE_GAP + (1 - p) ** _VARINT_3RD_BYTE_GAP
    coded = k * min(varint, rice_bits_per_index(p) / 8)
    bitmap = (n + 7) // 8
    tags = k * TAG_BITS / 8 if tagged else 0.0
    values = k2 * INT2_BITS / 8 + k4 * INT4_BITS / 8 + k16 * FP16_BITS / 8
    scales = SCALE_BYTES * ((k2 > 0) + (k4 > 0))
    elastic = tags + values + (coded if coded < bitmap else 0.0)
    return _HEAD_BYTES_ESTIMATE + min(coded, bitmap) + tags + values + scales, elastic


def _head_value(mode: IndexMode, index_bytes: int) -> int:
    return int(mode) if mode in (IndexMode.EMPTY, IndexMode.BITMAP) else index_bytes << 2 | mode


def plan(levels: U8, *, tagged: bool) -> SparsePlan:
    """Plan a section from per-coordinate levels (see module docstring)."""
    n = int(levels.size)
    k = int(np.count_nonzero(levels))
    if tagged:
        k2 = int(np.count_nonzero(levels == 1))
        k4 = int(np.count_nonzero(levels == 2))
        counts = (k2, k4, k - k2 - k4)
    else:
        counts = (0, 0, k)
    if k == 0:
        return SparsePlan(levels, counts, SupportChoice(IndexMode.EMPTY, 0), tagged)
    if 2 * k >= n:  # dense: neither varints nor Rice codes beat one bit per coordinate
        return SparsePlan(levels, counts, SupportChoice(IndexMode.BITMAP, (n + 7) // 8), tagged)
    support = np.flatnonzero(levels != 0)
    return SparsePlan(levels, counts, choose_support_code(support, n), tagged, support)


def _positions(tags: U8, tag: int) -> I64:
    # flatnonzero of a bool array is ~6x faster than of uint8 (no per-byte branch).
    return np.flatnonzero(tags == tag)


def encode_section(
    out: ByteWriter,
    parts: PartCounter,
    x: F32,
    p: SparsePlan,
    rounding: Rounding,
    rng: np.random.Generator | None,
    scales: tuple[float, float] | None = None,
) -> F32:
    """Write one section for flat values ``x``; returns the decoded values at ``p.support``.

    ``scales`` are the (INT2, INT4) scales to use (values beyond ``q_max*s`` clip); ``None``
    takes the absmax of the coordinates assigned each width.
    """
    code = encode_support(p.support, p.n, p.code)
    parts.header += out.varint(_head_value(code.mode, code.data.size))
    parts.indices += out.raw(code.data)
    vals = np.take(x, p.support)
    if not p.tagged:
        half = to_half(vals)
        parts.values += out.raw(half_bytes(half))
        return half_to_f32(half)
    tags = np.take(p.levels, p.support)
    tags -= 1
    parts.tags += out.raw(pack_codes(tags, TAG_BITS))
    decoded = np.empty(p.k, dtype=np.float32)
    packed: list[U8] = []
    for tag, width in enumerate((INT2_BITS, INT4_BITS)):
        pos = _positions(tags, tag)
        if pos.size == 0:
            continue
        qmax = QMAX[width]
        v = np.take(vals, pos)
        scale = absmax_scale(v, qmax) if scales is None else np.float32(scales[tag])
        parts.scales += out.f32(float(scale))
        codes = quantize_codes(v, scale, qmax, rounding, rng)
        packed.append(pack_codes(codes, width))
        decoded[pos] = dequantize_codes(codes, scale, qmax)
    for chunk in packed:
        parts.values += out.raw(chunk)
    pos16 = _positions(tags, 2)
    half = to_half(np.take(vals, pos16))
    parts.values += out.raw(half_bytes(half))
    decoded[pos16] = half_to_f32(half)
    return decoded


@dataclass(frozen=True)
class SparseSection:
    """One parsed sparse section: the symbols the encoder emitted, before reconstruction."""

    n: int
    support: I64
    tags: U8 | None  # per sent coordinate: 0 INT2, 1 INT4, 2 fp16; None for Top-k (all fp16)
    scales: tuple[np.float32, np.float32]  # INT2, INT4 (0 when the width is unused)
    int2: U8  # offset codes q + 1 of the INT2 coordinates, in support order
    int4: U8  # offset codes q + 7 of the INT4 coordinates
    fp16: F32  # values of the fp16 coordinates

    def dense(self) -> F32:
        """The section's tensor as flat float32 values."""
        out = np.zeros(self.n, dtype=np.float32)
        if self.tags is None:
            out[self.support] = self.fp16
            return out
        values = np.empty(self.support.size, dtype=np.float32)
        for tag, codes, width in ((0, self.int2, INT2_BITS), (1, self.int4, INT4_BITS)):
            values[_positions(self.tags, tag)] = dequantize_codes(
                codes, self.scales[tag], QMAX[width]
            )
        values[_positions(self.tags, 2)] = self.fp16
        out[self.support] = values
        return out


def decode_section(reader: ByteReader, n: int, *, tagged: bool, name: str) -> F32:
    """Read one section of a tensor with ``n`` elements; returns its dense flat values."""
    return parse_section(reader, n, tagged=tagged, name=name).dense()


def parse_section(reader: ByteReader, n: int, *, tagged: bool, name: str) -> SparseSection:
    """Read and check one section of a tensor with ``n`` elements."""
    head = reader.varint(f"{name}: section head", (reader.remaining << 2) | 3)
    mode, index_bytes = head & 3, head >> 2
    if mode in (IndexMode.VARINT, IndexMode.RICE):
        if index_bytes == 0 or n == 0:
            raise DecodeError(f"{name}: empty coded index section")
        data = reader.take(index_bytes, f"{name}: indices")
    elif index_bytes:
        raise DecodeError(f"{name}: index length given for a bitmap or empty support")
    elif mode == IndexMode.BITMAP:
        data = reader.take((n + 7) // 8, f"{name}: bitmap")
    else:
        data = reader.take(0, name)
    support = decode_support(mode, data, n)
    k = int(support.size)
    if not tagged:
        fp16 = fp16_from_bytes(reader.take(packed_size(k, FP16_BITS), f"{name}: fp16 values"))
        none = np.zeros(0, dtype=np.uint8)
        return SparseSection(n, support, None, (np.float32(0), np.float32(0)), none, none, fp16)
    tags = unpack_codes(reader.take(packed_size(k, TAG_BITS), f"{name}: tags"), k, TAG_BITS)
    if k and int(tags.max()) == 3:
        raise DecodeError(f"{name}: invalid precision tag 3")
    counts = [int(np.count_nonzero(tags == tag)) for tag in (0, 1)]
    scales: list[np.float32] = []
    for count in counts:
        raw = reader.f32(f"{name}: scale") if count else 0.0
        if not (np.isfinite(raw) and raw >= 0):
            raise DecodeError(f"{name}: invalid scale {raw}")
        scales.append(np.float32(raw))
    codes = []
    for count, width in zip(counts, (INT2_BITS, INT4_BITS), strict=True):
        buf = reader.take(packed_size(count, width), f"{name}: INT{width}")
        c = unpack_codes(buf, count, width)
        if count and int(c.max()) > 2 * QMAX[width]:
            raise DecodeError(f"{name}: INT{width} code out of range")
        codes.append(c)
    k16 = k - counts[0] - counts[1]
    fp16 = fp16_from_bytes(reader.take(packed_size(k16, FP16_BITS), f"{name}: fp16 values"))
    return SparseSection(n, support, tags, (scales[0], scales[1]), codes[0], codes[1], fp16)
