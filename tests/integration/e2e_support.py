"""Helpers of the end-to-end tests: the real aggregator and real edge agents on one Mosquitto.

Each service runs in a daemon thread of the test process (``Services``), with its own stop
event; everything is stopped and joined with a hard timeout when the test ends. Transport
wrappers around the real ``broker.mqtt.MqttClient`` observe (and, for fault injection, cut or
hold) what crosses the wire, so the tests can check the services against what was really sent,
not against the services' own bookkeeping.

Nothing here imports another test directory's support module: the fleets are real, not fakes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import torch

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.codec import decode, peek_kind
from broker.errors import WireError
from broker.messages import UploadChunk, UploadManifest
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import UploadTopic, topic_as
from broker.transport import Completion, DelegatingTransport, Message, PublishHandle, Will
from edge_agent.agent import EdgeAgent
from edge_agent.outbox import Outbox, OutboxEntry
from edge_agent.settings import AgentSettings
from fstq.compressors import decompress
from workload.adapters import load_peft_dir
from workload.data import QAPair, federated_split, load_chatterbot, write_jsonl
from workload.models import load_base_model

__all__ = [
    "FAST_MQTT",
    "LORA",
    "AgentWire",
    "AggregatorWire",
    "Node",
    "OffsetClock",
    "Services",
    "agent_settings",
    "aggregator_settings",
    "client_data",
    "expected_global",
    "global_state",
    "outbox_upload",
    "read_rounds",
    "sha256_hex",
    "tiny_loader",
    "unique",
]

LORA: dict[str, Any] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
#: Every agent's (and the aggregator's) MQTT timers are short: a test waits seconds, not minutes.
FAST_MQTT: dict[str, Any] = {"backoff_base_s": 0.05, "backoff_max_s": 0.5, "keepalive_s": 10}

_ids = itertools.count()


def unique(prefix: str) -> str:
    """A fleet or device id unique to this run (the session broker keeps sessions/retained)."""
    return f"{prefix}{next(_ids)}-{time.monotonic_ns() % 10**8}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# -- model and data -------------------------------------------------------------------------


@functools.cache
def _tiny() -> tuple[torch.nn.Module, Any]:
    return load_base_model("tiny")


def tiny_loader() -> tuple[torch.nn.Module, Any]:
    """A fresh copy of the tiny base model (peft wraps in place) and the shared tokenizer."""
    base, tokenizer = _tiny()
    return copy.deepcopy(base), tokenizer


@functools.cache
def _chatterbot_split(n_clients: int, seed: int) -> tuple[tuple[QAPair, ...], ...]:
    split = federated_split(
        load_chatterbot(["english"]),
        n_clients,
        alpha=1.0,
        rng=np.random.default_rng(seed),
        by="category",
        max_test=8,
    )
    return tuple(tuple(c) for c in split.clients)


def client_data(sizes: Sequence[int], seed: int = 0) -> list[list[QAPair]]:
    """Real chatterbot-corpus pairs split non-IID over ``len(sizes)`` clients, cut to ``sizes``.

    Distinct sizes make distinct FedAvg weights (sample counts), so a wrong weighting shows.
    """
    parts = _chatterbot_split(len(sizes), seed)
    out = []
    for part, n in zip(parts, sizes, strict=True):
        assert len(part) >= n, f"the split gave a client only {len(part)} pairs, {n} wanted"
        out.append(list(part[:n]))
    return out


# -- settings -------------------------------------------------------------------------------


class Node(Protocol):
    """Where a client connects: a ``LocalBroker``, or anything with its ``host`` and ``port``
    (a node of a cluster set-up passes its full table, failover included, as ``mqtt=``)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


def aggregator_settings(
    broker: Node, fleet: str, state_dir: Path, **changes: Any
) -> AggregatorSettings:
    """Tiny model, LoRA r=4 on q/v, 3 clients per round, a long deadline, fast polling."""
    base: dict[str, Any] = {
        "fleet": fleet,
        "mqtt": {"host": broker.host, "port": broker.port, **FAST_MQTT},
        "state_dir": state_dir,
        "model": "tiny",
        "lora": LORA,
        "chunk_size": 1024,
        "rounds": {
            "clients_per_round": 3,
            "min_clients": 3,
            "round_timeout_s": 120.0,
            "heartbeat_ttl_s": 60.0,
            # fstq's minimal payload for 8 tensors is a few hundred bytes; ~3x below fp16.
            "budget_bytes": 1200,
        },
        "health_interval_s": 0.5,
        "poll_s": 0.05,
    }
    return AggregatorSettings(**_merge(base, changes))


