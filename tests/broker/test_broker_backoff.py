"""Backoff generator: bounds, growth, cap, determinism -- without sleeping."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.backoff import ceilings, full_jitter


@given(
    base=st.floats(0.001, 10),
    cap_factor=st.floats(1, 1000),
    seed=st.integers(0, 2**32),
)
def test_full_jitter_stays_within_its_ceiling(base: float, cap_factor: float, seed: int) -> None:
    cap = base * cap_factor
    delays = list(itertools.islice(full_jitter(base, cap, rng=random.Random(seed)), 200))
    bounds = list(itertools.islice(ceilings(base, cap), 200))
    assert all(0 <= d <= b <= cap for d, b in zip(delays, bounds, strict=True))


def test_ceilings_double_then_cap_and_never_overflow() -> None:
    got = list(itertools.islice(ceilings(0.5, 30.0), 2000))
    assert got[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert got[-1] == 30.0


def test_same_seed_same_delays_and_jitter_spreads() -> None:
    a = list(itertools.islice(full_jitter(1, 60, rng=random.Random(7)), 50))
    b = list(itertools.islice(full_jitter(1, 60, rng=random.Random(7)), 50))
    assert a == b
    assert len(set(a)) == 50  # full jitter: no two clients retry in lockstep
    late = list(itertools.islice(full_jitter(1, 60, rng=random.Random(7)), 20, 2000))
    assert min(late) < 10 < max(late)  # uniform over [0, cap], not clustered at the cap


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_invalid_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="base_s"):
        next(ceilings(base, cap))
