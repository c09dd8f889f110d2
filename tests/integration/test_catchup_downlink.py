"""End to end: the catch-up downlink with the real aggregator and real agents over Mosquitto.

Three agents, two selected per round for three rounds (the selection seed is chosen so that one
device sits out round 2 and returns in round 3, two versions behind). The same fleet runs twice,
``downlink.mode = "catchup"`` (the default) and ``"full"`` (the baseline arm). The checks do not
trust either service's bookkeeping alone: every state a device ends a fetch with is its own
hash-verified bytes, and equals the state the aggregator rebuilds for that id from its store;
the aggregator's per-round downlink account is compared with what the devices counted; each
global is the previous one plus FedAvg of the uploads (devices train from what they hold, the
server rule is unchanged).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_support import (
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    expected_global,
    global_state,
    read_rounds,
    tiny_loader,
    unique,
)

from aggregator.rounds import select_clients
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.local import LocalBroker
from edge_agent.agent import EdgeAgent
from edge_agent.device_state import DeviceState
from edge_agent.downloader import DeviceDownlink
from edge_agent.outbox import Outbox
from workload.catchup import canonical_bytes

pytestmark = pytest.mark.broker

SIZES = (8, 12, 16)
ROUNDS = 3
ATOL = 1e-6
log = logging.getLogger(__name__)


def returning_seed() -> int:
    """A selection seed under which device 0 is in rounds 1 and 3 but not 2 (2 of 3 a round)."""
    for seed in range(100):
        picks = [
            select_clients(["a", "b", "c"], 2, np.random.default_rng([seed, r]))
            for r in range(1, ROUNDS + 1)
        ]
        if "a" in picks[0] and "a" not in picks[1] and "a" in picks[2]:
            return seed
    raise AssertionError("no such seed below 100")


def run_fleet(
    mosquitto: LocalBroker, root: Path, mode: str
) -> tuple[AggregatorSettings, list[EdgeAgent]]:
    """Three rounds of a three-device fleet in ``mode``; returns what the test inspects."""
    fleet = unique("down")
    settings = aggregator_settings(
        mosquitto, fleet, root / "agg",
        rounds={"clients_per_round": 2, "min_clients": 3, "quorum": 2, "max_rounds": ROUNDS,
                "selection_seed": returning_seed()},
        downlink={"mode": mode},
    )  # fmt: skip
    agents = [
        EdgeAgent(agent_settings(mosquitto, fleet, f"dev{i}-{fleet}", root / f"dev{i}", pairs))
        for i, pairs in enumerate(client_data(SIZES))
    ]
    with Services() as services:
        agg = services.aggregator(Aggregator(settings, model_loader=tiny_loader))
        runs = [services.agent(a) for a in agents]
        services.join(agg, timeout=90)  # max_rounds: it stops by itself
        for r in runs:
            r.stop.set()
        services.join(*runs, timeout=30)
    return settings, agents


def device_bytes(agents: list[EdgeAgent], round_id: int) -> dict[str, int]:
    """Chunk data the devices received for a round's adapter, by route."""
    out: dict[str, int] = {}
    for a in agents:
        d: DeviceDownlink | None = a.downlinks.get(round_id)
        if d is not None:
            out[d.route] = out.get(d.route, 0) + d.payload_bytes
    return out


def check_globals(settings: AggregatorSettings, agents: list[EdgeAgent]) -> None:
    """Each global = the previous + FedAvg of the uploads the devices made (outbox payloads)."""
    previous = global_state(settings, 0)
    for r in range(1, ROUNDS + 1):
        uploads = []
        for a in agents:
            outbox = Outbox(a.settings.state_dir / "outbox")
            for e in outbox.entries():
                if e.round_id == r and e.state == "complete":
                    uploads.append((outbox.payload(e.upload_id), e.sample_count))
        if r == ROUNDS:  # earlier rounds' entries are pruned; their totals are in the records
            want = expected_global(previous, uploads)
            got = global_state(settings, r)
            assert max(float((got[k] - want[k]).abs().max()) for k in want) < ATOL
        previous = global_state(settings, r)


