"""Meeting a byte budget exactly: adjust the ladder's bit target against the real encoded size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fstq.ladder import PriceSource, find_boundary, levels_at, price_histogram
from fstq.sparse_codec import SparsePlan, estimated_bytes, plan

__all__ = ["fit_budget", "plans_at", "plans_within", "sample_target"]

T = TypeVar("T")


def fit_budget(
    evaluate: Callable[[float], tuple[int, int, T]],
    budget: int,
    first_target: float,
    *,
    tolerance: float = 0.0025,
    max_evals: int = 12,
) -> T:
    """The plan of largest exact size ``<= budget`` found by adjusting the bit target.

    ``evaluate(target_bits) -> (exact_bytes, elastic_bytes, plan)``: ``elastic_bytes`` is the
    part of the size that scales with the target (values, tags, varint indices; not bitmaps,
    heads or framing), which gives the first secant slope. ``evaluate`` must be (nearly)
    monotone in the target; at target 0 nothing is taken (the caller checks that fits).
    Stops within ``tolerance`` (relative; at least 16 bytes) below the budget, else returns the
    largest feasible plan seen, else the target-0 plan.
    """
    slack = max(16.0, tolerance * budget)
    aim = budget - 0.7 * slack  # below the middle of the window: overshooting costs a pass
    lo, hi = 0.0, float("inf")
    best: T | None = None
    target = max(first_target, 0.0)
    prev: tuple[float, int] | None = None
    for _ in range(max_evals):
        size, elastic, found = evaluate(target)
        if size <= budget:
            lo, best = target, found
            if budget - size <= slack:
                return found
        else:
            hi = target
        if prev is not None and target != prev[0] and (size - prev[1]) * (target - prev[0]) > 0:
            slope = (size - prev[1]) / (target - prev[0])
        else:
            slope = max(elastic, 1) / max(target, 8.0)
        prev = (target, size)
        step = target + (aim - size) / slope
        target = step if lo < step < hi else (lo + hi) / 2 if hi < float("inf") else 2 * lo + 8
        if hi - lo <= 1.0:
            break
    if best is not None:
        return best
    return evaluate(0.0)[2]  # nothing taken: fits whenever the empty update does


def plans_at(
    src: PriceSource,
    counts: npt.NDArray[np.float64],
    steps: Sequence[float],
    target_bits: float,
    *,
    tagged: bool,
) -> list[SparsePlan]:
    """Section plans of every tensor when ``target_bits`` worth of ladder steps are taken."""
    boundary = find_boundary(counts, steps, target_bits)
    return [plan(lv, tagged=tagged) for lv in levels_at(src, boundary, steps)]


def plans_within(
    src: PriceSource,
    counts: npt.NDArray[np.float64],
    steps: Sequence[float],
    avail_bytes: int,
    first_target: float,
    *,
    tagged: bool,
) -> list[SparsePlan]:
    """Section plans whose exact bytes sum to at most ``avail_bytes``.

    ``counts`` is the price histogram of ``src`` (exact, or estimated from a sample: the fit
    against exact sizes makes up for it).
    """

    def evaluate(target_bits: float) -> tuple[int, int, list[SparsePlan]]:
        plans = plans_at(src, counts, steps, target_bits, tagged=tagged)
        return sum(p.total for p in plans), sum(p.elastic for p in plans), plans

    return fit_budget(evaluate, avail_bytes, first_target, tolerance=0.006)


def sample_target(
    src: PriceSource,
    strides: Sequence[int],
    sizes: Sequence[int],
    steps: Sequence[float],
    avail_bytes: int,
    first_target: float,
    *,
    tagged: bool,
) -> tuple[float, npt.NDArray[np.float64]]:
    """Bit target meeting ``avail_bytes`` by the sizes a sample predicts, and its histogram.

    ``src`` prices a sample in which tensor ``i`` keeps every ``strides[i]``-th of its
    ``sizes[i]`` coordinates. Cheap: it never touches the full update.
    """
    weights = [float(s) for s in strides]
    counts = price_histogram(src, weights)

    def evaluate(target_bits: float) -> tuple[int, int, float]:
        boundary = find_boundary(counts, steps, target_bits)
        total = elastic = 0.0
        for lv, stride, n in zip(
            levels_at(src, boundary, steps, weights), strides, sizes, strict=True
        ):
            k2 = stride * int(np.count_nonzero(lv == 1)) if tagged else 0
            k4 = stride * int(np.count_nonzero(lv == 2)) if tagged else 0
            k = stride * int(np.count_nonzero(lv))
            size, grow = estimated_bytes((k2, k4, k - k2 - k4), n, tagged=tagged)
            total += size
            elastic += grow
        return int(np.ceil(total)), int(elastic), target_bits

    # Aim a little low: the full fit accepts 0.6% below the budget but nothing above it.
    aim = int(avail_bytes * 0.997)
    return fit_budget(evaluate, aim, first_target, tolerance=0.001), counts
