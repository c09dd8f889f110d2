"""Chunked transfer in both directions. Pure: no I/O, no clock (callers pass ``now``).

* :func:`split` cuts a payload into chunks (:class:`Chunk`, CRC-32 each) and a :class:`TransferSpec`
  (total size, chunk count, chunk size, SHA-256 of the whole payload).
* :class:`Reassembler` puts one transfer back together: any order, duplicates ignored (QoS 1 is
  at-least-once), every chunk's CRC-32 checked on arrival, the SHA-256 at completion, hard limits
  checked before anything is allocated.
* :func:`upload_messages` / :func:`chunks_missing` are the device side of the uplink; the
  aggregator side (many uploads, bounded memory) is :class:`broker.inbox.Inbox`.
* :func:`global_manifest` describes a global adapter version; :func:`plan_messages` cuts the
  payload of one downlink plan (full adapter or catch-up) into chunks;
  :class:`Download` (device) reassembles a plan's payload and builds :class:`FetchRequest`
  bitmaps; :func:`chunks_for_fetch` answers them on the aggregator side.

Every rejection is a typed :class:`~broker.errors.WireError` whose ``reason`` is a metrics label.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    DEFAULT_CHUNK_SIZE,
    AckStatus,
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    UploadAck,
    UploadChunk,
    UploadManifest,
    bitmap_len,
    chunk_count_for,
)

__all__ = [
    "Chunk",
    "Download",
    "Reassembler",
    "Split",
    "TransferLimits",
    "TransferSpec",
    "bitmap_from_indices",
    "chunks_for_fetch",
    "chunks_missing",
    "crc32",
    "full_bitmap",
    "global_manifest",
    "indices_from_bitmap",
    "plan_messages",
    "split",
    "upload_messages",
]

MiB = 1 << 20


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# -- bitmaps -----------------------------------------------------------------------------------


def full_bitmap(count: int) -> bytes:
    """Bitmap with bits ``0..count-1`` set and zero padding."""
    return bitmap_from_indices(range(count), count)


def bitmap_from_indices(indices: Iterable[int], count: int) -> bytes:
    out = bytearray(bitmap_len(count))
    for i in indices:
        if not 0 <= i < count:
            raise BitmapError(f"index {i} outside [0, {count})")
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def indices_from_bitmap(bitmap: bytes, count: int) -> list[int]:
    """Set bits of ``bitmap`` (which must be exactly ``bitmap_len(count)`` long, zero-padded)."""
    if len(bitmap) != bitmap_len(count):
        raise BitmapError(f"bitmap of {len(bitmap)} bytes for {count} chunks")
    if count % 8 and bitmap[-1] >> (count % 8):
        raise BitmapError("bitmap padding bits are set")
    return [i for i in range(count) if bitmap[i >> 3] >> (i & 7) & 1]


# -- transfer description and splitting ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """What a manifest says about a transfer (uplink or downlink)."""

    total_size: int
    chunk_count: int
    chunk_size: int
    sha256: bytes

    def __post_init__(self) -> None:
        if self.total_size < 0 or self.chunk_size < 1 or len(self.sha256) != 32:
            raise TransferError(f"invalid transfer spec {self!r}", reason="bad_spec")
        if self.chunk_count != chunk_count_for(self.total_size, self.chunk_size):
            raise TransferError("chunk_count inconsistent with sizes", reason="bad_spec")

    @classmethod
    def of(cls, manifest: UploadManifest | GlobalManifest | DownlinkPlan) -> TransferSpec:
        return cls(manifest.total_size, manifest.chunk_count, manifest.chunk_size, manifest.sha256)

    def length_of(self, index: int) -> int:
        """Exact byte length of chunk ``index``."""
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.total_size - (self.chunk_count - 1) * self.chunk_size


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a split payload: what an ``UploadChunk`` or ``GlobalChunk`` carries."""

    index: int
    crc32: int
    data: bytes


class Split(NamedTuple):
    spec: TransferSpec
    chunks: tuple[Chunk, ...]


