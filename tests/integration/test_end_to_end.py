"""End to end: the real aggregator and real edge agents through a real Mosquitto.

Neither side is faked. The aggregator and three agents run in threads of the test process on a
fleet of their own; each agent trains the tiny model on its own slice of the chatterbot corpus
and uploads fstq (or dense) updates. The checks do not trust the aggregator's bookkeeping: the
expected global adapter is recomputed from what the devices really sent (their outbox payloads,
or the chunks their MQTT client published), and chunk counts come from wrappers around the real
MQTT clients on both ends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_support import (
    AgentWire,
    AggregatorWire,
    OffsetClock,
    Running,
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    expected_global,
    global_state,
    outbox_upload,
    read_rounds,
    sha256_hex,
    tiny_loader,
    unique,
)
from peft import PeftModel, get_peft_model_state_dict

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.local import LocalBroker
from broker.settings import MqttSettings
from broker.transport import Transport, Will
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent
from edge_agent.outbox import Outbox
from workload.data import QAPair

pytestmark = pytest.mark.broker

#: Local examples per device = its FedAvg weight; distinct so that a wrong weighting shows.
SIZES = (8, 12, 16)
#: Tolerance of "equal" globals: float32 storage of a float64 mean (values ~0.1, steps ~1e-3).
ATOL = 1e-6


def assert_close(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float = ATOL
) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0)


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@dataclass
class Device:
    """One real edge agent of the test fleet and the wire wrapper of its MQTT client."""

    name: str
    root: Path
    pairs: list[QAPair]
    agent: EdgeAgent
    wires: list[AgentWire]

    @property
    def state_dir(self) -> Path:
        return self.root / "state"


def make_aggregator(
    settings: AggregatorSettings, **kwargs: Any
) -> tuple[Aggregator, AggregatorWire]:
    wires: list[AggregatorWire] = []

    def client(mqtt: MqttSettings) -> Transport:
        wires.append(AggregatorWire(mqtt))
        return wires[-1]

    agg = Aggregator(settings, client_factory=client, model_loader=tiny_loader, **kwargs)
    agg.start()  # here, not in its thread: global v0 is on disk and announced before agents run
    (wire,) = wires
    return agg, wire


def make_device(
    broker: LocalBroker,
    fleet: str,
    name: str,
    root: Path,
    pairs: list[QAPair],
    seed: int,
    wire: Callable[[MqttSettings, Will], AgentWire] | None = None,
    **changes: Any,
) -> Device:
    """An EdgeAgent whose MQTT client is an ``AgentWire`` (``wire`` builds a custom one)."""
    wires: list[AgentWire] = []

    def factory(mqtt: MqttSettings, will: Will) -> Transport:
        wires.append(wire(mqtt, will) if wire is not None else AgentWire(mqtt, will))
        return wires[-1]

    settings = agent_settings(broker, fleet, name, root, pairs, **changes)
    agent = EdgeAgent(settings, transport_factory=factory, seed=seed)
    return Device(name, root, pairs, agent, wires)


def make_fleet(
    broker: LocalBroker,
    fleet: str,
    tmp_path: Path,
    special: Mapping[int, Mapping[str, Any]] | None = None,
    **changes: Any,
) -> list[Device]:
    """One device per entry of SIZES; ``special[i]`` adds ``make_device`` arguments to device i."""
    names = [unique("dev") for _ in SIZES]
    return [
        make_device(
            broker, fleet, n, tmp_path / n, pairs, seed=i, **changes, **(special or {}).get(i, {})
        )
        for i, (n, pairs) in enumerate(zip(names, client_data(SIZES), strict=True))
    ]


def check_round_record(
    record: dict[str, Any],
    round_id: int,
    selected: Sequence[str],
    arrived: Sequence[str],
    uploads: Mapping[str, tuple[int, int, str]],
) -> None:
    """``uploads``: device -> (payload bytes, sample count, method), as the devices saw it."""
    assert record["round"] == round_id and record["status"] == "closed"
    assert (record["base_version"], record["global_version"]) == (round_id - 1, round_id)
    assert record["selected"] == sorted(selected) and record["arrived"] == sorted(arrived)
    assert record["late"] == 0 and record["rejected"] == {}
    sizes = sum(size for size, _, _ in uploads.values())
    assert record["accepted_payload_bytes"] == sizes
    # Every accepted byte crossed the uplink once as first copies; framing comes on top.
    assert 0 < record["uplink_payload_bytes"] == sizes < record["uplink_wire_bytes"]
    for name, (size, samples, method) in uploads.items():
        client = record["clients"][name]
        assert (client["bytes"], client["sample_count"], client["method"]) == (
            size,
            samples,
            method,
        )


# -- 1. two full rounds ------------------------------------------------------------------------


def test_two_full_rounds_with_three_real_agents(mosquitto: LocalBroker, tmp_path: Path) -> None:
    fleet = unique("e2e")
    settings = aggregator_settings(mosquitto, fleet, tmp_path / "agg", rounds={"max_rounds": 2})
    devices = make_fleet(mosquitto, fleet, tmp_path, max_rounds=2)
    names = [d.name for d in devices]

    started = time.monotonic()
    agg, agg_wire = make_aggregator(settings)
    v0 = global_state(settings, 0)
    with Services() as services:
        agg_run = services.aggregator(agg)
        runs = [services.agent(d.agent) for d in devices]
        services.join(agg_run, *runs, timeout=45)
        # The aggregator stopped by itself (max_rounds reached), not by its stop event; its
        # state is gone once run() has closed it, so the ledger checked below is on disk.
        assert not agg_run.stop.is_set() and agg_run.outcome() is None
    assert [r.outcome() for r in runs] == [ExitCode.OK] * len(devices)
    elapsed = time.monotonic() - started

    # Each device trained and finished both rounds once, and the aggregator acknowledged both.
    for d in devices:
        assert d.agent.rounds_trained == 2 and d.agent.rounds_finished == 2
        assert [(r.entry.round_id, r.state) for r in d.agent.reports] == [
            (1, "complete"),
            (2, "complete"),
        ]
        assert all(r.entry.sample_count == len(d.pairs) for r in d.agent.reports)

    # Round 1, recomputed from the chunks each device's MQTT client published (the outbox
    # entries of round 1 are pruned once round 2 finishes).
    round1: dict[str, tuple[bytes, int]] = {}
    for d in devices:
        report = d.agent.reports[0]
        (wire,) = d.wires
        payload = wire.payload_of(report.entry.upload_id)
        assert sha256_hex(payload) == report.entry.sha256 and len(payload) == report.entry.size
        round1[d.name] = (payload, report.entry.sample_count)
    v1 = global_state(settings, 1)
    assert_close(v1, expected_global(v0, list(round1.values())))

    # Round 2, recomputed from the payloads in the devices' outboxes.
    round2: dict[str, tuple[bytes, int]] = {}
    for d in devices:
        entry, payload = outbox_upload(d.state_dir, 2)
        assert entry.state == "complete" and entry.base_version == 1
        assert entry.upload_id == d.agent.reports[1].entry.upload_id
        round2[d.name] = (payload, entry.sample_count)
    v2 = global_state(settings, 2)
    want = expected_global(v1, list(round2.values()))
    assert_close(v2, want)
    # The check has teeth: the round moved the adapter, and the weights matter.
    assert max_diff(v2, v1) > 100 * ATOL
    unweighted = expected_global(v1, [(p, 1) for p, _ in round2.values()])
    assert max_diff(want, unweighted) > 10 * ATOL

    # The final global is a stock peft directory.
    base, _ = tiny_loader()
    loaded = PeftModel.from_pretrained(base, str(settings.global_dir(2)))
    # save_embedding_layers=False: peft would otherwise look the base model "tiny" up online.
    assert_close(get_peft_model_state_dict(loaded, save_embedding_layers=False), want)

    # rounds.jsonl: both rounds closed early with 3/3, byte counts match what devices sent.
    records = read_rounds(settings)
    assert [r["round"] for r in records] == [1, 2]
    for record, uploads in zip(records, (round1, round2), strict=True):
        check_round_record(
            record,
            record["round"],
            names,
            names,
            {n: (len(p), k, "fstq") for n, (p, k) in uploads.items()},
        )
        assert record["ratio_vs_fp16"] > 1
        assert record["duplicate_chunks"] == agg_wire.duplicates(record["round"])
        routes = record["downlink"]["routes"]
        if record["round"] == 1:  # every device derives v0 from the LoRA seed: nothing fetched
            assert record["downlink_chunks"] == 0 and routes["derived"]["fetches"] == 3
        else:  # each device asks for a catch-up on top of the v0 it holds
            assert record["downlink_chunks"] > 0 and routes["catchup"]["fetches"] >= 1
        assert record["closed_at"] - record["opened_at"] < settings.rounds.round_timeout_s
    logging.getLogger(__name__).info("two rounds with three real agents: %.1f s", elapsed)


# -- 2. an upload cut mid-way resumes in a new process ------------------------------------------

CHUNK = 256  # with dense fp32 the tiny adapter's update (~7.3 KB) is ~29 chunks
CUT_AFTER = 8  # chunks that cross the link before it drops and the first process dies


def test_interrupted_upload_resumes_with_only_the_missing_chunks(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet = unique("e2e")
    settings = aggregator_settings(
        mosquitto, fleet, tmp_path / "agg", chunk_size=CHUNK, rounds={"max_rounds": 1}
    )
    dense = {"method": "dense_fp32", "budget_mode": "fixed", "budget_bytes": 1 << 20}
    cut_at: list[float] = []

    def cut_link(mqtt: MqttSettings, will: Will) -> AgentWire:
        def on_cut() -> None:  # the link drops, then the process dies
            cut_at.append(time.monotonic())
            first.stop()

        return AgentWire(mqtt, will, cut_after=CUT_AFTER, on_cut=on_cut)

    victim_setup = {"wire": cut_link, "compression": dense}
    devices = make_fleet(mosquitto, fleet, tmp_path, {0: victim_setup}, max_rounds=1)
    victim = devices[0]
    first = victim.agent

    agg, agg_wire = make_aggregator(settings)
    v0 = global_state(settings, 0)
    with Services() as services:
        agg_run = services.aggregator(agg)
        runs = [services.agent(d.agent) for d in devices]
        services.join(runs[0], timeout=30)

        # The first process trained once, stored the upload, sent part of it and died.
        assert runs[0].outcome() == ExitCode.OK
        assert first.rounds_trained == 1 and first.reports == []
        (pending,) = Outbox(victim.state_dir / "outbox").pending()
        payload = Outbox(victim.state_dir / "outbox").payload(pending.upload_id)
        n = math.ceil(pending.size / CHUNK)
        assert pending.round_id == 1 and n >= 20
        (first_wire,) = victim.wires
        assert first_wire.chunks_of(pending.upload_id) == list(range(CUT_AFTER))

        # What reached the aggregator before the link dropped: the chunks the broker took.
        uid = pending.upload_id
        services.wait(
            lambda: time.monotonic() - cut_at[0] > 1.0 and agg_wire.quiet_for(uid) > 1.0,
            "the aggregator to drain the first process's chunks",
        )
        had = set(agg_wire.received(upload_id=uid))
        assert had == set(range(CUT_AFTER))
        missing = set(range(n)) - had
        assert agg.open_round == 1 and agg.global_version == 0  # the round waits for it

        # A new process on the same state directory resumes the upload from the outbox.
        victim2 = make_device(
            mosquitto, fleet, victim.name, victim.root, victim.pairs, seed=0, max_rounds=1,
            compression=dense,
        )  # fmt: skip
        second_run = services.agent(victim2.agent)
        services.join(agg_run, second_run, *runs[1:], timeout=40)
        assert not agg_run.stop.is_set() and agg_run.outcome() is None  # max_rounds reached
    assert [r.outcome() for r in (second_run, *runs[1:])] == [ExitCode.OK] * 3

    # No retraining: the same upload, the same bytes, completed.
    second = victim2.agent
    assert second.rounds_trained == 0
    (report,) = second.reports
    assert (report.entry.upload_id, report.state) == (uid, "complete")
    entry, after = outbox_upload(victim.state_dir, 1)
    assert after == payload and entry.sha256 == pending.sha256 == sha256_hex(payload)

    # Only the missing chunks went out again, each once.
    (second_wire,) = victim2.wires
    resent = second_wire.chunks_of(uid)
    assert len(resent) <= len(missing)
    assert sorted(resent) == sorted(missing)
    assert (report.stats.chunks_first, report.stats.chunks_resent) == (0, len(resent))

    # The aggregator got every chunk; nothing beyond the duplicates it counted itself.
    received = agg_wire.received(upload_id=uid)
    (record,) = read_rounds(settings)
    assert record["duplicate_chunks"] == agg_wire.duplicates(1)
    assert sorted(set(received)) == list(range(n))
    assert len(received) - record["duplicate_chunks"] == n

    # The round closed 3/3 with the resumed upload in the average.
    uploads = {d.name: outbox_upload(d.state_dir, 1) for d in devices[1:]}
    uploads[victim.name] = (entry, after)
    names = [d.name for d in devices]
    check_round_record(
        record,
        1,
        names,
        names,
        {n: (len(p), e.sample_count, e.method) for n, (e, p) in uploads.items()},
    )
    assert record["clients"][victim.name]["method"] == "dense_fp32"
    v1 = global_state(settings, 1)
    assert_close(v1, expected_global(v0, [(p, e.sample_count) for e, p in uploads.values()]))


# -- 3. an upload arriving after its round closed ------------------------------------------------


def test_late_upload_is_acked_late_and_leaves_the_global_alone(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet = unique("e2e")
    clock = OffsetClock()
    settings = aggregator_settings(
        mosquitto, fleet, tmp_path / "agg", rounds={"quorum": 2, "max_rounds": 0}
    )
    release = threading.Event()
    stalled_link = {"wire": lambda mqtt, will: AgentWire(mqtt, will, hold=release)}
    devices = make_fleet(mosquitto, fleet, tmp_path, {2: stalled_link}, max_rounds=1)
    on_time, straggler = devices[:2], devices[2]

    agg, _ = make_aggregator(settings, clock=clock)
    v0 = global_state(settings, 0)
    with Services() as services:
        services.on_exit(release.set)
        agg_run = services.aggregator(agg)
        runs: list[Running] = [services.agent(d.agent) for d in devices]
        # Two devices finish; the third trained too, but its link stalls before the manifest.
        services.join(*runs[:2], timeout=30)
        services.wait(
            lambda: any(w.held.is_set() for w in straggler.wires), "the straggler's upload to stall"
        )
        assert agg.open_round == 1 and agg.global_version == 0

        # The deadline passes (quorum 2 of 3): the round closes without the straggler. The jump
        # also ages every heartbeat past the TTL, so no new round opens behind it.
        clock.offset = settings.rounds.round_timeout_s + settings.rounds.heartbeat_ttl_s + 5
        services.wait(lambda: agg.global_version == 1, "the round to close at its deadline")

        release.set()
        services.join(runs[2], timeout=20)
        assert runs[2].outcome() == ExitCode.OK
        services.wait(lambda: agg.counters["late"] >= 1, "the aggregator to count the late upload")
        assert agg.global_version == 1 and agg.open_round is None
        agg_run.stop.set()
        services.join(agg_run, timeout=10)
    assert [r.outcome() for r in runs[:2]] == [ExitCode.OK] * 2

    # The straggler was told `late` and closed its outbox entry that way.
    (report,) = straggler.agent.reports
    assert (report.entry.round_id, report.state, report.reason) == (1, "late", "round_closed")
    late_entry, late_payload = outbox_upload(straggler.state_dir, 1)
    assert late_entry.state == "late"

    # The global is the FedAvg of the two on-time uploads only, and no version followed it.
    uploads = {d.name: outbox_upload(d.state_dir, 1) for d in on_time}
    v1 = global_state(settings, 1)
    want = expected_global(v0, [(p, e.sample_count) for e, p in uploads.values()])
    assert_close(v1, want)
    with_late = expected_global(
        v0, [(p, e.sample_count) for e, p in [*uploads.values(), (late_entry, late_payload)]]
    )
    assert max_diff(want, with_late) > 10 * ATOL  # the late update would have changed it
    assert not settings.global_dir(2).exists()

    (record,) = read_rounds(settings)
    check_round_record(
        record,
        1,
        [d.name for d in devices],
        [d.name for d in on_time],
        {n: (len(p), e.sample_count, "fstq") for n, (e, p) in uploads.items()},
    )
    store = AggregatorStore(settings.db_path)
    try:
        assert store.rejection_counts() == {"round_closed": 1}
    finally:
        store.close()
