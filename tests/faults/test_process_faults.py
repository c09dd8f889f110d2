"""Process faults: the real services as OS processes, SIGKILLed at the worst moment, restarted.

Every service runs as ``fedfstq agent|aggregator --config FILE`` (tiny model) against a real
Mosquitto; an MQTT watcher of the test sees what the broker routes and times each kill on it
(N of M chunks seen, an upload acknowledged, a global chunk served). A slow link comes from
``relay.Relay``: every forwarded piece is at most 400 bytes followed by a 0.1 s pause (~4 KB/s
per direction, also right after an idle period, when the throttle alone would let a burst go).
The broker test stalls the aggregator (SIGSTOP) so that the uploads queue in its session, then
restarts Mosquitto (own instance, persistence on).

After the restart each test checks the promise: the round completes, no upload the aggregator
acknowledged is missing from its store, every stored payload is bit-exactly what the device
declared (manifest on the wire, outbox entry), and each global adapter on disk is the previous
one plus the FedAvg of exactly the stored uploads. The rows go to the reliability table.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    agent_settings,
    aggregator_settings,
    client_data,
    outbox_upload,
    read_rounds,
    unique,
)
from process_support import (
    Audit,
    Service,
    Services,
    Watcher,
    audit,
    check_globals,
    sent_stats,
)
from relay import Relay
from report import FaultRow

from aggregator.global_adapter import GlobalAdapter
from aggregator.settings import AggregatorSettings
from broker.local import LocalBroker
from broker.messages import GlobalManifest, UploadChunk, UploadManifest
from edge_agent.device_state import DeviceState
from edge_agent.outbox import Outbox
from workload.data import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.broker]

#: Two devices with distinct FedAvg weights (sample counts).
SIZES = (8, 12)
#: Dense fp32 of the tiny adapter (~7.3 KB) in 256-byte chunks: 29 chunks, ~3 s on the slow link.
DENSE: dict[str, Any] = {"method": "dense_fp32", "budget_mode": "fixed", "budget_bytes": 1 << 20}
CHUNK = 256
#: Chunks that reach the broker before a kill mid-upload.
KILL_AT = 8
#: Each service process exits by itself after this long at most (max_rounds reached).
FINISH_S = 60.0

Report = Callable[[FaultRow], None]


@dataclass
class Fleet:
    settings: AggregatorSettings
    aggregator: Service
    agents: list[Service]
    dirs: list[Path]  # the agents' state directories


@dataclass
class Rig:
    """One test's broker, fleet id, slow link, watcher and service processes."""

    broker: LocalBroker
    root: Path
    fleet_id: str
    relay: Relay
    watcher: Watcher
    services: Services

    def slow_link(self) -> dict[str, Any]:
        """Agent settings that put its MQTT connection through the slow relay."""
        return {"mqtt": {"host": self.relay.host, "port": self.relay.port}}

    def start(
        self, agents: Sequence[Mapping[str, Any]], rounds: int = 1, **aggregator: Any
    ) -> Fleet:
        """Write the configs and start the aggregator and one agent per entry of ``agents``."""
        broker, fleet, root = self.broker, self.fleet_id, self.root
        n = len(agents)
        settings = aggregator_settings(
            broker, fleet, root / "agg",
            rounds={"clients_per_round": n, "min_clients": n, "quorum": n, "max_rounds": rounds},
            **aggregator,
        )  # fmt: skip
        agg = self.services.add("aggregator", "aggregator", settings)
        procs, dirs = [], []
        for i, (pairs, changes) in enumerate(zip(client_data(SIZES), agents, strict=True)):
            name = f"dev{i}-{fleet}"
            s = agent_settings(
                broker, fleet, name, root / name, pairs, max_rounds=rounds, **changes
            )
            procs.append(self.services.add("agent", f"dev{i}", s))
            dirs.append(s.state_dir)
        for p in [agg, *procs]:
            p.start()
        return Fleet(settings, agg, procs, dirs)

    def finish(self, fleet: Fleet) -> None:
        """Every process of the fleet exits by itself (max_rounds) with code 0."""
        self.services.finish([fleet.aggregator, *fleet.agents], FINISH_S)


