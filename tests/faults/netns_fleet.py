"""A round of real services over a faulty link, and the bit-exact ledger of the reliability table.

Shared by the link-fault scenarios (the userspace relay of scenario 1, the lossy namespace of
the packet-loss run): ``run_fleet`` runs the real aggregator and real edge agents (tiny model,
dense fp32 updates so that uploads span many chunks) in threads until ``rounds`` rounds ended;
``audit`` then checks, without trusting the aggregator's bookkeeping, that every upload it
acknowledged is stored byte for byte as the device produced it (its outbox entry's SHA-256 and
the chunks its MQTT client published) and that each new global is the previous one + FedAvg of
exactly those payloads, and returns the numbers of the table row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from e2e_support import (
    AgentWire,
    AggregatorWire,
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    expected_global,
    global_state,
    read_rounds,
    sha256_hex,
    tiny_loader,
    unique,
)
from report import FaultRow

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.local import LocalBroker
from broker.settings import MqttSettings
from broker.transport import Transport, Will
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent

__all__ = ["Audit", "FleetRun", "audit", "run_fleet"]

SIZES = (8, 12, 16)  # local examples = FedAvg weights; distinct, so a wrong weighting shows
DENSE = {"method": "dense_fp32", "budget_mode": "fixed", "budget_bytes": 1 << 20}
ATOL = 1e-6


@dataclass
class FleetRun:
    settings: AggregatorSettings
    agents: list[EdgeAgent]
    wires: dict[str, list[AgentWire]]  # every MQTT client each agent made, in order
    agg_wire: AggregatorWire
    v0: dict[str, torch.Tensor]
    rounds: int


def run_fleet(
    broker: LocalBroker,
    root: Path,
    *,
    rounds: int,
    chunk_size: int,
    timeout_s: float,
    agent_mqtt: Mapping[str, Any] | None = None,
) -> FleetRun:
    """Run ``rounds`` rounds with one agent per entry of ``SIZES``; agents connect with
    ``agent_mqtt`` (e.g. a relay's address) where given. Every service must end cleanly."""
    fleet = unique("link")
    settings = aggregator_settings(
        broker, fleet, root / "agg", chunk_size=chunk_size, rounds={"max_rounds": rounds}
    )
    agg_wires: list[AggregatorWire] = []

    def agg_client(mqtt: MqttSettings) -> Transport:
        agg_wires.append(AggregatorWire(mqtt))
        return agg_wires[-1]

    agents: list[EdgeAgent] = []
    wires: dict[str, list[AgentWire]] = {}
    for i, pairs in enumerate(client_data(SIZES)):
        name = unique("dev")
        wires[name] = []

        def factory(mqtt: MqttSettings, will: Will, name: str = name) -> Transport:
            wires[name].append(AgentWire(mqtt, will))
            return wires[name][-1]

        s = agent_settings(
            broker, fleet, name, root / name, pairs, max_rounds=rounds, compression=DENSE,
            **({"mqtt": dict(agent_mqtt)} if agent_mqtt else {}),
        )  # fmt: skip
        agents.append(EdgeAgent(s, transport_factory=factory, seed=i))

    agg = Aggregator(settings, client_factory=agg_client, model_loader=tiny_loader)
    agg.start()  # here: global v0 is on disk and announced before the agents run
    (agg_wire,) = agg_wires
    v0 = global_state(settings, 0)
    with Services() as services:
        agg_run = services.aggregator(agg)
        runs = [services.agent(a) for a in agents]
        services.join(agg_run, *runs, timeout=timeout_s)
        assert agg_run.outcome() is None  # it stopped by itself: max_rounds reached
    assert [r.outcome() for r in runs] == [ExitCode.OK] * len(agents)
    return FleetRun(settings, agents, wires, agg_wire, v0, rounds)


@dataclass
class Audit:
    records: list[dict[str, Any]]
    stored: dict[tuple[int, str], tuple[bytes, int, str]]  # (round, client) -> payload, n, id
    acknowledged: int
    corrupted: int
    lost: int
    bytes_resent: int  # chunk payload bytes sent again (see ``_resent_bytes``)

    def row(self, scenario: str, notes: str) -> FaultRow:
        return FaultRow(
            scenario=scenario,
            rounds_completed=sum(r["status"] == "closed" for r in self.records),
            uploads_acknowledged=self.acknowledged,
            uploads_aggregated=len(self.stored),
            bytes_resent=self.bytes_resent,
            corrupted_aggregated=self.corrupted,
            acknowledged_lost=self.lost,
            notes=notes,
        )


def audit(run: FleetRun) -> Audit:
    """The checks of the module docstring; asserts the two must-be-zero columns are zero."""
    store = AggregatorStore(run.settings.db_path)
    try:
        stored = {
            (u.round_id, u.client_id): (u.payload, u.sample_count, u.upload_id)
            for k in range(1, run.rounds + 1)
            for u in store.accepted_uploads(k)
        }
    finally:
        store.close()
    acknowledged = corrupted = lost = 0
    for agent in run.agents:
        name = agent.settings.client_id
        assert [(r.entry.round_id, r.state) for r in agent.reports] == [
            (k, "complete") for k in range(1, run.rounds + 1)
        ]
        for report in agent.reports:
            acknowledged += 1
            entry = report.entry
            if (entry.round_id, name) not in stored:
                lost += 1
                continue
            payload, samples, upload_id = stored[(entry.round_id, name)]
            (wire,) = run.wires[name]
            published = wire.payload_of(upload_id)  # what its MQTT client really sent
            exact = (upload_id, samples) == (entry.upload_id, entry.sample_count) and (
                sha256_hex(payload) == entry.sha256 == sha256_hex(published)
            )
            corrupted += not exact
    assert corrupted == 0 and lost == 0, (corrupted, lost)

    previous = run.v0
    for k in range(1, run.rounds + 1):
        uploads = [(p, n) for (r, _), (p, n, _) in sorted(stored.items()) if r == k]
        got, want = global_state(run.settings, k), expected_global(previous, uploads)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
        previous = got
    resent = _resent_bytes(run)
    return Audit(read_rounds(run.settings), stored, acknowledged, corrupted, lost, resent)


def _resent_bytes(run: FleetRun) -> int:
    """Chunk payload bytes that left a device more than once: the application's re-sends
    (publishes of a chunk after its first) plus MQTT's (QoS 1 redelivery after a reconnect:
    copies the aggregator received beyond what the application published)."""
    received = Counter((u, i) for _, u, i, _ in run.agg_wire.chunks)
    total = 0
    for wires in run.wires.values():
        for wire in wires:
            for (upload_id, index), n in Counter(wire.chunks).items():
                again = (n - 1) + max(0, received[(upload_id, index)] - n)
                total += again * len(wire.chunk_data[upload_id][index])
    return total