@pytest.mark.timeout(300)
def test_catch_up_downlink_with_a_returning_device(mosquitto: LocalBroker, tmp_path: Path) -> None:
    # Act
    settings, agents = run_fleet(mosquitto, tmp_path / "catchup", "catchup")
    full_settings, full_agents = run_fleet(mosquitto, tmp_path / "full", "full")

    # Assert: three closed rounds in both arms, with the same selections.
    records, full_records = read_rounds(settings), read_rounds(full_settings)
    assert [r["status"] for r in records] == ["closed"] * ROUNDS
    assert [r["status"] for r in full_records] == ["closed"] * ROUNDS
    sel = [[n.split("-")[0] for n in r["selected"]] for r in records]
    assert sel == [[n.split("-")[0] for n in r["selected"]] for r in full_records]
    assert "dev0" in sel[0] and "dev0" not in sel[1] and "dev0" in sel[2]

    # Round 1: every selected device derived v0 (no bytes); the aggregator counted them.
    for rec in records:
        assert rec["downlink"]["mode"] == "catchup"
    assert records[0]["downlink"]["routes"] == {
        "derived": {"fetches": 2, "payload_bytes": 0, "wire_bytes": 0}
    }
    assert records[0]["downlink_payload_bytes"] == 0
    # The returning device caught up two versions with one payload smaller than the full one.
    back = agents[0].downlinks[3]
    full_size = records[2]["downlink"]["full_bytes"]
    assert (back.route, back.staleness, back.fallbacks) == ("catchup", 2, 0)
    assert 0 < back.payload_bytes <= records[2]["downlink"]["budget_bytes"] < full_size
    # The aggregator counts it as a first contact (it never served it: it derived v0).
    assert records[2]["downlink"]["staleness"]["new"]["payload_bytes"] == back.payload_bytes
    assert back.first_contact and set(records[1]["downlink"]["staleness"]) == {"new"}
    assert records[2]["downlink"]["staleness"]["1"]["fetches"] == 1
    for r in (2, 3):  # no device needed the full adapter
        by_route = device_bytes(agents, r)
        assert set(by_route) <= {"catchup", "held", "derived"}, by_route
        account = records[r - 1]["downlink"]["routes"]
        assert account["catchup"]["payload_bytes"] == by_route["catchup"]
        assert records[r - 1]["downlink_payload_bytes"] == by_route["catchup"]

    # What each device holds is what the aggregator can rebuild for that id (and it verified it).
    store = AggregatorStore(settings.db_path)
    try:
        from aggregator.downlink import Downlink
        from aggregator.global_adapter import GlobalAdapter

        planner = Downlink(settings.downlink, store, chunk_size=settings.chunk_size,
                           load_master=lambda v: global_state(settings, v))  # fmt: skip
        g = GlobalAdapter.load(settings.global_dir(ROUNDS), ROUNDS, ROUNDS,
                               spec=settings.lora.spec(), base_model="tiny",
                               chunk_size=settings.chunk_size)  # fmt: skip
        planner.publish(g)
        for a in agents:
            meta, payload = DeviceState(a.settings.state_dir).load_global() or ({}, b"")
            held = hashlib.sha256(payload).digest()
            assert meta["sha256"] == held.hex()
            if meta["route"] == "catchup":
                rebuilt = planner.state(held)
                assert rebuilt is not None and canonical_bytes(rebuilt) == payload
    finally:
        store.close()
    check_globals(settings, agents)

    # The baseline arm: full adapters; catch-up moved far fewer bytes for the same rounds.
    assert all(d.route in ("full", "held", "derived") for a in full_agents
               for d in a.downlinks.values())  # fmt: skip
    down = [r["downlink_wire_bytes"] for r in records]
    full_down = [r["downlink_wire_bytes"] for r in full_records]
    fetched: dict[str, Any] = {"catchup": sum(down), "full": sum(full_down)}
    log.info("downlink wire bytes over %d rounds: %s (per round %s vs %s)", ROUNDS, fetched,
             down, full_down)  # fmt: skip
    assert sum(down) * 3 < sum(full_down)