@contextlib.contextmanager
def make_rig(broker: LocalBroker, root: Path, *, persistent_watcher: bool = False) -> Iterator[Rig]:
    fleet_id = unique("proc")
    with (
        # ~4 KB/s: at most 400 bytes per read, then a 0.1 s pause.
        Relay(broker.host, broker.port, throttle_bps=4000, delay_s=0.1) as relay,
        Watcher(broker, fleet_id, persistent=persistent_watcher) as watcher,
        Services(root / "logs") as services,
    ):
        yield Rig(broker, root, fleet_id, relay, watcher, services)


@pytest.fixture
def rig(mosquitto: LocalBroker, tmp_path: Path) -> Iterator[Rig]:
    """A rig on the session broker; its processes are killed (by PID) when the test ends."""
    with make_rig(mosquitto, tmp_path) as r:
        yield r


def client_of(fleet: Fleet, i: int) -> str:
    return f"dev{i}-{fleet.settings.fleet}"


def only_manifest(watcher: Watcher, client: str) -> UploadManifest:
    """The one upload the client declared (re-sent manifests are equal)."""
    manifests = [s.body for s in watcher.seen(UploadManifest, client=client)]
    assert manifests and all(m == manifests[0] for m in manifests), manifests
    manifest: UploadManifest = manifests[0]
    return manifest


def check_outcome(
    fleet: Fleet, watcher: Watcher, rounds: int, fault_report: Report, scenario: str, notes: str,
    bytes_resent: int,
) -> Audit:  # fmt: skip
    """Every round closed with every device; nothing acked lost or corrupted; globals exact."""
    records = read_rounds(fleet.settings)
    names = sorted(client_of(fleet, i) for i in range(len(fleet.agents)))
    assert [(r["round"], r["status"], r["arrived"]) for r in records] == [
        (k, "closed", names) for k in range(1, rounds + 1)
    ]
    result = audit(fleet.settings, rounds, watcher, fleet.dirs)
    fault_report(
        FaultRow(
            scenario=scenario,
            rounds_completed=len(records),
            uploads_acknowledged=len(result.acked),
            uploads_aggregated=result.aggregated,
            bytes_resent=bytes_resent,
            corrupted_aggregated=len(result.corrupted),
            acknowledged_lost=len(result.lost),
            notes=notes,
        )
    )
    assert result.corrupted == [] and result.lost == []
    assert result.aggregated == len(result.acked) == rounds * len(fleet.agents)
    check_globals(fleet.settings, result.stored)
    return result


# -- 1. an agent killed mid-upload resumes from its outbox ---------------------------------------


