"""Quality against cumulative uplink bytes and against simulated time, one line per method.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg when saved as PNG),
never through pyplot: no global figure state and no display needed. matplotlib is imported
inside the functions because it is the optional ``eval`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from evaluation.summary import method_records
from evaluation.targets import progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from evaluation.run_record import FleetRound, FleetRun

__all__ = ["XAxis", "plot_quality_vs_bytes", "plot_quality_vs_time", "quality_figure"]

XAxis = Literal["bytes", "time"]

_LABELS = {
    "loss": "held-out answer-token loss",
    "accuracy": "answer-token accuracy",
    "rouge_l": "ROUGE-L",
}


def plot_quality_vs_bytes(run: FleetRun, metric: str, path: str | Path) -> Path:
    """``metric`` against cumulative uplink wire bytes on a log axis (round 0, at 0 B, left out)."""
    return _plot(run, metric, Path(path), "bytes")


def plot_quality_vs_time(run: FleetRun, metric: str, path: str | Path) -> Path:
    """``metric`` against cumulative simulated round time, from round 0 at t = 0."""
    return _plot(run, metric, Path(path), "time")


def _series(rounds: Sequence[FleetRound], metric: str, x: XAxis) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for p in progress(rounds, metric):
        if p.value is None or (x == "bytes" and p.uplink_wire_bytes <= 0):
            continue  # unevaluated, or round 0 (no bytes yet) on a log axis
        xs.append(float(p.uplink_wire_bytes) if x == "bytes" else p.time_s)
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
    if x == "bytes":
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes on the wire")
    else:
        ax.set_xlabel("cumulative simulated time (s)")
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
