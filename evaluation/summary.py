"""Per-method summary of a fleet run record and the Markdown tables for EVALUATION.md.

The run record is :class:`~evaluation.run_record.FleetRun` (what evaluation/fleet.py writes). Ratios
are "dense / method" against the ``dense_fp16`` run, so 46x means 46 times less; without a
dense run they are None. A method that never reaches the target says so instead of a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from evaluation.run_record import FleetRound, FleetRun, MethodRun, RunRecordError, Scalar
from evaluation.targets import Target, ToTarget, metric_value, progress, to_target

__all__ = [
    "METRICS",
    "REFERENCE",
    "MethodSummary",
    "RunRecordError",
    "Summary",
    "markdown_tables",
    "method_records",
    "summarize",
]

REFERENCE = "dense_fp16"
METRICS = ("loss", "accuracy", "rouge_l")
_LABELS = {"loss": "loss", "accuracy": "accuracy", "rouge_l": "ROUGE-L"}
_NONE = "—"


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
    to_target: ToTarget | None  # None: no target, or never reached
    bytes_ratio: float | None  # dense / method, uplink wire bytes to target
    time_ratio: float | None  # dense / method, simulated time to target
    total_uplink_wire_bytes: int  # all rounds
    total_resent_bytes: int  # all rounds: duplicate chunks the aggregator received
    total_downlink_wire_bytes: int  # all rounds: global adapter chunks sent to devices
    total_time_s: float  # all rounds
    mean_payload_bytes: float | None  # per arrived client per round
    payload_ratio: float | None  # dense / method, mean payload
    agent_peak_rss_mb: float | None


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
    return MethodSummary(
        method=name,
        options=dict(rec.options),
        rounds=sum(1 for p in steps if p.round > 0),
        final_round=None if last is None else last.round,
        final={m: None if last is None else metric_value(last, m) for m in METRICS},
        vs_dense_pct=dict.fromkeys(METRICS),
        by_round={r.round: {m: metric_value(r, m) for m in METRICS} for r in rounds},
        to_target=None if target is None else to_target(rounds, target),
        bytes_ratio=None,
        time_ratio=None,
        total_uplink_wire_bytes=steps[-1].uplink_wire_bytes if steps else 0,
        total_resent_bytes=sum(r.uplink_resent_bytes for r in rounds),
        total_downlink_wire_bytes=sum(r.downlink_wire_bytes for r in rounds),
        total_time_s=steps[-1].time_s if steps else 0.0,
        mean_payload_bytes=_mean_payload(rounds),
        payload_ratio=None,
        agent_peak_rss_mb=rec.agent_peak_rss_mb,
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
    bytes_ratio = time_ratio = None
    mt, rt = m.to_target, ref.to_target
    if mt is not None and rt is not None:
        bytes_ratio = _ratio(rt.uplink_wire_bytes, mt.uplink_wire_bytes)
        time_ratio = _ratio(rt.time_s, mt.time_s)
    same = m.final if ref.final_round is None else m.by_round.get(ref.final_round, m.final)
    return replace(
        m,
        vs_dense_pct={k: _change_pct(same[k], ref.final[k]) for k in METRICS},
        bytes_ratio=bytes_ratio,
        time_ratio=time_ratio,
        payload_ratio=_ratio(ref.mean_payload_bytes, m.mean_payload_bytes),
    )


# --- Markdown ------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return _NONE
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _times(x: float | None) -> str:
    return _NONE if x is None else f"{x:.1f}x"


def _pct(x: float | None) -> str:
    return _NONE if x is None else f"{x:+.1f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return _NONE if x is None else format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _options(m: MethodSummary) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(m.options.items())) or _NONE


def _quality_table(s: Summary) -> str:
    header = ["method", "options", "final round", *(_LABELS[k] for k in METRICS)]
    if s.reference:
        at = s.methods[s.reference].final_round
        header += [f"{_LABELS[k]} vs dense (round {at})" for k in METRICS]
    rows = []
    for m in s.methods.values():
        row = [
            m.method,
            _options(m),
            _num(m.final_round, "d"),
            *(_num(m.final[k]) for k in METRICS),
        ]
        if s.reference:
            row += [_pct(m.vs_dense_pct[k]) for k in METRICS]
        rows.append(row)
    return _table(header, rows)


def _target_table(s: Summary, target: Target) -> str:
    header = ["method", "round reached", "uplink to target", "dense / method", "time to target"]
    header.append("dense / method")
    rows = []
    for m in s.methods.values():
        t = m.to_target
        if t is None:
            rows.append(
                [
                    m.method,
                    f"not reached in {m.rounds} rounds",
                    "not reached",
                    _NONE,
                    "not reached",
                    _NONE,
                ]
            )
            continue
        rows.append(
            [
                m.method,
                str(t.round),
                _bytes(t.uplink_wire_bytes),
                _times(m.bytes_ratio),
                f"{t.time_s:,.1f} s",
                _times(m.time_ratio),
            ]
        )
    return _table(header, rows)


def _traffic_table(s: Summary) -> str:
    header = [
        "method",
        "mean payload / client / round",
        "dense / method",
        "total uplink",
        "of which re-sent",
        "total downlink",
        "total simulated time",
        "peak agent RSS",
    ]
    rows = [
        [
            m.method,
            _bytes(m.mean_payload_bytes),
            _times(m.payload_ratio),
            _bytes(m.total_uplink_wire_bytes),
            _bytes(m.total_resent_bytes),
            _bytes(m.total_downlink_wire_bytes),
            f"{m.total_time_s:,.1f} s",
            _NONE if m.agent_peak_rss_mb is None else f"{m.agent_peak_rss_mb:,.0f} MB",
        ]
        for m in s.methods.values()
    ]
    return _table(header, rows)


def markdown_tables(summary: Summary) -> str:
    """The three EVALUATION.md tables: final quality, cost to target, traffic and memory."""
    parts = ["### Quality at the final round", "", _quality_table(summary), ""]
    t = summary.target
    if t is None:
        parts += ["### Cost to the target", "", "No target in the run record.", ""]
    else:
        op = ">=" if t.higher_is_better else "<="
        parts += [
            f"### Cost to the target: {_LABELS.get(t.metric, t.metric)} {op} {t.value:.4f}",
            "",
            f"Target (its rule fixed before the run): {t.rule.rstrip('.')}.",
            "",
            _target_table(summary, t),
            "",
        ]
    parts += ["### Traffic and memory (all rounds)", "", _traffic_table(summary), ""]
    if summary.reference is None:
        parts.append(f"No `{REFERENCE}` run in the record, so there are no ratios to dense.\n")
    return "\n".join(parts)