@pytest.mark.timeout(120)
def test_agent_killed_mid_upload_resends_only_the_missing_chunks(
    rig: Rig, fault_report: Report
) -> None:
    watcher, services = rig.watcher, rig.services
    # A short ack settle: the restarted process must not need the settle heuristic to tell the
    # reply to its status query from the acks its session kept for the dead one (regression).
    victim_setup = {"compression": DENSE, "ack_settle_s": 0.05, **rig.slow_link()}
    fleet = rig.start([victim_setup, {}], chunk_size=CHUNK)
    victim, name = fleet.agents[0], client_of(fleet, 0)
    services.wait_for(
        lambda: len(watcher.seen(UploadChunk, client=name)) >= KILL_AT,
        f"{KILL_AT} chunks of the victim's upload at the broker",
        timeout=60,
    )
    victim.kill()
    # What the broker took from the dead process: wait for the relay to drop the link and for
    # anything still in flight to land (a torn last packet is discarded by Mosquitto).
    services.wait_for(
        lambda: rig.relay.open_connections == 0 and watcher.quiet(UploadChunk, 1.0),
        "the killed agent's link to drain",
        timeout=15,
    )
    manifest = only_manifest(watcher, name)
    uid, n = manifest.upload_id, manifest.chunk_count
    had = set(watcher.chunks(uid))
    missing = set(range(n)) - had
    assert KILL_AT <= len(had) < n, (len(had), n)  # the kill landed mid-upload

    # On disk: the upload, durable before its first byte went out.
    (pending,) = Outbox(fleet.dirs[0] / "outbox").pending()
    assert (pending.upload_id, pending.sha256) == (uid, manifest.sha256.hex())
    assert victim.log(0).count("round 1: trained") == 1

    restarted = time.monotonic()
    victim.start()
    rig.finish(fleet)

    # No retraining: the new process resumed the same upload and trained nothing.
    second = victim.log(1)
    assert f"resuming upload {uid} of round 1 from the outbox (no retraining)" in second
    assert "trained" not in second
    entry, _ = outbox_upload(fleet.dirs[0], 1)
    assert (entry.upload_id, entry.sha256, entry.state) == (uid, pending.sha256, "complete")

    # Only the missing chunks went out again, each once, and the aggregator saw no duplicate.
    resent = watcher.chunks(uid, since=restarted)
    assert sorted(resent) == sorted(missing)
    (stats,) = sent_stats(second)
    assert (stats.upload_id, stats.state) == (uid, "complete")
    assert (stats.chunks_first, stats.chunks_resent) == (0, len(missing))
    (record,) = read_rounds(fleet.settings)
    assert record["duplicate_chunks"] == 0

    check_outcome(
        fleet, watcher, 1, fault_report, "process: agent SIGKILL mid-upload, restarted",
        f"killed after {len(had)}/{n} chunks; resent {len(resent)} = the missing ones; "
        "no retraining", stats.bytes_resent,
    )  # fmt: skip


# -- 2. an agent killed mid-training trains the round again --------------------------------------

#: Enough local steps that training lasts a second or more, so the kill lands inside it.
LONG_TRAINING = {"steps": 24, "batch_size": 2, "max_len": 32, "lr": 1e-3}


@pytest.mark.timeout(120)
def test_agent_killed_mid_training_trains_the_round_again(rig: Rig, fault_report: Report) -> None:
    watcher = rig.watcher
    fleet = rig.start([{"training": LONG_TRAINING}, {}])
    victim, name = fleet.agents[0], client_of(fleet, 0)
    rig.services.wait_for(
        lambda: watcher.in_state(name, "training"), "the victim to start training", timeout=60
    )
    time.sleep(0.5)  # past building the adapter, inside the optimiser loop
    victim.kill()
    assert "trained" not in victim.log(0)  # killed before training ended
    assert Outbox(fleet.dirs[0] / "outbox").entries() == []  # readable, and nothing half-made
    assert watcher.seen(UploadManifest, client=name) == []

    victim.start()
    rig.finish(fleet)

    second = victim.log(1)
    assert second.count("round 1: trained") == 1 and "resuming upload" not in second
    entry, _ = outbox_upload(fleet.dirs[0], 1)
    assert entry.state == "complete"
    (stats,) = sent_stats(second)
    assert (stats.upload_id, stats.state, stats.chunks_resent) == (entry.upload_id, "complete", 0)
    check_outcome(
        fleet, watcher, 1, fault_report, "process: agent SIGKILL mid-training, restarted",
        "outbox empty after the kill; the round trained again from the cached global",
        stats.bytes_resent,
    )  # fmt: skip


# -- 3. the aggregator killed while chunks arrive -------------------------------------------------


