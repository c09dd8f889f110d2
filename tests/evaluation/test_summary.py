from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.summary import REFERENCE, RunRecordError, markdown_tables, summarize
from evaluation.targets import ToTarget

TARGET = {"metric": "loss", "value": 3.41, "higher_is_better": False, "rule": "95% of dense"}


def _method(
    name: str, losses: list[float], wire: int, payload: int, time_s: float, **extra: Any
) -> dict[str, Any]:
    """A method record in the fleet runner's shape: every round costs the same."""
    rounds = []
    for r, loss in enumerate(losses):
        ev = {"loss": loss, "accuracy": 0.30 + r / 100, "rouge_l": 0.10 + r / 200, "groups": {}}
        clients = [
            {"client": f"c{i}", "compute_s": 1.0, "wire_bytes": wire // 2, "arrived": arrived,
             "payload_bytes": payload if arrived else 0, "rate_bps": 2e6}
            for i, arrived in enumerate([True, True, False])
        ] if r else []  # fmt: skip
        rounds.append({
            "round": r, "eval": ev, "clients": clients,
            "uplink_wire_bytes": wire if r else 0, "uplink_payload_bytes": 2 * payload if r else 0,
            "uplink_resent_bytes": 0, "downlink_wire_bytes": 0,
            "round_time_s": time_s if r else 0.0, "server_s": 0.0,
        })  # fmt: skip
    return {"method": name, "options": extra.pop("options", {}), "rounds": rounds, **extra}


def _run() -> dict[str, Any]:
    return {
        "config": {"clients": 100, "per_round": 10, "rounds": 4},
        "target": dict(TARGET),
        "methods": {
            "fstq": _method("fstq", [3.63, 3.50, 3.40, 3.35, 3.30], 10_000, 4_000, 2.0,
                            options={"allocation": "budget"}, agent_peak_rss_mb=None),
            REFERENCE: _method(REFERENCE, [3.63, 3.55, 3.45, 3.40, 3.38], 2_000_000, 800_000, 8.0,
                               agent_peak_rss_mb=812.5),
            "topk": _method("topk", [3.63, 3.62, 3.61, 3.60, 3.60], 50_000, 20_000, 3.0),
        },
    }  # fmt: skip


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
    run = _run()
    del run["methods"][REFERENCE]
    s = summarize(run)
    assert s.reference is None
    m = s.methods["fstq"]
    assert m.bytes_ratio is m.time_ratio is m.payload_ratio is None
    assert set(m.vs_dense_pct.values()) == {None}
    assert m.to_target == ToTarget(round=2, uplink_wire_bytes=20_000, time_s=4.0)
    md = markdown_tables(s)
    assert "vs dense" not in md and "no ratios to dense" in md


def test_without_target_the_cost_table_says_so() -> None:
    run = _run()
    del run["target"]
    s = summarize(run)
    assert s.target is None and all(m.to_target is None for m in s.methods.values())
    assert "No target in the run record." in markdown_tables(s)


def test_a_method_without_rounds_summarises_to_blanks() -> None:
    run = _run()
    run["methods"]["fstq"]["rounds"] = []
    m = summarize(run).methods["fstq"]
    assert m.final_round is None and set(m.final.values()) == {None}
    assert m.to_target is None and m.mean_payload_bytes is None and m.total_uplink_wire_bytes == 0
    assert "not reached in 0 rounds" in _rows(markdown_tables(summarize(run)))["fstq"]


@given(scale=st.integers(1, 1000), slowdown=st.floats(0.01, 100))
def test_ratios_scale_inversely_with_what_a_method_spends(scale: int, slowdown: float) -> None:
    base = summarize(_run()).methods["fstq"]
    run = _run()
    for rnd in run["methods"]["fstq"]["rounds"]:
        rnd["uplink_wire_bytes"] *= scale
        rnd["round_time_s"] *= slowdown
    m = summarize(run).methods["fstq"]
    assert m.to_target is not None and base.to_target is not None
    assert m.to_target.round == base.to_target.round
    assert m.bytes_ratio == pytest.approx(300.0 / scale)
    assert m.time_ratio == pytest.approx(6.0 / slowdown)


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (["methods"], {}, "non-empty"),
        (["methods", "fstq", "rounds"], None, "list of objects"),
        (["methods", "fstq", "rounds", 1, "uplink_wire_bytes"], "many", "must be a number"),
        (["methods", "fstq", "rounds", 1, "clients", 0, "payload_bytes"], None, "client entry"),
        (["methods", "fstq", "agent_peak_rss_mb"], "big", "agent_peak_rss_mb"),
        (["target", "value"], "low", "bad target"),
    ],
)
def test_malformed_records_raise_run_record_error(path: list[Any], value: Any, match: str) -> None:
    run = copy.deepcopy(_run())
    node: Any = run
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(RunRecordError, match=match):
        summarize(run)
