"""Per-tensor sections of the sparse methods (FSTQ mixed precision and Top-k) on the wire.

Format 2. Given a section plan (:mod:`fstq.sparse_plan`), one tensor's section is::

    head    varint  index_bytes << 6 | coded << 3 | IndexMode
                    (index_bytes only for VARINT, RICE and COMPLEMENT; ``coded`` bit i set when
                    stream i, of tags, INT2, INT4, is ANS-coded; always 0 for Top-k)
    index   nothing (EMPTY, FULL) | bitmap of ceil(n/8) bytes | varint gaps | Rice-coded gaps |
            Rice-coded gaps of the indices left out (index_coding)
    -- FSTQ, when k > 0 --
    tags    coded: varint k2, varint k4 (the tag model: exact counts of INT2 and INT4)
            packed: ceil(k/4) bytes, a 2-bit tag per sent coordinate: 0 INT2, 1 INT4, 2 fp16
    scales  f32 INT2 scale if k2 > 0, then f32 INT4 scale if k4 > 0
    int2    coded: model of the 3 offset codes | packed: ceil(k2/4) bytes of codes q + 1
    int4    coded: model of the 15 offset codes | packed: ceil(k4/2) bytes of codes q + 7
    -- every sparse section --
    fp16    2 bytes per fp16 coordinate, little-endian IEEE half

After its last section an FSTQ payload holds two ANS blocks (:mod:`fstq.stream_coding`): the
coded tag streams of every tensor in table order, then the coded INT2 and INT4 streams (INT2
first within a tensor). Values of each width appear in support order. Counts are derived
(support -> k, tags or the tag model -> k2/k4/k16), never stored twice. A decoder parses every
section first, then pops the blocks, so each stream's length and model are known before its
symbols are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fstq.accounting import PartCounter
from fstq.bitpack import pack_codes, packed_size, unpack_codes
from fstq.container import ByteReader, ByteWriter, TensorSpec
from fstq.errors import DecodeError
from fstq.index_coding import CODED_MODES, IndexMode, decode_support, encode_support
from fstq.quantize import (
    FP16_BITS,
    QMAX,
    dequantize_codes,
    fp16_from_bytes,
    half_bytes,
    half_to_f32,
)
from fstq.sparse_plan import (
    HEAD_SHIFT,
    INT2_BITS,
    INT4_BITS,
    INT_ALPHABET,
    TAG_ALPHABET,
    TAG_BITS,
    SectionPlan,
    head_value,
)
from fstq.stream_coding import (
    BlockDecoder,
    BlockEncoder,
    SymbolModel,
    read_block,
    read_model,
    write_block,
    write_model,
)

__all__ = [
    "SparseBlocks",
    "SparseSection",
    "encode_section",
    "parse_sections",
    "write_blocks",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

_WIDTHS = (INT2_BITS, INT4_BITS)
_FLAGS_MASK = 7
_MODE_MASK = 7


def _positions(tags: U8, tag: int) -> I64:
    # flatnonzero of a bool array is ~6x faster than of uint8 (no per-byte branch).
    return np.flatnonzero(tags == tag)


@dataclass
class SparseBlocks:
    """The two ANS blocks of an FSTQ payload while its sections are written."""

    tags: BlockEncoder
    ints: BlockEncoder

    @classmethod
    def new(cls) -> SparseBlocks:
        return cls(BlockEncoder(), BlockEncoder())


def encode_section(
    out: ByteWriter,
    parts: PartCounter,
    p: SectionPlan,
    blocks: SparseBlocks | None,
    *,
    keep_decoded: bool,
) -> F32 | None:
    """Write one section; returns the decoded values at ``p.support`` if ``keep_decoded``.

    Coded streams are queued on ``blocks`` (FSTQ), written after the last section.
    """
    code = encode_support(p.support, p.n, p.code)
    if code.data.size != p.code.nbytes:  # the budget fit counted the planned size
        raise AssertionError(f"index of {code.data.size} bytes, planned {p.code.nbytes}")
    index_bytes = code.data.size if code.mode in CODED_MODES else 0
    parts.header += out.varint(head_value(code.mode, index_bytes, p.coded))
    parts.indices += out.raw(code.data)
    if blocks is None:  # Top-k: fp16 values only
        parts.values += out.raw(half_bytes(p.half))
        return half_to_f32(p.half) if keep_decoded else None
    if p.k == 0:
        return np.zeros(0, dtype=np.float32) if keep_decoded else None
    tags = p.tags
    tag_model, *int_models = p.models
    if tag_model is not None:
        parts.tags += out.varint(p.counts[0]) + out.varint(p.counts[1])
        blocks.tags.add(tags, tag_model)
    else:
        parts.tags += out.raw(pack_codes(tags, TAG_BITS))
    for scale, count in zip(p.scales, p.counts[:2], strict=True):
        if count:
            parts.scales += out.f32(float(scale))
    for tag, (width, model) in enumerate(zip(_WIDTHS, int_models, strict=True)):
        codes = p.int2 if width == INT2_BITS else p.int4
        if codes.size == 0:
            continue
        if model is not None:
            parts.values += write_model(out, model.counts, p.precisions[tag])
            blocks.ints.add(codes, model)
        else:
            parts.values += out.raw(pack_codes(codes, width))
    parts.values += out.raw(half_bytes(p.half))
    if not keep_decoded:
        return None
    decoded = np.empty(p.k, dtype=np.float32)
    for tag, codes, width in ((0, p.int2, INT2_BITS), (1, p.int4, INT4_BITS)):
        decoded[_positions(tags, tag)] = dequantize_codes(codes, p.scales[tag], QMAX[width])
    decoded[_positions(tags, 2)] = half_to_f32(p.half)
    return decoded


def write_blocks(out: ByteWriter, parts: PartCounter, blocks: SparseBlocks) -> None:
    """Write the tag block, then the INT block, after the last section of an FSTQ payload."""
    head, body = write_block(out, blocks.tags.words())
    parts.header += head
    parts.tags += body
    head, body = write_block(out, blocks.ints.words())
    parts.header += head
    parts.values += body


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


@dataclass
class _Pending:
    """A section whose coded streams still wait in the blocks (None where a stream is coded)."""

    name: str
    n: int
    support: I64
    counts: tuple[int, int]  # INT2, INT4 coordinates
    tags: U8 | None
    tag_model: SymbolModel | None
    scales: tuple[np.float32, np.float32]
    codes: list[U8 | None]  # INT2, INT4
    models: list[SymbolModel | None]
    fp16: F32


def parse_sections(
    reader: ByteReader, specs: Sequence[TensorSpec], *, tagged: bool
) -> list[SparseSection]:
    """Read and check every section of a sparse payload, then (FSTQ) its two blocks."""
    pending = [_parse_one(reader, spec.numel, tagged=tagged, name=spec.name) for spec in specs]
    if tagged:
        tag_block = BlockDecoder(read_block(reader, "tag block"), "tag block")
        int_block = BlockDecoder(read_block(reader, "INT block"), "INT block")
        for sec in pending:
            if sec.tag_model is not None:
                sec.tags = tag_block.take(sec.tag_model, sec.support.size, f"{sec.name}: tags")
                if not np.array_equal(
                    np.bincount(sec.tags, minlength=TAG_ALPHABET), sec.tag_model.counts
                ):
                    raise DecodeError(f"{sec.name}: coded tags disagree with their counts")
        tag_block.finish()
        for sec in pending:
            for i, (model, count) in enumerate(zip(sec.models, sec.counts, strict=True)):
                if model is not None:
                    sec.codes[i] = int_block.take(model, count, f"{sec.name}: INT{_WIDTHS[i]}")
        int_block.finish()
    none = np.zeros(0, dtype=np.uint8)
    return [
        SparseSection(
            sec.n,
            sec.support,
            sec.tags,
            sec.scales,
            none if sec.codes[0] is None else sec.codes[0],
            none if sec.codes[1] is None else sec.codes[1],
            sec.fp16,
        )
        for sec in pending
    ]


def _read_support(reader: ByteReader, n: int, name: str) -> tuple[I64, int]:
    """The section head's index mode and support; returns ``(support, coded flags)``."""
    head = reader.varint(f"{name}: section head", (reader.remaining << HEAD_SHIFT) | 63)
    mode, coded, index_bytes = head & _MODE_MASK, (head >> 3) & _FLAGS_MASK, head >> HEAD_SHIFT
    if mode not in IndexMode._value2member_map_:
        raise DecodeError(f"{name}: unknown index mode {mode}")
    if mode in CODED_MODES:
        if index_bytes == 0 or n == 0:
            raise DecodeError(f"{name}: empty coded index section")
        data = reader.take(index_bytes, f"{name}: indices")
    elif index_bytes:
        raise DecodeError(f"{name}: index length given for a bitmap, full or empty support")
    elif mode == IndexMode.BITMAP:
        data = reader.take((n + 7) // 8, f"{name}: bitmap")
    else:
        data = reader.take(0, name)
    return decode_support(mode, data, n), coded


def _parse_one(reader: ByteReader, n: int, *, tagged: bool, name: str) -> _Pending:
    support, coded = _read_support(reader, n, name)
    k = int(support.size)
    zero = (np.float32(0), np.float32(0))
    if coded and (not tagged or k == 0):
        raise DecodeError(f"{name}: coded streams flagged in a section without tags")
    if not tagged:
        fp16 = fp16_from_bytes(reader.take(packed_size(k, FP16_BITS), f"{name}: fp16 values"))
        return _Pending(
            name, n, support, (0, 0), None, None, zero, [None, None], [None, None], fp16
        )
    tags: U8 | None = None
    tag_model = None
    if coded & 1:
        k2 = reader.varint(f"{name}: INT2 count", k)
        k4 = reader.varint(f"{name}: INT4 count", k - k2)
        tag_model = SymbolModel(np.array([k2, k4, k - k2 - k4], dtype=np.int64))
    else:
        tags = unpack_codes(reader.take(packed_size(k, TAG_BITS), f"{name}: tags"), k, TAG_BITS)
        if k and int(tags.max()) == 3:
            raise DecodeError(f"{name}: invalid precision tag 3")
        k2, k4 = (int(np.count_nonzero(tags == tag)) for tag in (0, 1))
    scales: list[np.float32] = []
    for count in (k2, k4):
        raw = reader.f32(f"{name}: scale") if count else 0.0
        if not (np.isfinite(raw) and raw >= 0):
            raise DecodeError(f"{name}: invalid scale {raw}")
        scales.append(np.float32(raw))
    codes: list[U8 | None] = []
    models: list[SymbolModel | None] = []
    for i, (count, width) in enumerate(zip((k2, k4), _WIDTHS, strict=True)):
        what = f"{name}: INT{width}"
        if coded & (2 << i):
            if count == 0:
                raise DecodeError(f"{what}: coded stream of no codes")
            models.append(read_model(reader, INT_ALPHABET[width], what))
            codes.append(None)
            continue
        c = unpack_codes(reader.take(packed_size(count, width), what), count, width)
        if count and int(c.max()) > 2 * QMAX[width]:
            raise DecodeError(f"{what} code out of range")
        models.append(None)
        codes.append(c)
    k16 = k - k2 - k4
    fp16 = fp16_from_bytes(reader.take(packed_size(k16, FP16_BITS), f"{name}: fp16 values"))
    return _Pending(
        name, n, support, (k2, k4), tags, tag_model, (scales[0], scales[1]), codes, models, fp16
    )