@pytest.mark.timeout(120)
def test_aggregator_killed_while_chunks_arrive_loses_no_acked_upload(
    rig: Rig, fault_report: Report
) -> None:
    watcher, services = rig.watcher, rig.services
    # dev0: a small fstq upload on a fast link, acked before the crash; dev1: a dense upload on
    # the slow link, half-way through when the aggregator dies.
    fleet = rig.start([{}, {"compression": DENSE, **rig.slow_link()}], chunk_size=CHUNK)
    agg, fast, slow = fleet.aggregator, client_of(fleet, 0), client_of(fleet, 1)
    # Order the two uploads whatever the machine's load: the slow link is held from the moment
    # dev1 trains (its download is done) until dev0's upload is acknowledged.
    services.wait_for(lambda: watcher.in_state(slow, "training"), "dev1 to train", 60)
    rig.relay.stall()

    def fast_acked() -> bool:
        acked = watcher.acked_complete()
        return any(s.body.upload_id in acked for s in watcher.seen(UploadManifest, client=fast))

    services.wait_for(fast_acked, "dev0's upload to be acked", timeout=60)
    rig.relay.resume()
    services.wait_for(
        lambda: len(watcher.seen(UploadChunk, client=slow)) >= KILL_AT, "dev1 half-way", 30
    )
    agg.kill()
    acked_before = set(watcher.acked_complete())
    slow_manifest = only_manifest(watcher, slow)
    assert slow_manifest.upload_id not in acked_before
    assert len(set(watcher.chunks(slow_manifest.upload_id))) < slow_manifest.chunk_count
    agg.start()
    rig.finish(fleet)

    assert "resumed round 1 with 1 stored uploads" in agg.log(1)
    (record,) = read_rounds(fleet.settings)
    assert record["resumed"] is True
    (stats,) = sent_stats(fleet.agents[1].log(0))
    assert (stats.upload_id, stats.state) == (slow_manifest.upload_id, "complete")
    result = check_outcome(
        fleet, watcher, 1, fault_report, "process: aggregator SIGKILL while chunks arrive",
        "acked before the kill: 1 upload, kept; the in-memory inbox is lost, so the device "
        "re-sends what the new process lacks; pre-crash duplicate/rejection counts are lost",
        stats.bytes_resent,
    )  # fmt: skip
    assert acked_before <= {u.upload_id for u in result.stored[1]}


# -- 4. the aggregator killed while it publishes the new global adapter ---------------------------


@pytest.mark.timeout(150)
def test_aggregator_killed_while_publishing_the_global_adapter(
    rig: Rig, fault_report: Report
) -> None:
    watcher, services = rig.watcher, rig.services
    eval_path = rig.root / "eval.jsonl"
    write_jsonl(eval_path, [p for pairs in client_data(SIZES) for p in pairs])
    # Both devices on the slow link, fetching two 1 KiB chunks per request: v1 (5 chunks) takes
    # several request/answer turns. The held-out evaluation (the first one also builds the peft
    # model) keeps the aggregator busy closing round 1 for a while.
    device = {"fetch_window": 2, **rig.slow_link()}
    # The full-adapter downlink: v1 is the payload served by two processes (a catch-up plan
    # killed in flight is test_downlink_faults.py's scenario 9.1).
    fleet = rig.start(
        [device, device], rounds=2, eval={"path": eval_path, "max_len": 32},
        downlink={"mode": "full"},
    )  # fmt: skip
    agg, s = fleet.aggregator, fleet.settings

    # Kill 1: the last upload of round 1 is acknowledged, so the aggregator is building and
    # evaluating v1; nothing of v1 is on disk or published yet (regression: it was recorded
    # before the evaluation, and a crash then lost round 1's metrics line).
    services.wait_for(
        lambda: len(watcher.acked_complete()) == 2, "round 1's uploads acked", timeout=60
    )
    agg.kill()
    assert not s.global_dir(1).exists()
    assert watcher.seen(GlobalManifest, where=lambda m: m.version == 1) == []
    agg.start()

    # Kill 2: the new process published v1 and serves its first chunks.
    services.wait_for(
        lambda: bool(watcher.global_chunks(1)), "the first chunk of global v1", timeout=60
    )
    agg.kill()
    killed = time.monotonic()
    v1s = [s.body for s in watcher.seen(GlobalManifest, where=lambda m: m.version == 1)]
    v1: GlobalManifest = v1s[0]
    for i in range(2):  # neither device had all of v1 when the aggregator died
        got = {c.body.index for c in watcher.global_chunks(1, until=killed)
               if c.client == client_of(fleet, i)}  # fmt: skip
        assert len(got) < v1.chunk_count
    agg.start()
    rig.finish(fleet)

    # The first restart closed round 1 again from the stored uploads, with its full record.
    assert "resumed round 1 with 2 stored uploads" in agg.log(1)
    records = read_rounds(s)
    assert [r["resumed"] for r in records] == [True, True]
    assert all(r["eval"] is not None for r in records)
    # Served by two processes, the chunks still make the one adapter v1 the devices verified.
    assert "started: global v1, open round 2" in agg.log(2)
    on_disk = GlobalAdapter.load(
        s.global_dir(1), 1, 1, spec=s.lora.spec(), base_model=s.model, chunk_size=s.chunk_size
    )
    assert all(m.sha256 == v1.sha256 for m in v1s) and on_disk.sha256_hex == v1.sha256.hex()
    for agent, state_dir in zip(fleet.agents, fleet.dirs, strict=True):
        assert "global adapter v1 verified and cached" in agent.log(0)
        cached = DeviceState(state_dir).load_global()  # checked against its own SHA-256
        assert cached is not None
        meta, payload = cached
        assert (meta["version"], meta["sha256"]) == (1, v1.sha256.hex())
        assert len(payload) == v1.total_size
    after = watcher.global_chunks(1, since=killed)
    assert records[1]["base_version"] == 1  # the next round trained from v1
    check_outcome(
        fleet, watcher, 2, fault_report, "process: aggregator SIGKILL while publishing the global",
        "killed while closing round 1 (v1 evaluated, not yet recorded) and again while serving "
        f"v1 ({len(after)} v1 chunks served after the restart); devices verified v1, round 2 "
        "trained from it", 0,
    )  # fmt: skip


