"""Helpers of the edge-agent tests: a fake aggregator and agent settings for the tiny model.

The fake aggregator speaks the protocol with ``broker/`` (MqttClient, Inbox, chunking) and
``workload/`` helpers only (no aggregator package), so these tests pin the agent to the wire
contract. It runs in a thread and records everything it sees; knobs inject faults.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from broker.chunking import chunks_for_fetch, global_manifest, plan_messages
from broker.codec import decode, encode
from broker.errors import UnknownUploadError
from broker.inbox import Inbox, UploadKey
from broker.local import LocalBroker
from broker.messages import (
    AckStatus,
    ClientStatus,
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    RoundAnnouncement,
    UploadAck,
    UploadChunk,
    UploadManifest,
)
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import (
    FetchTopic,
    StatusTopic,
    UploadTopic,
    ack_topic,
    aggregator_filters,
    down_topic,
    global_manifest_topic,
    parse_topic,
    round_topic,
)
from edge_agent.agent import EdgeAgent
from edge_agent.settings import AgentSettings
from fstq.training import get_adapter_state
from workload.adapters import adapter_to_bytes
from workload.data import QAPair, write_jsonl
from workload.models import LoraSpec, load_base_model, make_peft_model

_ids = itertools.count()

LORA = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
GLOBAL_CHUNK = 1024  # the tiny adapter (4.6 KB in fp16) travels in 5 chunks
UPLOAD_CHUNK = 256
BUDGET = 1200  # bytes: about 5 upload chunks

PAIRS = [
    QAPair("What is the capital of France?", "Paris."),
    QAPair("How many legs does a spider have?", "Eight."),
    QAPair("What colour is the sky?", "Blue, on a clear day."),
    QAPair("Who wrote Hamlet?", "William Shakespeare."),
    QAPair("What is two plus two?", "Four."),
    QAPair("What do bees make?", "Honey."),
]


def unique(prefix: str) -> str:
    """Fleet or client id unique to this test run (the broker session outlives a test)."""
    return f"{prefix}{next(_ids)}-{time.monotonic_ns() % 10**8}"


@functools.cache
def global_adapter_bytes() -> bytes:
    """Version 0 of the global adapter: a fresh tiny LoRA as fp16 safetensors bytes."""
    base, _ = load_base_model("tiny")
    state = get_adapter_state(make_peft_model(base, LORA, seed=0))
    return adapter_to_bytes(state, dtype=torch.float16)


def run_agent(agent: EdgeAgent, stop: threading.Event | None = None, limit: float = 60) -> int:
    """Run in this thread; a watchdog stops it (and fails the test) if it hangs."""
    stop = stop or threading.Event()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stop.set()

    timer = threading.Timer(limit, expire)
    timer.start()
    try:
        code = agent.run(stop)
    finally:
        timer.cancel()
    assert not expired.is_set(), f"agent still running after {limit}s"
    return code


def agent_settings(
    broker: LocalBroker, fleet: str, client_id: str, tmp_path: Path, **changes: Any
) -> AgentSettings:
    """Fast-timer settings for the tiny model (a round trains in about a second)."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_jsonl(data, PAIRS)
    base: dict[str, Any] = {
        "client_id": client_id,
        "fleet": fleet,
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.5,
            "keepalive_s": 10,
        },
        "data_path": data,
        "state_dir": tmp_path / "state",
        "model": "tiny",
        "training": {"steps": 3, "batch_size": 2, "max_len": 48},
        "heartbeat_s": 0.5,
        "ack_timeout_s": 1.0,
        "fetch_timeout_s": 0.5,
        "ack_settle_s": 0.2,
        "will_delay_s": 1,
        "broker_wait_s": 10.0,
    }
    return AgentSettings(**(base | changes))


Served = tuple[DownlinkPlan, tuple[GlobalChunk, ...]]


def full_plan(payload: bytes, version: int = 0) -> Served:
    """The full-adapter plan of ``payload`` (its plan id: a hash of the payload)."""
    sha = hashlib.sha256(payload).digest()
    return plan_messages(
        payload, version=version, route=DownlinkRoute.FULL, plan=hashlib.sha256(b"full" + sha)
        .digest(), base=None, result=sha, chunk_size=GLOBAL_CHUNK,
    )  # fmt: skip


@dataclass
class Faults:
    """What the fake aggregator does wrong (each at most once per index)."""

    drop_fetch_chunks: set[int] = field(default_factory=set)
    drop_upload_chunks: set[int] = field(default_factory=set)
    unknown_first_manifest: bool = False
    reject_reason: str | None = None
    #: Answers to the first plan requests, in order (then the full adapter's plan); each may be
    #: preceded by messages sent on the device's downlink first (replays, foreign plans...).
    plans: list[tuple[Served, tuple[DownlinkPlan | GlobalChunk, ...]]] = field(default_factory=list)
    #: Sent on the device's downlink before the answer to the first chunk request.
    before_chunks: list[DownlinkPlan | GlobalChunk] = field(default_factory=list)


