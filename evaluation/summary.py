"""Per-method summary of a fleet run record (its Markdown tables: :mod:`evaluation.tables`).

The run record is :class:`~evaluation.run_record.FleetRun` (what evaluation/fleet.py writes). Ratios
are "dense / method" against the ``dense_fp16`` run, so 46x means 46 times less; without a
dense run they are None. Bytes are counted both ways: uplink, downlink and their total, to the
target and at dense's final round; time with each device's download and, as older records had
it, without.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from evaluation.downlink import (
    CatchupError,
    DownlinkCount,
    Route,
    add_counts,
    device_downlinks,
    round_downlinks,
    sort_staleness,
    tally,
)
from evaluation.run_record import FleetRound, FleetRun, MethodRun, RunRecordError, Scalar
from evaluation.targets import Progress, Target, ToTarget, metric_value, progress, to_target

__all__ = [
    "METRICS",
    "REFERENCE",
    "MethodSummary",
    "Ratios",
    "RunRecordError",
    "Summary",
    "method_records",
    "summarize",
]

REFERENCE = "dense_fp16"
METRICS = ("loss", "accuracy", "rouge_l")


class _Spent(Protocol):
    """What a run had spent by some round (a :class:`Progress` or a :class:`ToTarget`)."""

    @property
    def uplink_wire_bytes(self) -> int: ...
    @property
    def downlink_wire_bytes(self) -> int: ...
    @property
    def total_wire_bytes(self) -> int: ...
    @property
    def time_s(self) -> float: ...
    @property
    def time_with_downlink_s(self) -> float: ...


@dataclass(frozen=True)
class Ratios:
    """dense / method of each cost (46x: 46 times less); None without both sides."""

    uplink: float | None = None
    downlink: float | None = None
    total: float | None = None
    time_s: float | None = None  # uplink-only round times
    time_with_downlink_s: float | None = None

    @classmethod
    def of(cls, dense: _Spent | None, method: _Spent | None) -> Ratios:
        if dense is None or method is None:
            return cls()
        return cls(
            uplink=_ratio(dense.uplink_wire_bytes, method.uplink_wire_bytes),
            downlink=_ratio(dense.downlink_wire_bytes, method.downlink_wire_bytes),
            total=_ratio(dense.total_wire_bytes, method.total_wire_bytes),
            time_s=_ratio(dense.time_s, method.time_s),
            time_with_downlink_s=_ratio(dense.time_with_downlink_s, method.time_with_downlink_s),
        )


@dataclass(frozen=True)
class MethodSummary:
    """What one method's run came to."""

    method: str
    options: dict[str, Scalar]
    rounds: int  # trained rounds in the record (round 0 excluded)
    final_round: int | None  # the last round (each is evaluated); None without rounds
    final: dict[str, float | None]  # metric -> value at final_round
    #: metric -> (method - dense) / |dense| * 100 at dense's final round (a method run for more
    #: rounds, to reach the target, is compared where dense stopped; one run for fewer, at its own
    #: final round)
    vs_dense_pct: dict[str, float | None]
    by_round: dict[int, dict[str, float | None]]  # round -> metric -> value
    spent: dict[int, Progress]  # round -> what rounds 1..round cost
    to_target: ToTarget | None  # None: no target, or never reached
    to_target_ratios: Ratios  # dense / method, to the target
    #: What rounds 1..dense's final round cost (the method's own final round if it ran fewer)
    at_dense_final: Progress | None
    at_dense_final_ratios: Ratios
    total_uplink_wire_bytes: int  # all rounds
    total_resent_bytes: int  # all rounds: duplicate chunks the aggregator received
    total_downlink_wire_bytes: int  # all rounds: what the aggregator sent devices to start rounds
    total_time_s: float  # all rounds, uplink-only round times
    total_time_with_downlink_s: float  # all rounds
    mean_payload_bytes: float | None  # per arrived client per round
    payload_ratio: float | None  # dense / method, mean payload
    agent_peak_rss_mb: float | None
    downlink: dict[str, Scalar] | None  # the aggregator's downlink settings; None: full fp16
    downlink_by_route: dict[Route, DownlinkCount]  # all rounds
    #: all rounds, as the devices saw it: how many versions their held state was behind ("new":
    #: it held nothing). The aggregator's own breakdown (FleetRound.downlink) files every first
    #: contact under "new"; a device that derived v0 knows it is base_version behind.
    downlink_by_staleness: dict[str, DownlinkCount]
    #: all rounds: devices that held nothing fetched before (derived v0, or nothing), any staleness
    downlink_first_contact: DownlinkCount
    downlink_fallbacks: int  # all rounds: catch-ups that failed to verify on the device
    catchup_error: dict[int, CatchupError]  # round -> the aggregator's, rounds with catch-ups

    @property
    def total_wire_bytes(self) -> int:
        return self.total_uplink_wire_bytes + self.total_downlink_wire_bytes