# -- 5. the broker restarted mid-round, with persistence ------------------------------------------


@pytest.mark.timeout(150)
def test_broker_restart_mid_round_delivers_the_persisted_queue(
    tmp_path: Path, fault_report: Report
) -> None:
    with (
        LocalBroker("dev", workdir=tmp_path / "broker", persistence=True) as broker,
        make_rig(broker, tmp_path, persistent_watcher=True) as rig,
    ):
        assert "\npersistence true\n" in broker.conf_path.read_text()
        watcher, services = rig.watcher, rig.services
        # ack_settle_s: after a status query a device re-sends what the aggregator still lacks
        # 2 s after its first answer; the persisted queue is delivered well within that. Six
        # local steps: both devices report `training` well before either uploads.
        device = {
            "compression": DENSE,
            "ack_settle_s": 2.0,
            # 24 steps: a wide window, so the pause lands before any upload (devices derive v0
            # and start training at once; 6 steps raced the pause in one CI run).
            "training": LONG_TRAINING,
        }
        fleet = rig.start([device, device], chunk_size=CHUNK)
        agg = fleet.aggregator
        names = [client_of(fleet, i) for i in range(2)]
        services.wait_for(
            lambda: all(watcher.in_state(n, "training") for n in names),
            "both devices to have the global adapter and train",
            timeout=60,
        )
        # A stalled aggregator: what the devices upload now queues in its broker session.
        agg.pause()
        paused = time.monotonic()
        assert watcher.seen(UploadManifest, until=paused) == []

        def all_routed() -> bool:
            ms = [watcher.seen(UploadManifest, client=n) for n in names]
            return all(m and len(set(watcher.chunks(m[0].body.upload_id))) == m[0].body.chunk_count
                       for m in ms)  # fmt: skip

        services.wait_for(all_routed, "both uploads routed to the stalled aggregator", timeout=30)
        broker.restart()  # SIGTERM: Mosquitto writes sessions, queues and retained messages
        agg.resume()
        rig.finish(fleet)

        # Nothing was re-sent: the aggregator got every chunk from its persisted session.
        stats = [sent_stats(a.log(0)) for a in fleet.agents]
        assert [[(s.state, s.chunks_resent) for s in st] for st in stats] == [[("complete", 0)]] * 2
        (record,) = read_rounds(fleet.settings)
        check_outcome(
            fleet, watcher, 1, fault_report, "process: broker restart mid-round (persistence on)",
            "aggregator stalled while both uploads queued; broker restarted; the persisted queue "
            f"delivered them, nothing re-sent (aggregator counted {record['duplicate_chunks']} "
            "redelivered duplicates)", 0,
        )  # fmt: skip
