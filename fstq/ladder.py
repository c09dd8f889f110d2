"""Greedy budget filling without sorting: price histograms over every step of every coordinate.

Each coordinate climbs a ladder of levels (FSTQ: 0 -> INT2 -> INT4 -> fp16; Top-k: 0 -> fp16).
Step ``l`` of coordinate ``j`` has a *price* ``t[l, j]``, the largest bit price at which taking
it still pays (non-increasing along a coordinate's ladder), and costs ``step_bits[l]``. Greedy
by price under a bit budget = take every step whose price beats a threshold.

The threshold comes from a histogram of prices keyed on their float32 bit patterns
(``bits >> 15``: exponent and 8 mantissa bits; monotone for non-negative floats, 2**-8 relative
resolution). Bin 0 (zero, negative and denormal prices) is never taken. Steps in the boundary
bin are taken in upload order while bits last.

Prices are recomputed block by block from a :class:`PriceSource` instead of being stored (a
pass of arithmetic in cache is cheaper than first-touching bytes per coordinate of fresh
memory). A block is about :data:`CHUNK` coordinates: a chunk of a large tensor, or several
small tensors packed together, so that numpy's per-call overhead stays small either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHUNK",
    "HIST_BINS",
    "KEY_SHIFT",
    "Boundary",
    "Piece",
    "PriceSource",
    "bin_value",
    "find_boundary",
    "gather",
    "levels_at",
    "make_blocks",
    "price_bins",
    "price_histogram",
    "spread",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]

HIST_BINS = 1 << 16
KEY_SHIFT = 15
CHUNK = 1 << 14  # coordinates per block: every temporary of a kernel call stays in L2
_HIST_BLOCK = 1 << 18  # bins per bincount call (its output has HIST_BINS entries)


@dataclass(frozen=True)
class Piece:
    """Coordinates ``start:stop`` of tensor ``tensor``."""

    tensor: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


Block = Sequence[Piece]


def make_blocks(sizes: Sequence[int], chunk: int = CHUNK) -> list[list[Piece]]:
    """Cut tensors of ``sizes`` into blocks: big ones in chunks, small ones packed in order."""
    blocks: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for i, n in enumerate(sizes):
        if n >= chunk:
            blocks.extend([Piece(i, a, min(n, a + chunk))] for a in range(0, n, chunk))
            continue
        if n == 0:
            continue
        if filled + n > chunk:
            blocks.append(current)
            current, filled = [], 0
        current.append(Piece(i, 0, n))
        filled += n
    if current:
        blocks.append(current)
    return blocks


def gather(block: Block, arrays: Sequence[F32]) -> F32:
    """The block's coordinates of per-tensor ``arrays`` (a view when it is one piece)."""
    if len(block) == 1:
        p = block[0]
        return arrays[p.tensor][p.start : p.stop]
    return np.concatenate([arrays[p.tensor][p.start : p.stop] for p in block])


def spread(block: Block, per_tensor: Sequence[float]) -> np.float32 | F32:
    """A per-tensor value for every coordinate of the block (a scalar when it is one piece)."""
    if len(block) == 1:
        return np.float32(per_tensor[block[0].tensor])
    values = np.array([per_tensor[p.tensor] for p in block], dtype=np.float32)
    return np.repeat(values, [p.size for p in block])


class PriceSource(Protocol):
    """Step prices of an update's coordinates, block by block, computed on demand."""

    @property
    def n_levels(self) -> int:
        """Steps per coordinate."""
        ...

    @property
    def sizes(self) -> Sequence[int]:
        """Coordinates per tensor."""
        ...

    @property
    def blocks(self) -> Sequence[Block]:
        """The blocks (see :func:`make_blocks`) that :meth:`prices` is asked for."""
        ...

    def prices(self, b: int) -> Sequence[F32]:
        """Prices of every step of the coordinates of block ``b``."""
        ...


def price_bins(t: F32) -> U16:
    """Bin of each price: monotone in the value; 0 for zero, negative or tiny prices."""
    keys = t.view(np.int32) >> KEY_SHIFT
    np.maximum(keys, 0, out=keys)
    return keys.astype(np.uint16)


def bin_value(b: int) -> np.float32:
    """The smallest price that falls in bin ``b`` (``1 <= b < HIST_BINS``)."""
    return np.int32(b << KEY_SHIFT).view(np.float32)


