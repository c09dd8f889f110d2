from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from run_records import device, fleet_eval, fleet_round, fleet_run, method_run

from evaluation.run_record import FleetRun, MethodRun, Scalar
from evaluation.summary import REFERENCE, RunRecordError, markdown_tables, summarize
from evaluation.targets import Target, ToTarget

TARGET = Target("loss", 3.41, higher_is_better=False, rule="95% of dense")


def _method(
    name: str,
    losses: list[float],
    wire: int,
    payload: int,
    time_s: float,
    *,
    options: dict[str, Scalar] | None = None,
    agent_peak_rss_mb: float | None = None,
) -> MethodRun:
    """A method record in the fleet runner's shape: every round costs the same."""
    clients = [
        device(f"c{i}", arrived=arrived, payload_bytes=payload if arrived else 0,
               wire_bytes=wire // 2)
        for i, arrived in enumerate([True, True, False])
    ]  # fmt: skip
    rounds = [
        fleet_round(
            r,
            fleet_eval(loss, 0.30 + r / 100, 0.10 + r / 200),
            wire=wire,
            time_s=time_s,
            clients=clients if r else (),
        )
        for r, loss in enumerate(losses)
    ]
    return method_run(name, rounds, options=options, agent_peak_rss_mb=agent_peak_rss_mb)


def _run() -> FleetRun:
    return fleet_run(
        {
            "fstq": _method("fstq", [3.63, 3.50, 3.40, 3.35, 3.30], 10_000, 4_000, 2.0,
                            options={"allocation": "budget"}),
            REFERENCE: _method(REFERENCE, [3.63, 3.55, 3.45, 3.40, 3.38], 2_000_000, 800_000, 8.0,
                               agent_peak_rss_mb=812.5),
            "topk": _method("topk", [3.63, 3.62, 3.61, 3.60, 3.60], 50_000, 20_000, 3.0),
        },
        TARGET,
    )  # fmt: skip


def _without(run: FleetRun, name: str) -> FleetRun:
    return replace(run, methods={k: m for k, m in run.methods.items() if k != name})


def test_summary_compares_every_method_with_dense() -> None:
    s = summarize(_run())
    assert list(s.methods) == [REFERENCE, "fstq", "topk"]  # the reference first
    dense, fstq, topk = s.methods.values()
    assert dense.to_target == ToTarget(round=3, uplink_wire_bytes=6_000_000, time_s=24.0)
    assert fstq.to_target == ToTarget(round=2, uplink_wire_bytes=20_000, time_s=4.0)
    assert fstq.bytes_ratio == 300.0 and fstq.time_ratio == 6.0
    assert dense.bytes_ratio == dense.time_ratio == 1.0
    assert topk.to_target is None and topk.bytes_ratio is None and topk.time_ratio is None
    assert fstq.final_round == 4 and fstq.rounds == 4
    assert fstq.final["loss"] == 3.30 and fstq.final["rouge_l"] == pytest.approx(0.12)
    assert fstq.vs_dense_pct["loss"] == pytest.approx((3.30 - 3.38) / 3.38 * 100)
    assert fstq.vs_dense_pct["accuracy"] == 0.0
    # Only uploads that arrived count towards the mean payload.
    assert fstq.mean_payload_bytes == 4_000 and fstq.payload_ratio == 200.0
    assert fstq.total_uplink_wire_bytes == 40_000 and fstq.total_time_s == 8.0
    assert dense.agent_peak_rss_mb == 812.5 and fstq.agent_peak_rss_mb is None
    assert topk.agent_peak_rss_mb is None and fstq.options == {"allocation": "budget"}


def _rows(md: str) -> dict[str, list[str]]:
    """Table rows by their first cell, after checking every table is rectangular."""
    rows: dict[str, list[str]] = {}
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        widths = {ln.count(" | ") for ln in lines}
        assert len(widths) <= 1, block
        for ln in lines:
            cells = [c.strip() for c in ln.strip("|").split(" | ")]
            rows.setdefault(cells[0], []).extend(cells[1:])
    return rows


def test_markdown_says_not_reached_instead_of_a_number() -> None:
    md = markdown_tables(summarize(_run()))
    assert "### Cost to the target: loss <= 3.4100" in md and "95% of dense" in md
    rows = _rows(md)
    assert "not reached in 4 rounds" in rows["topk"] and "not reached" in rows["topk"]
    assert "300.0x" in rows["fstq"] and "6.0x" in rows["fstq"] and "20.00 kB" in rows["fstq"]
    assert "6.00 MB" in rows[REFERENCE] and "812 MB" in rows[REFERENCE]
    assert "allocation=budget" in rows["fstq"] and "-2.4%" in rows["fstq"]


def test_without_dense_there_are_no_ratios() -> None:
    s = summarize(_without(_run(), REFERENCE))
    assert s.reference is None
    m = s.methods["fstq"]
    assert m.bytes_ratio is m.time_ratio is m.payload_ratio is None
    assert set(m.vs_dense_pct.values()) == {None}
    assert m.to_target == ToTarget(round=2, uplink_wire_bytes=20_000, time_s=4.0)
    md = markdown_tables(s)
    assert "vs dense" not in md and "no ratios to dense" in md


def test_without_target_the_cost_table_says_so() -> None:
    s = summarize(replace(_run(), target=None))
    assert s.target is None and all(m.to_target is None for m in s.methods.values())
    assert "No target in the run record." in markdown_tables(s)


def test_a_method_without_rounds_summarises_to_blanks() -> None:
    run = _run()
    run = replace(run, methods={**run.methods, "fstq": replace(run.methods["fstq"], rounds=())})
    m = summarize(run).methods["fstq"]
    assert m.final_round is None and set(m.final.values()) == {None}
    assert m.to_target is None and m.mean_payload_bytes is None and m.total_uplink_wire_bytes == 0
    assert "not reached in 0 rounds" in _rows(markdown_tables(summarize(run)))["fstq"]


@given(scale=st.integers(1, 1000), slowdown=st.floats(0.01, 100))
def test_ratios_scale_inversely_with_what_a_method_spends(scale: int, slowdown: float) -> None:
    base = summarize(_run()).methods["fstq"]
    run = _run()
    fstq = run.methods["fstq"]
    rounds = tuple(
        replace(r, uplink_wire_bytes=r.uplink_wire_bytes * scale,
                round_time_s=r.round_time_s * slowdown)
        for r in fstq.rounds
    )  # fmt: skip
    run = replace(run, methods={**run.methods, "fstq": replace(fstq, rounds=rounds)})
    m = summarize(run).methods["fstq"]
    assert m.to_target is not None and base.to_target is not None
    assert m.to_target.round == base.to_target.round
    assert m.bytes_ratio == pytest.approx(300.0 / scale)
    assert m.time_ratio == pytest.approx(6.0 / slowdown)


def test_a_record_without_methods_has_nothing_to_summarise() -> None:
    with pytest.raises(RunRecordError, match="no methods"):
        summarize(replace(_run(), methods={}))
