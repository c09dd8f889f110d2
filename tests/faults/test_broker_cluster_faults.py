"""A broker node SIGKILLed mid-round: ejabberd-2 and nats-3, real services in threads.

The aggregator connects to node 1 (its session lives there) with the other nodes as
``mqtt.failover``; on ejabberd every device is on node 2, on NATS the devices are spread over
nodes 2, 3 and 1. Round 1 runs until one device (on a surviving node) has sent ``HOLD_AT`` of
its chunks and the aggregator has taken them in; that device then stalls, node 1 is killed by
PID, and the device is let go at once, so its remaining chunks leave while the aggregator is
still failing over. What the dead node held is gone on ejabberd (the aggregator's session and
anything queued in it); NATS keeps sessions and queues on its three replicas.

The promise is checked from the devices' side: every upload a device saw acknowledged
``complete`` is in the aggregator's store, bit-exactly the bytes that device published (its
declared SHA-256), both rounds close with every device, and each global is the previous one plus
FedAvg of exactly the stored uploads. Re-sent bytes (chunks a device published more than once,
after the aggregator's have-bitmap said they were missing) go to the reliability table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    FAST_MQTT,
    AgentWire,
    AggregatorWire,
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    read_rounds,
    sha256_hex,
    tiny_loader,
    unique,
)
from process_support import check_globals
from report import FaultRow

from aggregator.service import Aggregator
from aggregator.store import AggregatorStore
from broker.codec import peek_kind
from broker.local_setups import BrokerSetup, missing, start_setup
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import UploadTopic, topic_as
from broker.transport import Message, PublishHandle, Transport, Will
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent

pytestmark = [pytest.mark.slow, pytest.mark.broker]

SIZES = (8, 12, 16)
#: Dense fp32 of the tiny adapter (~7.3 KB) in 256-byte chunks: about 29 chunks per upload.
DENSE: dict[str, Any] = {"method": "dense_fp32", "budget_mode": "fixed", "budget_bytes": 1 << 20}
CHUNK = 256
#: Chunks of the held device's round-1 upload the aggregator takes in before the kill.
HOLD_AT = 8
#: The device that stalls before the kill (never on the killed node 1).
HELD = 0

Report = Callable[[FaultRow], None]


class HoldingWire(AgentWire):
    """An agent's wire whose chunk publishes block, after ``after`` of them, until ``gate``."""

    def __init__(self, settings: MqttSettings, will: Will, after: int, gate: threading.Event):
        super().__init__(settings, will)
        self.after, self.gate = after, gate
        self.waiting = threading.Event()

    def send(self, message: Message) -> PublishHandle:
        chunk = topic_as(message.topic, UploadTopic) is not None and (
            message.payload and peek_kind(message.payload) == "up.chunk"
        )
        if chunk and not self.gate.is_set() and len(self.chunks) >= self.after:
            self.waiting.set()
            if not self.gate.wait(60):
                raise AssertionError("chunks held for 60 s: the test never released them")
        return super().send(message)


@dataclass(frozen=True)
class At:
    """A node's address (the full ``[mqtt]`` table, failover included, goes in as ``mqtt=``)."""

    host: str
    port: int


def device_node(setup: BrokerSetup, i: int) -> int:
    return 1 if setup.name.startswith("ejabberd") else setup.node_of(i + 1)