@dataclass(frozen=True)
class Summary:
    target: Target | None
    reference: str | None  # REFERENCE when the record has it
    methods: dict[str, MethodSummary]  # reference first, then in record order


def method_records(run: FleetRun) -> dict[str, MethodRun]:
    """The run record's methods, the reference first; a record without any is an error."""
    methods = run.methods
    if not methods:
        raise RunRecordError("the run record has no methods")
    # sorted() is stable: the reference first, the rest in record order.
    return {name: methods[name] for name in sorted(methods, key=lambda n: n != REFERENCE)}


def summarize(run: FleetRun) -> Summary:
    """Summarise every method of a run record."""
    target = run.target
    raw = {name: _method(name, rec, target) for name, rec in method_records(run).items()}
    ref = raw.get(REFERENCE)
    return Summary(
        target=target,
        reference=REFERENCE if ref else None,
        methods={name: _against(m, ref) for name, m in raw.items()},
    )


def _method(name: str, rec: MethodRun, target: Target | None) -> MethodSummary:
    rounds = rec.rounds
    steps = progress(rounds, METRICS[0])  # cumulative bytes and time; metrics read below
    last = rounds[-1] if rounds else None
    by_route: dict[Route, DownlinkCount] = {}
    by_staleness: dict[str, DownlinkCount] = {}
    errors: dict[int, CatchupError] = {}
    devices = device_downlinks(rounds)
    for rnd, down, got in zip(rounds, round_downlinks(rounds), devices, strict=True):
        by_route = add_counts(by_route, down.by_route)
        by_staleness = add_counts(by_staleness, tally(got.values()).by_staleness)
        if down.catchup_error is not None:
            errors[rnd.round] = down.catchup_error
    first = [d for got in devices for d in got.values() if d.first_contact]
    return MethodSummary(
        method=name,
        options=dict(rec.options),
        rounds=sum(1 for p in steps if p.round > 0),
        final_round=None if last is None else last.round,
        final={m: None if last is None else metric_value(last, m) for m in METRICS},
        vs_dense_pct=dict.fromkeys(METRICS),
        by_round={r.round: {m: metric_value(r, m) for m in METRICS} for r in rounds},
        spent={p.round: p for p in steps},
        to_target=None if target is None else to_target(rounds, target),
        to_target_ratios=Ratios(),
        at_dense_final=steps[-1] if steps else None,
        at_dense_final_ratios=Ratios(),
        total_uplink_wire_bytes=steps[-1].uplink_wire_bytes if steps else 0,
        total_resent_bytes=sum(r.uplink_resent_bytes for r in rounds),
        total_downlink_wire_bytes=steps[-1].downlink_wire_bytes if steps else 0,
        total_time_s=steps[-1].time_s if steps else 0.0,
        total_time_with_downlink_s=steps[-1].time_with_downlink_s if steps else 0.0,
        mean_payload_bytes=_mean_payload(rounds),
        payload_ratio=None,
        agent_peak_rss_mb=rec.agent_peak_rss_mb,
        downlink=None if rec.downlink is None else dict(rec.downlink),
        downlink_by_route=by_route,
        downlink_by_staleness=sort_staleness(by_staleness),
        downlink_first_contact=DownlinkCount(
            fetches=len(first), wire_bytes=sum(d.wire_bytes for d in first)
        ),
        downlink_fallbacks=sum(c.downlink_fallbacks or 0 for r in rounds for c in r.clients),
        catchup_error=errors,
    )


def _mean_payload(rounds: Sequence[FleetRound]) -> float | None:
    """Mean compressed payload over every upload that arrived, rounds 1..n."""
    sizes = [c.payload_bytes for rnd in rounds for c in rnd.clients if c.arrived]
    return sum(sizes) / len(sizes) if sizes else None


def _ratio(dense: float | None, method: float | None) -> float | None:
    """dense / method, or None when either is missing or the method spent nothing."""
    if dense is None or method is None or method <= 0:
        return None
    return dense / method


def _change_pct(value: float | None, dense: float | None) -> float | None:
    if value is None or dense is None or dense == 0 or not math.isfinite(dense):
        return None
    return (value - dense) / abs(dense) * 100


def _against(m: MethodSummary, ref: MethodSummary | None) -> MethodSummary:
    """Fill in the comparisons with the reference run."""
    if ref is None:
        return m
    same = m.final if ref.final_round is None else m.by_round.get(ref.final_round, m.final)
    at = m.at_dense_final
    if ref.final_round is not None:
        at = m.spent.get(ref.final_round, at)
    return replace(
        m,
        vs_dense_pct={k: _change_pct(same[k], ref.final[k]) for k in METRICS},
        to_target_ratios=Ratios.of(ref.to_target, m.to_target),
        at_dense_final=at,
        at_dense_final_ratios=Ratios.of(ref.at_dense_final, at),
        payload_ratio=_ratio(ref.mean_payload_bytes, m.mean_payload_bytes),
    )
