"""Runs of several seeds side by side: each seed is its own fleet (data split, links, selection,
dropouts, initial adapter and target), summarised on its own; this table only sets their
headline numbers next to each other, with the mean where every seed has a value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import fmean

from evaluation.summary import REFERENCE, MethodSummary, Summary
from evaluation.tables import fmt_bytes, fmt_times, table

__all__ = ["seeds_table"]

_NONE = "—"
#: (header, value of a method's summary, how to print it)
_Column = tuple[str, Callable[[MethodSummary], float | None], Callable[[float], str]]


def _round(m: MethodSummary) -> float | None:
    return None if m.to_target is None else m.to_target.round


def _total(m: MethodSummary) -> float | None:
    return None if m.to_target is None else m.to_target.total_wire_bytes


def _time(m: MethodSummary) -> float | None:
    return None if m.to_target is None else m.to_target.time_with_downlink_s


def _loss_vs_dense(m: MethodSummary) -> float | None:
    return m.vs_dense_pct.get("loss")


_COLUMNS: tuple[_Column, ...] = (
    ("round reached", _round, lambda x: f"{x:g}"),
    ("total bytes to target", _total, fmt_bytes),
    ("dense / method (total)", lambda m: m.to_target_ratios.total, fmt_times),
    ("dense / method (uplink)", lambda m: m.to_target_ratios.uplink, fmt_times),
    ("time to target (with downlink)", _time, lambda x: f"{x:,.1f} s"),
    ("dense / method (time)", lambda m: m.to_target_ratios.time_with_downlink_s, fmt_times),
    ("loss vs dense at its final round", _loss_vs_dense, lambda x: f"{x:+.1f}%"),
)


def _cell(values: Mapping[int, float | None], show: Callable[[float], str]) -> str:
    each = ", ".join(f"s{seed}: {_NONE if v is None else show(v)}" for seed, v in values.items())
    known = [v for v in values.values() if v is not None]
    mean = show(fmean(known)) if known and len(known) == len(values) else _NONE
    return f"{mean} ({each})"


def seeds_table(summaries: Mapping[int, Summary]) -> str:
    """One row per method: each headline number as "mean (s0: value, s1: value)"; the mean is
    left out (—) when a seed has no value (e.g. did not reach its target)."""
    names: list[str] = []
    for s in summaries.values():
        names += [n for n in s.methods if n not in names]
    names.sort(key=lambda n: n != REFERENCE)
    rows = []
    for name in names:
        runs = {seed: s.methods.get(name) for seed, s in summaries.items()}
        seeds = [seed for seed, m in runs.items() if m is not None]
        row = [name, ", ".join(map(str, seeds))]
        for _, value, show in _COLUMNS:
            row.append(_cell({seed: value(m) for seed, m in runs.items() if m is not None}, show))
        rows.append(row)
    return table(["method", "seeds", *(header for header, _, _ in _COLUMNS)], rows)
