from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from run_records import fleet_eval, fleet_round, fleet_run, method_run

from evaluation.plots import plot_quality_vs_bytes, plot_quality_vs_time, quality_figure
from evaluation.run_record import FleetRun, RunRecordError
from evaluation.targets import Target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Plot = Callable[[FleetRun, str, Path], Path]


def _synthetic_run(methods: dict[str, tuple[int, float]], rounds: int = 6) -> FleetRun:
    """Loss falling by 0.05 a round; each method spends (bytes, seconds) per round."""
    return fleet_run(
        {
            name: method_run(name, [
                fleet_round(r, fleet_eval(3.6 - 0.05 * r, 0.3 + 0.01 * r), wire=wire, time_s=secs)
                for r in range(rounds + 1)
            ])
            for name, (wire, secs) in methods.items()
        },
        Target("loss", 3.4, higher_is_better=False, rule="test"),
    )  # fmt: skip


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    assert len(data) > 10_000  # axes, lines and text, not an empty canvas
    width, height = struct.unpack(">II", data[16:24])
    return width, height


RUN = _synthetic_run({"dense_fp16": (2_400_000, 8.0), "fstq": (20_000, 2.5), "qsgd": (600_000, 4)})


@pytest.mark.parametrize("plot", [plot_quality_vs_bytes, plot_quality_vs_time])
@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_plot_writes_a_png(tmp_path: Path, plot: Plot, metric: str) -> None:
    out = plot(RUN, metric, tmp_path / "figs" / f"{metric}.png")  # creates the folder
    assert out == tmp_path / "figs" / f"{metric}.png"
    assert _png_size(out) == (840, 540)  # 7 x 4.5 in at 120 dpi


def test_figure_has_one_line_per_method_and_the_target() -> None:
    ax = quality_figure(RUN, "loss", "bytes").axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == ["dense_fp16", "fstq", "qsgd", "target"]
    assert ax.get_xscale() == "log"
    fstq_bytes = np.asarray(lines["fstq"].get_xdata()).tolist()
    assert fstq_bytes == [20_000.0 * r for r in range(1, 7)]  # round 0 (0 B) left out
    assert np.asarray(lines["target"].get_ydata()).tolist() == [3.4, 3.4]
    timed = quality_figure(RUN, "accuracy", "time").axes[0]
    assert [ln.get_label() for ln in timed.get_lines()] == ["dense_fp16", "fstq", "qsgd"]
    assert timed.get_xscale() == "linear"
    assert np.asarray(timed.get_lines()[1].get_xdata()).tolist() == [2.5 * r for r in range(7)]


@pytest.mark.parametrize("plot", [plot_quality_vs_bytes, plot_quality_vs_time])
def test_plot_copes_with_missing_evaluations_and_no_target(tmp_path: Path, plot: Plot) -> None:
    run = _synthetic_run({"dense_fp16": (1000, 1.0), "empty": (0, 0.0)})
    dense = run.methods["dense_fp16"]
    rounds = list(dense.rounds)
    rounds[2] = replace(rounds[2], eval=fleet_eval(None, None, None))  # no answer tokens
    methods = {"dense_fp16": replace(dense, rounds=tuple(rounds)),
               "empty": replace(run.methods["empty"], rounds=())}  # fmt: skip
    run = replace(run, target=None, methods=methods)
    _png_size(plot(run, "rouge_l", tmp_path / "none.png"))  # no method has the metric
    _png_size(plot(run, "loss", tmp_path / "some.png"))


def test_plot_rejects_a_record_without_methods(tmp_path: Path) -> None:
    with pytest.raises(RunRecordError, match="methods"):
        plot_quality_vs_bytes(fleet_run({}), "loss", tmp_path / "x.png")


def test_module_imports_without_matplotlib_or_a_display() -> None:
    code = "import sys, evaluation.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert out.stdout.strip() == "False"


def test_total_bytes_and_time_with_downlink_are_their_own_axes() -> None:
    run = fleet_run(
        {"fstq": method_run("fstq", [
            fleet_round(r, fleet_eval(3.6 - 0.05 * r), wire=1000, time_s=2.0, downlink=9000,
                        time_with_downlink_s=5.0)
            for r in range(4)
        ])},
    )  # fmt: skip
    total = quality_figure(run, "loss", "total").axes[0]
    assert total.get_xscale() == "log" and "uplink + downlink" in total.get_xlabel()
    assert np.asarray(total.get_lines()[0].get_xdata()).tolist() == [
        10_000.0 * r for r in (1, 2, 3)
    ]
    timed = quality_figure(run, "loss", "time").axes[0]
    assert "downlink included" in timed.get_xlabel()
    assert np.asarray(timed.get_lines()[0].get_xdata()).tolist() == [5.0 * r for r in range(4)]
    up_only = quality_figure(run, "loss", "uplink_time").axes[0]
    assert np.asarray(up_only.get_lines()[0].get_xdata()).tolist() == [2.0 * r for r in range(4)]
