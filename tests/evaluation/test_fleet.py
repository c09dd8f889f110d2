"""The evaluation harness end to end, scaled down: tiny model, 10 clients, 3 rounds, 2 methods
(dense fp16 with the full downlink, fstq with the catch-up downlink at 1/8).

The full runs are benchmarks (`fedfstq bench fleet`, EVALUATION.md); this keeps the harness from
rotting: a real Mosquitto, the real aggregator and real agents sharing one model, dropouts, the
round-time model, both directions of traffic and the run record the summary and plots read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evaluation.fleet import FleetConfig, compression_for
from evaluation.fleet_wire import dropout_fate
from evaluation.round_time import ClientTiming, round_time
from evaluation.run_record import FleetRun, read_run
from evaluation.summary import summarize
from evaluation.tables import markdown_tables
from fedfstq.cli import main

pytestmark = pytest.mark.broker

CONFIG = FleetConfig(
    clients=10, per_round=4, rounds=3, model="tiny", dropout=0.3, held_out=24,
    generation_examples=4, steps=2, batch_size=2, max_len=32,
)  # fmt: skip
OFFLINE = "c003"
CATCHUP = "fstq_down8"
_PLOTS = tuple(
    f"{metric}_vs_{x}.png"
    for metric in ("loss", "rouge_l")
    for x in ("uplink", "total", "time", "uplink_time")
)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scaled-down `fedfstq bench fleet` (agent memory included), shared by the tests."""
    root = tmp_path_factory.mktemp("fleet")
    c = CONFIG
    # A link trace naming every client: c003 is never available (its window lies far ahead).
    clients = {f"c{i:03d}": {"uplink_kbps": 1000.0 + 500 * i} for i in range(c.clients)}
    clients[OFFLINE]["active"] = [[1e6, 2e6]]
    (root / "trace.json").write_text(json.dumps({"clients": clients}))
    argv = [
        "bench", "fleet", "--model", c.model, "--clients", str(c.clients), "--per-round",
        str(c.per_round), "--rounds", str(c.rounds), "--dropout", str(c.dropout),
        "--methods", f"dense_fp16,{CATCHUP}", "--held-out", str(c.held_out),
        "--generation-examples", str(c.generation_examples), "--steps", str(c.steps),
        "--batch-size", str(c.batch_size),
        "--max-len", str(c.max_len), "--workdir", str(root / "work"), "--json",
        str(root / "run.json"), "--plots", str(root / "plots"), "--trace", str(root / "trace.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    return root


@pytest.fixture(scope="module")
def run(out: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / "run.json").read_text())
    return record


@pytest.fixture(scope="module")
def typed(out: Path) -> FleetRun:
    return read_run(out / "run.json")


@pytest.mark.timeout(240)
def test_every_round_closes_and_dropouts_follow_their_fate(run: dict[str, Any]) -> None:
    names = [f"c{i:03d}" for i in range(CONFIG.clients)]
    fates: set[str] = set()
    for rec in run["methods"].values():
        rounds = rec["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3]
        for r in rounds[1:]:
            assert r["status"] == "closed" and len(r["selected"]) == CONFIG.per_round
            for row in r["clients"]:
                fate = dropout_fate(CONFIG.seed, r["round"], names.index(row["client"]), 0.3)
                if row["client"] == OFFLINE:
                    fate = "offline"  # outside its trace window: never takes part
                # A dropout never arrives; everyone else does (no link faults here).
                assert row["arrived"] == (fate == "ok"), (r["round"], row)
                assert row["dropped"] == (None if fate == "ok" else fate)
                fates.add(fate)
    # The seed drops someone, and the offline device is selected at least once; otherwise
    # this test would check nothing.
    assert {"ok", "offline"} < fates


@pytest.mark.timeout(240)
def test_round_time_and_bytes_are_accounted(run: dict[str, Any]) -> None:
    for rec in run["methods"].values():
        for r in rec["rounds"][1:]:
            arrived = [row for row in r["clients"] if row["arrived"]]
            timings = [
                ClientTiming(row["compute_s"], row["wire_bytes"], row["rate_bps"],
                             row["downlink_bytes"], row["downlink_rate_bps"])
                for row in arrived
            ]  # fmt: skip
            up_only = round_time(timings, r["server_s"], downlink=False)
            assert r["round_time_s"] == up_only > r["server_s"]
            assert r["round_time_with_downlink_s"] == round_time(timings, r["server_s"])
            assert r["round_time_with_downlink_s"] >= up_only
            # What arrived devices sent covers their payloads plus framing.
            for row in arrived:
                assert row["wire_bytes"] > row["payload_bytes"] > 0
            assert r["uplink_wire_bytes"] >= sum(row["wire_bytes"] for row in arrived)
            assert r["uplink_payload_bytes"] >= sum(row["payload_bytes"] for row in arrived)
    dense, fstq = (run["methods"][m]["rounds"] for m in ("dense_fp16", CATCHUP))
    budget = run["config"]["budget_bytes"]
    assert budget == compression_for(CATCHUP, budget)["budget_bytes"]
    for d, f in zip(dense[1:], fstq[1:], strict=True):
        assert d["selected"] == f["selected"]  # same seeds: same selection per round
        assert all(row["payload_bytes"] <= budget for row in f["clients"] if row["arrived"])
        assert f["uplink_wire_bytes"] < d["uplink_wire_bytes"] / 4


@pytest.mark.timeout(240)
def test_quality_is_evaluated_from_the_same_start(run: dict[str, Any]) -> None:
    dense, fstq = (run["methods"][m]["rounds"] for m in ("dense_fp16", CATCHUP))
    assert dense[0]["eval"] == fstq[0]["eval"]  # one initial adapter for every method
    for r in dense + fstq:
        ev = r["eval"]
        assert ev["loss"] > 0 and 0 <= ev["accuracy"] <= 1 and 0 <= ev["rouge_l"] <= 1
        assert set(ev["groups"]) <= set(CONFIG.languages)
    # Training moved the global adapter, so the held-out loss changed.
    assert dense[-1]["eval"]["loss"] != dense[0]["eval"]["loss"]


@pytest.mark.timeout(240)
def test_record_has_target_memory_and_plots(run: dict[str, Any], out: Path) -> None:
    target = run["target"]
    assert target["metric"] == "loss" and not target["higher_is_better"]
    dense_losses = [r["eval"]["loss"] for r in run["methods"]["dense_fp16"]["rounds"]]
    assert min(dense_losses) <= target["value"] <= max(dense_losses)
    for rec in run["methods"].values():
        assert 100 < rec["agent_peak_rss_mb"] < 8000  # a real process's RSS, in MB
    summary = summarize(read_run(out / "run.json"))
    for name, m in summary.methods.items():
        rounds = run["methods"][name]["rounds"]
        # Devices fetched the new global adapters after round 1: downlink spent and counted.
        assert m.total_downlink_wire_bytes == sum(r["downlink_wire_bytes"] for r in rounds) > 0
        assert m.total_uplink_wire_bytes == sum(r["uplink_wire_bytes"] for r in rounds)
    tables = markdown_tables(summary)
    assert "dense_fp16" in tables and CATCHUP in tables
    for name in _PLOTS:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(240)
def test_the_downlink_adds_up_by_route_device_and_direction(typed: FleetRun) -> None:
    for name, method in typed.methods.items():
        assert method.downlink is not None and method.downlink["derive_v0"] is True
        for r in method.rounds[1:]:
            down = r.downlink
            assert down is not None, (name, r.round)
            # The aggregator's routes and staleness add up to its own downlink count ...
            assert sum(c.wire_bytes for c in down.by_route.values()) == r.downlink_wire_bytes
            assert sum(c.wire_bytes for c in down.by_staleness.values()) == r.downlink_wire_bytes
            # ... and to what the devices' wires received, counted independently.
            assert sum(d.downlink_bytes or 0 for d in r.clients) == r.downlink_wire_bytes
            for d in r.clients:
                # A device that never saw the round fetched nothing and reports no route.
                unseen = d.dropped in ("silent", "offline")
                assert (d.downlink_route is None) == unseen, (name, r.round, d)
                assert d.downlink_rate_bps is not None and d.downlink_rate_bps > d.rate_bps
                if d.downlink_route in ("catchup", "full"):
                    assert d.downlink_bytes
            for route in ("catchup", "full"):
                served = [d for d in r.clients if d.downlink_route == route]
                got = down.by_route.get(route)
                assert len(served) == (got.fetches if got else 0), (
                    name,
                    r.round,
                    route,
                    [
                        (
                            d.client,
                            d.dropped,
                            d.downlink_route,
                            d.downlink_bytes,
                            d.downlink_fallbacks,
                            d.first_contact,
                        )
                        for d in r.clients
                    ],
                    down,
                )
    dense, caught = typed.methods["dense_fp16"].rounds, typed.methods[CATCHUP].rounds
    # Round 1 starts from v0, which every device derives: nothing crosses the downlink.
    for rounds in (dense, caught):
        assert rounds[1].downlink_wire_bytes == 0
        assert {d.downlink_route for d in rounds[1].clients} <= {"derived", None}
    # Later rounds: dense serves the full adapter, the catch-up arm compressed catch-ups.
    full = [
        d.downlink_bytes or 0 for r in dense[2:] for d in r.clients if d.downlink_route == "full"
    ]
    catchups = [d for r in caught[2:] for d in r.clients if d.downlink_route == "catchup"]
    assert full and catchups
    assert all(0 < (d.downlink_bytes or 0) < min(full) for d in catchups)
    assert not any(d.downlink_route == "catchup" for r in dense for d in r.clients)
    for r in caught[2:]:
        assert r.downlink is not None and r.downlink.catchup_error is not None
        assert 0 <= r.downlink.catchup_error.vs_gap < 1
    assert sum(r.downlink_wire_bytes for r in caught) < sum(r.downlink_wire_bytes for r in dense)
