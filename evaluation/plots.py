"""Quality against cumulative bytes (uplink, or both ways) and against simulated time (each
device's download included, or uplink only as older records had it), one line per method.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg when saved as PNG),
never through pyplot: no global figure state and no display needed. matplotlib is imported
inside the functions because it is the optional ``eval`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from evaluation.summary import method_records
from evaluation.targets import Progress, progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from evaluation.run_record import FleetRound, FleetRun

__all__ = ["XAxis", "plot_quality_vs_bytes", "plot_quality_vs_time", "quality_figure"]

#: ``bytes``: uplink; ``total``: uplink + downlink; ``time``: with the downlink; ``uplink_time``:
#: without it.
XAxis = Literal["bytes", "total", "time", "uplink_time"]
_XLABELS: dict[XAxis, str] = {
    "bytes": "cumulative uplink bytes on the wire",
    "total": "cumulative bytes on the wire, uplink + downlink",
    "time": "cumulative simulated time, downlink included (s)",
    "uplink_time": "cumulative simulated time, uplink only (s)",
}

_LABELS = {
    "loss": "held-out answer-token loss",
    "accuracy": "answer-token accuracy",
    "rouge_l": "ROUGE-L",
}


def plot_quality_vs_bytes(
    run: FleetRun, metric: str, path: str | Path, *, both_ways: bool = False
) -> Path:
    """``metric`` against cumulative uplink wire bytes (``both_ways``: uplink + downlink) on a log
    axis (round 0, at 0 B, left out)."""
    return _plot(run, metric, Path(path), "total" if both_ways else "bytes")


def plot_quality_vs_time(
    run: FleetRun, metric: str, path: str | Path, *, downlink: bool = True
) -> Path:
    """``metric`` against cumulative simulated round time, from round 0 at t = 0 (``downlink``:
    each device's download counted)."""
    return _plot(run, metric, Path(path), "time" if downlink else "uplink_time")


def _x(p: Progress, x: XAxis) -> float:
    return {
        "bytes": float(p.uplink_wire_bytes),
        "total": float(p.total_wire_bytes),
        "time": p.time_with_downlink_s,
        "uplink_time": p.time_s,
    }[x]


def _series(rounds: Sequence[FleetRound], metric: str, x: XAxis) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for p in progress(rounds, metric):
        if p.value is None or (x in ("bytes", "total") and _x(p, x) <= 0):
            continue  # unevaluated, or round 0 (no bytes yet) on a log axis
        xs.append(_x(p, x))
        ys.append(p.value)
    return xs, ys


def quality_figure(run: FleetRun, metric: str, x: XAxis) -> Figure:
    """The figure both plots save: ``metric`` per method against bytes or time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, rec in method_records(run).items():
        ax.plot(*_series(rec.rounds, metric, x), marker="o", markersize=3, label=name)
    target = run.target
    if target is not None and target.metric == metric:
        ax.axhline(target.value, color="0.4", linestyle="--", linewidth=1, label="target")
    if x in ("bytes", "total"):
        ax.set_xscale("log")
    ax.set_xlabel(_XLABELS[x])
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    return fig


def _plot(run: FleetRun, metric: str, path: Path, x: XAxis) -> Path:
    fig = quality_figure(run, metric, x)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
