"""Helpers of the aggregator service tests: a fake clock, fake devices, running the service.

Fake devices speak the protocol with ``broker.mqtt.MqttClient`` and ``broker.chunking`` only (no
edge_agent), so these tests pin the aggregator to the wire contract.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from aggregator.adapter_model import ModelLoader
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.chunking import bitmap_from_indices, upload_messages
from broker.codec import decode, encode
from broker.local import LocalBroker
from broker.messages import (
    AckStatus,
    ClientState,
    ClientStatus,
    DownlinkPlan,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
    UploadAck,
    UploadChunk,
    UploadManifest,
    WireMessage,
)
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import device_filters, fetch_topic, status_topic, upload_topic
from broker.transport import Message
from fstq.compressors import make_compressor
from workload.adapters import load_peft_dir

_counter = itertools.count()

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


class FakeClock:
    """Unix-like time that only moves when a test says so."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


@contextlib.contextmanager
def running(
    settings: AggregatorSettings, loader: ModelLoader, clock: Callable[[], float] = time.time
) -> Iterator[Aggregator]:
    """An aggregator serving in a background thread; stopped (cleanly) on exit."""
    agg = Aggregator(settings, clock=clock, model_loader=loader)
    agg.start()
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), name="aggregator", daemon=True)
    thread.start()
    try:
        yield agg
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "aggregator did not stop"


class Device:
    """A fake edge device: subscribes like one, uploads raw protocol messages, records replies."""

    def __init__(self, broker: LocalBroker, fleet: str, name: str) -> None:
        self.fleet, self.name = fleet, name
        settings = MqttSettings(
            host=broker.host, port=broker.port, client_id=f"{fleet[:40]}-{name}", clean_start=True
        )
        self.client = MqttClient(settings)
        self.client.connect()
        for topic_filter in device_filters(fleet, name):
            self.client.subscribe(topic_filter)
        self.seen: list[tuple[str, WireMessage]] = []

    def close(self) -> None:
        self.client.close()

    # -- sending -----------------------------------------------------------------------------

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish_wait(topic, payload, timeout=10)

    def online(self) -> None:
        status = ClientStatus(client=self.name, state=ClientState.ONLINE, timestamp=time.time())
        self.send(status_topic(self.fleet, self.name), encode(status))

    def upload_topic(self, round_id: int) -> str:
        return upload_topic(self.fleet, self.name, round_id)

    def prepare(
        self,
        payload: bytes,
        *,
        round_id: int,
        base_version: int = 0,
        samples: int = 10,
        upload_id: str | None = None,
        chunk_size: int = 1024,
        method: str = "dense_fp32",
    ) -> tuple[UploadManifest, tuple[UploadChunk, ...]]:
        return upload_messages(
            payload,
            upload_id=upload_id or f"{self.name}-r{round_id}-{next(_counter)}",
            round_id=round_id,
            client=self.name,
            base_version=base_version,
            sample_count=samples,
            method=method,
            chunk_size=chunk_size,
        )

    def send_upload(
        self, manifest: UploadManifest, chunks: Sequence[UploadChunk], *, dup: int | None = None
    ) -> None:
        topic = self.upload_topic(manifest.round)
        self.send(topic, encode(manifest))
        for c in chunks:
            self.send(topic, encode(c))
        if dup is not None:  # QoS 1 is at-least-once: the same chunk again
            self.send(topic, encode(chunks[dup]))

    # -- receiving ---------------------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[str, WireMessage], bool], timeout: float = 20.0
    ) -> WireMessage:
        """The first message (already seen or arriving within ``timeout``) matching."""
        for topic, msg in self.seen:
            if predicate(topic, msg):
                return msg
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            raw: Message | None = self.client.receive(min(left, 0.5))
            if raw is None:
                continue
            msg = decode(raw.payload) if raw.payload else None
            if msg is None:
                continue
            self.seen.append((raw.topic, msg))
            if predicate(raw.topic, msg):
                return msg
        raise AssertionError(f"{self.name}: no matching message within {timeout}s")

    def ack(
        self, upload_id: str, status: AckStatus | None = None, timeout: float = 20
    ) -> UploadAck:
        def match(_: str, m: WireMessage) -> bool:
            return (
                isinstance(m, UploadAck)
                and m.upload_id == upload_id
                and (status is None or m.status is status)
            )

        msg = self.wait_for(match, timeout)
        assert isinstance(msg, UploadAck)
        return msg

    def announcement(self, round_id: int, timeout: float = 20) -> RoundAnnouncement:
        msg = self.wait_for(
            lambda _, m: isinstance(m, RoundAnnouncement) and m.round == round_id, timeout
        )
        assert isinstance(msg, RoundAnnouncement)
        return msg

    def global_manifest(self, version: int, timeout: float = 20) -> GlobalManifest:
        msg = self.wait_for(
            lambda _, m: isinstance(m, GlobalManifest) and m.version == version, timeout
        )
        assert isinstance(msg, GlobalManifest)
        return msg

    # -- the downlink ------------------------------------------------------------------------

    def fetch_plan(self, version: int, held: bytes | None = None) -> DownlinkPlan:
        """Ask how to get ``version`` holding ``held``; the plan that answers."""
        self.seen = [(t, m) for t, m in self.seen if not isinstance(m, DownlinkPlan)]
        request = FetchRequest(version=version, held=held)
        self.send(fetch_topic(self.fleet, self.name), encode(request))
        msg = self.wait_for(lambda _, m: isinstance(m, DownlinkPlan) and m.version == version)
        assert isinstance(msg, DownlinkPlan)
        return msg

    def fetch_chunks(
        self, plan: DownlinkPlan, indices: list[int] | None = None, held: bytes | None = None
    ) -> list[GlobalChunk]:
        """Ask for ``plan``'s chunks (all if ``indices`` is None) and collect them."""
        wanted = b"" if indices is None else bitmap_from_indices(indices, plan.chunk_count)
        self.seen = [(t, m) for t, m in self.seen if not isinstance(m, GlobalChunk)]
        request = FetchRequest(version=plan.version, held=held, plan=plan.plan, wanted=wanted)
        self.send(fetch_topic(self.fleet, self.name), encode(request))
        n = plan.chunk_count if indices is None else len(indices)
        got: list[GlobalChunk] = []
        while len(got) < n:
            msg = self.wait_for(
                lambda _, m: isinstance(m, GlobalChunk) and m.plan == plan.plan
                and all(m.index != g.index for g in got)
            )  # fmt: skip
            assert isinstance(msg, GlobalChunk)
            got.append(msg)
        return got


def random_delta(template: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A client update shaped like the global adapter."""
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.01 * torch.randn(t.shape, generator=gen) for k, t in template.items()}


def compressed(delta: Mapping[str, torch.Tensor], method: str = "dense_fp32") -> bytes:
    if method == "fstq":
        update = make_compressor("fstq").compress(
            delta, budget_bytes=2000, rng=np.random.default_rng(0)
        )
    else:
        update = make_compressor(method).compress(delta)
    return update.payload


def global_state(settings: AggregatorSettings, version: int) -> dict[str, torch.Tensor]:
    return load_peft_dir(settings.global_dir(version))
