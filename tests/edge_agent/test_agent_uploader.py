"""The upload/ack state machine alone, on the in-process broker with explicit times (no sleeps)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from broker.chunking import bitmap_from_indices
from broker.codec import decode, encode
from broker.memory import MemoryBroker, MemoryClient
from broker.messages import AckStatus, RoundAnnouncement, UploadAck, UploadChunk, UploadManifest
from broker.settings import MqttSettings
from broker.topics import ack_topic, round_topic, upload_filter
from edge_agent.outbox import Outbox, OutboxEntry
from edge_agent.trainer import ComputeTime, TrainResult
from edge_agent.uploader import Uploader, UploadOutcome
from fstq.compressors import make_compressor

PAYLOAD = bytes(range(256)) * 4 + b"tail"  # 5 chunks of 256 B (the last one 4 B)
COUNT = 5


class Rig:
    def __init__(
        self, tmp_path: Path, *, max_packet_size: int | None = 1 << 20, settle_s: float = 0.5
    ) -> None:
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
            settle_s=settle_s,
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


def test_resume_drops_the_acks_the_session_kept_for_the_previous_process(
    tmp_path: Path,
) -> None:
    # Settling would not help: acted on at once, a stale reply would bring every chunk again.
    rig = Rig(tmp_path, settle_s=0.0)
    rig.device.subscribe(ack_topic("fl", "dev"))
    rig.device.subscribe(round_topic("fl"))
    stale = UploadAck(upload_id="u1", round=3, status=AckStatus.RECEIVING, chunk_count=COUNT,
                      have=bitmap_from_indices([], COUNT))  # fmt: skip
    rig.spy.publish(ack_topic("fl", "dev"), encode(stale))  # kept by the session while away
    rig.spy.publish(round_topic("fl"), b"announcement")  # the in-memory broker delivers at once
    early = rig.up.resume(rig.outbox.pending(), now=0.0)
    assert [m.topic for m in early] == [round_topic("fl")]  # the rest is the caller's
    assert rig.sent() == ["M"]
    for msg in rig.device.messages(idle_timeout=0):  # what the agent would dispatch next
        rig.up.on_ack(decode(msg.payload, expect=UploadAck), 0.1)
    rig.up.tick(0.2)
    assert rig.sent() == []  # nothing re-sent on the stale ack's word
    rig.ack(AckStatus.RECEIVING, [0, 1, 2], now=0.3)  # the reply to the query
    rig.up.tick(0.3)
    assert rig.sent() == [3, 4]


def test_store_writes_a_new_upload_to_the_outbox(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    update = make_compressor("dense_fp16").compress({"w": torch.arange(8.0)})
    took = ComputeTime(wall_s=1.5, cpu_s=2.5)
    result = TrainResult(update, sample_count=6, budget_bytes=900, compute=took,
                         train_loss=float("nan"), tokens_kept=0.5)  # fmt: skip
    ann = RoundAnnouncement(
        fleet="fl", round=7, global_version=2, global_sha256=bytes(32), selected=("dev",),
        deadline=2000.0, quorum=1, upload_window_s=30.0, chunk_size=128, budget_bytes={},
    )  # fmt: skip
    entry = rig.up.store(ann, base_version=2, result=result, now=12.0)
    again = rig.up.store(ann, base_version=2, result=result, now=12.0)
    assert entry.upload_id.startswith("r7-") and again.upload_id != entry.upload_id
    assert (entry.round_id, entry.base_version, entry.sample_count, entry.method) == (
        7, 2, 6, "dense_fp16",
    )  # fmt: skip
    assert (entry.chunk_size, entry.deadline, entry.created_at) == (128, 2000.0, 12.0)
    # What the aggregator may log; no timings (they stay on the device) and no NaN loss.
    assert entry.metadata == {"tokens_kept": 0.5, "budget_bytes": 900}
    assert rig.outbox.payload(entry.upload_id) == update.payload  # durable, hash checked
    assert rig.outbox.pending()[-2:] == sorted([entry, again], key=lambda e: e.upload_id)
