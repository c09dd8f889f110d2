"""Aggregator-side table of uploads in progress (pure, no I/O, no clock).

An :class:`Inbox` manages many uploads keyed by :class:`UploadKey` ``(round, client, upload_id)``
with memory bounded by :class:`InboxLimits`:

* the caller first checks that a message names the client and round of the topic it came on
  (:func:`check_origin`), once, before anything else looks at it;
* a manifest opens an upload after every limit is checked (per-transfer size/chunk limits,
  concurrent uploads in total and per client, reserved bytes = sum of declared sizes) --
  nothing is allocated for a refused manifest;
* chunks may arrive in any order and more than once; each is CRC-checked on arrival, the whole
  payload SHA-256-checked on the last one;
* a chunk whose manifest is unknown is **rejected** (:class:`UnknownUploadError`) rather than
  buffered: the aggregator answers with an ``unknown`` ack, the device re-sends its manifest and
  then only the chunks the next ack lists as missing. Nothing is buffered without a manifest, so
  memory stays bounded by the reserved bytes;
* re-sending an identical manifest is the device's way to ask "what do you have?": it returns
  the current ack;
* finished uploads (complete, rejected, late) leave a bounded tombstone so a late duplicate or a
  re-sent manifest still gets the right answer.

Time is whatever the caller passes as ``now`` (unix seconds or a test clock).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from broker.chunking import MiB, Reassembler, TransferLimits, TransferSpec, full_bitmap
from broker.errors import (
    ExpiredError,
    LimitError,
    ManifestConflictError,
    OriginError,
    PayloadChecksumError,
    UnknownUploadError,
)
from broker.messages import AckStatus, UploadAck, UploadChunk, UploadManifest
from broker.topics import UploadTopic

__all__ = [
    "ChunkResult",
    "CompletedUpload",
    "Inbox",
    "InboxLimits",
    "UploadKey",
    "check_origin",
    "verdict_ack",
]


class UploadKey(NamedTuple):
    round: int
    client: str
    upload_id: str

    @classmethod
    def of(cls, msg: UploadManifest | UploadChunk) -> UploadKey:
        return cls(msg.round, msg.client, msg.upload_id)


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """Bounds on everything an :class:`Inbox` holds at once."""

    transfer: TransferLimits = field(default_factory=TransferLimits)
    max_uploads: int = 64
    max_uploads_per_client: int = 2
    max_reserved_bytes: int = 256 * MiB
    upload_ttl_s: float = 900.0
    max_finished: int = 4096


@dataclass(frozen=True, slots=True)
class CompletedUpload:
    manifest: UploadManifest
    payload: bytes


@dataclass(frozen=True, slots=True)
class ChunkResult:
    key: UploadKey
    new: bool
    completed: CompletedUpload | None = None


@dataclass(slots=True)
class _Open:
    manifest: UploadManifest
    reassembler: Reassembler


class Inbox:
    """Aggregator-side table of uploads in progress, memory bounded by :class:`InboxLimits`.

    Reserved memory is the sum of the declared ``total_size`` of open uploads; a manifest that
    would exceed any limit is refused with :class:`LimitError` before anything is allocated.
    Finished uploads leave a bounded tombstone so late duplicates get a correct ack.
    """

    def __init__(self, limits: InboxLimits | None = None) -> None:
        self.limits = limits or InboxLimits()
        self._open: dict[UploadKey, _Open] = {}
        self._finished: OrderedDict[UploadKey, tuple[AckStatus, str, int]] = OrderedDict()
        self.reserved_bytes = 0

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, key: object) -> bool:
        return key in self._open

    def keys(self) -> list[UploadKey]:
        return list(self._open)

    def open(
        self, manifest: UploadManifest, *, now: float, expires_at: float | None = None
    ) -> UploadAck:
        """Accept a manifest (idempotent for an identical re-send) and return the ack to send."""
        key = UploadKey.of(manifest)
        if key in self._finished:
            return self.ack(key)
        current = self._open.get(key)
        if current is not None:
            if current.manifest != manifest:
                raise ManifestConflictError(f"different manifest for open upload {key}")
            return self.ack(key)
        spec = TransferSpec.of(manifest)
        self.limits.transfer.check(spec)
        per_client = sum(1 for k in self._open if k.client == key.client)
        if per_client >= self.limits.max_uploads_per_client:
            raise LimitError(
                f"{key.client} already has {per_client} uploads open", reason="client_uploads"
            )
        if len(self._open) >= self.limits.max_uploads:
            raise LimitError(f"{len(self._open)} uploads already open", reason="too_many_uploads")
        if self.reserved_bytes + spec.total_size > self.limits.max_reserved_bytes:
            raise LimitError(
                f"{spec.total_size} bytes would exceed the {self.limits.max_reserved_bytes} "
                f"byte budget ({self.reserved_bytes} reserved)",
                reason="memory",
            )
        deadline = now + self.limits.upload_ttl_s if expires_at is None else expires_at
        reassembler = Reassembler(spec, limits=self.limits.transfer, expires_at=deadline)
        self._open[key] = _Open(manifest, reassembler)
        self.reserved_bytes += spec.total_size
        return self.ack(key)

    def add(self, chunk: UploadChunk, *, now: float) -> ChunkResult:
        """Store a chunk; on the last one verify the SHA-256 and return the completed upload."""
        key = UploadKey.of(chunk)
        if key in self._finished:
            return ChunkResult(key, new=False)
        entry = self._open.get(key)
        if entry is None:
            raise UnknownUploadError(f"no manifest for {key}")
        if entry.reassembler.expired(now):
            self._finish(key, AckStatus.LATE, "expired")
            raise ExpiredError(f"upload {key} expired")
        if not entry.reassembler.add(chunk.index, chunk.crc32, chunk.data):
            return ChunkResult(key, new=False)
        if not entry.reassembler.complete:
            return ChunkResult(key, new=True)
        try:
            payload = entry.reassembler.payload()
        except PayloadChecksumError:
            self._finish(key, AckStatus.REJECTED, PayloadChecksumError.default_reason)
            raise
        self._finish(key, AckStatus.COMPLETE, "")
        return ChunkResult(key, new=True, completed=CompletedUpload(entry.manifest, payload))

    def ack(self, key: UploadKey) -> UploadAck:
        """The acknowledgement describing ``key`` right now (``unknown`` if never seen)."""
        entry = self._open.get(key)
        if entry is not None:
            r = entry.reassembler
            return UploadAck(
                upload_id=key.upload_id,
                round=key.round,
                status=AckStatus.RECEIVING,
                chunk_count=r.spec.chunk_count,
                have=r.have_bitmap(),
            )
        status, reason, count = self._finished.get(key, (AckStatus.UNKNOWN, "", 0))
        return verdict_ack(key, status, reason, count)

    def drop(
        self, key: UploadKey, status: AckStatus = AckStatus.REJECTED, reason: str = ""
    ) -> bool:
        """Abandon an open upload (e.g. the round closed); returns False if it was not open."""
        if key not in self._open:
            return False
        self._finish(key, status, reason)
        return True

    def settle(self, key: UploadKey, status: AckStatus, reason: str = "") -> None:
        """Set the final verdict of ``key``, open or finished.

        For checks past reassembly: a payload whose SHA-256 matched but which fails to decode
        or validate must answer a re-sent manifest with ``rejected``, not ``complete``.
        """
        self._finish(key, status, reason)

    def drop_round(self, round_id: int, status: AckStatus = AckStatus.LATE) -> list[UploadKey]:
        """Abandon every open upload of ``round_id``."""
        keys = [k for k in self._open if k.round == round_id]
        for k in keys:
            self._finish(k, status, "round_closed")
        return keys

    def expire(self, now: float) -> list[UploadKey]:
        """Abandon every open upload whose deadline has passed; returns their keys."""
        keys = [k for k, e in self._open.items() if e.reassembler.expired(now)]
        for k in keys:
            self._finish(k, AckStatus.LATE, "expired")
        return keys

    def _finish(self, key: UploadKey, status: AckStatus, reason: str) -> None:
        entry = self._open.pop(key, None)
        count = self._finished.get(key, (AckStatus.UNKNOWN, "", 0))[2]  # re-settled: keep it
        if entry is not None:
            self.reserved_bytes -= entry.reassembler.spec.total_size
            count = entry.reassembler.spec.chunk_count
        self._finished[key] = (status, reason, count)
        self._finished.move_to_end(key)
        while len(self._finished) > self.limits.max_finished:
            self._finished.popitem(last=False)


def verdict_ack(
    key: UploadKey, status: AckStatus, reason: str = "", chunk_count: int = 0
) -> UploadAck:
    """An ack that is not progress: ``complete`` (all ``chunk_count`` chunks) or a verdict."""
    have = full_bitmap(chunk_count) if status is AckStatus.COMPLETE else b""
    return UploadAck(
        upload_id=key.upload_id,
        round=key.round,
        status=status,
        chunk_count=chunk_count if have else 0,
        have=have,
        reason=reason[:256],  # the wire limit; longer details go to the log
    )


def check_origin(msg: UploadManifest | UploadChunk, topic: UploadTopic) -> None:
    """:class:`OriginError` unless ``msg`` names the client and round of ``topic``.

    The broker's ACL vouches only for the topic (``pattern write fstq/v1/+/up/%u/+``), so what
    a message says about its sender counts only where the two agree.
    """
    if msg.client != topic.client or msg.round != topic.round:
        raise OriginError(f"{msg.kind} of {msg.client}/{msg.round} on {topic}")
