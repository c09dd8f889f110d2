"""The upload/ack state machine alone, on the in-process broker with explicit times (no sleeps)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from broker.chunking import bitmap_from_indices
from broker.codec import decode
from broker.memory import MemoryBroker, MemoryClient
from broker.messages import AckStatus, UploadAck, UploadChunk, UploadManifest
from broker.settings import MqttSettings
from broker.topics import upload_filter
from edge_agent.outbox import Outbox, OutboxEntry
from edge_agent.uploader import Uploader, UploadOutcome

PAYLOAD = bytes(range(256)) * 4 + b"tail"  # 5 chunks of 256 B (the last one 4 B)
COUNT = 5


class Rig:
    def __init__(self, tmp_path: Path, *, max_packet_size: int | None = 1 << 20) -> None:
        broker = MemoryBroker(max_packet_size=max_packet_size)
        self.device = MemoryClient(broker, MqttSettings(client_id="dev"))
        self.device.connect()
        self.spy = MemoryClient(broker, MqttSettings(client_id="spy"))
        self.spy.connect()
        self.spy.subscribe(upload_filter("fl"))
        self.outbox = Outbox(tmp_path / "outbox")
        self.entry = OutboxEntry(
            upload_id="u1",
            round_id=3,
            base_version=0,
            sha256=hashlib.sha256(PAYLOAD).hexdigest(),
            size=len(PAYLOAD),
            sample_count=1,
            method="fstq",
            chunk_size=256,
            deadline=1000.0,
        )
        self.outbox.put(self.entry, PAYLOAD)
        self.finished: list[UploadOutcome] = []
        self.up = Uploader(
            self.device,
            self.outbox,
            fleet="fl",
            client_id="dev",
            ack_timeout_s=10.0,
            settle_s=0.5,
            expiry_grace_s=60.0,
            on_finished=self.finished.append,
        )

    def sent(self) -> list[str | int]:
        """What reached the broker since the last call: "M" for a manifest, chunk indices."""
        out: list[str | int] = []
        for raw in self.spy.messages(idle_timeout=0):
            msg = decode(raw.payload)
            assert isinstance(msg, UploadManifest | UploadChunk)
            out.append("M" if isinstance(msg, UploadManifest) else msg.index)
        return out

    def ack(self, status: AckStatus, have: list[int] | None = None, now: float = 0.0) -> None:
        bitmap = b"" if have is None else bitmap_from_indices(have, COUNT)
        count = COUNT if have is not None else 0
        self.up.on_ack(
            UploadAck(upload_id="u1", round=3, status=status, chunk_count=count, have=bitmap), now
        )


def test_the_ack_of_the_first_manifest_triggers_no_resend(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    assert rig.sent() == ["M", 0, 1, 2, 3, 4]
    rig.ack(AckStatus.RECEIVING, [], now=0.1)
    rig.up.tick(5.0)
    assert rig.sent() == []
    rig.ack(AckStatus.COMPLETE, list(range(COUNT)), now=5.5)
    (done,) = rig.finished
    assert done.state == "complete"
    assert (done.stats.chunks_first, done.stats.chunks_resent) == (5, 0)
    assert rig.outbox.entries()[0].state == "complete"


def test_resume_acts_on_the_newest_reply_after_settling(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.resume(rig.outbox.pending(), now=0.0)
    assert rig.sent() == ["M"]  # the manifest alone: it asks what the aggregator has
    # Queued while the agent was away, delivered first: stale, says nothing arrived.
    rig.ack(AckStatus.RECEIVING, [], now=0.1)
    rig.ack(AckStatus.RECEIVING, [0, 1], now=0.2)  # the reply to our query
    rig.up.tick(0.5)
    assert rig.sent() == []  # still settling
    rig.up.tick(0.71)
    assert rig.sent() == [2, 3, 4]
    rig.ack(AckStatus.COMPLETE, list(range(COUNT)), now=1.0)
    (done,) = rig.finished
    assert (done.stats.chunks_first, done.stats.chunks_resent, done.stats.manifests) == (0, 3, 1)


def test_ack_timeout_resends_the_manifest_then_only_missing_chunks(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    rig.sent()
    rig.up.tick(9.9)
    assert rig.sent() == []
    rig.up.tick(10.0)
    assert rig.sent() == ["M"]
    rig.ack(AckStatus.RECEIVING, [0, 2, 3, 4], now=10.1)
    rig.up.tick(10.6)
    assert rig.sent() == [1]
    assert rig.up.next_timer() == pytest.approx(20.6)


def test_unknown_acks_bring_one_manifest_then_everything(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    rig.sent()
    for _ in range(1 + COUNT):  # for the manifest, then for every chunk
        rig.ack(AckStatus.UNKNOWN, now=0.1)
    assert rig.sent() == ["M"]
    rig.ack(AckStatus.RECEIVING, [], now=0.2)
    rig.ack(AckStatus.UNKNOWN, now=0.3)  # lost again after replying: the reply is void
    assert rig.sent() == ["M"]
    rig.up.tick(1.0)
    assert rig.sent() == []
    rig.ack(AckStatus.RECEIVING, [], now=1.1)
    rig.up.tick(1.7)
    assert rig.sent() == [0, 1, 2, 3, 4]


def test_rejected_and_late_close_the_entry(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    rig.up.on_ack(
        UploadAck(upload_id="other", round=3, status=AckStatus.COMPLETE, chunk_count=0, have=b""),
        0.1,
    )
    assert rig.finished == []  # not ours
    rejected = UploadAck(
        upload_id="u1", round=3, status=AckStatus.REJECTED, chunk_count=0, have=b"",
        reason="payload_sha256",
    )  # fmt: skip
    rig.up.on_ack(rejected, 0.2)
    (done,) = rig.finished
    assert (done.state, done.reason) == ("rejected", "payload_sha256")
    assert rig.outbox.entries()[0].state == "rejected" and rig.up.active is None


def test_superseded_upload_closes_late_without_an_answer(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    rig.sent()
    rig.up.supersede(4, now=1.0)
    assert rig.sent() == ["M"]
    rig.ack(AckStatus.UNKNOWN, now=1.5)  # stale, from a chunk: says nothing about the round
    rig.up.tick(10.9)
    assert rig.finished == []
    rig.up.tick(11.0)
    (done,) = rig.finished
    assert done.state == "late" and done.reason.startswith("superseded")


def test_an_answer_after_supersede_keeps_the_upload_going(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    rig.up.supersede(4, now=1.0)
    rig.ack(AckStatus.RECEIVING, [0, 1, 2, 3], now=1.1)  # the round is still open
    rig.up.tick(1.6)
    rig.up.tick(11.5)
    assert rig.finished == [] and rig.up.active is not None


def test_corrupt_outbox_entry_is_closed_not_sent(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (tmp_path / "outbox" / "u1" / "payload.bin").write_bytes(b"x" * len(PAYLOAD))
    rig.up.resume(rig.outbox.pending(), now=0.0)
    assert rig.sent() == [] and rig.up.active is None
    assert rig.outbox.entries()[0].state == "rejected"


def test_chunks_over_the_packet_limit_close_the_upload(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_packet_size=300)  # the manifest fits, a 256 B chunk does not
    rig.up.start(rig.entry, PAYLOAD, now=0.0)
    (done,) = rig.finished
    assert done.state == "rejected" and done.reason.startswith("packet_too_large")
    assert rig.sent() == ["M"]
