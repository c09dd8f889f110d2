"""The budget fit: the sparse plan of largest exact encoded size within a byte budget.

Everything between "a byte budget" and "the section plans that fill it" lives here:

1. **minimum size** (:func:`section_budget`): the framing (magic, tensor table, CRC) and a
   one-byte head per tensor must fit, else :class:`~fstq.errors.BudgetError`;
2. **price search** (:mod:`fstq.ladder`): a bit target becomes a price threshold and the levels
   it takes; FSTQ first estimates the target on a strided sample, where it also picks its INT
   scales (:func:`~fstq.allocation.choose_scales`);
3. **fit to the exact size** (:func:`fit_budget`): the bit target is adjusted (secant steps,
   then bisection) against the exact bytes of the section plans until the payload lands
   within :data:`FIT_TOLERANCE` below the budget, never above it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from fstq.allocation import (
    FstqPrices,
    MagnitudePrices,
    ScaleRule,
    Scales,
    choose_scales,
    fstq_level_costs,
    index_bits_estimate,
    sample_update,
)
from fstq.config import Rounding
from fstq.container import CRC_BYTES, TensorSpec, table_size
from fstq.errors import BudgetError
from fstq.ladder import PriceSource, find_boundary, levels_at, price_histogram
from fstq.quantize import FP16_BITS
from fstq.sparse_codec import (
    EMPTY_SECTION_BYTES,
    INT4_BITS,
    SCALE_BYTES,
    TAG_BITS,
    SparsePlan,
    estimated_bytes,
    plan,
)

__all__ = [
    "FIT_TOLERANCE",
    "fit_budget",
    "fstq_budget_plans",
    "minimum_bytes",
    "section_budget",
    "topk_budget_plans",
    "topk_count_plans",
]

T = TypeVar("T")
F32 = npt.NDArray[np.float32]

FIT_TOLERANCE: Final = 0.006  # the exact fit stops within 0.6% below the budget (README #9)
# The sample's estimate aims 0.3% low and stops within 0.1%: the exact fit accepts up to 0.6%
# below the budget but nothing above, so an estimate that lands high costs an extra full pass.
_SAMPLE_AIM: Final = 0.997
_SAMPLE_TOLERANCE: Final = 0.001
# Small budgets: sizes move in steps of several bytes (a scale alone is 4), so a window much
# narrower than this could not be hit and the fit would spend all its passes.
_MIN_SLACK_BYTES: Final = 16.0
_AIM_INTO_SLACK: Final = 0.7  # aim below the window's middle: overshooting costs a pass
_MAX_FIT_PASSES: Final = 12  # fits take 1-5 passes as a rule; this bounds one that bisects
_MIN_TARGET_BITS: Final = 8.0  # one byte: the first secant slope and growth from 0 need a size
# FSTQ's first target leaves out what the price model does not see: each section's head
# (1 byte when small) and up to two INT scales.
_UNMODELLED_SECTION_BYTES: Final = EMPTY_SECTION_BYTES + 2 * SCALE_BYTES
# The index cost per sent coordinate is estimated at the density the budget would give if most
# sends were INT4 values with their tag (the commonest level at useful budgets).
_TYPICAL_SENT_BITS: Final = float(INT4_BITS + TAG_BITS)
_COUNT_STEPS: Final = (1.0,)  # a step cost of 1 makes a bit target a coordinate count


def _framing_bytes(specs: list[TensorSpec]) -> int:
    return table_size(specs) + CRC_BYTES


def minimum_bytes(specs: list[TensorSpec]) -> int:
    """Smallest FSTQ or Top-k payload of these tensors: framing and empty sections."""
    return _framing_bytes(specs) + EMPTY_SECTION_BYTES * len(specs)


def section_budget(specs: list[TensorSpec], budget_bytes: int) -> int:
    """Bytes left for the sections; BudgetError if even empty sections do not fit."""
    minimal = minimum_bytes(specs)
    if budget_bytes < minimal:
        raise BudgetError(f"budget {budget_bytes} B is below the minimal {minimal} B")
    return budget_bytes - _framing_bytes(specs)


def fstq_budget_plans(
    xs: Sequence[F32],
    weights: Sequence[F32 | None],
    avail: int,
    rounding: Rounding,
    scale_rule: ScaleRule,
) -> tuple[list[SparsePlan], list[Scales]]:
    """FSTQ section plans of exact size ``<= avail`` bytes, and the INT scales they assume."""
    bits_per_coord = 8.0 * avail / max(sum(int(x.size) for x in xs), 1)
    costs = fstq_level_costs(index_bits_estimate(bits_per_coord, _TYPICAL_SENT_BITS))
    target = 8.0 * (avail - _UNMODELLED_SECTION_BYTES * len(xs))
    sample = sample_update(xs, weights)
    scales = choose_scales(sample, costs, rounding, target, scale_rule)
    steps = costs.step_bits()
    # Where the budget lands is estimated on the sample, then fitted on the full update.
    sample_src = FstqPrices(sample.xs, sample.weights, scales, costs, rounding)
    target, counts = _sample_target(
        sample_src, sample.strides, sample.sizes, steps, avail, target, tagged=True
    )
    src = FstqPrices(xs, weights, scales, costs, rounding)
    return _plans_within(src, counts, steps, avail, target, tagged=True), scales


def topk_budget_plans(xs: Sequence[F32], avail: int) -> list[SparsePlan]:
    """Top-k section plans of exact size ``<= avail`` bytes: the largest magnitudes first."""
    src = MagnitudePrices(xs)
    bits_per_coord = 8.0 * avail / max(sum(int(x.size) for x in xs), 1)
    step = FP16_BITS + index_bits_estimate(bits_per_coord, float(FP16_BITS))
    target = 8.0 * (avail - EMPTY_SECTION_BYTES * len(xs))
    return _plans_within(src, price_histogram(src), (step,), avail, target, tagged=False)


def topk_count_plans(xs: Sequence[F32], k: int) -> list[SparsePlan]:
    """Top-k section plans sending the ``k`` largest magnitudes (no budget)."""
    src = MagnitudePrices(xs)
    return _plans_at(src, price_histogram(src), _COUNT_STEPS, float(k), tagged=False)


def fit_budget(
    evaluate: Callable[[float], tuple[int, int, T]],
    budget: int,
    first_target: float,
    *,
    tolerance: float,
    max_evals: int = _MAX_FIT_PASSES,
    empty: Callable[[], T] | None = None,
) -> T:
    """The plan of largest exact size ``<= budget`` found by adjusting the bit target.

    ``evaluate(target_bits) -> (exact_bytes, elastic_bytes, plan)``: ``elastic_bytes`` is the
    part of the size that scales with the target (values, tags, varint indices; not bitmaps,
    heads or framing), which gives the first secant slope. ``evaluate`` must be (nearly)
    monotone in the target; at target 0 nothing is taken (the caller checks that fits).
    Stops within ``tolerance`` (relative; at least 16 bytes) below the budget, else returns the
    largest feasible plan seen, else the target-0 plan, else ``empty()`` when the target-0 plan
    does not fit either (coordinates of infinite price are taken at any target).
    """
    slack = max(_MIN_SLACK_BYTES, tolerance * budget)
    aim = budget - _AIM_INTO_SLACK * slack
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
            slope = max(elastic, 1) / max(target, _MIN_TARGET_BITS)
        prev = (target, size)
        step = target + (aim - size) / slope
        if not lo < step < hi:
            step = (lo + hi) / 2 if hi < float("inf") else 2 * lo + _MIN_TARGET_BITS
        target = step
        if hi - lo <= 1.0:
            break
    if best is not None:
        return best
    size, _, found = evaluate(0.0)
    return empty() if empty is not None and size > budget else found


def _plans_at(
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


def _plans_within(
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
        plans = _plans_at(src, counts, steps, target_bits, tagged=tagged)
        return sum(p.total for p in plans), sum(p.elastic for p in plans), plans

    def empty() -> list[SparsePlan]:
        return [plan(np.zeros(n, dtype=np.uint8), tagged=tagged) for n in src.sizes]

    return fit_budget(evaluate, avail_bytes, first_target, tolerance=FIT_TOLERANCE, empty=empty)


def _sample_target(
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

    aim = int(avail_bytes * _SAMPLE_AIM)
    return fit_budget(evaluate, aim, first_target, tolerance=_SAMPLE_TOLERANCE), counts
