"""Plans of the sparse sections (FSTQ mixed precision, Top-k): what each holds, and its size.

A plan is made from per-coordinate *levels* (FSTQ: 0 pruned, 1 INT2, 2 INT4, 3 fp16; Top-k: 0
or 1 = fp16). It holds each tensor's support code, the INT codes (quantised here, so that
sizing and encoding see the very same symbols) and, per symbol stream (tags, INT2, INT4),
whether it is ANS-coded with its own model or packed at its fixed width.

A whole payload is planned at once (:func:`make_plans`), vectorised over its tensors: the
budget fit plans a payload several times, and per-tensor numpy calls over 240 small LoRA
matrices would cost more than the arithmetic. A payload whose coded streams would not beat
fixed-width packing is planned packed throughout, so entropy coding never costs bytes.

Sizes are exact for everything inside the sections and an upper bound for the two ANS blocks
(:func:`~fstq.stream_coding.block_bytes`); :attr:`PayloadPlan.total` is what a budget is
fitted against, so a payload never exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from fstq.config import Rounding
from fstq.index_coding import (
    CODED_MODES,
    MAX_RICE_PARAM,
    IndexMode,
    SupportChoice,
    rice_bits_per_index_array,
    support_gaps,
)
from fstq.quantize import FP16_BITS, QMAX, quantize_codes, to_half
from fstq.stream_coding import (
    SLACK_BITS_PER_SYMBOL,
    SymbolModel,
    block_bytes,
    fit_models,
    model_bytes,
)

__all__ = [
    "EMPTY_SECTION_BYTES",
    "FSTQ_WIDTHS",
    "HEAD_SHIFT",
    "INT2_BITS",
    "INT4_BITS",
    "INT_ALPHABET",
    "SCALE_BYTES",
    "TAG_ALPHABET",
    "TAG_BITS",
    "TOPK_WIDTHS",
    "Coding",
    "PayloadPlan",
    "SectionPlan",
    "estimated_bytes",
    "head_value",
    "make_plans",
]

F32 = npt.NDArray[np.float32]
F16 = npt.NDArray[np.float16]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

INT2_BITS: Final = 2  # paper section 2.4: the two integer widths of the ladder
INT4_BITS: Final = 4
FSTQ_WIDTHS: Final = (0, INT2_BITS, INT4_BITS, FP16_BITS)  # value bits per level; tag = level-1
TOPK_WIDTHS: Final = (0, FP16_BITS)  # Top-k sends fp16 values, untagged
TAG_BITS: Final = 2  # packed width of a tag: three precisions (INT2, INT4, fp16); 3 is invalid
TAG_ALPHABET: Final = 3
INT_ALPHABET: Final = {INT2_BITS: 2 * QMAX[2] + 1, INT4_BITS: 2 * QMAX[4] + 1}  # offset codes
SCALE_BYTES: Final = 4  # one float32 scale per INT width a section uses
EMPTY_SECTION_BYTES: Final = 1  # an empty section is its one-byte head (mode EMPTY)
HEAD_SHIFT: Final = 6  # section head: index_bytes << 6 | coded streams << 3 | index mode
_STREAM_WIDTHS: Final = (TAG_BITS, INT2_BITS, INT4_BITS)
_RICE_SEARCH: Final = (-1, 0, 1)  # Rice parameters tried around the mean gap's (index_coding)
# Sizing a plan from a sample (estimated_bytes): a head varint is at most 3 bytes for the index
# sections of LoRA-sized tensors (< 2**15 bytes); a varint gap takes a 2nd byte from 2**7 and a
# 3rd from 2**14.
_HEAD_BYTES_ESTIMATE: Final = 3.0
_VARINT_2ND_BYTE_GAP: Final = 1 << 7
_VARINT_3RD_BYTE_GAP: Final = 1 << 14
# Typical wire sizes of the INT models (precision 3 for INT2, 7 for INT4, as fitted on LoRA deltas).
_INT2_MODEL_BYTES: Final = model_bytes(INT_ALPHABET[INT2_BITS], 3)
_INT4_MODEL_BYTES: Final = model_bytes(INT_ALPHABET[INT4_BITS], 7)


@dataclass(frozen=True)
class Coding:
    """The encoder's choices that the wire format leaves open.

    ``entropy=False`` makes format 1's choices in format 2's layout (fixed-width streams, no
    complement or full index codes): the before/after comparison of the codec benchmark.
    """

    entropy: bool = True
    rounding: Rounding = "nearest"
    rng: np.random.Generator | None = None


def head_value(mode: int, index_bytes: int, coded: int) -> int:
    """The section head: index bytes (0 unless a coded mode), coded-stream flags, index mode."""
    return index_bytes << HEAD_SHIFT | coded << 3 | mode


def _varint_sizes(values: I64) -> I64:
    sizes = np.ones(values.shape, dtype=np.int64)
    for j in range(1, 5):
        sizes += values >= (1 << (7 * j))
    return sizes


def _segment_sums(values: I64, lengths: I64) -> I64:
    """Sums of consecutive segments of ``values`` with the given lengths (some may be 0)."""
    out = np.zeros(lengths.size, dtype=np.int64)
    live = np.flatnonzero(lengths)
    if live.size:
        starts = np.cumsum(lengths) - lengths
        out[live] = np.add.reduceat(values, starts[live])
    return out


@dataclass(frozen=True)
class SectionPlan:
    """What one tensor's section holds (a view into its :class:`PayloadPlan`)."""

    n: int
    support: I64  # flat indices in the tensor
    tags: U8  # per sent coordinate: 0 INT2, 1 INT4, 2 fp16 (FSTQ; empty for Top-k)
    counts: tuple[int, int, int]  # INT2, INT4, fp16 coordinates
    code: SupportChoice
    scales: tuple[np.float32, np.float32]
    int2: U8
    int4: U8
    half: F16  # values of the fp16 coordinates, in support order
    coded: int  # bit i: stream i (tags, INT2, INT4) ANS-coded
    models: tuple[SymbolModel | None, SymbolModel | None, SymbolModel | None]
    precisions: tuple[int, int]  # wire precision of the INT2 and INT4 models

    @property
    def k(self) -> int:
        return int(self.support.size)


