"""Entropy-coded symbol streams: static models, their wire form, size bounds, and ANS blocks.

The tags and INT codes of an FSTQ payload are coded with ``constriction``'s ANS (a stack coder
with 64-bit state, 32-bit words and 24-bit probabilities). Each stream of each tensor has its
own static model (the measurements in BENCHMARKS.md: per-tensor models beat one pooled model by
far more than their header bytes). Every coded stream of a kind is pushed onto one ANS stack per
payload, a *block*, so the coder's flush costs are paid once, not per tensor.

A model is a table of non-negative counts; symbol ``s`` has probability ``counts[s] / sum``.
The encoder never emits a symbol of count 0, and a decoder that meets one rejects the payload.
A model with a single non-zero count is *degenerate*: its symbols cost nothing and never touch
the coder. The wire form of a quantised model (:func:`write_model`) is::

    precision  u8         P in 1..MAX_PRECISION
    counts     m fields of P bits, LSB-first (bitpack), padding zero; at least one non-zero

A block on the wire is ``varint words`` then ``words`` little-endian u32 of the ANS stack; the
decoder pops the streams in the order the encoder pushed them (:class:`BlockEncoder` pushes in
reverse) and checks that the stack ends empty.

Sizes: ANS spends at most ``log2(1 + 2**-8)`` bits above a symbol's information content (the
state is renormalised to at least ``probability << 8``), and flushing its 64-bit state costs
at most 64 bits (the most measured over 8,000 random multi-stream blocks: 54).
:func:`block_bytes` adds :data:`SLACK_BITS_PER_SYMBOL` per symbol and :data:`SLACK_BITS`;
``tests/fstq/test_stream_coding.py`` checks the bound on hostile distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import constriction  # type: ignore[import-untyped]  # no stubs or py.typed
import numpy as np
import numpy.typing as npt

from fstq.bitpack import pack_uint, unpack_uint, varint_size
from fstq.container import ByteReader, ByteWriter
from fstq.errors import DecodeError

__all__ = [
    "MAX_PRECISION",
    "SLACK_BITS",
    "SLACK_BITS_PER_SYMBOL",
    "BlockDecoder",
    "BlockEncoder",
    "SymbolModel",
    "block_bytes",
    "fit_models",
    "ideal_bits",
    "model_bytes",
    "read_block",
    "read_model",
    "write_block",
    "write_model",
]

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

MAX_PRECISION: Final = 12  # bits per count: finer tables cost more than they save here
SLACK_BITS_PER_SYMBOL: Final = 0.006  # >= log2(1 + 2**-8), ANS's per-symbol rounding loss
SLACK_BITS: Final = 64  # flushing the 64-bit state (incl. rounding to 32-bit words)
_WORD_BYTES: Final = 4
_PRECISION_BYTES: Final = 1


@dataclass(frozen=True)
class SymbolModel:
    """A static model: symbol ``s`` has probability ``counts[s] / counts.sum()``."""

    counts: I64

    @property
    def single(self) -> int | None:
        """The only symbol of a degenerate model (one non-zero count), else None."""
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[0]) if nonzero.size == 1 else None

    def categorical(self) -> constriction.stream.model.Categorical:
        # Encoder and decoder build the model from the same integers, hence the same floats:
        # constriction's (deterministic) quantisation then agrees on both sides.
        return constriction.stream.model.Categorical(self.counts.astype(np.float64), perfect=False)


def ideal_bits(hist: I64 | F64, counts: I64 | F64) -> float:
    """Information content in bits of symbols with histogram ``hist`` under ``counts``.

    Every symbol present in ``hist`` must have a non-zero count.
    """
    present = hist > 0
    total = float(np.sum(counts))
    return float(np.sum(hist[present] * (np.log2(total) - np.log2(counts[present]))))


def model_bytes(alphabet: int, precision: int) -> int:
    """Wire bytes of a quantised model (:func:`write_model`)."""
    return _PRECISION_BYTES + (alphabet * precision + 7) // 8


def fit_models(hists: I64) -> tuple[I64, I64, F64]:
    """Quantised models of the rows of ``hists`` (one stream each), vectorised over rows.

    For each row the precision ``P`` minimising model bytes plus coded bits is chosen; counts
    are the histogram scaled so its peak is ``2**P - 1`` (a present symbol keeps at least 1).
    Returns ``(counts, precision, bits)``: the ``(rows, m)`` tables, each row's precision and
    the coded bits of its own symbols (model bytes not included). Rows with no symbols get
    precision 0 and no model.
    """
    rows, m = hists.shape
    h = hists.astype(np.float64)
    present = h > 0
    peak = np.maximum(h.max(axis=1, keepdims=True), 1.0) if rows else np.ones((0, 1))
    best_cost = np.full(rows, np.inf)
    best_bits = np.zeros(rows)
    best_p = np.zeros(rows, dtype=np.int64)
    best_counts = np.zeros((rows, m), dtype=np.int64)
    for p in range(1, MAX_PRECISION + 1):
        q = np.where(present, np.maximum(1.0, np.rint(h / peak * ((1 << p) - 1))), 0.0)
        log_q = np.log2(np.where(present, q, 1.0))
        log_total = np.log2(np.maximum(q.sum(axis=1), 1.0))  # rows without symbols: 0 bits
        bits = (h * (log_total[:, None] - log_q)).sum(axis=1)
        cost = bits + 8 * model_bytes(m, p)
        better = cost < best_cost
        best_cost[better] = cost[better]
        best_bits[better] = bits[better]
        best_p[better] = p
        best_counts[better] = q[better].astype(np.int64)
    empty = ~present.any(axis=1)
    best_p[empty] = 0
    best_bits[empty] = 0.0
    best_counts[empty] = 0
    return best_counts, best_p, best_bits


def write_model(out: ByteWriter, counts: I64, precision: int) -> int:
    """Write a quantised model; returns the bytes written."""
    return out.u8(precision) + out.raw(pack_uint(counts, precision))


def read_model(reader: ByteReader, alphabet: int, what: str) -> SymbolModel:
    """Read and check a quantised model over ``alphabet`` symbols."""
    precision = reader.u8(f"{what}: model precision")
    if not 1 <= precision <= MAX_PRECISION:
        raise DecodeError(f"{what}: model precision {precision} out of 1..{MAX_PRECISION}")
    size = model_bytes(alphabet, precision) - _PRECISION_BYTES
    counts = unpack_uint(reader.take(size, f"{what}: model"), alphabet, precision)
    if not counts.any():
        raise DecodeError(f"{what}: model has no symbol")
    return SymbolModel(counts)


def block_bytes(bits: float, symbols: int) -> int:
    """Upper bound of the wire bytes of a block holding ``symbols`` coded symbols of ``bits``."""
    if symbols == 0:
        return varint_size(0)
    words = int(np.ceil((bits + SLACK_BITS_PER_SYMBOL * symbols + SLACK_BITS) / 32))
    return varint_size(words) + _WORD_BYTES * words


class BlockEncoder:
    """Streams to push onto one ANS stack, in the order the decoder will pop them."""

    def __init__(self) -> None:
        self._streams: list[tuple[U8, SymbolModel]] = []

    def add(self, symbols: U8, model: SymbolModel) -> None:
        """Queue ``symbols`` (each with a non-zero count in ``model``); degenerate ones skip."""
        if symbols.size and model.single is None:
            self._streams.append((symbols, model))

    def words(self) -> U32:
        """The ANS stack of every queued stream (empty when none)."""
        coder = constriction.stream.stack.AnsCoder()
        for symbols, model in reversed(self._streams):
            coder.encode_reverse(symbols.astype(np.int32), model.categorical())
        words: U32 = coder.get_compressed()
        return words


def write_block(out: ByteWriter, words: U32) -> tuple[int, int]:
    """Write a block; returns ``(length bytes, word bytes)`` written."""
    head = out.varint(int(words.size))
    return head, out.raw(words.astype("<u4").view(np.uint8))


def read_block(reader: ByteReader, what: str) -> U32:
    """Read a block's words (length checked against the bytes left)."""
    words = reader.varint(f"{what}: length", reader.remaining // _WORD_BYTES)
    raw = reader.take(_WORD_BYTES * words, what)
    return raw.view("<u4").astype(np.uint32)


class BlockDecoder:
    """Pops streams off one block's ANS stack; every failure is a DecodeError."""

    def __init__(self, words: U32, what: str) -> None:
        self.what = what
        try:
            self._coder = constriction.stream.stack.AnsCoder(words)
        except (ValueError, TypeError) as exc:  # e.g. a stack ending in a zero word
            raise DecodeError(f"{what}: {exc}") from exc

    def take(self, model: SymbolModel, count: int, what: str) -> U8:
        """``count`` symbols of ``model`` (``count`` is bounded by the declared shapes)."""
        single = model.single
        if single is not None or count == 0:
            return np.full(count, 0 if single is None else single, dtype=np.uint8)
        try:
            symbols = self._coder.decode(model.categorical(), count)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DecodeError(f"{what}: {exc}") from exc
        hist = np.bincount(symbols, minlength=model.counts.size)
        if bool((hist[model.counts == 0] > 0).any()):
            raise DecodeError(f"{what}: coded symbol outside its model")
        out: U8 = symbols.astype(np.uint8)
        return out

    def finish(self) -> None:
        """DecodeError unless every word of the block was used."""
        if not self._coder.is_empty():
            raise DecodeError(f"{self.what}: coded stream has data left over")