class FakeAggregator:
    """Publishes a global adapter and rounds, answers fetches, reassembles uploads, acks."""

    def __init__(self, broker: LocalBroker, fleet: str, faults: Faults | None = None) -> None:
        self.fleet = fleet
        self.faults = faults or Faults()
        settings = MqttSettings(
            host=broker.host, port=broker.port, client_id=f"agg-{fleet}"[:64], keepalive_s=10
        )
        self.client = MqttClient(settings)
        self.inbox = Inbox()
        self.publish_global(global_adapter_bytes(), version=0)
        # What it saw, in order (read by the tests).
        self.fetches: list[FetchRequest] = []
        self.manifests: list[UploadManifest] = []
        self.chunk_log: list[int] = []
        self.statuses: list[ClientStatus] = []
        self.completed: list[tuple[UploadManifest, bytes]] = []
        self.on_complete: Callable[[UploadManifest], None] | None = None
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-aggregator", daemon=True)
        self._unknown_sent = False

    def publish_global(
        self, payload: bytes, version: int, metadata: dict[str, str | int] | None = None
    ) -> None:
        """Make ``payload`` the global adapter ``version`` (retained once connected)."""
        self.manifest = global_manifest(
            payload,
            version=version,
            round_id=version,
            format="safetensors-fp16",
            chunk_size=GLOBAL_CHUNK,
            metadata={
                "lora_r": LORA.r,
                "lora_alpha": LORA.alpha,
                "lora_targets": ",".join(LORA.target_modules),
                "base_model": "tiny",
                **(metadata or {}),
            },
        )
        self.full = full_plan(payload, version)
        self.plans: dict[bytes, Served] = {self.full[0].plan: self.full}

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeAggregator:
        self.client.connect(timeout=10)
        for f in aggregator_filters(self.fleet):
            self.client.subscribe(f)
        self.client.publish_wait(
            global_manifest_topic(self.fleet), encode(self.manifest), retain=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for topic in (round_topic(self.fleet), global_manifest_topic(self.fleet)):
            self.client.publish_wait(topic, b"", retain=True)  # leave no retained state
        self.client.close()

    def republish(self) -> None:
        """Publish the (new) global manifest, retained."""
        self.client.publish_wait(
            global_manifest_topic(self.fleet), encode(self.manifest), retain=True
        )

    def announce(
        self,
        round_id: int,
        selected: tuple[str, ...],
        *,
        deadline_in: float = 60.0,
        budget: int = BUDGET,
    ) -> RoundAnnouncement:
        ann = RoundAnnouncement(
            fleet=self.fleet,
            round=round_id,
            global_version=self.manifest.version,
            global_sha256=self.manifest.sha256,
            selected=selected,
            deadline=time.time() + deadline_in,
            quorum=1,
            upload_window_s=30.0,
            chunk_size=UPLOAD_CHUNK,
            budget_bytes={c: budget for c in selected},
        )
        self.client.publish_wait(round_topic(self.fleet), encode(ann), retain=True)
        return ann

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        with self._lock:
            if not self._lock.wait_for(predicate, timeout):
                raise AssertionError(f"condition not met within {timeout}s")

    def states(self, client: str) -> list[str]:
        with self._lock:
            return [s.state.value for s in self.statuses if s.client == client]

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.client.receive(timeout=0.05)
            if msg is None or not msg.payload:
                continue
            topic = parse_topic(msg.topic)
            with self._lock:
                if isinstance(topic, FetchTopic):
                    self._on_fetch(topic.client, decode(msg.payload, expect=FetchRequest))
                elif isinstance(topic, StatusTopic):
                    self.statuses.append(decode(msg.payload, expect=ClientStatus))
                elif isinstance(topic, UploadTopic):
                    self._on_upload(topic.client, decode(msg.payload))
                self._lock.notify_all()

    def _on_fetch(self, client: str, request: FetchRequest) -> None:
        self.fetches.append(request)
        down = down_topic(self.fleet, client)
        if request.plan is None:  # how do I get there? the next scripted answer, else full
            served, before = self.faults.plans.pop(0) if self.faults.plans else (self.full, ())
            self.plans[served[0].plan] = served
            for msg in before:
                self._send(down, msg)
            self._send(down, served[0])
            return
        plan, chunks = self.plans[request.plan]
        while self.faults.before_chunks:
            self._send(down, self.faults.before_chunks.pop(0))
        for chunk in chunks_for_fetch(plan, chunks, request):
            if chunk.index in self.faults.drop_fetch_chunks:
                self.faults.drop_fetch_chunks.discard(chunk.index)
                continue
            self._send(down, chunk)

    def _on_upload(self, client: str, msg: object) -> None:
        f = self.faults
        if isinstance(msg, UploadManifest):
            self.manifests.append(msg)
            if f.unknown_first_manifest and not self._unknown_sent:
                self._unknown_sent = True  # as if it had restarted and lost the upload
                self._ack(client, self._unknown(msg.upload_id, msg.round))
                return
            ack = self.inbox.open(msg, now=time.time())
            if f.reject_reason is not None:
                key = UploadKey.of(msg)
                self.inbox.drop(key, AckStatus.REJECTED, f.reject_reason)
                ack = self.inbox.ack(key)
            self._ack(client, ack)
        elif isinstance(msg, UploadChunk):
            self.chunk_log.append(msg.index)
            if msg.index in f.drop_upload_chunks:
                f.drop_upload_chunks.discard(msg.index)
                return
            try:
                result = self.inbox.add(msg, now=time.time())
            except UnknownUploadError:
                self._ack(client, self._unknown(msg.upload_id, msg.round))
                return
            if result.completed is not None:
                done = result.completed
                self.completed.append((done.manifest, done.payload))
                self._ack(client, self.inbox.ack(result.key))
                if self.on_complete is not None:
                    self.on_complete(done.manifest)

    @staticmethod
    def _unknown(upload_id: str, round_id: int) -> UploadAck:
        return UploadAck(
            upload_id=upload_id, round=round_id, status=AckStatus.UNKNOWN, chunk_count=0, have=b""
        )

    def _ack(self, client: str, ack: UploadAck) -> None:
        self._send(ack_topic(self.fleet, client), ack)

    def _send(self, topic: str, msg: UploadAck | DownlinkPlan | GlobalChunk) -> None:
        self.client.publish(topic, encode(msg), expiry_s=120)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