def resent_bytes(wire: AgentWire) -> int:
    """Chunk bytes this device published more than once (all uploads)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for upload_id, index in list(wire.chunks):
        if (upload_id, index) in seen:
            total += len(wire.chunk_data[upload_id][index])
        seen.add((upload_id, index))
    return total


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["ejabberd-2", "nats-3"])
def test_broker_node_killed_mid_round(name: str, tmp_path: Path, fault_report: Report) -> None:
    reason = missing(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    with start_setup(name, tmp_path / "broker") as setup:
        run_kill_scenario(setup, tmp_path, fault_report)


def run_kill_scenario(setup: BrokerSetup, root: Path, fault_report: Report) -> None:
    # Arrange
    fleet = unique("kill")
    settings = aggregator_settings(
        At(*setup.endpoints[0]), fleet, root / "agg",
        mqtt=setup.mqtt(0, **FAST_MQTT), chunk_size=CHUNK, rounds={"max_rounds": 2},
    )  # fmt: skip
    agg_wires: list[AggregatorWire] = []

    def agg_client(mqtt: MqttSettings) -> Transport:
        agg_wires.append(AggregatorWire(mqtt))
        return agg_wires[-1]

    gate = threading.Event()
    wires: dict[int, AgentWire] = {}
    agents = []
    for i, pairs in enumerate(client_data(SIZES)):
        node = device_node(setup, i)
        dev = unique("dev")

        def transport(mqtt: MqttSettings, will: Will, i: int = i) -> Transport:
            wire = HoldingWire(mqtt, will, HOLD_AT, gate) if i == HELD else AgentWire(mqtt, will)
            wires[i] = wire
            return wire

        s = agent_settings(
            At(*setup.endpoints[node]), fleet, dev, root / dev, pairs, compression=DENSE,
            mqtt=setup.mqtt(node, **FAST_MQTT), max_rounds=2,
        )  # fmt: skip
        agents.append(EdgeAgent(s, transport_factory=transport, seed=i))
    assert device_node(setup, HELD) != 0

    # Act: round 1 until the held device has HOLD_AT chunks at the aggregator, then kill node 1.
    agg = Aggregator(settings, client_factory=agg_client, model_loader=tiny_loader)
    agg.start()
    (agg_wire,) = agg_wires
    with Services() as services:
        services.on_exit(gate.set)
        agg_run = services.aggregator(agg)
        runs = [services.agent(a) for a in agents]
        services.wait(lambda: HELD in wires, "the held device's MQTT client")
        held = wires[HELD]
        assert isinstance(held, HoldingWire)
        services.wait(held.waiting.is_set, f"{HOLD_AT} chunks sent by the held device", 60)
        upload_id = held.chunks[0][0]
        services.wait(
            lambda: len(set(agg_wire.received(upload_id=upload_id))) >= HOLD_AT,
            f"{HOLD_AT} chunks of the held upload at the aggregator",
            30,
        )
        setup.kill_node(0)
        gate.set()
        services.join(agg_run, *runs, timeout=150)
        assert agg_run.outcome() is None
    assert [r.outcome() for r in runs] == [ExitCode.OK] * len(agents)

    # Assert: the aggregator failed over and both rounds closed with every device.
    client = agg_wire.inner
    assert isinstance(client, MqttClient) and client.endpoint != setup.endpoints[0]
    records = read_rounds(settings)
    names = sorted(a.settings.client_id for a in agents)
    assert [(r["round"], r["status"], r["arrived"]) for r in records] == [
        (1, "closed", names),
        (2, "closed", names),
    ]
    # Every upload a device saw acknowledged is stored, bit-exactly what it published.
    store = AggregatorStore(settings.db_path)
    try:
        stored = {k: list(store.accepted_uploads(k)) for k in (1, 2)}
    finally:
        store.close()
    by_id = {u.upload_id: u for ups in stored.values() for u in ups}
    acked = [(i, r.entry) for i, a in enumerate(agents) for r in a.reports if r.state == "complete"]
    lost = [e.upload_id for _, e in acked if e.upload_id not in by_id]
    corrupted = []
    for i, e in acked:
        u = by_id.get(e.upload_id)
        published = wires[i].payload_of(e.upload_id)
        same = u is not None and sha256_hex(u.payload) == u.sha256 == e.sha256
        if u is not None and not (same and sha256_hex(published) == e.sha256):
            corrupted.append(e.upload_id)
    node_now = setup.endpoints.index(client.endpoint) + 1
    resent = sum(resent_bytes(w) for w in wires.values())
    fault_report(
        FaultRow(
            scenario=f"broker node killed mid-round ({setup.name})",
            rounds_completed=len(records),
            uploads_acknowledged=len(acked),
            uploads_aggregated=len(by_id),
            bytes_resent=resent,
            corrupted_aggregated=len(corrupted),
            acknowledged_lost=len(lost),
            notes=f"node 1 killed; aggregator failed over to node {node_now}",
        )
    )
    assert lost == [] and corrupted == []
    assert len(acked) == len(by_id) == 2 * len(agents)
    check_globals(settings, stored)
