"""The uplink side of the protocol: store an upload in the outbox, publish it, drive it to a
final ack.

One upload is active at a time; others wait in the outbox. A new upload gets its id and its
outbox entry here (:meth:`Uploader.store`), durable before its first byte is published. The
state machine, per docs/architecture.md ("Acks"):

* a new upload sends its manifest and every chunk; a resumed one (after a restart) sends only
  the manifest, which doubles as the status query;
* ``receiving`` acks answer manifests. The one answering the *first* manifest only proves the
  aggregator is listening; only a reply to a status query (a re-sent manifest) makes us re-send
  what it lists as missing. Two kinds of stale ack must not pass for that reply. Acks the
  persistent session kept for a previous (killed) process arrive with the session, before
  anything is sent: :meth:`Uploader.resume` drops them before its query goes out. Acks in
  flight that answer an earlier manifest of this process arrive after the query: the newest
  reply is acted on ``settle_s`` after it arrived;
* ``unknown`` -> re-send the manifest (once per outstanding query: the aggregator answers every
  chunk of an upload it lost with ``unknown``);
* ``complete`` / ``rejected`` / ``late`` -> the outbox entry is marked, the upload is finished;
* no ack for ``ack_timeout_s`` -> re-send the manifest;
* when a later round is announced, the aggregator has closed ours: one more status query, and
  without an answer the entry is closed locally as ``late``.

Nothing here trains or reads settings; the agent passes what it needs.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from broker.chunking import chunks_missing, upload_messages
from broker.codec import encode
from broker.errors import PacketTooLargeError
from broker.messages import AckStatus, RoundAnnouncement, UploadAck, UploadChunk, UploadManifest
from broker.progress import DeviceProgress, Stage
from broker.topics import ack_topic, upload_topic
from broker.transport import Message, PublishHandle, Transport
from edge_agent.outbox import Outbox, OutboxEntry, OutboxError
from edge_agent.trainer import TrainResult
from workload.adapters import sha256_hex

__all__ = ["ActiveUpload", "SendStats", "UploadOutcome", "Uploader"]

log = logging.getLogger(__name__)


@dataclass
class SendStats:
    """What one upload cost on the wire (encoded message bytes, as published)."""

    manifests: int = 0
    chunks_first: int = 0
    chunks_resent: int = 0
    bytes_first: int = 0
    bytes_resent: int = 0
    manifest_bytes: int = 0


@dataclass(frozen=True)
class UploadOutcome:
    """A finished upload, handed to the agent's callback."""

    entry: OutboxEntry
    state: str  # complete | rejected | late
    reason: str
    stats: SendStats


@dataclass
class ActiveUpload:
    entry: OutboxEntry
    manifest: UploadManifest
    chunks: tuple[UploadChunk, ...]
    #: Resumed from the outbox by a new process: every chunk it sends counts as a re-send,
    #: since an earlier process may have sent it (what it did send is not recorded).
    resumed: bool
    last_heard: float
    sent: set[int] = field(default_factory=set)
    #: The latest publish of each chunk this process sent: PUBACKed = through the link.
    handles: dict[int, PublishHandle] = field(default_factory=dict)
    #: A status query is out; the next ``receiving`` ack lists what the aggregator lacks.
    awaiting_reply: bool = False
    reply: UploadAck | None = None
    reply_at: float = 0.0
    superseded_at: float | None = None
    stats: SendStats = field(default_factory=SendStats)


