"""The budget fit: the sparse plan of largest exact encoded size within a byte budget.

Everything between "a byte budget" and "the section plans that fill it" lives here:

1. **minimum size** (:func:`section_budget`): the framing (magic, tensor table, CRC), a
   one-byte head per tensor and (FSTQ) two empty ANS blocks must fit, else
   :class:`~fstq.errors.BudgetError`;
2. **price search** (:mod:`fstq.ladder`): a bit target becomes a price threshold and the levels
   it takes; FSTQ first estimates the target on a strided sample, where it also picks its INT
   scales (:func:`~fstq.allocation.choose_scales`);
3. **fit to the exact size** (:func:`fit_budget`): the bit target is adjusted (secant steps,
   then bisection) against the bytes of the section plans until the payload lands within
   :data:`FIT_TOLERANCE` below the budget, never above it. Those bytes are exact for the
   sections and an upper bound for the ANS blocks (:func:`~fstq.sparse_plan.sections_bytes`),
   so what entropy coding saves buys more coordinates and the budget still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from fstq.allocation import (
    FstqPrices,
    MagnitudePrices,
    Sample,
    ScaleRule,
    Scales,
    choose_scales,
    fstq_level_costs,
    index_bits_estimate,
    sample_update,
)
from fstq.container import CRC_BYTES, TensorSpec, table_size
from fstq.errors import BudgetError
from fstq.ladder import PriceSource, find_boundary, levels_at, price_histogram
from fstq.quantize import FP16_BITS, QMAX, quantize_codes
from fstq.sparse_plan import (
    EMPTY_SECTION_BYTES,
    INT2_BITS,
    INT4_BITS,
    SCALE_BYTES,
    TAG_BITS,
    Coding,
    PayloadPlan,
    estimated_bytes,
    make_plans,
)
from fstq.stream_coding import block_bytes

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
U8 = npt.NDArray[np.uint8]
MakePlans = Callable[[list[U8]], PayloadPlan]

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
_CODE_BITS_ROUNDS: Final = 2  # sample estimates of the INT codes' entropy (_sample_target)


def _framing_bytes(specs: list[TensorSpec]) -> int:
    return table_size(specs) + CRC_BYTES


def _blocks_bytes(tagged: bool) -> int:
    return 2 * block_bytes(0.0, 0) if tagged else 0  # FSTQ: two (empty) ANS blocks


def minimum_bytes(specs: list[TensorSpec], *, tagged: bool) -> int:
    """Smallest FSTQ (``tagged``) or Top-k payload of these tensors: framing, empty sections."""
    return _framing_bytes(specs) + EMPTY_SECTION_BYTES * len(specs) + _blocks_bytes(tagged)


def section_budget(specs: list[TensorSpec], budget_bytes: int, *, tagged: bool) -> int:
    """Bytes left for the sections (and blocks); BudgetError if even empty ones do not fit."""
    minimal = minimum_bytes(specs, tagged=tagged)
    if budget_bytes < minimal:
        raise BudgetError(f"budget {budget_bytes} B is below the minimal {minimal} B")
    return budget_bytes - _framing_bytes(specs)


def fstq_budget_plans(
    xs: Sequence[F32],
    weights: Sequence[F32 | None],
    avail: int,
    coding: Coding,
    scale_rule: ScaleRule,
) -> PayloadPlan:
    """FSTQ section plans of at most ``avail`` bytes (sections and blocks)."""
    rounding = coding.rounding
    bits_per_coord = 8.0 * avail / max(sum(int(x.size) for x in xs), 1)
    costs = fstq_level_costs(index_bits_estimate(bits_per_coord, _TYPICAL_SENT_BITS))
    target = 8.0 * (avail - _UNMODELLED_SECTION_BYTES * len(xs))
    sample = sample_update(xs, weights)
    scales = choose_scales(sample, costs, rounding, target, scale_rule)
    steps = costs.step_bits()
    # Where the budget lands is estimated on the sample, then fitted on the full update.
    sample_src = FstqPrices(sample.xs, sample.weights, scales, costs, rounding)
    target, counts = _sample_target(
        sample_src, sample, scales, steps, avail, target, entropy=coding.entropy
    )
    src = FstqPrices(xs, weights, scales, costs, rounding)
    # The absmax rule quantises with the absmax of each final assignment (decision 7).
    plan_scales = None if scale_rule == "absmax" else scales
    xs_list = list(xs)

    def make(levels: list[U8]) -> PayloadPlan:
        return make_plans(levels, coding, tagged=True, xs=xs_list, scales=plan_scales)

    return _plans_within(src, counts, steps, avail, target, make)


def topk_budget_plans(xs: Sequence[F32], avail: int, coding: Coding) -> PayloadPlan:
    """Top-k section plans of exact size ``<= avail`` bytes: the largest magnitudes first."""
    src = MagnitudePrices(xs)
    bits_per_coord = 8.0 * avail / max(sum(int(x.size) for x in xs), 1)
    step = FP16_BITS + index_bits_estimate(bits_per_coord, float(FP16_BITS))
    target = 8.0 * (avail - EMPTY_SECTION_BYTES * len(xs))
    counts = price_histogram(src)
    return _plans_within(src, counts, (step,), avail, target, _untagged(xs, coding))


def topk_count_plans(xs: Sequence[F32], k: int, coding: Coding) -> PayloadPlan:
    """Top-k section plans sending the ``k`` largest magnitudes (no budget)."""
    src = MagnitudePrices(xs)
    return _plans_at(src, price_histogram(src), _COUNT_STEPS, float(k), _untagged(xs, coding))


def _untagged(xs: Sequence[F32], coding: Coding) -> MakePlans:
    return lambda levels: make_plans(levels, coding, tagged=False, xs=list(xs))


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
    make: MakePlans,
) -> PayloadPlan:
    """Section plans of every tensor when ``target_bits`` worth of ladder steps are taken."""
    boundary = find_boundary(counts, steps, target_bits)
    return make(levels_at(src, boundary, steps))


def _plans_within(
    src: PriceSource,
    counts: npt.NDArray[np.float64],
    steps: Sequence[float],
    avail_bytes: int,
    first_target: float,
    make: MakePlans,
) -> PayloadPlan:
    """Section plans whose bytes (blocks bounded) sum to at most ``avail_bytes``.

    ``counts`` is the price histogram of ``src`` (exact, or estimated from a sample: the fit
    against exact sizes makes up for it).
    """

    def evaluate(target_bits: float) -> tuple[int, int, PayloadPlan]:
        plans = _plans_at(src, counts, steps, target_bits, make)
        return plans.total, plans.elastic, plans

    def empty() -> PayloadPlan:
        return make([np.zeros(n, dtype=np.uint8) for n in src.sizes])

    return fit_budget(evaluate, avail_bytes, first_target, tolerance=FIT_TOLERANCE, empty=empty)


def _code_bits(
    xs: Sequence[F32], levels: Sequence[U8], scales: Sequence[Scales]
) -> list[tuple[float, float]]:
    """Bits per INT2 and INT4 code of each tensor: the empirical entropy of the codes of the
    coordinates ``levels`` assigns each width (the fixed width where it has none), plus the
    Miller-Madow correction ``(symbols seen - 1) / (2 N ln 2)``: a sample's empirical entropy
    is biased low, by 6% for INT4 codes of a 50-coordinate sample."""
    T = len(xs)
    x = np.concatenate(xs) if T else np.zeros(0, np.float32)
    lv = np.concatenate(levels) if T else np.zeros(0, np.uint8)
    owner = np.repeat(np.arange(T), [v.size for v in xs])
    out = np.empty((T, 2))
    for i, width in enumerate((INT2_BITS, INT4_BITS)):
        pos = np.flatnonzero(lv == i + 1)
        scale = np.array([s[i] for s in scales], dtype=np.float32)[owner[pos]]
        codes = quantize_codes(x[pos], scale, QMAX[width], "nearest", None)
        m = 2 * QMAX[width] + 1
        hist = np.bincount(owner[pos] * m + codes, minlength=T * m).reshape(T, m)
        count = hist.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = hist / count
            h = -np.where(hist > 0, p * np.log2(p), 0.0).sum(axis=1)
            h += ((hist > 0).sum(axis=1) - 1) / (2 * np.log(2) * count[:, 0])
        out[:, i] = np.where(count[:, 0] > 0, np.minimum(h, width), width)
    return [(float(a), float(b)) for a, b in out]


def _sample_target(
    src: PriceSource,
    sample: Sample,
    scales: Sequence[Scales],
    steps: Sequence[float],
    avail_bytes: int,
    first_target: float,
    *,
    entropy: bool,
) -> tuple[float, npt.NDArray[np.float64]]:
    """Bit target meeting ``avail_bytes`` by the FSTQ sizes a sample predicts, and its histogram.

    ``src`` prices the sample, in which tensor ``i`` keeps every ``strides[i]``-th of its
    ``sizes[i]`` coordinates. Cheap: it never touches the full update. With entropy coding
    the bits per INT code are those of the sample's assignment at ``first_target``.
    """
    strides, sizes = sample.strides, sample.sizes
    weights = [float(s) for s in strides]
    counts = price_histogram(src, weights)
    code_bits = [(float(INT2_BITS), float(INT4_BITS))] * len(strides)

    T = len(strides)
    owner = np.repeat(np.arange(T), [x.size for x in sample.xs])
    stride_of = np.array(strides, dtype=np.float64)[:, None]
    n = np.array(sizes, dtype=np.float64)

    def evaluate(target_bits: float) -> tuple[int, int, float]:
        boundary = find_boundary(counts, steps, target_bits)
        lv = np.concatenate([np.zeros(0, np.uint8), *levels_at(src, boundary, steps, weights)])
        per_level = np.bincount(owner * 4 + lv, minlength=4 * T).reshape(T, 4)
        total, elastic = estimated_bytes(
            per_level[:, 1:] * stride_of, n, np.array(code_bits).reshape(T, 2), entropy=entropy
        )
        return int(np.ceil(total)), int(elastic), target_bits

    aim = int(avail_bytes * _SAMPLE_AIM)
    target = first_target
    # Coded INT codes cost what their distribution at the target says: estimate it at the
    # first target, fit, then once more at the fitted one (the spread grows with the target).
    for _ in range(_CODE_BITS_ROUNDS if entropy else 1):
        if entropy:
            at = levels_at(src, find_boundary(counts, steps, target), steps, weights)
            code_bits = _code_bits(sample.xs, at, scales)
        target = fit_budget(evaluate, aim, target, tolerance=_SAMPLE_TOLERANCE)
    return target, counts