def split(payload: bytes, chunk_size: int) -> Split:
    """Cut ``payload`` into ``chunk_size`` chunks (the last may be shorter; empty -> one)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    data = bytes(payload)
    count = chunk_count_for(len(data), chunk_size)
    pieces = tuple(
        Chunk(i, crc32(part), part)
        for i in range(count)
        for part in (data[i * chunk_size : (i + 1) * chunk_size],)
    )
    spec = TransferSpec(len(data), count, chunk_size, hashlib.sha256(data).digest())
    return Split(spec, pieces)


# -- limits and the per-transfer reassembler ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferLimits:
    """Hard per-transfer limits, checked against the manifest before allocation."""

    max_total_size: int = 64 * MiB
    max_chunk_count: int = 4096
    max_chunk_size: int = 1 * MiB

    def check(self, spec: TransferSpec) -> None:
        if spec.total_size > self.max_total_size:
            raise LimitError(
                f"transfer of {spec.total_size} bytes > {self.max_total_size}", reason="too_large"
            )
        if spec.chunk_count > self.max_chunk_count:
            raise LimitError(
                f"{spec.chunk_count} chunks > {self.max_chunk_count}", reason="too_many_chunks"
            )
        if spec.chunk_size > self.max_chunk_size:
            raise LimitError(
                f"chunk size {spec.chunk_size} > {self.max_chunk_size}", reason="chunk_too_large"
            )


class Reassembler:
    """Reassembles one transfer. Not thread-safe; one owner."""

    def __init__(
        self,
        spec: TransferSpec,
        *,
        limits: TransferLimits | None = None,
        expires_at: float = math.inf,
    ) -> None:
        (limits or TransferLimits()).check(spec)  # before allocating anything
        self.spec = spec
        self.expires_at = expires_at
        self._chunks: dict[int, bytes] = {}
        self._have = bytearray(bitmap_len(spec.chunk_count))
        self._payload: bytes | None = None
        self.received_bytes = 0

    def add(self, index: int, crc: int, data: bytes) -> bool:
        """Store one chunk. Returns False for a duplicate (ignored), True for a new chunk.

        Raises ChunkIndexError, ChunkSizeError or ChunkChecksumError; state is then unchanged.
        """
        if not 0 <= index < self.spec.chunk_count:
            raise ChunkIndexError(f"chunk {index} outside [0, {self.spec.chunk_count})")
        if self._have[index >> 3] >> (index & 7) & 1:
            return False
        if len(data) != self.spec.length_of(index):
            raise ChunkSizeError(
                f"chunk {index} has {len(data)} bytes, expected {self.spec.length_of(index)}"
            )
        if crc32(data) != crc:
            raise ChunkChecksumError(f"chunk {index} fails its CRC-32")
        self._chunks[index] = bytes(data)
        self._have[index >> 3] |= 1 << (index & 7)
        self.received_bytes += len(data)
        return True

    @property
    def received(self) -> int:
        return len(self._chunks) if self._payload is None else self.spec.chunk_count

    @property
    def complete(self) -> bool:
        return self.received == self.spec.chunk_count

    def have_bitmap(self) -> bytes:
        return bytes(self._have)

    def missing(self) -> list[int]:
        return [i for i in range(self.spec.chunk_count) if not self._have[i >> 3] >> (i & 7) & 1]

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def payload(self) -> bytes:
        """The verified payload; raises PayloadChecksumError on a SHA-256 mismatch."""
        if self._payload is None:
            if not self.complete:
                raise TransferError("transfer is not complete", reason="incomplete")
            data = b"".join(self._chunks[i] for i in range(self.spec.chunk_count))
            if hashlib.sha256(data).digest() != self.spec.sha256:
                raise PayloadChecksumError("reassembled payload fails its SHA-256")
            self._payload = data
            self._chunks.clear()
        return self._payload


# -- uplink: message builders (device side; the aggregator side is broker.inbox) ----------------


def upload_messages(
    payload: bytes,
    *,
    upload_id: str,
    round_id: int,
    client: str,
    base_version: int,
    sample_count: int,
    method: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metadata: Mapping[str, str | bool | int | float] | None = None,
) -> tuple[UploadManifest, tuple[UploadChunk, ...]]:
    """Manifest and chunks of one upload (device side)."""
    spec, pieces = split(payload, chunk_size)
    manifest = UploadManifest(
        upload_id=upload_id,
        round=round_id,
        client=client,
        base_version=base_version,
        total_size=spec.total_size,
        chunk_count=spec.chunk_count,
        chunk_size=spec.chunk_size,
        sha256=spec.sha256,
        sample_count=sample_count,
        method=method,
        metadata=dict(metadata or {}),
    )
    chunks = tuple(
        UploadChunk(
            upload_id=upload_id,
            round=round_id,
            client=client,
            index=p.index,
            crc32=p.crc32,
            data=p.data,
        )
        for p in pieces
    )
    return manifest, chunks


def chunks_missing(chunks: Sequence[UploadChunk], ack: UploadAck) -> list[UploadChunk]:
    """The chunks an ack says the aggregator still lacks (all of them if it has no bitmap)."""
    if ack.status is AckStatus.COMPLETE:
        return []
    if not ack.have or ack.chunk_count != len(chunks):
        return list(chunks)
    missing = set(range(len(chunks))) - set(indices_from_bitmap(ack.have, ack.chunk_count))
    return [c for c in chunks if c.index in missing]


# -- downlink: global adapter and plans (aggregator builds, device downloads) ------------------


def global_manifest(
    payload: bytes,
    *,
    version: int,
    round_id: int,
    format: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metadata: Mapping[str, str | bool | int | float] | None = None,
) -> GlobalManifest:
    """The retained manifest of a global adapter version whose full payload is ``payload``."""
    spec = TransferSpec(
        len(payload),
        chunk_count_for(len(payload), chunk_size),
        chunk_size,
        hashlib.sha256(payload).digest(),
    )
    return GlobalManifest(
        version=version,
        round=round_id,
        total_size=spec.total_size,
        chunk_count=spec.chunk_count,
        chunk_size=spec.chunk_size,
        sha256=spec.sha256,
        format=format,
        metadata=dict(metadata or {}),
    )


def plan_messages(
    payload: bytes,
    *,
    version: int,
    route: DownlinkRoute,
    plan: bytes,
    base: bytes | None,
    result: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[DownlinkPlan, tuple[GlobalChunk, ...]]:
    """A downlink plan and the chunks of its payload (aggregator side)."""
    spec, pieces = split(payload, chunk_size)
    message = DownlinkPlan(
        version=version,
        route=route,
        plan=plan,
        base=base,
        result=result,
        total_size=spec.total_size,
        chunk_count=spec.chunk_count,
        chunk_size=spec.chunk_size,
        sha256=spec.sha256,
    )
    chunks = tuple(
        GlobalChunk(version=version, plan=plan, index=p.index, crc32=p.crc32, data=p.data)
        for p in pieces
    )
    return message, chunks


def chunks_for_fetch(
    plan: DownlinkPlan,
    chunks: Sequence[GlobalChunk],
    request: FetchRequest,
    *,
    max_chunks: int | None = None,
) -> list[GlobalChunk]:
    """Answer a fetch of ``plan``'s chunks: the wanted ones (at most ``max_chunks``), in order.

    An empty ``wanted`` bitmap means "everything". Raises StaleVersionError if the request is
    for another version or plan (the device re-reads the manifest or asks for a new plan),
    BitmapError if the bitmap does not fit the plan.
    """
    if request.version != plan.version or request.plan != plan.plan:
        raise StaleVersionError(
            f"fetch for v{request.version} plan {(request.plan or b'').hex()[:12]}, serving "
            f"v{plan.version} plan {plan.plan.hex()[:12]}"
        )
    if request.wanted:
        wanted = indices_from_bitmap(request.wanted, plan.chunk_count)
    else:
        wanted = list(range(plan.chunk_count))
    return [chunks[i] for i in wanted[:max_chunks]]


class Download:
    """Device side of the downlink: the payload of one plan, fetched holding state ``held``."""

    def __init__(
        self,
        plan: DownlinkPlan,
        *,
        held: bytes | None,
        limits: TransferLimits | None = None,
        expires_at: float = math.inf,
    ) -> None:
        self.plan = plan
        self.held = held
        self.reassembler = Reassembler(TransferSpec.of(plan), limits=limits, expires_at=expires_at)

    @property
    def complete(self) -> bool:
        return self.reassembler.complete

    def add(self, chunk: GlobalChunk) -> bool:
        """Store a chunk (False for a duplicate); StaleVersionError if it is of another plan."""
        if chunk.version != self.plan.version or chunk.plan != self.plan.plan:
            raise StaleVersionError(
                f"chunk of v{chunk.version} plan {chunk.plan.hex()[:12]}, downloading "
                f"v{self.plan.version} plan {self.plan.plan.hex()[:12]}"
            )
        return self.reassembler.add(chunk.index, chunk.crc32, chunk.data)

    def fetch_request(self, max_chunks: int | None = None) -> FetchRequest:
        """Ask for the missing chunks (the first ``max_chunks`` of them, if given)."""
        missing = self.reassembler.missing()[:max_chunks]
        return FetchRequest(
            version=self.plan.version,
            held=self.held,
            plan=self.plan.plan,
            wanted=bitmap_from_indices(missing, self.plan.chunk_count),
        )

    def payload(self) -> bytes:
        return self.reassembler.payload()
