"""The Markdown tables of a fleet run's summary (:mod:`evaluation.summary`) for EVALUATION.md.

Quality at the final round; bytes and time to the target (uplink, downlink, total; time with and
without the downlink); the same at dense's final round; the downlink by route, by staleness and
the catch-up error per round; traffic and memory over all rounds. A method that never reaches the
target says so instead of a number; without a dense run there are no ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from evaluation.downlink import FIRST_CONTACT, ROUTES, DownlinkCount
from evaluation.summary import METRICS, REFERENCE, MethodSummary, Ratios, Summary
from evaluation.targets import Target

__all__ = ["fmt_bytes", "fmt_times", "markdown_tables", "table"]

_LABELS = {"loss": "loss", "accuracy": "accuracy", "rouge_l": "ROUGE-L"}
_ROUTE_LABELS = {"none": "none", "catchup": "catch-up", "full": "full", "derived": "derived"}
#: Staleness columns: versions behind, in powers of two past 1 (first contact apart).
_STALENESS_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("0", 0, 0), ("1", 1, 1), ("2–3", 2, 3), ("4–7", 4, 7), ("8+", 8, None),
)  # fmt: skip
_NONE = "—"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return _NONE
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_times(x: float | None) -> str:
    """A ratio: two decimals under 10 (1.26x), one above (46.1x)."""
    if x is None:
        return _NONE
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _pct(x: float | None) -> str:
    return _NONE if x is None else f"{x:+.1f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return _NONE if x is None else format(x, fmt)


def _seconds(x: float | None) -> str:
    return _NONE if x is None else f"{x:,.1f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _options(m: MethodSummary) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(m.options.items())) or _NONE


def _downlink_setting(m: MethodSummary) -> str:
    if not m.downlink:
        return "full (not recorded)"
    return ", ".join(f"{k}={v}" for k, v in sorted(m.downlink.items()))


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
    return table(header, rows)


def _not_reached(m: MethodSummary, cells: int) -> list[str]:
    return [m.method, f"not reached in {m.rounds} rounds", *(["not reached", _NONE] * cells)]


def _bytes_cells(spent_up: int, spent_down: int, r: Ratios) -> list[str]:
    return [
        fmt_bytes(spent_up), fmt_times(r.uplink), fmt_bytes(spent_down), fmt_times(r.downlink),
        fmt_bytes(spent_up + spent_down), fmt_times(r.total),
    ]  # fmt: skip


def _bytes_to_target_table(s: Summary) -> str:
    header = ["method", "round reached", "uplink", "dense / method", "downlink",
              "dense / method", "total", "dense / method"]  # fmt: skip
    rows = []
    for m in s.methods.values():
        t = m.to_target
        if t is None:
            rows.append(_not_reached(m, 3))
            continue
        cells = _bytes_cells(t.uplink_wire_bytes, t.downlink_wire_bytes, m.to_target_ratios)
        rows.append([m.method, str(t.round), *cells])
    return table(header, rows)


def _time_to_target_table(s: Summary) -> str:
    header = ["method", "round reached", "time (with downlink)", "dense / method",
              "time (uplink only)", "dense / method"]  # fmt: skip
    rows = []
    for m in s.methods.values():
        t, r = m.to_target, m.to_target_ratios
        if t is None:
            rows.append(_not_reached(m, 2))
            continue
        rows.append([
            m.method, str(t.round), _seconds(t.time_with_downlink_s),
            fmt_times(r.time_with_downlink_s), _seconds(t.time_s), fmt_times(r.time_s),
        ])  # fmt: skip
    return table(header, rows)


def _at_dense_final_table(s: Summary) -> str:
    header = ["method", "round", "uplink", "dense / method", "downlink", "dense / method",
              "total", "dense / method", "time (with downlink)", "dense / method"]  # fmt: skip
    rows = []
    for m in s.methods.values():
        p, r = m.at_dense_final, m.at_dense_final_ratios
        if p is None:
            rows.append([m.method, *([_NONE] * (len(header) - 1))])
            continue
        rows.append([
            m.method, str(p.round), *_bytes_cells(p.uplink_wire_bytes, p.downlink_wire_bytes, r),
            _seconds(p.time_with_downlink_s), fmt_times(r.time_with_downlink_s),
        ])  # fmt: skip
    return table(header, rows)


def _count(c: DownlinkCount | None) -> str:
    return _NONE if c is None or not c.fetches else f"{c.fetches} · {fmt_bytes(c.wire_bytes)}"


def _route_table(s: Summary) -> str:
    header = ["method", "downlink setting", *(_ROUTE_LABELS[r] for r in ROUTES), "total",
              "catch-ups that failed to verify"]  # fmt: skip
    rows = [
        [m.method, _downlink_setting(m), *(_count(m.downlink_by_route.get(r)) for r in ROUTES),
         fmt_bytes(m.total_downlink_wire_bytes), str(m.downlink_fallbacks)]
        for m in s.methods.values()
    ]  # fmt: skip
    return table(header, rows)


def _bucket(counts: Mapping[str, DownlinkCount], lo: int, hi: int | None) -> DownlinkCount | None:
    behind = [
        c for k, c in counts.items()
        if k.isdigit() and int(k) >= lo and (hi is None or int(k) <= hi)
    ]  # fmt: skip
    if not behind:
        return None
    return DownlinkCount(
        fetches=sum(c.fetches for c in behind), wire_bytes=sum(c.wire_bytes for c in behind)
    )


def _staleness_table(s: Summary) -> str:
    # Keys that are neither "new" nor a number (the aggregator's "unknown") get a column each.
    other = sorted(
        {k for m in s.methods.values() for k in m.downlink_by_staleness}
        - {FIRST_CONTACT}
        - {k for m in s.methods.values() for k in m.downlink_by_staleness if k.isdigit()}
    )
    header = ["method", "held nothing", *(f"{label} behind" for label, _, _ in _STALENESS_BUCKETS),
              *other, "of all: first contacts"]  # fmt: skip
    rows = [
        [m.method, _count(m.downlink_by_staleness.get(FIRST_CONTACT)),
         *(_count(_bucket(m.downlink_by_staleness, lo, hi)) for _, lo, hi in _STALENESS_BUCKETS),
         *(_count(m.downlink_by_staleness.get(k)) for k in other),
         _count(m.downlink_first_contact)]
        for m in s.methods.values()
    ]  # fmt: skip
    return table(header, rows)


def _catchup_error_table(s: Summary) -> str | None:
    rounds = sorted({r for m in s.methods.values() for r in m.catchup_error})
    if not rounds:
        return None
    header = ["method", *(f"round {r}" for r in rounds)]
    rows = []
    for m in s.methods.values():
        if not m.catchup_error:
            continue
        cells = []
        for r in rounds:
            e = m.catchup_error.get(r)
            cells.append(_NONE if e is None else f"{e.vs_gap:.3f} / {e.vs_master:.4f}")
        rows.append([m.method, *cells])
    return table(header, rows)


def _traffic_table(s: Summary) -> str:
    header = [
        "method",
        "mean payload / client / round",
        "dense / method",
        "total uplink",
        "of which re-sent",
        "total downlink",
        "total both ways",
        "total time (with downlink)",
        "total time (uplink only)",
        "peak agent RSS",
    ]
    rows = [
        [
            m.method,
            fmt_bytes(m.mean_payload_bytes),
            fmt_times(m.payload_ratio),
            fmt_bytes(m.total_uplink_wire_bytes),
            fmt_bytes(m.total_resent_bytes),
            fmt_bytes(m.total_downlink_wire_bytes),
            fmt_bytes(m.total_wire_bytes),
            _seconds(m.total_time_with_downlink_s),
            _seconds(m.total_time_s),
            _NONE if m.agent_peak_rss_mb is None else f"{m.agent_peak_rss_mb:,.0f} MB",
        ]
        for m in s.methods.values()
    ]
    return table(header, rows)


def _section(title: str, body: str) -> list[str]:
    return [f"### {title}", "", body, ""]


def _target_sections(s: Summary, t: Target) -> list[str]:
    op = ">=" if t.higher_is_better else "<="
    rule = f"Target (its rule fixed before the run): {t.rule.rstrip('.')}."
    return [
        *_section(
            f"Bytes to the target: {_LABELS.get(t.metric, t.metric)} {op} {t.value:.4f}",
            f"{rule}\n\n{_bytes_to_target_table(s)}",
        ),
        *_section("Time to the target", _time_to_target_table(s)),
    ]


def markdown_tables(summary: Summary) -> str:
    """The EVALUATION.md tables of one fleet (one seed)."""
    s = summary
    parts = _section("Quality at the final round", _quality_table(s))
    if s.target is None:
        parts += _section("Cost to the target", "No target in the run record.")
    else:
        parts += _target_sections(s, s.target)
    if s.reference is not None:
        at = s.methods[s.reference].final_round
        parts += _section(f"Cost at dense's final round ({at})", _at_dense_final_table(s))
    parts += _section("Downlink by route (all rounds; fetches · bytes)", _route_table(s))
    parts += _section(
        "Downlink by staleness (all rounds, as devices saw it: versions their adapter was behind; "
        "fetches · bytes)",
        _staleness_table(s),
    )
    errors = _catchup_error_table(s)
    parts += _section(
        "Catch-up start error per round (means over its catch-ups: ‖master − result‖ / "
        "‖master − held‖ / ‖master − result‖ / ‖master‖)",
        errors or "No catch-up in these runs: every fetch was full, none or derived.",
    )
    parts += _section("Traffic and memory (all rounds)", _traffic_table(s))
    if s.reference is None:
        parts.append(f"No `{REFERENCE}` run in the record, so there are no ratios to dense.\n")
    return "\n".join(parts)
