"""Round bookkeeping as pure logic: client selection, arrivals, and when a round closes.

No I/O and no clock of its own: every decision takes `now` from the caller, so the policy is
tested by invariants without sleeping.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["Decision", "RoundPolicy", "RoundState", "decide", "live_clients", "select_clients"]


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds are sized and timed."""

    clients_per_round: int = 3
    min_clients: int = 1  # do not open a round with fewer live clients than this
    quorum: int = 1  # completed uploads needed to close at the deadline
    round_timeout_s: float = 300.0  # deadline = open time + this
    extension_s: float = 60.0  # grace added at a deadline without quorum
    max_extensions: int = 2  # then the round fails and the global adapter stays as it was

    def __post_init__(self) -> None:
        if self.clients_per_round < 1 or self.min_clients < 1 or self.quorum < 1:
            raise ValueError("clients_per_round, min_clients and quorum must be >= 1")
        if self.quorum > self.clients_per_round:
            raise ValueError("quorum cannot exceed clients_per_round")
        if self.round_timeout_s <= 0 or self.extension_s <= 0 or self.max_extensions < 0:
            raise ValueError("timeouts must be positive and max_extensions >= 0")


class Decision(enum.Enum):
    """What the controller should do with an open round now."""

    WAIT = "wait"
    CLOSE = "close"  # aggregate what arrived and publish a new global adapter
    EXTEND = "extend"  # deadline passed without quorum: give stragglers more time
    FAIL = "fail"  # out of extensions: keep the old global adapter, open the next round


@dataclass(frozen=True)
class RoundState:
    """An open round as the policy sees it."""

    round_id: int
    selected: frozenset[str]
    opened_at: float
    deadline: float
    quorum: int
    arrived: frozenset[str] = field(default_factory=frozenset)
    extensions: int = 0

    def with_arrival(self, client: str) -> RoundState:
        """Record a completed upload from a selected client (others are ignored by the caller)."""
        if client not in self.selected:
            raise ValueError(f"client {client!r} was not selected for round {self.round_id}")
        return replace(self, arrived=self.arrived | {client})

    def extended(self, by_s: float) -> RoundState:
        return replace(self, deadline=self.deadline + by_s, extensions=self.extensions + 1)


def decide(state: RoundState, now: float, policy: RoundPolicy) -> Decision:
    """Close early when every selected client arrived; at the deadline close on quorum."""
    if state.arrived >= state.selected:
        return Decision.CLOSE
    if now < state.deadline:
        return Decision.WAIT
    if len(state.arrived) >= state.quorum:
        return Decision.CLOSE
    if state.extensions < policy.max_extensions:
        return Decision.EXTEND
    return Decision.FAIL


def live_clients(last_seen: Mapping[str, float], now: float, ttl_s: float) -> list[str]:
    """Clients heard from (heartbeat or online status) within `ttl_s`, sorted for determinism."""
    return sorted(c for c, t in last_seen.items() if now - t <= ttl_s)


def select_clients(candidates: Iterable[str], k: int, rng: np.random.Generator) -> frozenset[str]:
    """Uniformly sample `k` clients (all of them if fewer) with the caller's seeded generator."""
    pool = sorted(set(candidates))
    if len(pool) <= k:
        return frozenset(pool)
    picks = rng.choice(len(pool), size=k, replace=False)
    return frozenset(pool[int(i)] for i in picks)
