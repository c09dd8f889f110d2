"""Inbox: many uploads, bounded memory, idempotent manifests, tombstones, explicit clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.chunking import TransferLimits, chunks_missing, upload_messages
from broker.errors import (
    ChunkChecksumError,
    ExpiredError,
    LimitError,
    ManifestConflictError,
    OriginError,
    PayloadChecksumError,
    UnknownUploadError,
)
from broker.inbox import Inbox, InboxLimits, UploadKey, check_origin, verdict_ack
from broker.messages import AckStatus, UploadChunk, UploadManifest
from broker.topics import UploadTopic


def _upload(
    client: str = "dev-1", round_id: int = 1, size: int = 1000, upload_id: str = "u1"
) -> tuple[UploadManifest, tuple[UploadChunk, ...]]:
    payload = random.Random(f"{client}{round_id}{upload_id}").randbytes(size)
    return upload_messages(
        payload, upload_id=upload_id, round_id=round_id, client=client, base_version=0,
        sample_count=10, method="dense", chunk_size=100,
    )  # fmt: skip


def test_manifest_then_chunks_completes_with_ack_progress() -> None:
    # Arrange
    inbox = Inbox()
    manifest, chunks = _upload()
    # Act
    first = inbox.open(manifest, now=0.0)
    results = [inbox.add(ch, now=1.0) for ch in chunks]
    # Assert
    assert first.status is AckStatus.RECEIVING and first.have == bytes(2)
    assert all(r.completed is None for r in results[:-1])
    done = results[-1].completed
    assert done is not None and done.manifest == manifest
    assert len(done.payload) == manifest.total_size
    key = UploadKey.of(manifest)
    assert key not in inbox and len(inbox) == 0 and inbox.reserved_bytes == 0
    ack = inbox.ack(key)
    assert ack.status is AckStatus.COMPLETE and ack.chunk_count == 10
    assert ack.have == b"\xff\x03"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n_clients=st.integers(1, 5))
def test_interleaved_uploads_with_loss_and_duplicates_all_complete(
    seed: int, n_clients: int
) -> None:
    # Arrange: several devices, chunks interleaved, shuffled, 30% lost, 30% duplicated
    rng = random.Random(seed)
    inbox = Inbox()
    uploads = {f"dev-{i}": _upload(f"dev-{i}", size=rng.randint(0, 1500)) for i in range(n_clients)}
    for manifest, _ in uploads.values():
        inbox.open(manifest, now=0.0)
    stream = [ch for _, chunks in uploads.values() for ch in chunks]
    stream += rng.sample(stream, len(stream) * 3 // 10)
    rng.shuffle(stream)
    completed = {}
    # Act: lossy first pass, then the protocol's recovery (re-send manifest -> ack -> missing)
    for ch in stream:
        if rng.random() >= 0.3:
            r = inbox.add(ch, now=1.0)
            if r.completed:
                completed[r.key.client] = r.completed.payload
    for client, (manifest, chunks) in uploads.items():
        ack = inbox.open(manifest, now=2.0)  # idempotent re-send = "what do you have?"
        for ch in chunks_missing(chunks, ack):
            r = inbox.add(ch, now=2.0)
            if r.completed:
                completed[client] = r.completed.payload
    # Assert
    assert set(completed) == set(uploads)
    for client, (manifest, chunks) in uploads.items():
        assert completed[client] == b"".join(ch.data for ch in chunks)
        assert inbox.ack(UploadKey.of(manifest)).status is AckStatus.COMPLETE
    assert inbox.reserved_bytes == 0


def test_chunk_before_manifest_is_rejected_not_buffered() -> None:
    inbox = Inbox()
    manifest, chunks = _upload()
    with pytest.raises(UnknownUploadError) as info:
        inbox.add(chunks[0], now=0.0)
    assert info.value.reason == "unknown_upload"
    assert inbox.ack(UploadKey.of(manifest)).status is AckStatus.UNKNOWN
    assert len(inbox) == 0


def test_duplicate_manifest_is_idempotent_and_conflict_is_rejected() -> None:
    inbox = Inbox()
    manifest, chunks = _upload()
    inbox.open(manifest, now=0.0)
    inbox.add(chunks[3], now=0.0)
    again = inbox.open(manifest, now=0.5)
    assert again.status is AckStatus.RECEIVING and again.have == b"\x08\x00"
    with pytest.raises(ManifestConflictError):
        inbox.open(manifest.model_copy(update={"sample_count": 11}), now=0.5)
    assert inbox.reserved_bytes == manifest.total_size


def test_late_duplicates_of_a_finished_upload_are_harmless() -> None:
    inbox = Inbox()
    manifest, chunks = _upload()
    inbox.open(manifest, now=0.0)
    for ch in chunks:
        inbox.add(ch, now=0.0)
    r = inbox.add(chunks[0], now=5.0)
    assert not r.new and r.completed is None
    assert inbox.open(manifest, now=5.0).status is AckStatus.COMPLETE
    assert len(inbox) == 0


def test_corrupted_chunk_keeps_the_upload_open() -> None:
    inbox = Inbox()
    manifest, chunks = _upload()
    inbox.open(manifest, now=0.0)
    bad = chunks[0].model_copy(update={"data": b"\x00" * 100})
    with pytest.raises(ChunkChecksumError):
        inbox.add(bad, now=0.0)
    assert UploadKey.of(manifest) in inbox
    for ch in chunks:
        inbox.add(ch, now=0.0)
    assert inbox.ack(UploadKey.of(manifest)).status is AckStatus.COMPLETE


def test_payload_hash_mismatch_rejects_the_upload() -> None:
    inbox = Inbox()
    manifest, chunks = _upload()
    liar = manifest.model_copy(update={"sha256": bytes(32)})
    inbox.open(liar, now=0.0)
    for ch in chunks[:-1]:
        inbox.add(ch, now=0.0)
    with pytest.raises(PayloadChecksumError):
        inbox.add(chunks[-1], now=0.0)
    ack = inbox.ack(UploadKey.of(manifest))
    assert ack.status is AckStatus.REJECTED and ack.reason == "payload_sha256"
    assert inbox.reserved_bytes == 0


def test_origin_must_match_the_topic_client() -> None:
    manifest, chunks = _upload(client="dev-1", round_id=1)
    with pytest.raises(OriginError):
        check_origin(manifest, UploadTopic("f", "dev-2", 1))
    check_origin(manifest, UploadTopic("f", "dev-1", 1))
    with pytest.raises(OriginError):
        check_origin(chunks[0], UploadTopic("f", "dev-2", 1))
    check_origin(chunks[0], UploadTopic("f", "dev-1", 1))


def test_origin_must_match_the_topic_round() -> None:
    manifest, chunks = _upload(client="dev-1", round_id=2)
    for msg in (manifest, chunks[0]):
        with pytest.raises(OriginError) as info:
            check_origin(msg, UploadTopic("f", "dev-1", 1))
        assert info.value.reason == "origin"


def test_expiry_is_driven_by_the_callers_clock() -> None:
    # Arrange
    inbox = Inbox(InboxLimits(upload_ttl_s=10.0))
    m1, c1 = _upload("a")
    m2, _ = _upload("b")
    inbox.open(m1, now=0.0)
    inbox.open(m2, now=5.0)
    # Act / Assert
    assert inbox.expire(9.9) == []
    assert inbox.expire(10.0) == [UploadKey.of(m1)]
    assert inbox.ack(UploadKey.of(m1)).status is AckStatus.LATE
    assert inbox.ack(UploadKey.of(m1)).reason == "expired"
    assert not inbox.add(c1[0], now=10.5).new  # tombstoned: ignored, not "unknown"
    with pytest.raises(ExpiredError):
        inbox.add(_upload("b")[1][0], now=15.0)
    assert len(inbox) == 0 and inbox.reserved_bytes == 0


def test_explicit_expiry_and_drop_round() -> None:
    inbox = Inbox()
    m1, _ = _upload("a", round_id=1)
    m2, _ = _upload("b", round_id=2)
    inbox.open(m1, now=0.0, expires_at=3.0)
    inbox.open(m2, now=0.0)
    assert inbox.drop_round(1) == [UploadKey.of(m1)]
    assert inbox.ack(UploadKey.of(m1)).reason == "round_closed"
    assert inbox.drop(UploadKey.of(m2), AckStatus.REJECTED, "not_selected")
    assert not inbox.drop(UploadKey.of(m2))
    assert inbox.ack(UploadKey.of(m2)).reason == "not_selected"


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (InboxLimits(transfer=TransferLimits(max_total_size=999)), "too_large"),
        (InboxLimits(transfer=TransferLimits(max_chunk_count=9)), "too_many_chunks"),
        (InboxLimits(transfer=TransferLimits(max_chunk_size=99)), "chunk_too_large"),
    ],
)
def test_per_transfer_limits(limits: InboxLimits, reason: str) -> None:
    with pytest.raises(LimitError) as info:
        Inbox(limits).open(_upload(size=1000)[0], now=0.0)
    assert info.value.reason == reason


def test_concurrency_and_memory_limits_are_checked_before_allocating() -> None:
    # Arrange
    inbox = Inbox(InboxLimits(max_uploads=3, max_uploads_per_client=2, max_reserved_bytes=2500))
    inbox.open(_upload("a", upload_id="1")[0], now=0.0)
    inbox.open(_upload("a", upload_id="2")[0], now=0.0)
    # Act / Assert: per-client
    with pytest.raises(LimitError) as info:
        inbox.open(_upload("a", upload_id="3")[0], now=0.0)
    assert info.value.reason == "client_uploads"
    # memory: 2000 reserved, 1000 more would exceed 2500
    with pytest.raises(LimitError) as info:
        inbox.open(_upload("b", size=1000)[0], now=0.0)
    assert info.value.reason == "memory"
    inbox.open(_upload("b", size=400)[0], now=0.0)
    # count
    with pytest.raises(LimitError) as info:
        inbox.open(_upload("c", size=10)[0], now=0.0)
    assert info.value.reason == "too_many_uploads"
    assert len(inbox) == 3 and inbox.reserved_bytes == 2400


def test_tombstones_are_bounded() -> None:
    inbox = Inbox(InboxLimits(max_finished=2))
    manifests = [_upload(upload_id=f"u{i}", size=10)[0] for i in range(3)]
    for m in manifests:
        inbox.open(m, now=0.0)
        inbox.drop(UploadKey.of(m))
    assert inbox.ack(UploadKey.of(manifests[0])).status is AckStatus.UNKNOWN
    assert inbox.ack(UploadKey.of(manifests[2])).status is AckStatus.REJECTED


def test_settle_overrides_the_verdict_after_reassembly() -> None:
    # e.g. the SHA-256 matched but the payload failed to decode: a re-sent manifest must hear
    # "rejected", not "complete"
    inbox = Inbox()
    manifest, chunks = _upload()
    key = UploadKey.of(manifest)
    inbox.open(manifest, now=0.0)
    for ch in chunks:
        inbox.add(ch, now=0.0)
    inbox.settle(key, AckStatus.REJECTED, "undecodable")
    ack = inbox.open(manifest, now=1.0)
    assert (ack.status, ack.reason, ack.have) == (AckStatus.REJECTED, "undecodable", b"")
    inbox.settle(key, AckStatus.COMPLETE)
    assert inbox.ack(key).have == b"\xff\x03"  # chunk count survives re-settling
    other, _ = _upload(upload_id="u2")
    inbox.open(other, now=0.0)
    inbox.settle(UploadKey.of(other), AckStatus.LATE, "round_closed")  # open uploads too
    assert len(inbox) == 0 and inbox.reserved_bytes == 0


def test_verdict_acks_carry_a_full_bitmap_only_when_complete() -> None:
    key = UploadKey(3, "dev-1", "u1")
    done = verdict_ack(key, AckStatus.COMPLETE, chunk_count=10)
    assert (done.upload_id, done.round, done.chunk_count) == ("u1", 3, 10)
    assert done.have == bytes([0xFF, 0x03]) and done.reason == ""
    late = verdict_ack(key, AckStatus.LATE, "round_closed", chunk_count=10)
    assert (late.chunk_count, late.have, late.reason) == (0, b"", "round_closed")
    assert verdict_ack(key, AckStatus.REJECTED, "x" * 300).reason == "x" * 256