class Uploader:
    """Publishes outbox entries one at a time and handles their acks."""

    def __init__(
        self,
        client: Transport,
        outbox: Outbox,
        *,
        fleet: str,
        client_id: str,
        ack_timeout_s: float,
        settle_s: float,
        expiry_grace_s: float,
        on_finished: Callable[[UploadOutcome], None],
    ) -> None:
        self._client = client
        self._outbox = outbox
        self._fleet = fleet
        self._me = client_id
        self._ack_timeout_s = ack_timeout_s
        self._settle_s = settle_s
        self._grace_s = expiry_grace_s
        self._on_finished = on_finished
        self._queue: deque[OutboxEntry] = deque()
        self.active: ActiveUpload | None = None

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self._queue)

    # -- starting ----------------------------------------------------------------------------

    def store(
        self,
        ann: RoundAnnouncement,
        *,
        base_version: int,
        result: TrainResult,
        now: float,
        downlink_route: str | None = None,
    ) -> OutboxEntry:
        """Write round ``ann``'s update to the outbox under a new upload id (fsync'd: durable
        before its first byte is published); :meth:`start` publishes it. ``downlink_route``
        (how the device got the adapter it trained from) goes into the manifest's metadata:
        the aggregator counts derived initial adapters from it."""
        update = result.update
        entry = OutboxEntry(
            upload_id=f"r{ann.round}-{secrets.token_hex(8)}",
            round_id=ann.round,
            base_version=base_version,
            sha256=sha256_hex(update.payload),
            size=len(update.payload),
            sample_count=result.sample_count,
            method=update.method,
            metadata=result.manifest_metadata()
            | ({} if downlink_route is None else {"downlink_route": downlink_route}),
            created_at=now,
            chunk_size=ann.chunk_size,
            deadline=ann.deadline,
        )
        return self._outbox.put(entry, update.payload)

    def resume(self, entries: list[OutboxEntry], now: float) -> list[Message]:
        """Queue pending outbox entries (oldest first) left by an earlier process.

        Returns what the transport had already delivered, less our acks, for the caller to
        dispatch. Those acks were kept by our persistent session for the previous process (a
        killed process never PUBACKed them) and cannot answer the status query the resume
        sends; taken for its reply, a stale ``receiving`` with an empty bitmap would make every
        chunk go out again.
        """
        early = list(iter(lambda: self._client.receive(timeout=0), None))
        self._queue.extend(entries)
        self._next(now)
        mine = ack_topic(self._fleet, self._me)
        return [msg for msg in early if msg.topic != mine]

    def start(self, entry: OutboxEntry, payload: bytes, now: float) -> None:
        """Publish a freshly stored upload: manifest, then every chunk."""
        if self.active is not None:
            raise RuntimeError("an upload is already active")
        up = self.active = self._activate(entry, payload, now, resumed=False)
        self._send_manifest(now)
        if self.active is up:  # not closed by an oversized manifest
            self._send_chunks(up.chunks, now)

    def _next(self, now: float) -> None:
        while self.active is None and self._queue:
            entry = self._queue.popleft()
            try:
                payload = self._outbox.payload(entry.upload_id)
            except OutboxError as exc:
                # A corrupted entry can never be sent as recorded; closing it beats retrying
                # it on every start.
                log.error("%s; closing it", exc, extra=self._ctx(entry.round_id))
                self._outbox.mark(entry.upload_id, "rejected")
                continue
            log.info(
                "resuming upload %s of round %d from the outbox (no retraining)",
                entry.upload_id,
                entry.round_id,
                extra=self._ctx(entry.round_id),
            )
            self.active = self._activate(entry, payload, now, resumed=True)
            self._query(now)

    def _activate(
        self, entry: OutboxEntry, payload: bytes, now: float, *, resumed: bool
    ) -> ActiveUpload:
        manifest, chunks = upload_messages(
            payload,
            upload_id=entry.upload_id,
            round_id=entry.round_id,
            client=self._me,
            base_version=entry.base_version,
            sample_count=entry.sample_count,
            method=entry.method,
            chunk_size=entry.chunk_size,
            metadata=entry.metadata,
        )
        return ActiveUpload(entry, manifest, chunks, resumed, last_heard=now)

    # -- events ------------------------------------------------------------------------------

    def on_ack(self, ack: UploadAck, now: float) -> None:
        up = self.active
        if up is None or ack.upload_id != up.entry.upload_id or ack.round != up.entry.round_id:
            log.debug("ignoring ack for upload %s (not active)", ack.upload_id)
            return
        up.last_heard = now
        log.debug(
            "ack %s for upload %s (%d chunks in bitmap)",
            ack.status.value, ack.upload_id, bin(int.from_bytes(ack.have, "little")).count("1"),
            extra=self._ctx(ack.round),
        )  # fmt: skip
        if ack.status in (AckStatus.COMPLETE, AckStatus.REJECTED, AckStatus.LATE):
            self._finish(ack.status.value, ack.reason, now)
            return
        if ack.status is AckStatus.UNKNOWN:
            if up.reply is not None or not up.awaiting_reply:
                # Acks are ordered: an `unknown` after a reply means the aggregator lost the
                # upload since (e.g. it restarted), so that reply is void.
                up.reply = None
                log.info(
                    "aggregator does not know upload %s; re-sending its manifest",
                    up.entry.upload_id,
                    extra=self._ctx(up.entry.round_id),
                )
                self._query(now)
        else:
            # `receiving`: the aggregator answers `late` for a closed round, so ours is open.
            up.superseded_at = None
            if up.awaiting_reply:
                up.reply, up.reply_at = ack, now + self._settle_s

    def tick(self, now: float) -> None:
        """Act on timers: a settled reply, a superseded round, the ack timeout."""
        up = self.active
        if up is None:
            return
        if up.reply is not None:
            if now >= up.reply_at:
                missing = chunks_missing(up.chunks, up.reply)
                up.reply, up.awaiting_reply, up.last_heard = None, False, now
                self._send_chunks(missing, now)
        elif up.superseded_at is not None and now - up.superseded_at >= self._ack_timeout_s:
            self._finish("late", "superseded: a later round opened and no ack came", now)
        elif now - up.last_heard >= self._ack_timeout_s:
            self._query(now)

    def supersede(self, round_id: int, now: float) -> None:
        """A later round was announced: ask once more about the active upload, then give up."""
        up = self.active
        if up is not None and up.entry.round_id < round_id and up.superseded_at is None:
            up.superseded_at = now
            self._query(now)

    def extend_deadline(self, round_id: int, deadline: float) -> None:
        """The round was re-announced with a new deadline: later messages expire later."""
        up = self.active
        if up is not None and up.entry.round_id == round_id:
            up.entry = replace(up.entry, deadline=deadline)

    def progress(self) -> DeviceProgress | None:
        """``uploading`` (chunks through the link to the broker / all) until every chunk sent is
        PUBACKed, then ``awaiting_ack`` (the aggregator's verdict); None without an upload."""
        up = self.active
        if up is None:
            return None
        n = len(up.chunks)
        in_flight = sum(not h.done() for h in up.handles.values())
        stage = Stage.UPLOADING if in_flight else Stage.AWAITING_ACK
        return DeviceProgress(stage, n - in_flight, n)

    def next_timer(self) -> float | None:
        up = self.active
        if up is None:
            return None
        if up.reply is not None:
            return up.reply_at
        start = up.superseded_at if up.superseded_at is not None else up.last_heard
        return start + self._ack_timeout_s

    # -- sending -----------------------------------------------------------------------------

    def _query(self, now: float) -> None:
        up = self.active
        assert up is not None
        up.awaiting_reply, up.last_heard = True, now
        self._send_manifest(now)

    def _send_manifest(self, now: float) -> None:
        up = self.active
        assert up is not None
        data = encode(up.manifest)
        if self._publish(data, now) is not None:
            up.stats.manifests += 1
            up.stats.manifest_bytes += len(data)

    def _send_chunks(self, chunks: list[UploadChunk] | tuple[UploadChunk, ...], now: float) -> None:
        up = self.active
        assert up is not None
        for chunk in chunks:
            data = encode(chunk)
            handle = self._publish(data, now)
            if handle is None:
                return
            up.handles[chunk.index] = handle
            if up.resumed or chunk.index in up.sent:
                up.stats.chunks_resent += 1
                up.stats.bytes_resent += len(data)
            else:
                up.stats.chunks_first += 1
                up.stats.bytes_first += len(data)
            up.sent.add(chunk.index)
        if up.sent and chunks:
            log.debug(
                "sent %d chunks of upload %s",
                len(chunks),
                up.entry.upload_id,
                extra=self._ctx(up.entry.round_id),
            )

    def _publish(self, data: bytes, now: float) -> PublishHandle | None:
        """QoS 1 with message expiry; None (and the upload closed) if it can never fit."""
        up = self.active
        assert up is not None
        topic = upload_topic(self._fleet, self._me, up.entry.round_id)
        expiry = max(1, int(up.entry.deadline - now + self._grace_s))
        try:
            return self._client.publish(topic, data, qos=1, expiry_s=expiry)
        except PacketTooLargeError as exc:
            # Resending cannot help: the chunk size the round announced exceeds the broker limit.
            self._finish("rejected", f"packet_too_large: {exc}", now)
            return None

    def _finish(self, state: str, reason: str, now: float) -> None:
        up = self.active
        assert up is not None
        self._outbox.mark(up.entry.upload_id, state)
        self.active = None
        e, st = up.entry, up.stats
        log.log(
            logging.INFO if state == "complete" else logging.WARNING,
            "round %d %s%s: upload %s %d B in %d chunks; sent %d manifests, chunks first %d "
            "(%d B) resent %d (%d B)",
            e.round_id, state, f" ({reason})" if reason else "", e.upload_id, e.size,
            len(up.chunks), st.manifests, st.chunks_first, st.bytes_first, st.chunks_resent,
            st.bytes_resent, extra=self._ctx(e.round_id),
        )  # fmt: skip
        self._on_finished(UploadOutcome(up.entry, state, reason, up.stats))
        self._next(now)

    def _ctx(self, round_id: int) -> dict[str, object]:
        return {"round": round_id, "client": self._me, "phase": "uploading"}
