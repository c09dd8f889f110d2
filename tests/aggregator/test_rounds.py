from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rounds import (
    Decision,
    RoundPolicy,
    RoundState,
    decide,
    live_clients,
    select_clients,
)

POLICY = RoundPolicy(
    clients_per_round=3, quorum=2, round_timeout_s=10, extension_s=5, max_extensions=1
)


def _state(arrived: set[str] = frozenset(), extensions: int = 0) -> RoundState:  # type: ignore[assignment]
    return RoundState(1, frozenset({"a", "b", "c"}), 0.0, 10.0, 2, frozenset(arrived), extensions)


@pytest.mark.parametrize(
    ("arrived", "now", "extensions", "expected"),
    [
        ({"a", "b", "c"}, 1.0, 0, Decision.CLOSE),  # everyone in: close early
        ({"a", "b"}, 9.9, 0, Decision.WAIT),  # quorum but before the deadline: wait for c
        ({"a", "b"}, 10.0, 0, Decision.CLOSE),  # deadline with quorum
        ({"a"}, 10.0, 0, Decision.EXTEND),  # deadline without quorum: grace period
        ({"a"}, 15.0, 1, Decision.FAIL),  # out of extensions
        (set(), 15.0, 1, Decision.FAIL),
    ],
)
def test_decide(arrived: set[str], now: float, extensions: int, expected: Decision) -> None:
    assert decide(_state(arrived, extensions), now, POLICY) is expected


def test_arrival_from_unselected_client_is_refused() -> None:
    with pytest.raises(ValueError, match="not selected"):
        _state().with_arrival("mallory")


def test_extension_moves_deadline() -> None:
    s = _state({"a"}).extended(5.0)
    assert s.deadline == 15.0 and s.extensions == 1
    assert decide(s, 12.0, POLICY) is Decision.WAIT


@settings(max_examples=50, deadline=None)
@given(
    st.sets(st.text("abcdef", min_size=1, max_size=4), max_size=20),
    st.integers(1, 8),
    st.integers(0, 999),
)
def test_selection_is_a_seeded_subset(clients: set[str], k: int, seed: int) -> None:
    a = select_clients(clients, k, np.random.default_rng(seed))
    b = select_clients(clients, k, np.random.default_rng(seed))
    assert a == b and a <= clients and len(a) == min(k, len(clients))


def test_live_clients_respects_ttl() -> None:
    assert live_clients({"a": 100.0, "b": 50.0, "c": 91.0}, now=100.0, ttl_s=10.0) == ["a", "c"]


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="quorum"):
        RoundPolicy(clients_per_round=2, quorum=3)
