"""Broker benchmark: one round of chunk uploads through every broker set-up, same workload.

Run ``fedfstq bench brokers [--setups ...] [--json PATH]``. For each set-up of
``broker.local_setups`` (Mosquitto over MQTT 5 and 3.1.1, a 2-node ejabberd cluster, a 3-node
NATS JetStream cluster; private processes on free loopback ports, stopped by PID) ``--devices``
MQTT clients each publish one upload (its manifest and ``--chunks`` chunks of ``--chunk-size``
bytes, the real wire messages of ``broker.chunking``) at QoS 1, all at once, to one
aggregator-like subscriber. The devices sit where the matrix tests put them: ejabberd's other
node, NATS's nodes spread, so cluster traffic crosses nodes. A round is timed from the first
publish to the last chunk received; the table gives the median of ``--repeats`` rounds as MB/s
of chunk data and chunk messages per second. A set-up whose broker is not installed is listed as
skipped. Numbers: RELIABILITY.md ("Broker matrix").

Heavy imports (paho, pydantic) are lazy: ``fedfstq --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedfstq.option_types import comma_list, positive_int

if TYPE_CHECKING:
    from broker.local_setups import BrokerSetup
    from broker.transport import Transport

__all__ = [
    "BrokerBenchSpec",
    "BrokerResult",
    "add_arguments",
    "main",
    "markdown_table",
    "measure",
    "run_brokers_bench",
]

log = logging.getLogger(__name__)

#: broker.local_setups.SETUPS, repeated so that ``--help`` imports nothing heavy (a test ties them).
SETUP_NAMES = ("mosquitto-5", "mosquitto-311", "ejabberd-2", "nats-3")


@dataclass(frozen=True)
class BrokerBenchSpec:
    """The workload (the same on every set-up; written into the JSON)."""

    devices: int = 10
    chunks: int = 32
    chunk_size: int = 64 * 1024
    repeats: int = 5
    #: A round that has not fully arrived after this long is reported incomplete.
    round_timeout_s: float = 120.0


@dataclass
class BrokerResult:
    setup: str
    protocol: str = ""
    nodes: int = 0
    skipped: str = ""
    #: Chunk messages and chunk data bytes of one round.
    messages: int = 0
    chunk_bytes: int = 0
    #: Seconds of each measured round (first publish to last chunk received).
    seconds: list[float] = field(default_factory=list)
    #: Rounds that did not fully arrive within the timeout (chunks received / expected).
    incomplete: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.chunk_bytes / self.median_s / 1e6

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.median_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq bench brokers``."""
    d = BrokerBenchSpec()
    parser.add_argument(
        "--setups",
        type=comma_list(SETUP_NAMES, "set-up"),
        default=",".join(SETUP_NAMES),
        help="comma-separated set-ups to measure",
    )
    parser.add_argument("--devices", type=positive_int, default=d.devices, help="uploading clients")
    parser.add_argument("--chunks", type=positive_int, default=d.chunks, help="chunks per upload")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=d.chunk_size, help="chunk data bytes"
    )
    parser.add_argument("--repeats", type=positive_int, default=d.repeats, help="rounds measured")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the Markdown table, optionally write JSON; the exit code."""
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    spec = BrokerBenchSpec(args.devices, args.chunks, args.chunk_size, args.repeats)
    load = os.getloadavg()[0]  # the numbers move with the machine's other work: say how busy
    results = run_brokers_bench(names, spec)
    if args.json:
        doc = {"spec": asdict(spec), "load_average_at_start": load,
               "results": [asdict(r) for r in results]}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(results, spec, load))
    return 0


def run_brokers_bench(names: Sequence[str], spec: BrokerBenchSpec) -> list[BrokerResult]:
    """Start each set-up in turn (its processes stopped when done) and measure it."""
    from broker.local_setups import missing, start_setup

    results = []
    for name in names:
        reason = missing(name)
        if reason is not None:
            results.append(BrokerResult(name, skipped=reason))
            continue
        with start_setup(name) as setup:  # own temp directory, removed after a clean stop
            results.append(measure(setup, spec))
    return results


def measure(setup: BrokerSetup, spec: BrokerBenchSpec) -> BrokerResult:
    """``spec.repeats`` rounds of uploads on a started set-up."""
    import secrets

    from broker.chunking import upload_messages
    from broker.codec import encode, peek_kind
    from broker.mqtt import MqttClient
    from broker.topics import upload_filter, upload_topic

    fleet = f"bench-{secrets.token_hex(4)}"
    fast = {"backoff_base_s": 0.05, "backoff_max_s": 0.5}
    result = BrokerResult(setup.name, setup.protocol, len(setup.endpoints))
    result.messages = spec.devices * spec.chunks
    result.chunk_bytes = result.messages * spec.chunk_size
    sink = MqttClient(setup.settings(f"{fleet}-agg", node=0, **fast))
    devices = [
        MqttClient(setup.settings(f"{fleet}-d{i}", node=_device_node(setup, i), **fast))
        for i in range(spec.devices)
    ]
    clients = [sink, *devices]
    try:
        for c in clients:
            c.connect(timeout=30)
        sink.subscribe(upload_filter(fleet))
        for r in range(1, spec.repeats + 1):
            rounds: list[list[bytes]] = []
            for i in range(spec.devices):
                payload = secrets.token_bytes(spec.chunks * spec.chunk_size)
                manifest, chunks = upload_messages(
                    payload, upload_id=f"u{r}-{i}", round_id=r, client=f"d{i}", base_version=0,
                    sample_count=1, method="dense_fp32", chunk_size=spec.chunk_size,
                )  # fmt: skip
                rounds.append([encode(manifest), *(encode(c) for c in chunks)])
            started = time.monotonic()
            threads = [
                threading.Thread(
                    target=_publish_all, args=(d, upload_topic(fleet, f"d{i}", r), msgs)
                )
                for i, (d, msgs) in enumerate(zip(devices, rounds, strict=True))
            ]
            for t in threads:
                t.start()
            got, deadline = 0, started + spec.round_timeout_s
            while got < result.messages and time.monotonic() < deadline:
                msg = sink.receive(timeout=max(0.0, deadline - time.monotonic()))
                if msg is not None and msg.payload and peek_kind(msg.payload) == "up.chunk":
                    got += 1
            elapsed = time.monotonic() - started
            for t in threads:
                t.join()
            if got < result.messages:
                result.incomplete.append(f"round {r}: {got}/{result.messages}")
            else:
                result.seconds.append(elapsed)
            log.info("%s round %d: %d chunks in %.3f s", setup.name, r, got, elapsed)
    finally:
        for c in clients:
            c.close()
    return result


def _device_node(setup: BrokerSetup, i: int) -> int:
    """Where the matrix tests put device ``i``: ejabberd's other node, NATS's nodes spread."""
    return 1 if setup.name.startswith("ejabberd") else setup.node_of(i + 1)


def _publish_all(client: Transport, topic: str, messages: list[bytes]) -> None:
    for m in messages:
        client.publish(topic, m)  # paho queues beyond max_inflight; nothing waits here


def markdown_table(
    results: Sequence[BrokerResult], spec: BrokerBenchSpec, load: float | None = None
) -> str:
    busy = "" if load is None else f"; load average {load:.1f} at start"
    head = (
        f"One round: {spec.devices} devices x {spec.chunks} chunks of {spec.chunk_size} B "
        f"(QoS 1), median of {spec.repeats} rounds{busy}.\n\n"
        "| set-up | MQTT | nodes | chunks | MiB | s | MB/s | chunks/s | notes |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.setup} | | | | | | | | skipped: {r.skipped} |")
            continue
        note = "; ".join(f"incomplete {x}" for x in r.incomplete)
        if not r.seconds:
            rows.append(f"| {r.setup} | {r.protocol} | {r.nodes} | {r.messages} | | | | | {note} |")
            continue
        rows.append(
            f"| {r.setup} | {r.protocol} | {r.nodes} | {r.messages} | "
            f"{r.chunk_bytes / 2**20:.1f} | {r.median_s:.3f} | {r.mb_per_s:.1f} | "
            f"{r.messages_per_s:.0f} | {note} |"
        )
    return "\n".join(rows)