def agent_settings(
    broker: Node,
    fleet: str,
    client_id: str,
    root: Path,
    pairs: Sequence[QAPair],
    **changes: Any,
) -> AgentSettings:
    """An agent with its own state dir and JSONL data under ``root`` (2 steps, batch 2)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    if not data.exists():
        write_jsonl(data, pairs)
    base: dict[str, Any] = {
        "client_id": client_id,
        "fleet": fleet,
        "mqtt": {"host": broker.host, "port": broker.port, **FAST_MQTT},
        "data_path": data,
        "state_dir": root / "state",
        "model": "tiny",
        "training": {"steps": 2, "batch_size": 2, "max_len": 32, "lr": 1e-3},
        "heartbeat_s": 0.5,
        "ack_timeout_s": 3.0,
        "fetch_timeout_s": 1.0,
        "ack_settle_s": 0.5,
        "will_delay_s": 2,
        "broker_wait_s": 10.0,
    }
    return AgentSettings(**_merge(base, changes))


class OffsetClock:
    """Wall time plus an offset a test may move forward (the aggregator's view of time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


# -- transport wrappers ---------------------------------------------------------------------


class AgentWire(DelegatingTransport):
    """An edge agent's real MQTT client, recording the upload messages it publishes.

    Fault injection:

    * ``cut_after=N``: once the broker has acknowledged the first N chunk publishes (so they
      did cross the link: paho would otherwise still hold them when the socket goes), the TCP
      link is dropped (``abort()``: no DISCONNECT, the will fires) and ``on_cut`` runs (the test
      stops the agent): the process is gone, nothing it publishes afterwards leaves the device.
    * ``hold``: upload publishes block until the event is set (a link that stalls); ``held`` is
      set when the first one blocks.
    """

    def __init__(
        self,
        settings: MqttSettings,
        will: Will,
        *,
        cut_after: int | None = None,
        on_cut: Callable[[], None] | None = None,
        hold: threading.Event | None = None,
    ) -> None:
        super().__init__(MqttClient(settings, will=will))
        self.cut_after, self.on_cut, self.hold = cut_after, on_cut, hold
        self.held = threading.Event()
        self.cut = False
        #: What went out (before any cut), in order: manifests, and chunks as (upload, index).
        self.manifests: list[UploadManifest] = []
        self.chunks: list[tuple[str, int]] = []
        self.chunk_data: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()

    def chunks_of(self, upload_id: str) -> list[int]:
        with self._lock:
            return [i for u, i in self.chunks if u == upload_id]

    def payload_of(self, upload_id: str) -> bytes:
        """The upload reassembled from the chunks this client published."""
        with self._lock:
            parts = self.chunk_data[upload_id]
        return b"".join(parts[i] for i in range(len(parts)))

    def send(self, message: Message) -> PublishHandle:
        upload = topic_as(message.topic, UploadTopic) is not None
        if upload and self.hold is not None and not self.hold.is_set():
            self.held.set()
            if not self.hold.wait(60):
                raise AssertionError("upload held for 60 s: the test never released it")
        if self.cut:  # the device is gone: nothing leaves it any more
            return PublishHandle(0, message.topic, len(message.payload), Completion())
        handle = super().send(message)
        if upload:
            self._record(message.payload, handle)
        return handle

    def _record(self, payload: bytes, handle: PublishHandle) -> None:
        kind = peek_kind(payload)
        if kind == "up.manifest":
            with self._lock:
                self.manifests.append(decode(payload, expect=UploadManifest))
            return
        if kind != "up.chunk":
            return
        chunk = decode(payload, expect=UploadChunk)
        with self._lock:
            self.chunks.append((chunk.upload_id, chunk.index))
            self.chunk_data.setdefault(chunk.upload_id, {})[chunk.index] = chunk.data
            n = len(self.chunks)
        if self.cut_after is not None and n >= self.cut_after:
            self.cut = True
            # PUBACKs come in order on one connection: the N-th means all N reached the broker.
            handle.wait(10.0)
            self.inner.abort()
            if self.on_cut is not None:
                self.on_cut()


class AggregatorWire(DelegatingTransport):
    """The aggregator's real MQTT client, recording every upload chunk it takes in."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(MqttClient(settings))
        #: (round, upload id, chunk index, monotonic time) of every chunk received, in order.
        self.chunks: list[tuple[int, str, int, float]] = []
        self._lock = threading.Lock()

    def receive(self, timeout: float | None = None) -> Message | None:
        msg = super().receive(timeout)
        if msg is not None and msg.payload and topic_as(msg.topic, UploadTopic) is not None:
            try:
                if peek_kind(msg.payload) == "up.chunk":
                    c = decode(msg.payload, expect=UploadChunk)
                    with self._lock:
                        self.chunks.append((c.round, c.upload_id, c.index, time.monotonic()))
            except WireError:  # hostile input is the aggregator's business, not ours
                pass
        return msg

    def received(self, *, upload_id: str | None = None, round_id: int | None = None) -> list[int]:
        """Chunk indices received (duplicates included), optionally of one upload or round."""
        with self._lock:
            return [
                i
                for r, u, i, _ in self.chunks
                if (upload_id is None or u == upload_id) and (round_id is None or r == round_id)
            ]

    def duplicates(self, round_id: int) -> int:
        """Chunks of ``round_id`` whose (upload, index) had arrived before."""
        seen: set[tuple[str, int]] = set()
        dup = 0
        with self._lock:
            for r, u, i, _ in self.chunks:
                if r == round_id:
                    dup += (u, i) in seen
                    seen.add((u, i))
        return dup

    def quiet_for(self, upload_id: str) -> float:
        """Seconds since the last chunk of ``upload_id`` arrived (inf if none did)."""
        with self._lock:
            times = [t for _, u, _, t in self.chunks if u == upload_id]
        return time.monotonic() - max(times) if times else float("inf")


# -- running the services -------------------------------------------------------------------


@dataclass
class Running:
    """One service thread: its stop event and what ``run`` returned or raised."""

    name: str
    thread: threading.Thread
    stop: threading.Event
    result: list[Any] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def outcome(self) -> Any:
        """``run``'s return value; re-raises what it raised."""
        assert self.done, f"{self.name} is still running"
        if self.error:
            raise self.error[0]
        return self.result[0]


class Services:
    """Runs services in daemon threads; ``with`` stops and joins them (hard timeout) on exit."""

    def __init__(self, join_timeout_s: float = 20.0) -> None:
        self._join_timeout_s = join_timeout_s
        self._runs: list[Running] = []
        self._cleanups: list[Callable[[], None]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for cleanup in self._cleanups:
            cleanup()
        for r in self._runs:
            r.stop.set()
        deadline = time.monotonic() + self._join_timeout_s
        for r in self._runs:
            r.thread.join(max(0.0, deadline - time.monotonic()))
        hung = [r.name for r in self._runs if r.thread.is_alive()]
        if hung and et is None:
            raise AssertionError(f"did not stop within {self._join_timeout_s}s: {hung}")

    def on_exit(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` before the stop events are set (e.g. release a held link)."""
        self._cleanups.append(cleanup)

    def start(self, name: str, run: Callable[[threading.Event], Any]) -> Running:
        """Call ``run(stop)`` in a daemon thread; what it returns or raises is kept."""
        stop = threading.Event()
        result: list[Any] = []
        error: list[BaseException] = []

        def main() -> None:
            try:
                result.append(run(stop))
            except BaseException as exc:  # re-raised in the test thread by outcome() / wait()
                error.append(exc)

        thread = threading.Thread(target=main, name=name, daemon=True)
        running = Running(name, thread, stop, result, error)
        self._runs.append(running)
        thread.start()
        return running

    def aggregator(self, agg: Aggregator, name: str = "aggregator") -> Running:
        """Serve ``agg``; ``run`` starts it unless the test already called ``start()``."""
        return self.start(name, agg.run)

    def agent(self, agent: EdgeAgent) -> Running:
        return self.start(agent.settings.client_id, agent.run)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``predicate``; fail early if a service thread died with an exception."""
        deadline = time.monotonic() + timeout
        while not predicate():
            for r in self._runs:
                if r.error:
                    cause = r.error[0]
                    raise AssertionError(f"{r.name} raised while waiting for {what}") from cause
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def join(self, *runs: Running, timeout: float = 30.0) -> None:
        names = ", ".join(r.name for r in runs)
        self.wait(lambda: all(r.done for r in runs), f"{names} to finish", timeout)


# -- independent checks ---------------------------------------------------------------------


def read_rounds(settings: AggregatorSettings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in settings.rounds_path.read_text().splitlines()]


def global_state(settings: AggregatorSettings, version: int) -> dict[str, torch.Tensor]:
    return load_peft_dir(settings.global_dir(version))


def outbox_upload(state_dir: Path, round_id: int) -> tuple[OutboxEntry, bytes]:
    """A device's outbox entry of ``round_id`` and its payload bytes (SHA-256 checked)."""
    outbox = Outbox(state_dir / "outbox")
    (entry,) = [e for e in outbox.entries() if e.round_id == round_id]
    return entry, outbox.payload(entry.upload_id)


def expected_global(
    previous: Mapping[str, torch.Tensor], uploads: Sequence[tuple[bytes, int]]
) -> dict[str, torch.Tensor]:
    """previous + sum_k n_k * delta_k / sum_k n_k over the decoded payloads (float64).

    Written out here rather than calling ``aggregator.fedavg``: the reference must not share
    code with what it checks (only the decoder, ``fstq.compressors.decompress``, is shared).
    """
    deltas = [decompress(payload) for payload, _ in uploads]
    weights = [float(n) for _, n in uploads]
    assert all(d.keys() == previous.keys() for d in deltas), "update names != global names"
    out = {}
    for name, t in previous.items():
        weighted = sum(w * d[name].double() for d, w in zip(deltas, weights, strict=True))
        out[name] = (t.double() + weighted / sum(weights)).float()
    return out
