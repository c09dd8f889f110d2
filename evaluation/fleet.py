"""The fleet runner: many logical edge agents in one process against the real aggregator.

Every device is a real :class:`~edge_agent.agent.EdgeAgent` with its own client id, MQTT
connection, data partition, token scores, residual and on-disk outbox; they share one frozen
base model (:class:`~edge_agent.shared_model.SharedBaseModel`). The aggregator is the real
service, stepped by this thread, and they talk through a real Mosquitto. Per round, each
selected device may drop out (:func:`~evaluation.fleet_wire.dropout_fate`); the runner skips the
idle wait for dropouts up to the deadline (:class:`~evaluation.fleet_wire.FleetClock`), then
evaluates the new global adapter and charges the round its simulated time: the FedScale way,
the slowest arrived device's download bytes over its downlink rate, measured compute time and
upload bytes over its uplink rate, plus the server's measured close time (and, for comparison
with older records, the same without the download).

One run of :func:`run_method` is one method from the same initial adapter, data split and
seeds; :func:`run_fleet` runs several methods and returns the run record (schema in
``evaluation/README.md``).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aggregator.round_result import RoundResult
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.local import LocalBroker
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.transport import Transport, Will
from edge_agent.agent import EdgeAgent
from edge_agent.settings import AgentSettings
from edge_agent.shared_model import SharedBaseModel
from evaluation.downlink import (
    FIRST_CONTACT,
    DeviceDownlink,
    Route,
    VersionsHeld,
    client_timings,
    tally,
)
from evaluation.fleet_config import METHODS, FleetConfig, compression_for, downlink_for
from evaluation.fleet_downlink import (
    Reported,
    agent_downlink,
    aggregator_downlink,
    downlink_settings,
)
from evaluation.fleet_wire import Fate, FleetClock, FleetWire, dropout_fate
from evaluation.links import DOWNLINK_ASYMMETRY, LinkProfile, lognormal_links, with_downlinks
from evaluation.quality import HeldOut, evaluate_adapter
from evaluation.round_time import round_time
from evaluation.run_record import (
    DeviceRound,
    FleetEval,
    FleetRound,
    FleetRun,
    MethodRun,
    RunConfig,
)
from fstq.adapter_state import get_adapter_state
from workload.data import FederatedSplit, federated_split, load_chatterbot
from workload.data import write_jsonl as write_pairs
from workload.models import load_base_model

__all__ = [
    "METHODS",
    "FleetConfig",
    "FleetError",
    "compression_for",
    "downlink_for",
    "run_fleet",
    "run_method",
]

log = logging.getLogger(__name__)

#: Threads torch trains with; CPU seconds / this = the wall time of the same work on idle cores.
_THREADS = max(1, torch.get_num_threads())


class FleetError(RuntimeError):
    """The fleet could not finish a run (a round made no progress within its wall limit)."""


@dataclass
class Fleet:
    """What every method of a run shares: broker, model, data, links, held-out set."""

    config: FleetConfig
    workdir: Path
    broker: LocalBroker
    shared: SharedBaseModel
    split: FederatedSplit
    held_out: HeldOut
    links: dict[str, LinkProfile]
    names: list[str]
    #: Size of one dense fp16 update of this LoRA (the budgets' and ratios' reference).
    dense_fp16_bytes: int

    @property
    def budget_bytes(self) -> int:
        return math.ceil(self.config.budget_fraction * self.dense_fp16_bytes)


def prepare(
    config: FleetConfig,
    workdir: Path,
    broker: LocalBroker,
    links: dict[str, LinkProfile] | None = None,
    downlink_asymmetry: float = DOWNLINK_ASYMMETRY,
) -> Fleet:
    """Load the model once, split the data (seeded), draw the links (a downlink for each: its
    own, else the uplink x ``downlink_asymmetry``), tokenise the held-out set."""
    rng = np.random.default_rng(config.seed)
    pairs = load_chatterbot(config.languages)
    split = federated_split(
        pairs, config.clients, config.alpha, rng, by=config.partition_by,
        max_per_client=config.examples_per_client, max_test=config.held_out,
    )  # fmt: skip
    names = [f"c{i:03d}" for i in range(config.clients)]
    if links is None:
        links = lognormal_links(
            names, np.random.default_rng([config.seed, 1]), median_mbps=config.link_median_mbps,
            sigma=config.link_sigma, lo_mbps=config.link_lo_mbps, hi_mbps=config.link_hi_mbps,
        )  # fmt: skip
    base, tokenizer = load_base_model(config.model, config.model_cache_dir)
    shared = SharedBaseModel(base, tokenizer)
    held_out = HeldOut.build(
        tokenizer, split.test, by=config.partition_by, max_len=config.max_len,
        generation_examples=config.generation_examples, rng=np.random.default_rng([config.seed, 2]),
    )  # fmt: skip
    model = shared.peft_model(config.lora, seed=config.seed)
    dense = 2 * sum(t.numel() for t in get_adapter_state(model).values())
    links = with_downlinks(links, downlink_asymmetry)
    return Fleet(config, workdir, broker, shared, split, held_out, links, names, dense)


def _fleet_id(label: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"eval-{label}-s{seed}")[:64]


def _aggregator_settings(fleet: Fleet, label: str, root: Path) -> AggregatorSettings:
    c = fleet.config
    return AggregatorSettings.model_validate(
        {
            "fleet": _fleet_id(label, c.seed),
            "state_dir": root / "aggregator",
            "model": c.model,
            "model_cache_dir": c.model_cache_dir,
            "mqtt": {"host": fleet.broker.host, "port": fleet.broker.port},
            "lora": {"r": c.lora_r, "alpha": c.lora_alpha, "target_modules": c.lora_targets},
            "init_seed": c.seed,
            "chunk_size": c.chunk_size,
            "rounds": {
                "clients_per_round": c.per_round,
                # Every device is up before round 1, so selection is uniform over the whole fleet.
                "min_clients": c.clients,
                "quorum": max(1, math.ceil(c.quorum_fraction * c.per_round)),
                # Deadlines are for dropouts only: the runner skips the idle wait (FleetClock).
                "round_timeout_s": 3600.0,
                "heartbeat_ttl_s": 1e9,
                "max_rounds": c.rounds,
                "selection_seed": c.seed,
            },
            "poll_s": 0.02,
            "health_interval_s": 60.0,
            **downlink_settings(label, fleet.dense_fp16_bytes),
        }
    )


def _agent_settings(
    fleet: Fleet, label: str, root: Path, index: int, budget_bytes: int
) -> AgentSettings:
    c, name = fleet.config, fleet.names[index]
    home = root / "devices" / name
    home.mkdir(parents=True, exist_ok=True)
    data = home / "data.jsonl"
    write_pairs(data, fleet.split.clients[index])
    training = {"steps": c.steps, "batch_size": c.batch_size, "max_len": c.max_len, "lr": c.lr}
    return AgentSettings.model_validate(
        {
            "client_id": name,
            "fleet": _fleet_id(label, c.seed),
            "data_path": data,
            "state_dir": home / "state",
            "model": c.model,
            "model_cache_dir": c.model_cache_dir,
            "mqtt": {"host": fleet.broker.host, "port": fleet.broker.port},
            "training": {**training, "seed": c.seed},
            "compression": compression_for(label, budget_bytes),
            "heartbeat_s": 30.0,
            "ack_timeout_s": 15.0,
            "fetch_timeout_s": 15.0,
            "broker_wait_s": 60.0,
        }
    )


class _Fates:
    """Each device's fate in each round: its link's availability, then the seeded dropout.

    With availability windows (a link trace), a device outside its windows at the simulated time
    the round starts ignores the round ("offline"); that time is known once the previous round is
    accounted, so until then the fate is None and the device's wire holds the announcement.
    """

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._windows = any(link.windows for link in fleet.links.values())
        self._starts: dict[int, float] = {1: 0.0}

    def started(self, round_id: int, sim_time_s: float) -> None:
        self._starts[round_id] = sim_time_s

    def __call__(self, index: int, round_id: int) -> Fate | None:
        c = self._fleet.config
        if self._windows:
            start = self._starts.get(round_id)
            if start is None:
                return None
            if not self._fleet.links[self._fleet.names[index]].available(start):
                return "offline"
        return dropout_fate(c.seed, round_id, index, c.dropout)


def _transport(index: int, fates: _Fates) -> Callable[[MqttSettings, Will], FleetWire]:
    def fate(round_id: int) -> Fate | None:
        return fates(index, round_id)

    def make(settings: MqttSettings, will: Will) -> FleetWire:
        return FleetWire(MqttClient(settings, will=will), fate)

    return make


def run_method(
    fleet: Fleet,
    label: str,
    *,
    on_round: Callable[[MethodRun], None] | None = None,
) -> MethodRun:
    """Run ``config.rounds`` rounds of method ``label``; returns its run-record entry.

    ``on_round`` gets the entry so far as each round ends (round 0 first: the initial adapter),
    so a caller can save a run that is still going.
    """
    c = fleet.config
    root = fleet.workdir / label
    shutil.rmtree(root, ignore_errors=True)
    clock = FleetClock()
    budget = fleet.budget_bytes
    rounds: list[FleetRound] = []
    held = VersionsHeld()

    def entry(skipped_wait_s: float | None = None) -> MethodRun:
        return MethodRun(
            method=METHODS[label]["method"],
            options={k: v for k, v in compression_for(label, budget).items() if k != "method"},
            budget_bytes=budget if METHODS[label].get("budgeted") else None,
            downlink=downlink_for(label, fleet.dense_fp16_bytes),
            dense_fp16_bytes=fleet.dense_fp16_bytes,
            rounds=tuple(rounds),
            skipped_wait_s=skipped_wait_s,
        )

    agg = Aggregator(_aggregator_settings(fleet, label, root), clock=clock)
    wires: dict[str, FleetWire] = {}
    agents: dict[str, EdgeAgent] = {}
    fates = _Fates(fleet)
    for i, name in enumerate(fleet.names):
        make = _transport(i, fates)

        def factory(
            settings: MqttSettings,
            will: Will,
            name: str = name,
            make: Callable[[MqttSettings, Will], FleetWire] = make,
        ) -> Transport:
            wire = wires[name] = make(settings, will)
            return wire

        agents[name] = EdgeAgent(
            _agent_settings(fleet, label, root, i, budget), transport_factory=factory,
            clock=clock, seed=c.seed * 100_003 + i, shared_model=fleet.shared,
        )  # fmt: skip
    stop = threading.Event()
    threads = [
        threading.Thread(target=a.run, args=(stop,), name=f"agent-{n}", daemon=True)
        for n, a in agents.items()
    ]
    agg.start()
    try:
        rounds.append(_initial_record(fleet, agg))
        if on_round is not None:
            on_round(entry())
        for t in threads:
            t.start()
        for rec in _drive(fleet, agg, agents, clock, fates):
            rnd = _round_entry(fleet, agg, rec, agents, wires, fates, held)
            rounds.append(rnd)
            fates.started(rnd.round + 1, sum(r.round_time_s for r in rounds))
            if on_round is not None:
                on_round(entry())
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        agg.close()
    return entry(skipped_wait_s=clock.skipped_s)


def _drive(
    fleet: Fleet, agg: Aggregator, agents: dict[str, EdgeAgent], clock: FleetClock, fates: _Fates
) -> Iterator[RoundResult]:
    """Step the aggregator until it is done; yield each round record as the round ends."""
    c = fleet.config
    index = {n: i for i, n in enumerate(fleet.names)}
    seen: object = None
    opened_wall = time.monotonic()
    open_id: int | None = None
    while not agg.finished:
        agg.step(0.02)
        rnd = agg.rounds.round
        if rnd is not None:
            if rnd.round_id != open_id:
                open_id, opened_wall = rnd.round_id, time.monotonic()
            state = rnd.state
            waiting = [
                n
                for n in state.selected - state.arrived
                if fates(index[n], state.round_id) in ("ok", None)
                and not _finished(agents[n], state.round_id)
            ]
            if not waiting and clock() < state.deadline:
                skipped = clock.advance_to(state.deadline + 0.001)
                log.info("round %d: only dropouts left; skipped %.0f s to the deadline",
                         state.round_id, skipped)  # fmt: skip
            if time.monotonic() - opened_wall > c.round_wall_limit_s:
                raise FleetError(
                    f"round {state.round_id} still open after {c.round_wall_limit_s:.0f} s "
                    f"(waiting for {sorted(waiting)})"
                )
        rec = agg.rounds.last_record
        if rec is not None and rec is not seen:
            seen = rec
            yield rec


def _finished(agent: EdgeAgent, round_id: int) -> bool:
    """The device is done with the round: its upload ended, or it gave the round up."""
    return round_id in agent.rounds_given_up or any(
        r.entry.round_id == round_id for r in agent.reports
    )


def _evaluate(fleet: Fleet, agg: Aggregator) -> FleetEval:
    c = fleet.config
    with fleet.shared.lock:
        model = fleet.shared.peft_model(c.lora, seed=c.seed)
        return evaluate_adapter(
            model, fleet.shared.tokenizer, agg.rounds.current.master, fleet.held_out,
            batch_size=c.eval_batch_size, max_new_tokens=c.max_new_tokens,
        )  # fmt: skip


def _initial_record(fleet: Fleet, agg: Aggregator) -> FleetRound:
    return FleetRound(
        round=0, status="initial", selected=(), arrived=(), dropped=(),
        uplink_wire_bytes=0, uplink_payload_bytes=0, uplink_resent_bytes=0,
        downlink_wire_bytes=0, clients=(), server_s=0.0, round_time_s=0.0,
        eval=_evaluate(fleet, agg),
    )  # fmt: skip


def _round_entry(
    fleet: Fleet,
    agg: Aggregator,
    rec: RoundResult,
    agents: dict[str, EdgeAgent],
    wires: dict[str, FleetWire],
    fates: _Fates,
    held: VersionsHeld,
) -> FleetRound:
    r = rec.round
    arrived = set(rec.arrived)
    # The round can close before the last arrived device has read its ack (and recorded the
    # upload as finished): give the acks a moment.
    give_up = time.monotonic() + 30.0
    while not all(_finished(agents[n], r) for n in arrived) and time.monotonic() < give_up:
        time.sleep(0.02)
    clients: list[DeviceRound] = []
    downlinks: dict[str, DeviceDownlink] = {}
    for name in rec.selected:
        fate = fates(fleet.names.index(name), r)
        device = _device_round(fleet, rec, name, agents[name], wires.get(name), fate, held)
        clients.append(device)
        route, staleness = device.downlink_route, device.staleness
        if route is not None and staleness is not None:
            downlinks[name] = DeviceDownlink(
                route, device.downlink_bytes or 0, staleness, bool(device.first_contact)
            )
    for name in downlinks:
        held.served(name, rec.base_version)
    timings = client_timings(clients, downlinks)
    return FleetRound(
        round=r,
        status=rec.status,
        base_version=rec.base_version,
        selected=rec.selected,
        arrived=rec.arrived,
        dropped=tuple(sorted(d.client for d in clients if d.dropped)),
        uplink_wire_bytes=rec.uplink_wire_bytes,
        uplink_payload_bytes=rec.uplink_payload_bytes,
        uplink_resent_bytes=rec.uplink_resent_bytes,
        device_upload_bytes=sum(d.wire_bytes for d in clients),
        downlink_wire_bytes=rec.downlink_wire_bytes,
        downlink=aggregator_downlink(rec) or tally(downlinks.values()),
        late=rec.late,
        rejected=rec.rejected,
        clients=tuple(clients),
        server_s=rec.close_s,
        round_time_s=round_time(timings, rec.close_s, downlink=False),
        round_time_with_downlink_s=round_time(timings, rec.close_s),
        eval=_evaluate(fleet, agg),
    )


def _device_round(
    fleet: Fleet,
    rec: RoundResult,
    name: str,
    agent: EdgeAgent,
    wire: FleetWire | None,
    fate: Fate | None,
    held: VersionsHeld,
) -> DeviceRound:
    """One selected device's row: its compute, both directions of its traffic, its fate."""
    r = rec.round
    # Timed by the agent (never sent): what the round of a finished upload took to compute.
    done = any(x.entry.round_id == r for x in agent.reports)
    took = agent.compute_times.get(r) if done else None
    link = fleet.links[name]
    upload = rec.clients.get(name)
    down_bytes = wire.downlink_bytes(r) if wire is not None else 0
    reported: Reported | None = None
    if fate not in ("silent", "offline"):  # it saw the round, so it had to hold version base
        reported = agent_downlink(agent, r)
        if reported is None:  # it gave the round up before training: what its wire saw
            staleness = held.staleness(name, rec.base_version)
            route: Route = "full" if down_bytes else "none"
            reported = Reported(route, staleness, staleness == FIRST_CONTACT, 0)
    return DeviceRound(
        client=name,
        # Contention-robust compute time: CPU seconds over the torch threads that share
        # them (the wall time, kept as measured_s, grows with whatever else runs here).
        compute_s=took.cpu_s / _THREADS if took is not None else None,
        measured_s=took.wall_s if took is not None else None,
        wire_bytes=wire.upload_bytes(r) if wire is not None else 0,
        payload_bytes=0 if upload is None else upload.bytes,
        rate_bps=link.uplink_bps,
        arrived=name in rec.arrived,
        # From the fate, not the wire: a halfway device may still be on its way to the
        # point where its link dies when the round closes without it.
        dropped=None if fate is None or fate == "ok" else fate,
        downlink_bytes=down_bytes,
        downlink_route=None if reported is None else reported.route,
        staleness=None if reported is None else reported.staleness,
        first_contact=None if reported is None else reported.first_contact,
        downlink_fallbacks=None if reported is None else reported.fallbacks,
        downlink_rate_bps=link.downlink_bps,
    )


