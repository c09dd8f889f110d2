"""The fleet runner's clock, dropout fates and device transport (in-memory broker)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.chunking import upload_messages
from broker.codec import decode, encode
from broker.memory import MemoryBroker, MemoryClient
from broker.messages import RoundAnnouncement, UploadChunk
from broker.settings import MqttSettings
from broker.topics import round_topic, upload_filter, upload_topic
from evaluation.fleet_wire import Fate, FleetClock, FleetWire, dropout_fate

FLEET = "f"


class _Wall:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_clock_moves_forward_only() -> None:
    wall = _Wall()
    clock = FleetClock(wall)
    assert clock() == 1000.0
    assert clock.advance_to(1500.0) == 500.0
    assert clock() == 1500.0
    assert clock.advance_to(1200.0) == 0.0  # never back
    wall.t = 1010.0
    assert clock() == 1510.0 and clock.skipped_s == 500.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rate=st.sampled_from([0.0, 0.1, 0.3, 1.0]))
def test_dropout_rate_and_determinism(seed: int, rate: float) -> None:
    fates = [dropout_fate(seed, r, i, rate) for r in range(1, 21) for i in range(100)]
    assert fates == [dropout_fate(seed, r, i, rate) for r in range(1, 21) for i in range(100)]
    dropped = sum(f != "ok" for f in fates) / len(fates)
    assert abs(dropped - rate) < 0.04  # 2000 draws: > 4 sigma at rate 0.3
    if rate > 0:
        assert {"silent", "halfway"} <= set(fates)


def _pair(fate: Fate) -> tuple[MemoryBroker, FleetWire, MemoryClient]:
    broker = MemoryBroker()
    dev = FleetWire(MemoryClient(broker, MqttSettings(client_id="d")), lambda r: fate)
    server = MemoryClient(broker, MqttSettings(client_id="agg"))
    dev.connect()
    server.connect()
    server.subscribe(upload_filter(FLEET))
    dev.subscribe(round_topic(FLEET))
    return broker, dev, server


def _upload(dev: FleetWire, round_id: int, chunks: int) -> int:
    payload = bytes(range(256)) * chunks
    manifest, parts = upload_messages(
        payload, upload_id=f"u{round_id}", round_id=round_id, client="d", base_version=0,
        sample_count=1, method="dense_fp16", chunk_size=256,
    )  # fmt: skip
    topic = upload_topic(FLEET, "d", round_id)
    for msg in (manifest, *parts, manifest):  # the manifest again: a status query
        dev.publish(topic, encode(msg))
    return len(parts)


def _received_chunks(server: MemoryClient) -> list[int]:
    out = []
    while (msg := server.receive(0.05)) is not None:
        if msg.payload[:0] == b"" and b"up.chunk" in msg.payload:
            out.append(decode(msg.payload, expect=UploadChunk).index)
    return out


def test_ok_device_sends_everything_and_counts_wire_bytes() -> None:
    _, dev, server = _pair("ok")
    n = _upload(dev, 3, chunks=6)
    assert _received_chunks(server) == list(range(n))
    assert dev.upload_bytes(3) > 6 * 256 and dev.upload_bytes(2) == 0
    assert dev.dropped == {}


@pytest.mark.parametrize("chunks", [1, 2, 7])
def test_halfway_device_stops_after_half_of_its_chunks(chunks: int) -> None:
    _, dev, server = _pair("halfway")
    _upload(dev, 4, chunks=chunks)
    assert _received_chunks(server) == list(range(chunks // 2))
    assert dev.dropped == {4: "halfway"}


def _announcement(round_id: int) -> RoundAnnouncement:
    return RoundAnnouncement(
        fleet=FLEET, round=round_id, deadline=2e9, global_version=0, quorum=1,
        global_sha256=hashlib.sha256(b"").digest(), selected=("d",), upload_window_s=60.0,
        chunk_size=256, budget_bytes={},
    )  # fmt: skip


def test_an_announcement_waits_until_its_fate_is_known() -> None:
    # With availability windows a round's fate needs the simulated time it starts at.
    known: dict[int, Fate] = {}
    broker = MemoryBroker()
    dev = FleetWire(MemoryClient(broker, MqttSettings(client_id="d")), known.get)
    dev.connect()
    dev.subscribe(round_topic(FLEET))
    publisher = MemoryClient(broker, MqttSettings(client_id="p"))
    publisher.connect()
    publisher.publish(round_topic(FLEET), encode(_announcement(1)))
    publisher.publish(round_topic(FLEET), encode(_announcement(2)))
    assert dev.receive(0.05) is None and dev.receive(0.05) is None  # both held
    known[2] = "offline"
    assert dev.receive(0.05) is None and dev.dropped == {2: "offline"}
    known[1] = "ok"
    msg = dev.receive(0.05)
    assert msg is not None and decode(msg.payload, expect=RoundAnnouncement).round == 1
    assert dev.receive(0.05) is None


def test_silent_device_never_sees_the_announcement() -> None:
    broker, dev, _ = _pair("silent")
    ann = RoundAnnouncement(
        fleet=FLEET, round=5, deadline=2e9, global_version=0, quorum=1,
        global_sha256=hashlib.sha256(b"").digest(), selected=("d",), upload_window_s=60.0,
        chunk_size=256, budget_bytes={},
    )  # fmt: skip
    publisher = MemoryClient(broker, MqttSettings(client_id="p"))
    publisher.connect()
    publisher.publish(round_topic(FLEET), encode(ann))
    assert dev.receive(0.1) is None
    assert dev.dropped == {5: "silent"}
