from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from run_records import device, fleet_eval, fleet_round, fleet_run, method_run

from evaluation.downlink import (
    FIRST_CONTACT,
    CatchupError,
    DeviceDownlink,
    DownlinkCount,
    DownlinkRound,
    tally,
)
from evaluation.run_record import FleetRun, MethodRun, Scalar
from evaluation.summary import REFERENCE, Ratios, RunRecordError, summarize
from evaluation.tables import markdown_tables
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
    assert dense.to_target == ToTarget(
        round=3, uplink_wire_bytes=6_000_000, time_s=24.0, time_with_downlink_s=24.0
    )
    assert fstq.to_target == ToTarget(
        round=2, uplink_wire_bytes=20_000, time_s=4.0, time_with_downlink_s=4.0
    )
    assert fstq.to_target_ratios.uplink == 300.0 and fstq.to_target_ratios.time_s == 6.0
    assert dense.to_target_ratios.uplink == dense.to_target_ratios.time_s == 1.0
    assert topk.to_target is None and topk.to_target_ratios == Ratios()
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
    assert "### Bytes to the target: loss <= 3.4100" in md and "95% of dense" in md
    rows = _rows(md)
    assert "not reached in 4 rounds" in rows["topk"] and "not reached" in rows["topk"]
    assert "300.0x" in rows["fstq"] and "6.00x" in rows["fstq"] and "20.00 kB" in rows["fstq"]
    assert "6.00 MB" in rows[REFERENCE] and "812 MB" in rows[REFERENCE]
    assert "allocation=budget" in rows["fstq"] and "-2.4%" in rows["fstq"]


def test_without_dense_there_are_no_ratios() -> None:
    s = summarize(_without(_run(), REFERENCE))
    assert s.reference is None
    m = s.methods["fstq"]
    assert m.to_target_ratios == m.at_dense_final_ratios == Ratios() and m.payload_ratio is None
    assert set(m.vs_dense_pct.values()) == {None}
    assert m.to_target == ToTarget(
        round=2, uplink_wire_bytes=20_000, time_s=4.0, time_with_downlink_s=4.0
    )
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
    assert m.to_target_ratios.uplink == pytest.approx(300.0 / scale)
    assert m.to_target_ratios.time_s == pytest.approx(6.0 / slowdown)


def test_a_record_without_methods_has_nothing_to_summarise() -> None:
    with pytest.raises(RunRecordError, match="no methods"):
        summarize(replace(_run(), methods={}))


def _with_downlink(m: MethodRun, per_round: DownlinkRound, down_s: float) -> MethodRun:
    """Every trained round of ``m`` fetched ``per_round`` and took ``down_s`` longer for it."""
    total = sum(c.wire_bytes for c in per_round.by_route.values())
    rounds = tuple(
        r if r.round == 0 else replace(
            r, downlink=per_round, downlink_wire_bytes=total,
            round_time_with_downlink_s=r.round_time_s + down_s,
        )
        for r in m.rounds
    )  # fmt: skip
    return replace(m, rounds=rounds)


def test_bytes_and_time_count_both_ways_with_routes_staleness_and_catchup_error() -> None:
    run = _run()
    full = tally(
        [DeviceDownlink("full", 1_000_000, FIRST_CONTACT), DeviceDownlink("full", 1_000_000, 2)]
    )
    caught = replace(
        tally([DeviceDownlink("derived", 0, 0), DeviceDownlink("catchup", 100_000, 5)]),
        catchup_error=CatchupError(vs_gap=0.4, vs_master=0.01),
    )
    methods = {
        REFERENCE: _with_downlink(run.methods[REFERENCE], full, 1.0),
        "fstq": replace(
            _with_downlink(run.methods["fstq"], caught, 0.5),
            downlink={"mode": "catchup", "budget_bytes": 100_000},
        ),
        "topk": run.methods["topk"],  # a record from before: no downlink at all
    }
    s = summarize(replace(run, methods=methods))
    dense, fstq = s.methods[REFERENCE], s.methods["fstq"]
    assert dense.to_target is not None and fstq.to_target is not None
    # dense reaches the target at round 3, fstq at round 2.
    assert dense.to_target.downlink_wire_bytes == 6_000_000
    assert fstq.to_target.downlink_wire_bytes == 200_000
    assert fstq.to_target.total_wire_bytes == 220_000
    r = fstq.to_target_ratios
    assert r.uplink == 300.0 and r.downlink == 30.0 and r.total == pytest.approx(12e6 / 220_000)
    assert fstq.to_target.time_with_downlink_s == 5.0 and r.time_with_downlink_s == 27.0 / 5.0
    # At dense's final round (4): both runs have 4 rounds.
    at = fstq.at_dense_final
    assert at is not None and at.round == 4 and at.total_wire_bytes == 40_000 + 400_000
    assert fstq.at_dense_final_ratios.total == pytest.approx(16e6 / 440_000)
    # Routes and staleness over all rounds; derived counts as an event without bytes.
    assert fstq.downlink_by_route == {
        "catchup": DownlinkCount(fetches=4, wire_bytes=400_000),
        "derived": DownlinkCount(fetches=4, wire_bytes=0),
    }
    # Staleness as the devices saw it (these rows are legacy ones: the same two devices fetch
    # every round): first contacts in round 1, one version behind afterwards.
    assert dense.downlink_by_staleness == {
        FIRST_CONTACT: DownlinkCount(fetches=2, wire_bytes=2_000_000),
        "1": DownlinkCount(fetches=6, wire_bytes=6_000_000),
    }
    assert dense.downlink_first_contact == DownlinkCount(fetches=2, wire_bytes=2_000_000)
    assert fstq.catchup_error == {r: CatchupError(vs_gap=0.4, vs_master=0.01) for r in (1, 2, 3, 4)}
    md = markdown_tables(s)
    rows = _rows(md)
    assert "4 · 400.00 kB" in rows["fstq"] and "4 · 0 B" in rows["fstq"]
    assert "budget_bytes=100000, mode=catchup" in rows["fstq"]
    assert "full (not recorded)" in rows["topk"]
    assert "0.400 / 0.0100" in rows["fstq"]  # the catch-up error table has a row for fstq
    assert "No catch-up in these runs" not in md


def test_without_catchups_the_error_table_says_so() -> None:
    assert "No catch-up in these runs" in markdown_tables(summarize(_run()))


def test_a_longer_run_is_costed_where_dense_stopped() -> None:
    run = _run()
    longer = _method("fstq", [3.63, 3.50, 3.40, 3.35, 3.30, 3.25], 10_000, 4_000, 2.0)
    s = summarize(replace(run, methods={**run.methods, "fstq": longer}))
    fstq, dense = s.methods["fstq"], s.methods[REFERENCE]
    assert fstq.final_round == 5 and dense.final_round == 4
    at = fstq.at_dense_final
    assert at is not None and at.round == 4 and at.uplink_wire_bytes == 40_000
    assert fstq.at_dense_final_ratios.uplink == 8_000_000 / 40_000
    assert fstq.total_uplink_wire_bytes == 50_000  # all its rounds, elsewhere