def run_fleet(
    config: FleetConfig,
    methods: Sequence[str],
    workdir: Path,
    *,
    links: dict[str, LinkProfile] | None = None,
    downlink_asymmetry: float = DOWNLINK_ASYMMETRY,
    on_method: Callable[[str, FleetRun], None] | None = None,
    on_round: Callable[[str, FleetRun, FleetRound], None] | None = None,
) -> FleetRun:
    """Run every method in ``methods`` on one fleet (own Mosquitto); returns the run record.

    Devices whose link has no downlink rate get their uplink x ``downlink_asymmetry``.

    ``on_round`` (method, record so far, the round) as each round ends and ``on_method`` as each
    method ends get the record with every method run so far, the current one as far as it got.
    """
    for label in methods:
        compression_for(label, 1)  # unknown names fail before anything starts
    workdir.mkdir(parents=True, exist_ok=True)
    with LocalBroker("dev") as broker:
        fleet = prepare(config, workdir, broker, links, downlink_asymmetry)
        run_config = RunConfig.of(
            config, budget_bytes=fleet.budget_bytes, dense_fp16_bytes=fleet.dense_fp16_bytes,
            links={n: fleet.links[n].uplink_bps for n in fleet.names},
            downlink_asymmetry=downlink_asymmetry,
            downlinks={n: d for n in fleet.names if (d := fleet.links[n].downlink_bps)},
        )  # fmt: skip
        done: dict[str, MethodRun] = {}
        for label in methods:
            log.info("fleet: method %s", label)

            def progress(entry: MethodRun, label: str = label) -> None:
                if on_round is not None:
                    so_far = FleetRun(config=run_config, methods={**done, label: entry})
                    on_round(label, so_far, entry.rounds[-1])

            done[label] = run_method(fleet, label, on_round=progress)
            if on_method is not None:
                on_method(label, FleetRun(config=run_config, methods=dict(done)))
    return FleetRun(config=run_config, methods=done)
