"""The allocation machinery: hull prices = Lagrangian argmin, histogram greedy = sorted greedy."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fstq.allocation import (
    fstq_level_costs,
    fstq_thresholds,
    index_bits_estimate,
    policy_weights,
)
from fstq.ladder import find_boundary, gather, levels_at, make_blocks, price_histogram
from fstq.percentile import percentile_levels
from fstq.quantize import QMAX, expected_sq_error

F32 = np.ndarray


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("index_bits", [0.0, 3.5, 8.0])
def test_hull_prices_give_the_lagrangian_argmin(rounding: str, index_bits: float) -> None:
    # Arrange: heavy-tailed values and weights, scales that clip some values
    rng = np.random.default_rng(50)
    x = (rng.standard_t(2, 4000) * 1e-3).astype(np.float32)
    w = np.exp(rng.normal(0, 2, 4000)).astype(np.float32)
    amax = float(np.abs(x).max())
    scales = (0.2 * amax, 0.05 * amax)
    costs = fstq_level_costs(index_bits)
    # Act
    t = fstq_thresholds(x, w, scales, costs, rounding)  # type: ignore[arg-type]
    # Assert: at any price mu, #{b: t_b > mu} is argmin_b w*e_b + mu*C_b (brute force)
    ax = np.abs(x)
    errors: np.ndarray = np.stack(
        [
            ax.astype(np.float64) ** 2,
            expected_sq_error(ax, np.float32(scales[0]), QMAX[2], rounding),  # type: ignore[arg-type]
            expected_sq_error(ax, np.float32(scales[1]), QMAX[4], rounding),  # type: ignore[arg-type]
            np.zeros_like(ax, dtype=np.float64),
        ]
    )
    level_bits = np.array([0.0, *costs.level_bits()])[:, None]
    positive = np.concatenate([ti[ti > 0] for ti in t])
    for mu in np.quantile(positive, np.linspace(0.01, 0.99, 25)):
        from_prices = sum((ti > mu).astype(int) for ti in t)
        brute = np.argmin(w * errors + mu * level_bits, axis=0)
        near_tie = np.any([np.abs(ti - mu) <= 1e-4 * mu for ti in t], axis=0)
        assert np.array_equal(from_prices[~near_tie], brute[~near_tie])


def test_prices_are_non_increasing_along_the_ladder() -> None:
    rng = np.random.default_rng(51)
    x = (rng.standard_normal(5000) * 1e-2).astype(np.float32)
    amax = float(np.abs(x).max())
    t2, t4, t16 = fstq_thresholds(x, None, (amax / 3, amax / 30), fstq_level_costs(4.0), "nearest")
    assert np.all(t2 >= t4) and np.all(t4 >= t16)


class _Prices:
    """A PriceSource over fixed arrays (non-increasing along each coordinate's ladder)."""

    def __init__(self, tensors: Sequence[np.ndarray], chunk: int) -> None:
        self.tensors = tensors  # each (n_levels, n)
        self.n_levels = int(tensors[0].shape[0])
        self.sizes = [int(t.shape[1]) for t in tensors]
        self.blocks = make_blocks(self.sizes, chunk)

    def prices(self, b: int) -> list[np.ndarray]:
        return [
            gather(self.blocks[b], [t[level] for t in self.tensors])
            for level in range(self.n_levels)
        ]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    frac=st.floats(0.0, 1.2),
    ties=st.booleans(),
    chunk=st.sampled_from([64, 1000, 1 << 14]),
)
def test_histogram_greedy_matches_sorted_greedy(
    seed: int, frac: float, ties: bool, chunk: int
) -> None:
    # Arrange: three tensors, three steps per coordinate, prices over many decades
    rng = np.random.default_rng(seed)
    tensors = []
    for n in (1, 700, 0, 3, 20000, 5):
        raw = np.exp(rng.normal(0, 4, size=(3, n)))
        if ties:
            raw = np.round(raw, 0) + 0.5  # many equal prices: the partial fill decides
        tensors.append(-np.sort(-raw, axis=0).astype(np.float32))
    src = _Prices(tensors, chunk)
    steps = (4.0, 2.0, 12.0)
    total_bits = sum(float(np.dot(steps, np.ones((3, t.shape[1])).sum(axis=1))) for t in tensors)
    target = frac * total_bits
    # Act
    levels = levels_at(src, find_boundary(price_histogram(src), steps, target), steps)
    # Assert: a prefix of every ladder is taken, within the target, nearly all of it, and no
    # untaken step is priced above a taken one (beyond the histogram's 2**-8 resolution)
    spent = sum(float(np.cumsum([0.0, *steps])[lv].sum()) for lv in levels)
    assert spent <= target + 1e-6
    assert spent >= min(target, total_bits) - sum(steps)
    taken = np.concatenate(
        [
            t[lv_mask]
            for t, lv in zip(tensors, levels, strict=True)
            for lv_mask in [np.arange(3)[:, None] < lv[None, :]]
        ]
    )
    untaken = np.concatenate(
        [
            t[~m]
            for t, lv in zip(tensors, levels, strict=True)
            for m in [np.arange(3)[:, None] < lv[None, :]]
        ]
    )
    if taken.size and untaken.size:
        assert untaken.max() <= taken.min() * (1 + 2**-7)


def test_percentile_levels_are_numpy_lower_percentiles() -> None:
    # Arrange
    rng = np.random.default_rng(52)
    parts = [rng.exponential(size=n).astype(np.float32) for n in (1, 333, 4000)]
    parts[1][:50] = 0.0  # zero importance is never sent
    pcts = (60.0, 85.0, 97.0)
    # Act
    levels = np.concatenate(percentile_levels(parts, pcts))
    # Assert
    u = np.concatenate(parts)
    cuts = np.percentile(u, pcts, method="lower")
    expected = (u > 0) * ((u >= cuts[0]).astype(int) + (u >= cuts[1]) + (u >= cuts[2]))
    assert np.array_equal(levels, expected)


def test_policy_weights() -> None:
    rng = np.random.default_rng(53)
    x = np.array([0.0, 1e-30, 1e-3, -2.0], dtype=np.float32)
    fisher = np.ones(4, dtype=np.float32)
    assert policy_weights(x, fisher, "fisher", rng) is fisher
    assert policy_weights(x, fisher, "uniform", rng) is None
    w = policy_weights(x, fisher, "random", rng)
    assert w is not None and np.all(np.isfinite(w)) and w[0] == 0
    u = w[2:] * x[2:] ** 2
    assert np.all((u >= 0) & (u < 1))


def test_index_estimate_falls_with_density() -> None:
    # Sparse supports cost more bits per index (Rice ~ log2(1/p) + 1.5); a dense one costs 1.
    budgets = [0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0]
    estimates = [index_bits_estimate(b, 6.0) for b in budgets]
    assert all(a >= b for a, b in itertools.pairwise(estimates)), estimates
    assert estimates[-1] == 1.0 and 8.0 < estimates[0] < 16.0
