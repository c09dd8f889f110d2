"""The target quality and the cost of reaching it (decision 14).

The target is a value of one evaluation metric fixed before the compared runs: by default the
value the dense reference reaches with 95% of its improvement from round 0 to its last round.
A method's cost to target is what it spent (uplink and downlink bytes on the wire, simulated
time with and without the downlink) over rounds 1..k, where k is the first round whose evaluation
reaches the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic.dataclasses import dataclass as record

from common.record import RECORD_CONFIG
from evaluation.downlink import time_with_downlink

if TYPE_CHECKING:
    from evaluation.run_record import FleetRound

__all__ = [
    "Progress",
    "Target",
    "ToTarget",
    "first_reaching",
    "metric_value",
    "progress",
    "target_from_reference",
    "to_target",
]


@record(frozen=True, config=RECORD_CONFIG)
class Target:
    """A quality to reach: ``metric`` at ``value`` or better (the run record's ``target``)."""

    metric: str  # a metric of a round's "eval": loss, accuracy or rouge_l
    value: float
    higher_is_better: bool
    rule: str  # how the value was derived, for the report

    def reached(self, value: float | None) -> bool:
        """Whether an evaluation ``value`` (None: not evaluated) meets the target."""
        if value is None:
            return False
        return value >= self.value if self.higher_is_better else value <= self.value


def target_from_reference(
    values: Sequence[float],
    *,
    metric: str,
    higher_is_better: bool,
    fraction: float = 0.95,
) -> Target:
    """The value reached by ``fraction`` of the reference's improvement from round 0 to its last.

    ``values[r]`` is the reference's metric after round r (``values[0]``: the initial adapter).
    A reference that did not improve gives no meaningful target, so that is an error.
    """
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        raise ValueError("need finite values for round 0 and at least one trained round")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    first, last = values[0], values[-1]
    if (last > first) != higher_is_better or last == first:
        raise ValueError(f"the reference did not improve {metric}: {first} -> {last}")
    # Counted back from the last value, so fraction=1 is exactly the last value; clamped so
    # rounding never puts the target outside the reference's own range.
    value = last - (1 - fraction) * (last - first)
    value = min(max(value, min(first, last)), max(first, last))
    rule = (
        f"{fraction * 100:g}% of the reference's {metric} improvement from round 0 "
        f"({first:.4g}) to round {len(values) - 1} ({last:.4g})"
    )
    return Target(metric, value, higher_is_better, rule)


def first_reaching(values: Sequence[float | None], target: Target) -> int | None:
    """Index (the round, when ``values[r]`` is round r) of the first value meeting the target."""
    return next((i for i, v in enumerate(values) if target.reached(v)), None)


@dataclass(frozen=True)
class Progress:
    """Where a run stood after one round."""

    round: int
    value: float | None  # the metric after this round; None when the round was not evaluated
    uplink_wire_bytes: int  # cumulative over rounds 1..round
    time_s: float  # cumulative simulated round time over rounds 1..round, uplink only
    downlink_wire_bytes: int = 0  # cumulative over rounds 1..round
    time_with_downlink_s: float = 0.0  # cumulative, each device's download included

    @property
    def total_wire_bytes(self) -> int:
        """Both directions: what the run cost the network."""
        return self.uplink_wire_bytes + self.downlink_wire_bytes


@dataclass(frozen=True)
class ToTarget:
    """The first round that reached the target and what was spent up to and including it."""

    round: int
    uplink_wire_bytes: int
    time_s: float  # uplink only, as in records before the downlink accounting
    downlink_wire_bytes: int = 0
    time_with_downlink_s: float = 0.0

    @property
    def total_wire_bytes(self) -> int:
        return self.uplink_wire_bytes + self.downlink_wire_bytes


def metric_value(rnd: FleetRound, metric: str) -> float | None:
    """A round's evaluation of ``metric``; None when it has no value for it."""
    return rnd.eval.metric(metric)


def progress(rounds: Sequence[FleetRound], metric: str) -> list[Progress]:
    """Per round of a run record, in order: the metric and cumulative bytes and time.

    Round 0 (the initial adapter) costs nothing; failed or unevaluated rounds still count
    what they spent.
    """
    out: list[Progress] = []
    up = down = 0
    up_s = both_s = 0.0
    for rnd, with_down_s in zip(rounds, time_with_downlink(rounds), strict=True):
        if rnd.round > 0:
            up += rnd.uplink_wire_bytes
            down += rnd.downlink_wire_bytes
            up_s += rnd.round_time_s
            both_s += with_down_s
        out.append(Progress(rnd.round, metric_value(rnd, metric), up, up_s, down, both_s))
    return out


def to_target(rounds: Sequence[FleetRound], target: Target) -> ToTarget | None:
    """Cost to the first round reaching ``target``; None if the run never reaches it."""
    for p in progress(rounds, target.metric):
        if target.reached(p.value):
            return ToTarget(
                p.round, p.uplink_wire_bytes, p.time_s, p.downlink_wire_bytes,
                p.time_with_downlink_s,
            )  # fmt: skip
    return None