def price_histogram(
    src: PriceSource, tensor_weights: Sequence[float] | None = None
) -> npt.NDArray[np.float64]:
    """Counts of step prices, shape ``(n_levels, HIST_BINS)``.

    ``tensor_weights[i]`` multiplies the counts of tensor ``i`` (a sample standing for more).
    """
    counts = np.zeros((src.n_levels, HIST_BINS), dtype=np.float64)
    # Bins waiting for a bincount, grouped by weight (unweighted bincounts are much faster).
    pending: dict[float, list[list[U16]]] = {}
    held = 0

    def flush() -> None:
        for weight, parts in pending.items():
            for level, bins in enumerate(parts):
                hist = np.bincount(np.concatenate(bins), minlength=HIST_BINS)
                counts[level] += hist if weight == 1.0 else weight * hist
        pending.clear()

    for b, block in enumerate(src.blocks):
        bins = [price_bins(t) for t in src.prices(b)]
        offset = 0
        for p in block:
            weight = 1.0 if tensor_weights is None else float(tensor_weights[p.tensor])
            parts = pending.setdefault(weight, [[] for _ in range(src.n_levels)])
            for level, level_bins in enumerate(bins):
                parts[level].append(level_bins[offset : offset + p.size])
            offset += p.size
        held += offset
        if held >= _HIST_BLOCK:
            flush()
            held = 0
    flush()
    return counts


@dataclass(frozen=True)
class Boundary:
    """Steps with a bin above ``bin`` are taken; ``fill_bits`` more go to steps in ``bin``."""

    bin: int
    fill_bits: float


def find_boundary(
    counts: npt.NDArray[np.float64], step_bits: Sequence[float], target_bits: float
) -> Boundary:
    """The lowest bin whose strictly higher bins fit in ``target_bits``."""
    cost = np.asarray(step_bits, dtype=np.float64) @ counts
    cost[0] = 0.0  # bin 0 is "never"
    above = np.cumsum(cost[::-1])[::-1] - cost  # bits of all bins strictly above b
    fits = np.flatnonzero(above[1:] <= target_bits)
    b = int(fits[0]) + 1 if fits.size else HIST_BINS - 1
    return Boundary(b, max(0.0, target_bits - float(above[b])))


def levels_at(
    src: PriceSource,
    boundary: Boundary,
    step_bits: Sequence[float],
    tensor_weights: Sequence[float] | None = None,
) -> list[U8]:
    """Per-tensor levels (number of steps taken) at ``boundary``, boundary bin filled in order.

    ``tensor_weights[i]`` multiplies the bits a boundary step of tensor ``i`` spends.
    """
    lo = bin_value(boundary.bin)
    hi = bin_value(boundary.bin + 1) if boundary.bin + 1 < HIST_BINS else np.float32(np.inf)
    fill = boundary.fill_bits
    out = [np.zeros(n, dtype=np.uint8) for n in src.sizes]
    for b, block in enumerate(src.blocks):
        prices = src.prices(b)
        above = [t >= hi for t in prices]
        lv = above[0].astype(np.uint8)
        for more in above[1:]:
            lv += more  # uint8 += bool counts (np.add of two bools would OR them)
        if fill > 0:
            weight = np.float64(1.0) if tensor_weights is None else spread(block, tensor_weights)
            in_bin = [(t >= lo) ^ up for t, up in zip(prices, above, strict=True)]
            fill = _fill_boundary(lv, in_bin, step_bits, weight, fill)
        offset = 0
        for p in block:
            out[p.tensor][p.start : p.stop] = lv[offset : offset + p.size]
            offset += p.size
    return out


def _fill_boundary(
    lv: U8,
    in_bin: Sequence[npt.NDArray[np.bool_]],
    step_bits: Sequence[float],
    weight: np.floating | F32,
    fill: float,
) -> float:
    """Take boundary-bin steps of one block in order while ``fill`` bits last; returns the rest."""
    any_in = in_bin[0].copy()
    for more in in_bin[1:]:
        any_in |= more
    cand = np.flatnonzero(any_in)
    if cand.size == 0:
        return fill
    steps = [b[cand] for b in in_bin]
    extra = np.zeros(cand.size, dtype=np.float64)
    for s, c in zip(steps, step_bits, strict=True):
        extra[s] += c
    extra *= weight[cand] if isinstance(weight, np.ndarray) else weight
    spent = np.cumsum(extra)
    take = int(np.searchsorted(spent, fill, side="right"))
    for s in steps:
        lv[cand[:take]] += s[:take]
    # Stop at the first step that does not fit: upload order, no skipping ahead.
    return fill - float(spent[-1]) if take == cand.size else 0.0
