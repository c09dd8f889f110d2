"""Chunking: split, bitmaps, Reassembler (shuffle/dup/missing/corrupt), downlink helpers."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import chunking as c
from broker.errors import (
    BitmapError,
    ChunkChecksumError,
    ChunkIndexError,
    ChunkSizeError,
    LimitError,
    PayloadChecksumError,
    StaleVersionError,
    TransferError,
)
from broker.messages import (
    AckStatus,
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    UploadAck,
    bitmap_len,
)

payloads = st.binary(max_size=3000)
chunk_sizes = st.integers(min_value=1, max_value=700)


@given(payload=payloads, chunk_size=chunk_sizes)
def test_split_covers_the_payload_exactly(payload: bytes, chunk_size: int) -> None:
    # Act
    spec, pieces = c.split(payload, chunk_size)
    # Assert
    assert b"".join(p.data for p in pieces) == payload
    assert [p.index for p in pieces] == list(range(spec.chunk_count))
    assert all(len(p.data) == spec.length_of(p.index) for p in pieces)
    assert all(p.crc32 == c.crc32(p.data) for p in pieces)
    assert spec.total_size == len(payload)
    assert spec.sha256 == hashlib.sha256(payload).digest()
    assert spec.chunk_count == max(1, -(-len(payload) // chunk_size))


def test_empty_payload_is_one_empty_chunk() -> None:
    spec, pieces = c.split(b"", 10)
    assert spec.chunk_count == 1 and pieces[0].data == b""
    r = c.Reassembler(spec)
    assert r.add(0, pieces[0].crc32, b"")
    assert r.payload() == b""


@settings(max_examples=200, deadline=None)
@given(
    payload=payloads,
    chunk_size=chunk_sizes,
    seed=st.integers(0, 2**32),
    dup_rate=st.floats(0, 1),
)
def test_shuffled_and_duplicated_chunks_reassemble(
    payload: bytes, chunk_size: int, seed: int, dup_rate: float
) -> None:
    # Arrange
    rng = random.Random(seed)
    spec, pieces = c.split(payload, chunk_size)
    stream = list(pieces) + [p for p in pieces if rng.random() < dup_rate]
    rng.shuffle(stream)
    r = c.Reassembler(spec)
    # Act
    new = [r.add(p.index, p.crc32, p.data) for p in stream]
    # Assert
    assert sum(new) == spec.chunk_count  # each chunk counted once, duplicates ignored
    assert r.complete and r.missing() == []
    assert r.payload() == payload
    assert r.have_bitmap() == c.full_bitmap(spec.chunk_count)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=1, max_size=3000), chunk_size=chunk_sizes, data=st.data())
def test_missing_chunks_are_reported_and_resend_completes(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    # Arrange
    spec, pieces = c.split(payload, chunk_size)
    lost = data.draw(st.sets(st.integers(0, spec.chunk_count - 1), min_size=1))
    r = c.Reassembler(spec)
    # Act: first pass loses some chunks
    for p in pieces:
        if p.index not in lost:
            r.add(p.index, p.crc32, p.data)
    # Assert: the ack content names exactly what is missing
    assert not r.complete
    assert r.missing() == sorted(lost)
    have = r.have_bitmap()
    assert set(c.indices_from_bitmap(have, spec.chunk_count)) == set(range(spec.chunk_count)) - lost
    # Act: resend only the missing ones
    for i in r.missing():
        r.add(i, pieces[i].crc32, pieces[i].data)
    assert r.payload() == payload


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=1, max_size=2000), chunk_size=chunk_sizes, data=st.data())
def test_corrupted_chunk_is_rejected_and_state_unchanged(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    # Arrange
    spec, pieces = c.split(payload, chunk_size)
    victim = pieces[data.draw(st.integers(0, spec.chunk_count - 1))]
    if not victim.data:
        return
    pos = data.draw(st.integers(0, len(victim.data) - 1))
    corrupted = bytearray(victim.data)
    corrupted[pos] ^= 1 << data.draw(st.integers(0, 7))
    r = c.Reassembler(spec)
    # Act / Assert
    with pytest.raises(ChunkChecksumError) as info:
        r.add(victim.index, victim.crc32, bytes(corrupted))
    assert info.value.reason == "chunk_crc"
    assert victim.index in r.missing()
    for p in pieces:
        r.add(p.index, p.crc32, p.data)
    assert r.payload() == payload


def test_chunk_index_and_size_must_fit_the_manifest() -> None:
    spec, _ = c.split(b"a" * 25, 10)  # 10 + 10 + 5
    r = c.Reassembler(spec)
    with pytest.raises(ChunkIndexError):
        r.add(3, 0, b"x")
    with pytest.raises(ChunkIndexError):
        r.add(-1, 0, b"x")
    with pytest.raises(ChunkSizeError):
        r.add(0, c.crc32(b"a" * 9), b"a" * 9)
    with pytest.raises(ChunkSizeError):
        r.add(2, c.crc32(b"a" * 10), b"a" * 10)  # the last chunk is 5 bytes
    assert r.received == 0 and r.received_bytes == 0


def test_lying_manifest_fails_the_payload_sha256() -> None:
    spec, pieces = c.split(b"hello world", 4)
    wrong = c.TransferSpec(spec.total_size, spec.chunk_count, spec.chunk_size, bytes(32))
    r = c.Reassembler(wrong)
    for p in pieces:
        r.add(p.index, p.crc32, p.data)
    with pytest.raises(PayloadChecksumError) as info:
        r.payload()
    assert info.value.reason == "payload_sha256"


def test_payload_before_completion_is_an_error() -> None:
    spec, _ = c.split(b"abc", 1)
    with pytest.raises(TransferError, match="not complete"):
        c.Reassembler(spec).payload()


def test_expiry_uses_the_callers_clock() -> None:
    spec, _ = c.split(b"abc", 2)
    r = c.Reassembler(spec, expires_at=100.0)
    assert not r.expired(99.9)
    assert r.expired(100.0)
    assert not c.Reassembler(spec).expired(1e18)


@pytest.mark.parametrize(
    ("total", "chunk", "reason"),
    [
        (2**30, 2**20, "too_large"),
        (5000, 1, "too_many_chunks"),
        (4 << 20, 2 << 20, "chunk_too_large"),
    ],
)
def test_limits_are_checked_before_allocating(
    total: int, chunk: int, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a manifest claiming a huge transfer; bytearray must never be called
    spec = c.TransferSpec(total, max(1, -(-total // chunk)), chunk, bytes(32))
    calls: list[int] = []

    class SpyBytearray(bytearray):
        def __init__(self, n: int = 0) -> None:
            calls.append(n)
            super().__init__(n)

    monkeypatch.setattr(c, "bytearray", SpyBytearray, raising=False)
    # Act / Assert
    with pytest.raises(LimitError) as info:
        c.Reassembler(spec)
    assert info.value.reason == reason
    assert calls == []


def test_transfer_spec_rejects_inconsistent_fields() -> None:
    assert c.TransferSpec(10, 3, 4, bytes(32)).length_of(2) == 2
    with pytest.raises(TransferError):
        c.TransferSpec(10, 2, 4, bytes(32))
    with pytest.raises(TransferError):
        c.TransferSpec(10, 1, 0, bytes(32))
    with pytest.raises(TransferError):
        c.TransferSpec(10, 1, 10, b"short")


@given(count=st.integers(0, 300), data=st.data())
def test_bitmap_round_trip(count: int, data: st.DataObject) -> None:
    indices = data.draw(st.sets(st.integers(0, max(0, count - 1)))) if count else set()
    bitmap = c.bitmap_from_indices(indices, count)
    assert len(bitmap) == bitmap_len(count)
    assert c.indices_from_bitmap(bitmap, count) == sorted(indices)


def test_bitmap_layout_is_little_endian_per_byte() -> None:
    assert c.bitmap_from_indices([0], 8) == b"\x01"
    assert c.bitmap_from_indices([7, 8], 9) == b"\x80\x01"
    assert c.full_bitmap(10) == b"\xff\x03"


def test_bad_bitmaps_are_rejected() -> None:
    with pytest.raises(BitmapError):
        c.indices_from_bitmap(b"\x01", 9)  # too short
    with pytest.raises(BitmapError):
        c.indices_from_bitmap(b"\xff\xff", 10)  # padding bits set
    with pytest.raises(BitmapError):
        c.bitmap_from_indices([10], 10)


def test_upload_messages_and_resend_of_missing_only() -> None:
    # Arrange
    payload = bytes(range(256)) * 10
    manifest, chunks = c.upload_messages(
        payload, upload_id="u1", round_id=4, client="dev", base_version=3, sample_count=9,
        method="fstq", chunk_size=300, metadata={"bits": 2},
    )  # fmt: skip
    have = c.bitmap_from_indices([0, 2, 3], manifest.chunk_count)
    ack = UploadAck(
        upload_id="u1", round=4, status=AckStatus.RECEIVING,
        chunk_count=manifest.chunk_count, have=have,
    )  # fmt: skip
    # Act
    resend = c.chunks_missing(chunks, ack)
    # Assert
    assert manifest.chunk_count == len(chunks) == 9
    assert [ch.index for ch in resend] == [1, 4, 5, 6, 7, 8]
    assert c.chunks_missing(chunks, ack.model_copy(update={"status": AckStatus.COMPLETE})) == []
    unknown = UploadAck(upload_id="u1", round=4, status=AckStatus.UNKNOWN, chunk_count=0, have=b"")
    assert c.chunks_missing(chunks, unknown) == list(chunks)


PLAN, HELD = hashlib.sha256(b"plan").digest(), hashlib.sha256(b"held").digest()


def _full_plan(
    payload: bytes, chunk_size: int = 128
) -> tuple[DownlinkPlan, tuple[GlobalChunk, ...]]:
    result = hashlib.sha256(payload).digest()
    return c.plan_messages(
        payload, version=5, route=DownlinkRoute.FULL, plan=PLAN, base=None, result=result,
        chunk_size=chunk_size,
    )  # fmt: skip


def test_global_manifest_describes_the_full_payload() -> None:
    payload = b"global-adapter" * 100
    manifest = c.global_manifest(payload, version=5, round_id=4, format="f", chunk_size=128)
    plan, chunks = _full_plan(payload)
    assert manifest.sha256 == plan.sha256 == plan.result == hashlib.sha256(payload).digest()
    assert (manifest.total_size, manifest.chunk_count) == (len(payload), len(chunks))


def test_downlink_fetch_by_bitmap() -> None:
    # Arrange: aggregator side
    payload = b"global-adapter" * 100
    manifest, chunks = _full_plan(payload)
    # device side: nothing yet, ask for the first 4 missing
    download = c.Download(manifest, held=HELD)
    request = download.fetch_request(max_chunks=4)
    assert (request.held, request.plan, request.version) == (HELD, PLAN, 5)
    # Act
    answer = c.chunks_for_fetch(manifest, chunks, request)
    for ch in answer:
        download.add(ch)
    # Assert
    assert [ch.index for ch in answer] == [0, 1, 2, 3]
    assert not download.complete
    # the rest, in random order and with duplicates
    rest = c.chunks_for_fetch(manifest, chunks, download.fetch_request())
    random.Random(1).shuffle(rest := rest + rest[:3])
    for ch in rest:
        download.add(ch)
    assert download.complete and download.payload() == payload
    assert c.chunks_for_fetch(manifest, chunks, download.fetch_request()) == []
    everything = c.chunks_for_fetch(manifest, chunks, FetchRequest(version=5, plan=PLAN))
    assert len(everything) == manifest.chunk_count
    assert (
        len(c.chunks_for_fetch(manifest, chunks, FetchRequest(version=5, plan=PLAN), max_chunks=2))
        == 2
    )


def test_downlink_rejects_other_versions_and_plans() -> None:
    manifest, chunks = _full_plan(b"x" * 10)
    with pytest.raises(StaleVersionError) as info:
        c.chunks_for_fetch(manifest, chunks, FetchRequest(version=4, plan=PLAN))
    assert info.value.reason == "stale_version"
    with pytest.raises(StaleVersionError):  # a chunk request of another plan, or of none
        c.chunks_for_fetch(manifest, chunks, FetchRequest(version=5, plan=HELD))
    with pytest.raises(StaleVersionError):
        c.chunks_for_fetch(manifest, chunks, FetchRequest(version=5))
    with pytest.raises(StaleVersionError):
        c.Download(manifest, held=None).add(chunks[0].model_copy(update={"version": 6}))
    with pytest.raises(StaleVersionError):  # the chunk of another plan never mixes in
        c.Download(manifest, held=None).add(chunks[0].model_copy(update={"plan": HELD}))
    with pytest.raises(BitmapError):
        c.chunks_for_fetch(manifest, chunks, FetchRequest(version=5, plan=PLAN, wanted=b"\x01\x00"))


@pytest.mark.parametrize(
    ("route", "base", "result", "size", "why"),
    [
        (DownlinkRoute.FULL, HELD, PLAN, 10, "full plan has no base"),
        (DownlinkRoute.CATCHUP, None, PLAN, 10, "full plan has no base"),
        (DownlinkRoute.NONE, HELD, PLAN, 0, "none plan keeps its base"),
        (DownlinkRoute.NONE, HELD, HELD, 10, "none plan keeps its base"),
    ],
)
def test_inconsistent_plans_are_refused(
    route: DownlinkRoute, base: bytes | None, result: bytes, size: int, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        DownlinkPlan(
            version=1, route=route, plan=PLAN, base=base, result=result, total_size=size,
            chunk_count=1, chunk_size=64, sha256=PLAN,
        )  # fmt: skip