@dataclass
class PayloadPlan:
    """Every section of a sparse payload, as arrays over its tensors (``T`` of them)."""

    tagged: bool
    sizes: I64  # (T,) coordinates per tensor
    support: I64  # flat indices within their tensor, tensor after tensor
    seg: I64  # (T+1,) tensor t's sent coordinates are support[seg[t]:seg[t+1]]
    tags: U8  # per sent coordinate (FSTQ)
    counts: I64  # (T, 3) INT2, INT4, fp16 coordinates
    modes: I64  # (T,) IndexMode
    index_bytes: I64  # (T,)
    rice: I64  # (T,) Rice parameter (RICE, COMPLEMENT)
    scales: F32  # (T, 2) INT2, INT4 scales (0 when unused)
    codes: tuple[U8, U8]  # INT2 and INT4 codes, tensor after tensor
    code_seg: tuple[I64, I64]  # (T+1,) each
    half: F16  # fp16 values, tensor after tensor
    half_seg: I64  # (T+1,)
    coded: npt.NDArray[np.bool_]  # (T, 3) stream ANS-coded
    stream_bytes: I64  # (T, 3) bytes in the section: model (coded) or packed symbols
    block_bits: F64  # (T, 3) coded bits in the blocks (with the ANS slack)
    ans_symbols: I64  # (T, 3) symbols through the ANS coder
    int_models: tuple[I64, I64]  # (T, 3) and (T, 15) counts
    precisions: I64  # (T, 2)

    @property
    def k(self) -> I64:
        k: I64 = self.counts.sum(axis=1)
        return k

    def _section_bytes(self, coded: npt.NDArray[np.bool_]) -> I64:
        flags = coded.astype(np.int64) @ np.array([1, 2, 4], dtype=np.int64)
        index = np.where(_coded_mode(self.modes), self.index_bytes, 0)
        heads = _varint_sizes(index << HEAD_SHIFT | flags << 3 | self.modes)  # head_value
        streams = np.where(coded, self.stream_bytes, self._packed()).sum(axis=1)
        scales = SCALE_BYTES * (self.counts[:, :2] > 0).sum(axis=1)
        total: I64 = heads + self.index_bytes + streams + scales + 2 * self.counts[:, 2]
        return total

    def _packed_ints(self) -> tuple[I64, I64]:
        return (self.counts[:, 0] * INT2_BITS + 7) // 8, (self.counts[:, 1] * INT4_BITS + 7) // 8

    def _packed(self) -> I64:
        """(T, 3) bytes of the tags, INT2 and INT4 streams packed (none for Top-k)."""
        if not self.tagged:
            return np.zeros((self.sizes.size, 3), dtype=np.int64)
        return np.stack([(self.k * TAG_BITS + 7) // 8, *self._packed_ints()], axis=1)

    def _total(self, coded: npt.NDArray[np.bool_]) -> int:
        total = int(self._section_bytes(coded).sum())
        if not self.tagged:
            return total
        bits = np.where(coded, self.block_bits, 0.0)
        symbols = np.where(coded, self.ans_symbols, 0)
        tag_block = block_bytes(float(bits[:, 0].sum()), int(symbols[:, 0].sum()))
        int_block = block_bytes(float(bits[:, 1:].sum()), int(symbols[:, 1:].sum()))
        return total + tag_block + int_block

    @property
    def total(self) -> int:
        """Bytes of every section plus, for FSTQ, an upper bound of its two ANS blocks."""
        return self._total(self.coded)

    @property
    def elastic(self) -> int:
        """Bytes that grow with the number of steps taken (not bitmaps, heads or scales)."""
        index = np.where(_coded_mode(self.modes), self.index_bytes, 0).sum()
        streams = np.where(self.coded, self.stream_bytes + self.block_bits / 8, self._packed())
        return int(index + streams.sum() + 2 * self.counts[:, 2].sum())

    def section(self, t: int) -> SectionPlan:
        """Tensor ``t``'s section."""
        a, b = int(self.seg[t]), int(self.seg[t + 1])
        codes = [
            c[int(s[t]) : int(s[t + 1])] for c, s in zip(self.codes, self.code_seg, strict=True)
        ]
        coded = self.coded[t]
        models: list[SymbolModel | None] = [None, None, None]
        if coded[0]:
            models[0] = SymbolModel(self.counts[t].copy())
        for i in (1, 2):
            if coded[i]:
                models[i] = SymbolModel(self.int_models[i - 1][t].copy())
        mode = IndexMode(int(self.modes[t]))
        return SectionPlan(
            n=int(self.sizes[t]),
            support=self.support[a:b],
            tags=self.tags[a:b] if self.tagged else self.tags,
            counts=(int(self.counts[t, 0]), int(self.counts[t, 1]), int(self.counts[t, 2])),
            code=SupportChoice(mode, int(self.index_bytes[t]), int(self.rice[t])),
            scales=(np.float32(self.scales[t, 0]), np.float32(self.scales[t, 1])),
            int2=codes[0],
            int4=codes[1],
            half=self.half[int(self.half_seg[t]) : int(self.half_seg[t + 1])],
            coded=int(coded @ np.array([1, 2, 4])),
            models=(models[0], models[1], models[2]),
            precisions=(int(self.precisions[t, 0]), int(self.precisions[t, 1])),
        )


def _coded_mode(modes: I64) -> npt.NDArray[np.bool_]:
    coded: npt.NDArray[np.bool_] = np.isin(modes, [int(m) for m in CODED_MODES])
    return coded


def make_plans(
    levels: list[U8],
    coding: Coding,
    *,
    tagged: bool,
    xs: list[F32] | None = None,
    scales: list[tuple[float, float]] | None = None,
) -> PayloadPlan:
    """Plan a payload from per-tensor levels. FSTQ (``tagged``) needs the values ``xs`` to
    quantise; ``scales`` are the (INT2, INT4) scales per tensor, None for the absmax of each
    assignment (decision 7)."""
    T = len(levels)
    sizes = np.array([lv.size for lv in levels], dtype=np.int64)
    flat = np.concatenate([np.zeros(0, dtype=np.uint8), *levels])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    where = np.flatnonzero(flat)
    k = np.array([np.count_nonzero(lv) for lv in levels], dtype=np.int64)
    owner = np.repeat(np.arange(T), k)
    seg = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    support = where - np.repeat(offsets[:-1], k)
    modes, index_bytes, rice = _support_codes(flat, offsets, sizes, support, k, coding)
    plan = PayloadPlan(
        tagged=tagged,
        sizes=sizes,
        support=support,
        seg=seg,
        tags=np.zeros(0, dtype=np.uint8),
        counts=np.stack([np.zeros(T, np.int64), np.zeros(T, np.int64), k], axis=1),
        modes=modes,
        index_bytes=index_bytes,
        rice=rice,
        scales=np.zeros((T, 2), dtype=np.float32),
        codes=(np.zeros(0, np.uint8), np.zeros(0, np.uint8)),
        code_seg=(np.zeros(T + 1, np.int64), np.zeros(T + 1, np.int64)),
        half=np.zeros(0, dtype=np.float16),
        half_seg=seg,
        coded=np.zeros((T, 3), dtype=np.bool_),
        stream_bytes=np.zeros((T, 3), dtype=np.int64),
        block_bits=np.zeros((T, 3)),
        ans_symbols=np.zeros((T, 3), dtype=np.int64),
        int_models=(np.zeros((T, 3), np.int64), np.zeros((T, 15), np.int64)),
        precisions=np.zeros((T, 2), dtype=np.int64),
    )
    if xs is None:
        raise ValueError("a sparse plan needs the values it sends")
    vals = np.empty(support.size, dtype=np.float32)
    for t in np.flatnonzero(k):
        vals[seg[t] : seg[t + 1]] = np.take(xs[t], support[seg[t] : seg[t + 1]])
    if not tagged:
        plan.half = to_half(vals)
        return plan
    _quantize(plan, vals, flat[where], owner, scales, coding)
    if coding.entropy:
        _choose_streams(plan)
    return plan


def _support_codes(
    flat: U8, offsets: I64, sizes: I64, support: I64, k: I64, coding: Coding
) -> tuple[I64, I64, I64]:
    """Per tensor the smallest support code (index_coding's rules, vectorised):
    ``(modes, index bytes, Rice parameters)``."""
    T = sizes.size
    modes = np.full(T, int(IndexMode.BITMAP), dtype=np.int64)
    nbytes = (sizes + 7) // 8
    rice = np.zeros(T, dtype=np.int64)
    sparse = 2 * k < sizes
    gaps = support_gaps(support)
    starts = (np.concatenate([[0], np.cumsum(k)[:-1]]) if T else np.zeros(0)).astype(np.int64)
    live = k > 0
    gaps[starts[live]] = support[starts[live]]  # a tensor's first gap is its first index
    varint = _segment_sums(_varint_sizes(gaps), k)
    better = sparse & (varint < nbytes)
    modes[better], nbytes[better] = int(IndexMode.VARINT), varint[better]
    size, r = _rice_sizes(gaps, k)
    better = sparse & live & (size < nbytes)
    modes[better], nbytes[better], rice[better] = int(IndexMode.RICE), size[better], r[better]
    if coding.entropy:
        dense = np.flatnonzero(~sparse & (k < sizes))
        if dense.size:
            left = [np.flatnonzero(flat[offsets[t] : offsets[t + 1]] == 0) for t in dense]
            m = np.array([x.size for x in left], dtype=np.int64)
            d_gaps = support_gaps(np.concatenate(left))
            d_starts = np.concatenate([[0], np.cumsum(m)[:-1]]).astype(np.int64)
            d_gaps[d_starts] = np.array([x[0] for x in left], dtype=np.int64)
            size, r = _rice_sizes(d_gaps, m)
            better = size < nbytes[dense]
            chosen = dense[better]
            modes[chosen] = int(IndexMode.COMPLEMENT)
            nbytes[chosen], rice[chosen] = size[better], r[better]
        full = (k == sizes) & live
        modes[full], nbytes[full] = int(IndexMode.FULL), 0
    empty = ~live
    modes[empty], nbytes[empty] = int(IndexMode.EMPTY), 0
    return modes, nbytes, rice


def _rice_sizes(gaps: I64, k: I64) -> tuple[I64, I64]:
    """Per segment (``k`` gaps each) the smallest Rice code of its gaps: ``(bytes, parameter)``."""
    T = k.size
    total = _segment_sums(gaps, k)
    mean = total / np.maximum(k, 1)
    centre = np.floor(np.log2(np.maximum(mean * 0.69, 1.0))).astype(np.int64)
    best = np.full(T, np.iinfo(np.int64).max, dtype=np.int64)
    best_r = np.zeros(T, dtype=np.int64)
    for d in _RICE_SEARCH:
        r = np.clip(centre + d, 0, MAX_RICE_PARAM)
        unary = (k + _segment_sums(gaps >> np.repeat(r, k), k) + 7) // 8
        size = 1 + _varint_sizes(unary) + unary + (k * r + 7) // 8
        better = size < best
        best[better], best_r[better] = size[better], r[better]
    return best, best_r


def _quantize(
    plan: PayloadPlan,
    vals: F32,
    levels: U8,
    owner: I64,
    scales: list[tuple[float, float]] | None,
    coding: Coding,
) -> None:
    """Tags, INT scales and codes, fp16 values of every sent coordinate; per-tensor counts."""
    T = plan.sizes.size
    tags = levels - np.uint8(1)
    plan.tags = tags
    plan.counts = np.bincount(owner * 3 + tags, minlength=3 * T).reshape(T, 3).astype(np.int64)
    codes, code_segs = [], []
    for tag, width in enumerate((INT2_BITS, INT4_BITS)):
        pos = np.flatnonzero(tags == tag)
        v, who = vals[pos], owner[pos]
        qmax = QMAX[width]
        count = plan.counts[:, tag]
        if scales is None:  # absmax of the assignment: max |v| per tensor
            amax = np.zeros(T, dtype=np.float32)
            live = np.flatnonzero(count)
            if live.size:
                starts = np.concatenate([[0], np.cumsum(count)[:-1]])[live]
                amax[live] = np.maximum.reduceat(np.abs(v), starts)
            scale = (amax / np.float32(qmax)).astype(np.float32)
        else:
            scale = np.array([s[tag] for s in scales], dtype=np.float32)
        scale[count == 0] = 0
        plan.scales[:, tag] = scale
        codes.append(quantize_codes(v, scale[who], qmax, coding.rounding, coding.rng))
        code_segs.append(np.concatenate([[0], np.cumsum(count)]).astype(np.int64))
    plan.codes = (codes[0], codes[1])
    plan.code_seg = (code_segs[0], code_segs[1])
    plan.half = to_half(vals[tags == 2])
    plan.half_seg = np.concatenate([[0], np.cumsum(plan.counts[:, 2])]).astype(np.int64)


def _choose_streams(plan: PayloadPlan) -> None:
    """ANS-code each stream whose model and coded bits beat its packed bytes; if the blocks'
    own bytes eat the saving, keep the payload packed."""
    T = plan.sizes.size
    counts = plan.counts
    k = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tag_bits = np.where(counts > 0, counts * np.log2(k[:, None] / counts), 0.0).sum(axis=1)
    stream_bytes = np.zeros((T, 3), dtype=np.int64)
    bits = np.zeros((T, 3))
    symbols = np.zeros((T, 3), dtype=np.int64)
    stream_bytes[:, 0] = _varint_sizes(counts[:, 0]) + _varint_sizes(counts[:, 1])
    bits[:, 0] = tag_bits
    symbols[:, 0] = np.where((counts > 0).sum(axis=1) > 1, k, 0)
    owners = np.repeat(np.arange(T), counts[:, 0]), np.repeat(np.arange(T), counts[:, 1])
    models, precisions = [], []
    for i, width in enumerate((INT2_BITS, INT4_BITS)):
        m = INT_ALPHABET[width]
        hists = np.bincount(owners[i] * m + plan.codes[i], minlength=T * m).reshape(T, m)
        table, precision, coded_bits = fit_models(hists.astype(np.int64))
        models.append(table)
        precisions.append(precision)
        stream_bytes[:, i + 1] = 1 + (m * precision + 7) // 8
        bits[:, i + 1] = coded_bits
        symbols[:, i + 1] = np.where((table > 0).sum(axis=1) > 1, counts[:, i], 0)
    block_bits = bits + SLACK_BITS_PER_SYMBOL * symbols
    packed = plan._packed()
    sent = np.stack([k, counts[:, 0], counts[:, 1]], axis=1) > 0
    plan.stream_bytes, plan.block_bits, plan.ans_symbols = stream_bytes, block_bits, symbols
    plan.int_models = (models[0], models[1])
    plan.precisions = np.stack(precisions, axis=1)
    coded = sent & (8 * stream_bytes + block_bits < 8 * packed)
    if plan._total(coded) < plan._total(plan.coded):
        plan.coded = coded


def estimated_bytes(counts: F64, n: F64, code_bits: F64, *, entropy: bool) -> tuple[float, float]:
    """FSTQ sections' ``(total, elastic)`` bytes for coordinate counts, supports assumed random.

    Used to size plans from a sample, vectorised over tensors: ``counts`` is ``(T, 3)`` (INT2,
    INT4, fp16), ``n`` the tensor sizes, ``code_bits`` ``(T, 2)`` bits per INT2/INT4 code. Gaps
    of a random support are geometric with mean ``n/k`` (a varint needs a second byte with
    probability ``(1 - k/n)**128``; Rice codes follow
    :func:`~fstq.index_coding.rice_bits_per_index`, of the left-out indices when dense). Tags
    cost their entropy when coded.
    """
    k2, k4, k16 = counts.T
    k = counts.sum(axis=1)
    live = k > 0
    p = np.minimum(1.0, k / np.maximum(n, 1))
    varint = 1 + (1 - p) ** _VARINT_2ND_BYTE_GAP + (1 - p) ** _VARINT_3RD_BYTE_GAP
    bitmap = (n + 7) // 8
    sparse = 2 * k < n
    coded = np.where(sparse, k * np.minimum(varint, rice_bits_per_index_array(p) / 8), bitmap)
    if entropy:
        left_out = (n - k) * rice_bits_per_index_array(1 - p) / 8
        coded = np.where(sparse, coded, np.where(k < n, left_out, 0.0))
    tags = k * TAG_BITS / 8
    if entropy:
        with np.errstate(divide="ignore", invalid="ignore"):
            info = np.where(counts > 0, counts * np.log2(k[:, None] / counts), 0.0).sum(axis=1)
        tags = np.minimum(tags, info / 8 + 2)
    values = (k2 * code_bits[:, 0] + k4 * code_bits[:, 1] + k16 * FP16_BITS) / 8
    if entropy:  # the models of the coded INT streams
        values += _INT2_MODEL_BYTES * (k2 > 0) + _INT4_MODEL_BYTES * (k4 > 0)
    scales = SCALE_BYTES * ((k2 > 0).astype(np.int64) + (k4 > 0))
    total = _HEAD_BYTES_ESTIMATE + np.minimum(coded, bitmap) + tags + values + scales
    elastic = tags + values + np.where(coded < bitmap, coded, 0.0)
    total = np.where(live, total, EMPTY_SECTION_BYTES)
    return float(total.sum()), float(np.where(live, elastic, 0.0).sum())
