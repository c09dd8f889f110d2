"""Scenario 9: faults on the catch-up downlink, with the real services as OS processes.

Every service runs as ``fedfstq agent|aggregator --config FILE`` (tiny model, catch-up downlink:
the default) against a real Mosquitto; an MQTT watcher of the test sees what the broker routes.

1. **The aggregator SIGKILLed between computing a plan and serving it.** Its MQTT link goes
   through a relay whose aggregator-to-broker direction the test stalls once round 2 is
   announced; the devices' plan requests still reach it, it computes the catch-up v0 -> v1 and
   commits it, and its answer is held in the relay. The test waits for the plan in the store,
   kills the process and drops the held bytes: no plan ever reached a device. The restarted
   aggregator serves the stored plan (same id, same result) to the devices asking again.
2. **Replayed and mismatched plans.** While a device fetches round 3's adapter, the test
   publishes on its downlink an old plan replayed verbatim, that plan re-labelled for another
   held state, a chunk of a plan nobody asked for, and a corrupted catch-up for the very state
   it holds (a result id its payload does not produce). The device ignores the foreign ones and
   never trains from the corrupted one (it falls back to the full adapter, or the genuine plan
   supersedes it first).
3. **A held state the aggregator no longer knows.** Between rounds 2 and 3 the aggregator is
   killed and its downlink tables are emptied (a store restored from an older backup): the
   devices holding catch-up states get the full adapter.

Each test checks the promise of RELIABILITY.md (rounds close, nothing acknowledged is lost or
corrupted, each global = previous + FedAvg of the stored uploads) plus the downlink's own: every
state a device trains from is one it verified against an id the aggregator announced.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import agent_settings, aggregator_settings, client_data, read_rounds, unique
from process_support import Service, Services, Watcher, audit, check_globals
from relay import Relay
from report import FaultRow

from aggregator.settings import AggregatorSettings
from broker.chunking import crc32
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import (
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
)
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import down_topic
from edge_agent.device_state import DeviceState
from workload.data import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.broker]

SIZES = (8, 12)
FINISH_S = 90.0
Report = Callable[[FaultRow], None]


@dataclass
class Fleet:
    settings: AggregatorSettings
    aggregator: Service
    agents: list[Service]
    names: list[str]
    dirs: list[Path]  # the agents' state directories


@contextlib.contextmanager
def rig(
    broker: LocalBroker, root: Path, **relay_options: Any
) -> Iterator[tuple[Relay, Watcher, Services, str]]:
    fleet_id = unique("down")
    with (
        Relay(broker.host, broker.port, **relay_options) as relay,
        Watcher(broker, fleet_id) as watcher,
        Services(root / "logs") as services,
    ):
        yield relay, watcher, services, fleet_id


def start(
    broker: LocalBroker, root: Path, services: Services, fleet_id: str, rounds: int,
    victim: dict[str, Any] | None = None, **aggregator: Any,
) -> Fleet:  # fmt: skip
    """Two devices, both in every round (the first with ``victim`` settings), and the
    aggregator (changes: ``aggregator``)."""
    settings = aggregator_settings(
        broker, fleet_id, root / "agg",
        rounds={"clients_per_round": 2, "min_clients": 2, "quorum": 2, "max_rounds": rounds},
        **aggregator,
    )  # fmt: skip
    agg = services.add("aggregator", "aggregator", settings)
    agents, names, dirs = [], [], []
    for i, pairs in enumerate(client_data(SIZES)):
        name = f"dev{i}-{fleet_id}"
        changes = (victim or {}) if i == 0 else {}
        s = agent_settings(broker, fleet_id, name, root / name, pairs, max_rounds=rounds, **changes)
        agents.append(services.add("agent", f"dev{i}", s))
        names.append(name)
        dirs.append(s.state_dir)
    for p in [agg, *agents]:
        p.start()
    return Fleet(settings, agg, agents, names, dirs)


def held(fleet: Fleet, i: int) -> tuple[bytes, int, str]:
    """What device ``i`` holds now: its id (its bytes re-hashed), version, route."""
    found = DeviceState(fleet.dirs[i]).load_global()
    assert found is not None
    meta, payload = found
    return hashlib.sha256(payload).digest(), int(meta["version"]), str(meta["route"])


def acked(watcher: Watcher) -> int:
    return len(watcher.acked_complete())


def stored_plans(settings: AggregatorSettings, version: int) -> list[tuple[bytes, bytes]]:
    """(plan id, result id) of the catch-ups the aggregator committed for ``version``."""
    db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, result_id FROM plans WHERE version = ?", (version,))
        return [(bytes(p), bytes(r)) for p, r in rows]
    except sqlite3.OperationalError:  # the table is not there yet
        return []
    finally:
        db.close()


def finish_and_check(
    fleet: Fleet, services: Services, watcher: Watcher, rounds: int, report: Report,
    scenario: str, notes: str,
) -> None:  # fmt: skip
    """Every process exits 0; every round closed with both devices; the RELIABILITY promise."""
    services.finish([fleet.aggregator, *fleet.agents], FINISH_S)
    records = read_rounds(fleet.settings)
    assert [(r["status"], sorted(r["arrived"])) for r in records] == [
        ("closed", sorted(fleet.names))
    ] * rounds
    result = audit(fleet.settings, rounds, watcher, fleet.dirs)
    report(
        FaultRow(
            scenario=scenario, rounds_completed=len(records),
            uploads_acknowledged=len(result.acked), uploads_aggregated=result.aggregated,
            bytes_resent=0, corrupted_aggregated=len(result.corrupted),
            acknowledged_lost=len(result.lost), notes=notes,
        )
    )  # fmt: skip
    assert result.corrupted == [] and result.lost == []
    assert result.aggregated == len(result.acked) == rounds * len(fleet.agents)
    check_globals(fleet.settings, result.stored)


def announced_results(watcher: Watcher, version: int, forged: set[bytes]) -> set[bytes]:
    """Result ids of the plans the aggregator (not the test) sent for ``version``."""
    return {
        s.body.result
        for s in watcher.seen(DownlinkPlan, where=lambda p: p.version == version)
        if s.body.plan not in forged
    }


# -- 1. killed between computing a plan and serving it ------------------------------------------


@pytest.mark.timeout(180)
def test_aggregator_killed_between_computing_and_serving_a_plan(
    mosquitto: LocalBroker, tmp_path: Path, fault_report: Report
) -> None:
    with rig(mosquitto, tmp_path) as (relay, watcher, services, fleet_id):
        eval_path = tmp_path / "eval.jsonl"  # closing round 1 takes a while (model, eval)
        write_jsonl(eval_path, [p for pairs in client_data(SIZES) for p in pairs])
        fleet = start(
            mosquitto, tmp_path, services, fleet_id, 2,
            mqtt={"host": relay.host, "port": relay.port},
            eval={"path": eval_path, "max_len": 32},
        )  # fmt: skip
        agg = fleet.aggregator
        # Round 1's uploads are acked: hold the devices still while round 2 is set up.
        services.wait_for(lambda: acked(watcher) == 2, "round 1's uploads acked", timeout=60)
        for a in fleet.agents:
            a.pause()
        services.wait_for(
            lambda: bool(watcher.seen(RoundAnnouncement, where=lambda a: a.round == 2))
            and bool(watcher.seen(GlobalManifest, where=lambda m: m.version == 1)),
            "round 2 announced on v1", timeout=60,
        )  # fmt: skip
        relay.stall(up_only=True)  # what the aggregator sends from now on is held
        for a in fleet.agents:
            a.resume()
        services.wait_for(
            lambda: bool(stored_plans(fleet.settings, 1)), "the catch-up to v1 committed", 30
        )
        services.wait_for(
            lambda: len(watcher.seen(FetchRequest, where=lambda f: f.version == 1)) >= 2,
            "both devices' plan requests", timeout=30,
        )  # fmt: skip
        time.sleep(0.5)  # both answered (the second from the plan cache), both held
        agg.kill()
        relay.cut_all()  # the held answers die with the connection
        relay.resume()
        (plan_id, result), *more = stored_plans(fleet.settings, 1)
        assert more == []  # the first contacts share one plan (both hold the derived v0)
        assert watcher.seen(DownlinkPlan) == []  # computed and committed, never served
        agg.start()
        finish_and_check(
            fleet, services, watcher, 2, fault_report,
            "10.1 downlink: aggregator SIGKILL between computing and serving a plan",
            "catch-up v0->v1 committed, its answer held in a stalled link and dropped; the "
            "restarted aggregator served the stored plan; devices verified it",
        )  # fmt: skip
        plans = [s.body for s in watcher.seen(DownlinkPlan, where=lambda p: p.version == 1)]
        assert plans and {(p.plan, p.result, p.route) for p in plans} == {
            (plan_id, result, DownlinkRoute.CATCHUP)
        }
        for i in range(2):
            assert held(fleet, i) == (result, 1, "catchup")


# -- 2. replayed and mismatched plans ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_replayed_and_mismatched_plans_never_become_a_held_state(
    mosquitto: LocalBroker, tmp_path: Path, fault_report: Report
) -> None:
    # The victim's link is slow (~4 KB/s, 0.1 s per piece): the forged messages reach it while
    # it is still fetching.
    with rig(mosquitto, tmp_path, throttle_bps=4000, delay_s=0.1) as (
        relay, watcher, services, fleet_id,
    ):  # fmt: skip
        slow = {"mqtt": {"host": relay.host, "port": relay.port}}
        fleet = start(mosquitto, tmp_path, services, fleet_id, 3, victim=slow)
        victim = fleet.names[0]
        services.wait_for(
            lambda: bool(watcher.seen(DownlinkPlan, client=victim, where=lambda p: p.version == 1)),
            "the victim's plan to v1", timeout=60,
        )  # fmt: skip
        old = watcher.seen(DownlinkPlan, client=victim, where=lambda p: p.version == 1)[0].body
        # Round 3: the victim asks how to get v2 holding its catch-up state of v1.
        services.wait_for(
            lambda: bool(watcher.seen(
                FetchRequest, client=victim, where=lambda f: f.version == 2 and f.plan is None)),
            "the victim's plan request for v2", timeout=60,
        )  # fmt: skip
        request = watcher.seen(
            FetchRequest, client=victim, where=lambda f: f.version == 2 and f.plan is None
        )[0].body
        assert request.held is not None
        junk_id = hashlib.sha256(b"nobody asked").digest()
        payload = b"\x00" * old.total_size  # not the payload of any real plan
        corrupted = DownlinkPlan(
            version=2, route=DownlinkRoute.CATCHUP, plan=hashlib.sha256(b"corrupt").digest(),
            base=request.held, result=hashlib.sha256(b"not what it makes").digest(),
            total_size=len(payload), chunk_count=1, chunk_size=max(1, len(payload)),
            sha256=hashlib.sha256(payload).digest(),
        )  # fmt: skip
        forged: list[DownlinkPlan | GlobalChunk] = [
            old,  # replayed verbatim (v1: not the version being fetched)
            old.model_copy(update={"version": 2, "base": junk_id}),  # for another held state
            GlobalChunk(version=2, plan=junk_id, index=0, crc32=0, data=b"x"),  # another plan
            corrupted,
            GlobalChunk(
                version=2, plan=corrupted.plan, index=0, crc32=crc32(payload), data=payload
            ),
        ]
        sender = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port,
                                         client_id=unique("forger"), clean_start=True))  # fmt: skip
        sender.connect(10)
        try:
            for msg in forged:
                sender.publish_wait(down_topic(fleet_id, victim), encode(msg), timeout=10)
        finally:
            sender.close()
        services.finish([fleet.aggregator, *fleet.agents], FINISH_S)
        log = fleet.agents[0].log(0)
        ignored, fallbacks = log.count("ignoring a "), log.count("fetching the full adapter")
        victim_id, version, route = held(fleet, 0)
        finish_and_check(
            fleet, services, watcher, 3, fault_report,
            "10.2 downlink: replayed and mismatched plans",
            "during the round-3 fetch: an old plan replayed, a plan for another held state, a "
            f"chunk of another plan, a corrupted catch-up; {ignored} plans ignored, {fallbacks} "
            f"fallback to the full adapter, the device trained from a verified {route} state",
        )  # fmt: skip
        assert ignored >= 2  # the replay and the other state's plan
        ids = {p.plan for p in forged if isinstance(p, DownlinkPlan)}
        # What the victim holds is the result of a plan the aggregator made (or v2 itself).
        assert version == 2 and victim_id in announced_results(watcher, 2, ids) | {
            watcher.seen(GlobalManifest, where=lambda m: m.version == 2)[0].body.sha256
        }
        assert victim_id != corrupted.result
        assert route in ("catchup", "full")


# -- 3. a held state the aggregator no longer knows ------------------------------------------------


@pytest.mark.timeout(180)
def test_a_held_state_the_aggregator_forgot_gets_the_full_adapter(
    mosquitto: LocalBroker, tmp_path: Path, fault_report: Report
) -> None:
    with rig(mosquitto, tmp_path) as (_, watcher, services, fleet_id):
        eval_path = tmp_path / "eval.jsonl"  # closing round 2 takes a while: the kill lands first
        write_jsonl(eval_path, [p for pairs in client_data(SIZES) for p in pairs] * 4)
        fleet = start(
            mosquitto, tmp_path, services, fleet_id, 3, eval={"path": eval_path, "max_len": 32}
        )
        agg = fleet.aggregator
        # Round 2's uploads acked: the devices hold catch-up states of v1. Freeze them, kill the
        # aggregator, and empty its downlink tables (a store restored from an older backup).
        services.wait_for(lambda: acked(watcher) == 4, "round 2's uploads acked", timeout=90)
        for a in fleet.agents:
            a.pause()
        agg.kill()
        before = [held(fleet, i) for i in range(2)]
        assert [(v, route) for _, v, route in before] == [(1, "catchup")] * 2
        db = sqlite3.connect(str(fleet.settings.db_path))
        try:
            with db:
                db.execute("DELETE FROM states")
                db.execute("DELETE FROM plans")
                db.execute("DELETE FROM device_states")
        finally:
            db.close()
        restarted = time.monotonic()
        agg.start()
        for a in fleet.agents:
            a.resume()
        finish_and_check(
            fleet, services, watcher, 3, fault_report,
            "10.3 downlink: held state unknown to the aggregator",
            "downlink tables emptied between rounds 2 and 3; both devices got the full v2 "
            "adapter and verified it",
        )  # fmt: skip
        v2 = [s.body for s in watcher.seen(DownlinkPlan, since=restarted,
                                           where=lambda p: p.version == 2)]  # fmt: skip
        assert v2 and {p.route for p in v2} == {DownlinkRoute.FULL}
        manifest = watcher.seen(GlobalManifest, where=lambda m: m.version == 2)[0].body
        for i in range(2):
            assert held(fleet, i) == (manifest.sha256, 2, "full")
