"""FSTQ bit allocation: error model, step prices, INT scales and allocation weights.

Budget rule (decision 6, the paper's Lagrangian marginal rule). Coordinate ``j`` at level ``b``
in ``{0, 2, 4, 16}`` has distortion ``D_j(b) = w_j * e_j(b)`` (``w`` = Fisher or 1,
``e`` = expected squared quantisation error) and costs ``C(b)`` bits: value bits + 2-bit tag
+ an index-cost estimate (``C(0) = 0``). At bit price ``mu`` it takes
``argmin_b D_j(b) + mu*C(b)``. Non-concave ladders (0->4 better per bit than 0->2) are handled
exactly: the level at price ``mu`` is ``#{b : t_b > mu}`` with

    t_b = max_{b' >= b} min_{b'' < b} (D(b'') - D(b')) / (C(b') - C(b''))

(the lower convex hull of the ``(C, D)`` points); :mod:`fstq.ladder` finds the price that
spends a bit target and :mod:`fstq.budget` fits that target to the exact encoded size. fp16
error is taken as 0 (relative error <= 2**-11, below every INT step).

INT scales (one per tensor and width, decision 7) are chosen before the full pass:

* ``"search"`` (default): on a strided sample of each tensor, the price that meets the budget
  at group-max scales is found, then each tensor's INT4 and INT2 scales are picked from a
  geometric grid to minimise the sample's Lagrangian ``sum_j min_b D_j(b) + mu*C(b)`` (the
  group-max pair stays a candidate). The encoder uses exactly these scales (values beyond
  ``q_max*s`` clip), so the model is exact.
* ``"absmax"``: decision 7 literally: the model uses the absmax of the coordinates the sample
  allocation assigns each width, and the encoder the absmax of the final assignment.
* ``"group"``: paper section 2.4 literally: ``max_{j in g} |x_j| / q_max`` for both.

The paper's percentile rule is the alternative, in :mod:`fstq.percentile`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from fstq.config import Rounding
from fstq.errors import ConfigError
from fstq.index_coding import rice_bits_per_index
from fstq.ladder import (
    Boundary,
    bin_value,
    find_boundary,
    gather,
    levels_at,
    make_blocks,
    price_histogram,
    spread,
)
from fstq.quantize import QMAX, expected_sq_error
from fstq.sparse_plan import FSTQ_WIDTHS, TAG_BITS

__all__ = [
    "FstqPrices",
    "LevelCosts",
    "MagnitudePrices",
    "Policy",
    "Sample",
    "ScaleRule",
    "Scales",
    "allocation_weights",
    "check_policy",
    "choose_scales",
    "fstq_level_costs",
    "fstq_thresholds",
    "index_bits_estimate",
    "policy_weights",
    "rescale_weights",
    "sample_update",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]

Policy = Literal["fisher", "uniform", "random"]
ScaleRule = Literal["search", "absmax", "group"]
Scales = tuple[float, float]  # (INT2 scale, INT4 scale)

_SAMPLE_MIN: Final = 512  # coordinates per tensor kept by the scale-search sample (at least)
_PRIMES: Final = (1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31)  # sample strides (see Sample)
_GRID4: Final = 2.0 ** (-np.arange(12) / 2)  # INT4 scale candidates x (group max / 7)
_GRID2: Final = 2.0 ** (-np.arange(1, 16) / 2)  # INT2 scale candidates x group max
# index_bits_estimate: with no budget nothing is sent, so any cost does (a varint byte); the
# fixed point stops moving within 25 steps over budgets of 1e-4 to 40 bits per coordinate.
_NO_BUDGET_INDEX_BITS: Final = 8.0
_INDEX_FIXED_POINT_STEPS: Final = 30


def check_policy(policy: str, scale_rule: str) -> None:
    """ConfigError unless ``policy`` is a :data:`Policy` and ``scale_rule`` a :data:`ScaleRule`."""
    if policy not in get_args(Policy):
        raise ConfigError(f"policy must be fisher, uniform or random, got {policy!r}")
    if scale_rule not in get_args(ScaleRule):
        raise ConfigError(f"scale_rule must be search, absmax or group, got {scale_rule!r}")


def allocation_weights(
    xs: Sequence[F32], fisher: Sequence[F32] | None, policy: Policy, rng: np.random.Generator
) -> list[F32 | None]:
    """Per-tensor distortion weights of ``policy`` (see :func:`policy_weights`), rescaled."""
    fishers: Sequence[F32 | None] = fisher if fisher is not None else [None] * len(xs)
    return rescale_weights(
        [policy_weights(x, f, policy, rng) for x, f in zip(xs, fishers, strict=True)]
    )


def policy_weights(
    x: F32, fisher: F32 | None, policy: Policy, rng: np.random.Generator
) -> F32 | None:
    """Per-coordinate distortion weights for an allocation policy (None means all ones).

    ``fisher`` uses the coordinate Fisher; ``uniform`` ignores it (magnitude-based allocation);
    ``random`` makes the importance ``u = w*x**2`` i.i.d. Uniform(0, 1) (random support at the
    same budget; the precision ladder still follows each coordinate's quantisation error).
    """
    if policy == "fisher":
        return fisher
    if policy == "uniform":
        return None
    x2 = np.square(x)
    r = rng.random(x.shape, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        w = np.where(x2 > 0, r / x2, np.float32(0)).astype(np.float32)
    # Keep weights finite (tiny x): prices must never become inf*0 = NaN.
    return np.minimum(w, np.finfo(np.float32).max, out=w)


def rescale_weights(weights: Sequence[F32 | None]) -> list[F32 | None]:
    """Weights times a power of two bringing their maximum near 1 (exact; ordering unchanged).

    Prices are ``w * error / bits`` in float32: a Fisher of 1e-30 (or 1e30) would push them
    into denormals (or inf), where the price histogram loses resolution.
    """
    peaks = [float(w.max()) for w in weights if w is not None and w.size]
    peak = max(peaks, default=0.0)
    if peak <= 0 or 2.0**-40 <= peak <= 2.0**40:
        return list(weights)
    factor = np.float32(2.0 ** -round(np.log2(peak)))
    return [None if w is None else w * factor for w in weights]


@dataclass(frozen=True)
class LevelCosts:
    """Bits of level ``l >= 1``: ``value_bits[l-1] + tag_bits + index_bits``."""

    value_bits: tuple[int, ...]
    tag_bits: int
    index_bits: float

    def level_bits(self) -> tuple[float, ...]:
        return tuple(v + self.tag_bits + self.index_bits for v in self.value_bits)

    def step_bits(self) -> tuple[float, ...]:
        c = (0.0, *self.level_bits())
        return tuple(c[i + 1] - c[i] for i in range(len(self.value_bits)))


def fstq_level_costs(index_bits: float) -> LevelCosts:
    """Costs of the FSTQ ladder: INT2, INT4 and fp16 values, each with its tag and index."""
    return LevelCosts(FSTQ_WIDTHS[1:], TAG_BITS, index_bits)


def index_bits_estimate(bits_per_coord: float, value_bits: float) -> float:
    """Index bits per sent coordinate at the density a budget implies (cheapest support code)."""
    if bits_per_coord <= 0:
        return _NO_BUDGET_INDEX_BITS
    density = min(1.0, bits_per_coord / value_bits)
    cost = 1.0
    for _ in range(_INDEX_FIXED_POINT_STEPS):  # density = budget / (value + index(density))
        gap = 1.0 / max(density, 1e-12)
        varint_bytes = max(1, -(-int(np.log2(gap) + 1) // 7))
        cost = min(gap, 8.0 * varint_bytes, rice_bits_per_index(density))
        density = min(1.0, bits_per_coord / (value_bits + cost))
    return cost


def _f32(scale: float | np.float32 | F32) -> np.float32 | F32:
    return np.float32(scale) if np.ndim(scale) == 0 else np.asarray(scale, dtype=np.float32)


def fstq_thresholds(
    x: F32,
    weight: F32 | None,
    scales: tuple[float | np.float32 | F32, float | np.float32 | F32],
    costs: LevelCosts,
    rounding: Rounding,
) -> tuple[F32, F32, F32]:
    """Prices ``(t2, t4, t16)`` below which a coordinate takes at least INT2 / INT4 / fp16."""
    c2, c4, c16 = costs.level_bits()
    ax = np.abs(x)
    e0 = np.square(ax)
    e2 = expected_sq_error(ax, _f32(scales[0]), QMAX[2], rounding)
    e4 = expected_sq_error(ax, _f32(scales[1]), QMAX[4], rounding)
    f32 = np.float32
    s016 = e0 * f32(1 / c16)
    s216 = e2 * f32(1 / (c16 - c2))
    s416 = e4 * f32(1 / (c16 - c4))
    s02 = np.subtract(e0, e2, out=e0)
    s02 *= f32(1 / c2)
    np.subtract(np.square(ax, out=ax), e4, out=ax)  # e0 - e4
    s04 = ax
    s04 *= f32(1 / c4)
    s24 = np.subtract(e2, e4, out=e2)
    s24 *= f32(1 / (c4 - c2))
    t2 = np.maximum(s02, s04)
    np.maximum(t2, s016, out=t2)
    t4 = np.minimum(s04, s24, out=s04)
    np.maximum(t4, np.minimum(s016, s216, out=s24), out=t4)
    t16 = np.minimum(s016, s216, out=s016)
    np.minimum(t16, s416, out=t16)
    if weight is not None:
        t2 *= weight
        t4 *= weight
        t16 *= weight
    return t2, t4, t16


class FstqPrices:
    """:class:`~fstq.ladder.PriceSource` of the FSTQ ladder 0 -> INT2 -> INT4 -> fp16."""

    n_levels = 3

    def __init__(
        self,
        xs: Sequence[F32],
        weights: Sequence[F32 | None],
        scales: Sequence[Scales],
        costs: LevelCosts,
        rounding: Rounding,
    ) -> None:
        self.xs = xs
        self.weights: list[F32] | None = None
        if any(w is not None for w in weights):
            self.weights = [
                np.ones(x.size, np.float32) if w is None else w
                for x, w in zip(xs, weights, strict=True)
            ]
        # A zero scale only belongs to an all-zero tensor: any positive one gives it no error.
        self.s2 = [s[0] if s[0] > 0 else 1.0 for s in scales]
        self.s4 = [s[1] if s[1] > 0 else 1.0 for s in scales]
        self.costs, self.rounding = costs, rounding
        self.sizes = [int(x.size) for x in xs]
        self.blocks = make_blocks(self.sizes)

    def prices(self, b: int) -> tuple[F32, F32, F32]:
        block = self.blocks[b]
        return fstq_thresholds(
            gather(block, self.xs),
            None if self.weights is None else gather(block, self.weights),
            (spread(block, self.s2), spread(block, self.s4)),
            self.costs,
            self.rounding,
        )


class MagnitudePrices:
    """:class:`~fstq.ladder.PriceSource` of Top-k: one step (0 -> fp16) priced by ``|x|``."""

    n_levels = 1

    def __init__(self, xs: Sequence[F32]) -> None:
        self.xs = xs
        self.sizes = [int(x.size) for x in xs]
        self.blocks = make_blocks(self.sizes)

    def prices(self, b: int) -> tuple[F32]:
        return (np.abs(gather(self.blocks[b], self.xs)),)


# --------------------------------------------------------------------------------------------
# INT scales


def _absmax(x: F32) -> float:
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


@dataclass(frozen=True)
class Sample:
    """Every ``stride``-th coordinate of each tensor, standing for ``stride`` coordinates.

    Strides are primes (<= 31, at least 512 samples per tensor) so they do not align with
    the row length of a LoRA matrix (576, 4096, ...) and sample every column.
    """

    xs: list[F32]
    weights: list[F32 | None]
    strides: list[int]
    sizes: list[int]  # full tensor sizes
    group: list[Scales]  # group-max scales of the full tensors


def sample_update(xs: Sequence[F32], weights: Sequence[F32 | None]) -> Sample:
    """Deterministic strided sample of an update (see :class:`Sample`)."""
    strides = [max(p for p in _PRIMES if p <= max(1, x.size // _SAMPLE_MIN)) for x in xs]
    return Sample(
        xs=[np.ascontiguousarray(x[::s]) for x, s in zip(xs, strides, strict=True)],
        weights=[
            None if w is None else np.ascontiguousarray(w[::s])
            for w, s in zip(weights, strides, strict=True)
        ],
        strides=strides,
        sizes=[int(x.size) for x in xs],
        group=[(m, m / QMAX[4]) for m in map(_absmax, xs)],
    )


def choose_scales(
    sample: Sample, costs: LevelCosts, rounding: Rounding, target_bits: float, rule: ScaleRule
) -> list[Scales]:
    """Per-tensor ``(INT2, INT4)`` scales for the allocation model (see module docstring)."""
    if rule == "group" or not sample.xs:
        return sample.group
    src = FstqPrices(sample.xs, sample.weights, sample.group, costs, rounding)
    weights = [float(s) for s in sample.strides]
    boundary = find_boundary(price_histogram(src, weights), costs.step_bits(), target_bits)
    if rule == "absmax":
        levels = levels_at(src, Boundary(boundary.bin, 0.0), costs.step_bits())
        return [
            _assigned_absmax(x, lv, g)
            for x, lv, g in zip(sample.xs, levels, sample.group, strict=True)
        ]
    return _search_scales(sample, float(bin_value(boundary.bin)), costs, rounding)


def _assigned_absmax(x: F32, level: U8, fallback: Scales) -> Scales:
    a2, a4 = _absmax(x[level == 1]), _absmax(x[level == 2])
    return (a2 if a2 > 0 else fallback[0], a4 / QMAX[4] if a4 > 0 else fallback[1])


def _search_scales(
    sample: Sample, mu: float, costs: LevelCosts, rounding: Rounding
) -> list[Scales]:
    """Per tensor, the grid scales minimising the sample's Lagrangian at price ``mu``.

    Coordinate descent over geometric grids (INT4 alone, INT2 given INT4, INT4 given INT2),
    then the group-max pair where it is still better. All tensors are searched at once on the
    concatenated sample; ``reduceat`` gives per-tensor totals.
    """
    live = [
        i
        for i, (x, g) in enumerate(zip(sample.xs, sample.group, strict=True))
        if x.size and g[0] > 0
    ]
    if not live:
        return list(sample.group)
    sizes = [int(sample.xs[i].size) for i in live]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ax = np.abs(np.concatenate([sample.xs[i] for i in live]))
    w = None
    if any(sample.weights[i] is not None for i in live):
        w = np.concatenate([_or_ones(sample.weights[i], sizes[j]) for j, i in enumerate(live)])
    g2 = np.repeat(np.array([sample.group[i][0] for i in live], dtype=np.float32), sizes)
    g4 = np.repeat(np.array([sample.group[i][1] for i in live], dtype=np.float32), sizes)
    c2, c4, c16 = (np.float32(mu * c) for c in costs.level_bits())

    def cost(scale: F32, qmax: int, level_cost: np.float32) -> F32:
        d = expected_sq_error(ax, scale, qmax, rounding)
        if w is not None:
            d *= w
        d += level_cost
        return d

    def both(f2: F32, f4: F32) -> F32:
        return np.minimum(cost(g2 * f2, QMAX[2], c2), cost(g4 * f4, QMAX[4], c4))

    base = np.square(ax)  # pruned...
    if w is not None:
        base *= w
    np.minimum(base, c16, out=base)  # ...or fp16
    # Round 1: INT4 alone, then INT2 given INT4; round 2: INT4 again given INT2.
    f4 = _best_factor(base, starts, _GRID4, lambda f: cost(g4 * f, QMAX[4], c4))
    with_int4 = np.minimum(base, cost(g4 * np.repeat(f4, sizes), QMAX[4], c4))
    f2 = _best_factor(with_int4, starts, _GRID2, lambda f: cost(g2 * f, QMAX[2], c2))
    with_int2 = np.minimum(base, cost(g2 * np.repeat(f2, sizes), QMAX[2], c2))
    f4 = _best_factor(with_int2, starts, _GRID4, lambda f: cost(g4 * f, QMAX[4], c4))
    # Descent can miss the joint optimum: keep the group-max pair where it is better.
    ones = np.ones(len(live), dtype=np.float32)
    found = np.add.reduceat(
        np.minimum(base, both(np.repeat(f2, sizes), np.repeat(f4, sizes))), starts, dtype=np.float64
    )
    group = np.add.reduceat(
        np.minimum(base, both(g2 * 0 + 1, g4 * 0 + 1)), starts, dtype=np.float64
    )
    keep_group = group <= found
    f2[keep_group], f4[keep_group] = ones[keep_group], ones[keep_group]
    out = list(sample.group)
    for j, i in enumerate(live):
        out[i] = (sample.group[i][0] * float(f2[j]), sample.group[i][1] * float(f4[j]))
    return out


def _or_ones(w: F32 | None, n: int) -> F32:
    return np.ones(n, np.float32) if w is None else w


def _best_factor(
    base: F32,
    starts: npt.NDArray[np.int64],
    grid: npt.NDArray[np.float64],
    cost: Callable[[np.float32], F32],
    fallback: float = 1.0,
) -> npt.NDArray[np.float32]:
    """Per segment, the grid factor whose ``min(base, cost)`` total is lowest (else fallback)."""
    best_total = np.add.reduceat(base, starts, dtype=np.float64)
    best = np.full(starts.size, fallback, dtype=np.float32)
    for factor in grid.tolist():
        total = np.add.reduceat(
            np.minimum(base, cost(np.float32(factor))), starts, dtype=np.float64
        )
        better = total < best_total
        best_total[better] = total[better]
        best[better] = factor
    return best
