"""The aggregator service: one thread, one MQTT client, one SQLite store.

Implements "The protocol, message by message" of docs/architecture.md. The loop takes one
message at a time (``receive(timeout)``), dispatches it by topic family, then ticks the round
clock (:class:`~aggregator.round_controller.RoundController`, which owns rounds and global
adapter versions). Hostile or broken input is answered when it names an upload, always counted
and logged, never raised: a rejection leaves the running FedAvg sum untouched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from aggregator.adapter_model import AdapterModel, ModelLoader, default_loader, load_eval_examples
from aggregator.downlink import ServedPlan
from aggregator.fedavg import RejectedUpdate
from aggregator.metrics import received_wire_bytes
from aggregator.progress import ProgressReporter
from aggregator.prometheus import ServiceMetrics
from aggregator.round_controller import Event, RoundController
from aggregator.rounds import live_clients
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.chunking import chunks_for_fetch
from broker.codec import decode, encode
from broker.errors import (
    BitmapError,
    ExpiredError,
    OriginError,
    TopicError,
    TransferError,
    TransportError,
    UnexpectedKindError,
    UnknownUploadError,
    WireError,
)
from broker.inbox import CompletedUpload, Inbox, UploadKey, check_origin, verdict_ack
from broker.messages import (
    AckStatus,
    ClientState,
    ClientStatus,
    DownlinkPlan,
    FetchRequest,
    GlobalChunk,
    UploadAck,
    UploadChunk,
    UploadManifest,
)
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
    progress_topic,
    round_topic,
    status_filter,
)
from broker.transport import Message, PublishHandle, Transport
from common import atomic
from workload.batches import Example

__all__ = ["Aggregator", "ClientFactory", "Clock"]

log = logging.getLogger(__name__)

#: Builds an unconnected MQTT client (tests inject one; the default is ``broker.mqtt``).
ClientFactory = Callable[[MqttSettings], Transport]
#: Unix seconds; injected so tests can move deadlines without sleeping.
Clock = Callable[[], float]

_MAX_THROTTLED = 4096  # upload keys remembered for ack throttling


class _Taken(NamedTuple):
    """An upload chunk the inbox took: how Prometheus counts its bytes, what it completed."""

    kind: str  # "payload" (first copy) or "resent"
    size: int
    completed: CompletedUpload | None = None


def _mqtt_client(settings: MqttSettings) -> Transport:
    from broker.mqtt import MqttClient  # the only paho importer, loaded only when used

    return MqttClient(settings)


class Aggregator:
    """The service of one fleet: ``start()``, then ``run(stop)`` (or ``step()`` in tests)."""

    def __init__(
        self,
        settings: AggregatorSettings,
        *,
        client_factory: ClientFactory | None = None,
        clock: Clock = time.time,
        model_loader: ModelLoader | None = None,
    ) -> None:
        self.settings = settings
        self._fleet = settings.fleet
        self._client_factory = client_factory or _mqtt_client
        self._clock = clock
        self._model = AdapterModel(
            model_loader or default_loader(settings.model, settings.model_cache_dir),
            settings.lora.spec(),
            settings.init_seed,
        )
        self._controller: RoundController | None = None
        self._client: Transport | None = None
        self._inbox = Inbox(settings.inbox.limits())
        self._upload_wire: defaultdict[UploadKey, int] = defaultdict(int)
        self._upload_started: dict[UploadKey, float] = {}  # first manifest, for the histogram
        #: Prometheus metrics (private registry); served when ``metrics_port`` is set.
        self.prometheus = ServiceMetrics(settings.fleet)
        self._throttle: OrderedDict[UploadKey, float] = OrderedDict()
        #: (client, plan) -> the staleness label of the plan request, for its chunks' bytes.
        self._fetch_staleness: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._last_seen: dict[str, float] = {}
        self._retained: list[PublishHandle] = []
        self._progress = ProgressReporter(settings.fleet, settings.progress_interval_s)
        self._next_health = 0.0

    # -- public state ------------------------------------------------------------------------

    @property
    def rounds(self) -> RoundController:
        assert self._controller is not None, "start() first"
        return self._controller

    @property
    def counters(self) -> Counter[str]:
        """Lifetime counters: rejections by reason, ``late``, ``stale_fetch``, ..."""
        return self.rounds.counters

    @property
    def global_version(self) -> int:
        return self.rounds.current.version

    @property
    def open_round(self) -> int | None:
        rnd = self.rounds.round
        return rnd.round_id if rnd is not None else None

    @property
    def finished(self) -> bool:
        return self.rounds.finished

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, load or create the global adapter, resume, connect and announce.

        Raises the model/data errors of ``workload`` (bad model source, eval file), a
        ``LoraMismatchError`` (state made with other LoRA settings) or a ``TransportError``
        (broker unreachable); the CLI maps them to exit codes.
        """
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        s, now = self.settings, self._clock()
        store = AggregatorStore(s.db_path)
        examples: list[Example] = []
        if s.eval.path is not None:  # load now: a bad path or model fails at start, not later
            examples = load_eval_examples(
                self._model.tokenizer, s.eval.path, s.eval.max_examples, s.eval.max_len
            )
        self._controller = RoundController(s, store, self._model, examples)
        self._controller.load(now)
        rounds = self._controller
        resumed = None if rounds.round is None else rounds.round.state.selected
        self.prometheus.state(rounds.last_round_id, resumed, self.global_version)
        if s.metrics_port:
            self.prometheus.serve(s.metrics_host, s.metrics_port)
        client = self._client_factory(s.mqtt)
        self._client = client
        client.connect(timeout=s.start_timeout_s)
        for topic_filter in aggregator_filters(self._fleet):
            # Statuses at QoS 0: the broker queues none of them for us while we are away (each
            # device's retained last status is what counts), so they never crowd out chunks.
            client.subscribe(
                topic_filter, qos=0 if topic_filter == status_filter(self._fleet) else 1
            )
        self._publish_global()
        if self.rounds.round is not None:
            self._announce()
        self._write_health()
        log.info("aggregator of fleet %s started: global v%d, open round %s", self._fleet,
                 self.global_version, self.open_round,
                 extra={"fleet": self._fleet, "round": self.open_round})  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set or ``max_rounds`` rounds have ended; then close."""
        if self._client is None:
            self.start()
        try:
            while not stop.is_set() and not self.finished:
                self.step(self.settings.poll_s)
        finally:
            self.close()

    def step(self, timeout: float) -> None:
        """One loop turn: at most one message, then a tick of the round clock."""
        assert self._client is not None, "start() first"
        msg = self._client.receive(timeout)
        if msg is not None:
            self.handle(msg)
        self.tick(self._clock())

    def close(self) -> None:
        """Disconnect (nothing retained is published or cleared here) and close the store."""
        self.prometheus.close()
        client, self._client = self._client, None
        if client is not None:
            for handle in self._retained:  # let the latest global manifest reach the broker
                with contextlib.suppress(TransportError):
                    handle.wait(2.0)
            client.close()
        if self._controller is not None:
            self._controller.store.close()
            self._controller = None

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Process one received message; never raises for anything the network sent."""
        now = self._clock()
        try:
            topic = parse_topic(msg.topic)
        except TopicError as exc:
            self._note_rejection(None, None, exc.reason, str(exc), now)
            return
        try:
            if isinstance(topic, UploadTopic):
                self._last_seen[topic.client] = now
                self._on_upload(topic, msg, now)
            elif isinstance(topic, FetchTopic):
                self._last_seen[topic.client] = now
                self._on_fetch(topic, decode(msg.payload, expect=FetchRequest), now)
            elif isinstance(topic, StatusTopic):
                status = decode(msg.payload, expect=ClientStatus)
                # A retained status is a device's last word: heard when it says, not now.
                self._on_status(topic, status, min(now, status.timestamp) if msg.retain else now)
        except WireError as exc:  # undecodable: no upload id to answer, so count and log only
            round_id = topic.round if isinstance(topic, UploadTopic) else None
            client = getattr(topic, "client", None)
            self._note_rejection(round_id, client, exc.reason, str(exc), now)
        except Exception:  # a bug must not take the fleet's aggregator down with it
            log.exception("internal error handling a message on %s", msg.topic)
            self.counters["internal_error"] += 1

    def _on_status(self, topic: StatusTopic, status: ClientStatus, now: float) -> None:
        if status.client != topic.client:
            detail = f"status of {status.client!r} on {topic}"
            self._note_rejection(None, topic.client, "origin", detail, now)
        elif status.state is ClientState.OFFLINE:
            self._last_seen.pop(topic.client, None)
        else:
            self._last_seen[topic.client] = now

    def _on_fetch(self, topic: FetchTopic, request: FetchRequest, now: float) -> None:
        """A plan request (no ``plan``) gets a :class:`DownlinkPlan`; a chunk request gets the
        wanted chunks of its plan, or a new plan when that one is not (or no longer) known."""
        client, downlink = topic.client, self.rounds.downlink
        if request.version != self.global_version:  # the device re-reads the retained manifest
            log.debug("stale fetch for v%d from %s", request.version, client)
            self.counters["stale_fetch"] += 1
            return
        served = None if request.plan is None else downlink.served(request.plan)
        if served is None:
            outcome = downlink.plan(client, request.held, now)  # durable before it is sent
            served = outcome.served
            self._fetch_staleness[(client, served.message.plan)] = outcome.staleness
            self._fetch_staleness.move_to_end((client, served.message.plan))
            while len(self._fetch_staleness) > _MAX_THROTTLED:
                self._fetch_staleness.popitem(last=False)
            self.rounds.metrics.downlink.planned(
                outcome.computed, outcome.compute_s, outcome.error, outcome.error_vs_master
            )
            self._send_downlink(client, served, [served.message], outcome.staleness)
            return
        try:
            chunks = chunks_for_fetch(served.message, served.chunks, request)
        except BitmapError as exc:
            self._note_rejection(None, client, exc.reason, str(exc), now)
            return
        staleness = self._fetch_staleness.get((client, served.message.plan))
        self._send_downlink(client, served, chunks, staleness)

    def _send_downlink(
        self,
        client: str,
        served: ServedPlan,
        messages: Sequence[DownlinkPlan | GlobalChunk],
        staleness: str | None,
    ) -> None:
        """Publish a plan or its chunks on ``down/<client>`` and count them (route, staleness)."""
        dest = down_topic(self._fleet, client)
        expiry = self.settings.downlink_expiry_s
        wire = sum(self._publish(dest, encode(m), expiry_s=expiry).size for m in messages)
        payload = sum(len(m.data) for m in messages if isinstance(m, GlobalChunk))
        chunks = sum(isinstance(m, GlobalChunk) for m in messages)
        plans = len(messages) - chunks
        metrics = self.rounds.metrics
        metrics.add_downlink(chunks, payload, wire)
        metrics.downlink.add(served.route.value, staleness, plans, payload, wire)
        self.prometheus.downlink(wire, payload)

    # -- uploads -----------------------------------------------------------------------------

    def _on_upload(self, topic: UploadTopic, msg: Message, now: float) -> None:
        wire = received_wire_bytes(msg)
        metrics = self.rounds.metrics
        metrics.uplink_messages += 1
        metrics.uplink_wire_bytes += wire
        taken: _Taken | None = None
        try:
            taken = self._dispatch_upload(topic, msg, wire, now)
        finally:  # every message counts; one refused or undecodable is all framing
            kind, size = (taken.kind, taken.size) if taken is not None else (None, 0)
            self.prometheus.uplink(wire, kind, size)
        if taken is not None and taken.completed is not None:
            self._on_complete(topic.client, taken.completed, now)

    def _dispatch_upload(
        self, topic: UploadTopic, msg: Message, wire: int, now: float
    ) -> _Taken | None:
        """Route one upload message; returns the chunk the inbox took, if it took one."""
        body = decode(msg.payload)
        if not isinstance(body, UploadManifest | UploadChunk):
            raise UnexpectedKindError(f"{body.kind!r} on an upload topic")
        key = UploadKey.of(body)
        try:
            check_origin(body, topic)
        except OriginError as exc:
            self._reject(key, topic.client, exc.reason, str(exc), now)
            return None
        if isinstance(body, UploadManifest):
            self._on_manifest(topic.client, body, key, wire, now)
            return None
        return self._on_chunk(topic.client, body, key, wire, now)

    def _on_manifest(
        self, client: str, m: UploadManifest, key: UploadKey, wire: int, now: float
    ) -> None:
        # The store first: a device asking about an upload we committed (its ack lost in a
        # restart, or the round closed meanwhile) must hear ``complete``, never ``late``.
        stored = self.rounds.store.accepted_upload(m.round, client)
        if stored is not None and stored.upload_id == m.upload_id:
            self._send_ack(client, verdict_ack(key, AckStatus.COMPLETE, chunk_count=m.chunk_count))
            return
        rnd = self.rounds.round
        if rnd is None or m.round != rnd.round_id:
            self._not_open(key, client, now)
            return
        if stored is not None:
            detail = f"already accepted upload {stored.upload_id} this round"
            self._reject(key, client, "duplicate", detail, now)
            return
        if client not in rnd.state.selected:
            self._reject(key, client, "not_selected", "client not selected", now)
            return
        if m.base_version != rnd.base_version:
            detail = f"trained from v{m.base_version}, round is on v{rnd.base_version}"
            self._reject(key, client, "base_version", detail, now)
            return
        try:
            ack = self._inbox.open(m, now=now)
        except TransferError as exc:  # limits (checked before allocating), manifest conflict
            self._reject(key, client, exc.reason, str(exc), now)
            return
        self._upload_wire[key] += wire
        self._upload_started.setdefault(key, now)
        self._send_ack(client, ack)

    def _on_chunk(
        self, client: str, c: UploadChunk, key: UploadKey, wire: int, now: float
    ) -> _Taken | None:
        metrics = self.rounds.metrics
        try:
            result = self._inbox.add(c, now=now)
        except UnknownUploadError:
            if self.open_round == c.round:  # e.g. we restarted: the device re-sends its manifest
                self._send_throttled(client, key, verdict_ack(key, AckStatus.UNKNOWN), now)
            else:
                self._not_open(key, client, now, per_chunk=True)
            return None
        except ExpiredError as exc:
            self._reject(key, client, exc.reason, str(exc), now, late=True)
            return None
        except WireError as exc:  # TransferError (index, size) or ChecksumError (CRC, SHA-256)
            if key in self._inbox:
                # A bad chunk (CRC, index, size) is dropped and a resend fixes it: answer with
                # what we have so the device re-sends only the missing chunks.
                self._note_rejection(c.round, client, exc.reason, str(exc), now)
                self._send_throttled(client, key, self._inbox.ack(key), now)
            else:  # SHA-256 mismatch: the inbox voided the upload
                self._forget(key)
                self._reject(key, client, exc.reason, str(exc), now)
            return None
        if not result.new and key not in self._inbox:  # the upload was settled before
            return self._on_settled_chunk(client, key, c, now)
        self._upload_wire[key] += wire
        if not result.new:
            metrics.duplicate_chunks += 1
            metrics.uplink_resent_bytes += len(c.data)
        else:
            metrics.uplink_payload_bytes += len(c.data)
        return _Taken("payload" if result.new else "resent", len(c.data), result.completed)

    def _on_settled_chunk(
        self, client: str, key: UploadKey, c: UploadChunk, now: float
    ) -> _Taken | None:
        """A chunk of a finished upload: a duplicate if it completed, else the verdict again.

        An upload dropped when its round closed (or expired, or refused) is not a duplicate:
        its device is still sending and must hear ``late``/``rejected`` (throttled), as the
        chunks of a closed round's unknown uploads do, instead of silence.
        """
        verdict = self._inbox.ack(key)
        if verdict.status is AckStatus.COMPLETE:  # at-least-once delivery, or a replay
            self.rounds.metrics.duplicate_chunks += 1
            self.rounds.metrics.uplink_resent_bytes += len(c.data)
            return _Taken("resent", len(c.data))
        if self._send_throttled(client, key, verdict, now):
            self.counters[f"{verdict.reason or verdict.status.value}_chunks"] += 1
        return None

    def _on_complete(self, client: str, done: CompletedUpload, now: float) -> None:
        """Decode, validate, commit, fold in; then (and only then) acknowledge ``complete``."""
        key = UploadKey.of(done.manifest)
        wire = self._upload_wire.pop(key, 0)
        started = self._upload_started.pop(key, None)
        try:
            self.rounds.accept(client, done.manifest, done.payload, wire, now)
        except RejectedUpdate as exc:
            self._inbox.settle(key, AckStatus.REJECTED, exc.reason)  # re-sent manifests agree
            self._reject(key, client, exc.reason, str(exc), now)
            return
        self.prometheus.accepted(None if started is None else now - started)
        m = done.manifest
        log.info("accepted %s from %s (%d bytes, %d samples)", m.upload_id, client,
                 len(done.payload), m.sample_count,
                 extra={"round": m.round, "client": client, "upload": m.upload_id})  # fmt: skip
        self._send_ack(client, self._inbox.ack(key))

    def _not_open(self, key: UploadKey, client: str, now: float, per_chunk: bool = False) -> None:
        """An upload for a round that is not open: ``late`` if the round existed."""
        if key.round <= self.rounds.last_round_id:
            status, reason = AckStatus.LATE, "round_closed"
        else:
            status, reason = AckStatus.REJECTED, "unknown_round"
        if per_chunk:  # the chunks of a late upload: answer them (throttled), count the manifest
            if self._send_throttled(client, key, verdict_ack(key, status, reason), now):
                self.counters[f"{reason}_chunks"] += 1
            return
        self._reject(key, client, reason, f"round {key.round} is not open", now,
                     late=status is AckStatus.LATE)  # fmt: skip

    def _forget(self, key: UploadKey) -> None:
        """Drop the per-upload bookkeeping of an upload the inbox no longer holds."""
        self._upload_wire.pop(key, None)
        self._upload_started.pop(key, None)

    # -- answers -----------------------------------------------------------------------------

    def _note_rejection(
        self,
        round_id: int | None,
        client: str | None,
        reason: str,
        detail: str,
        now: float,
        *,
        late: bool = False,
    ) -> None:
        """Count (round metrics, lifetime counters, Prometheus), record and log a rejection."""
        self.rounds.note_rejection(round_id, client, reason, detail, now, late=late)
        self.prometheus.rejection(reason, late=late)

    def _reject(
        self,
        key: UploadKey,
        client: str,
        reason: str,
        detail: str,
        now: float,
        *,
        late: bool = False,
    ) -> None:
        """Count, record and log a refused upload, and tell the device (``rejected``/``late``)."""
        self._note_rejection(key.round, client, reason, detail, now, late=late)
        status = AckStatus.LATE if late else AckStatus.REJECTED
        self._send_ack(client, verdict_ack(key, status, reason))

    def _send_ack(self, client: str, ack: UploadAck) -> None:
        handle = self._publish(ack_topic(self._fleet, client), encode(ack))
        self.rounds.metrics.control_wire_bytes += handle.size

    def _send_throttled(self, client: str, key: UploadKey, ack: UploadAck, now: float) -> bool:
        """At most one such ack per upload per ``unknown_ack_interval_s``; True if sent."""
        last = self._throttle.get(key)
        if last is not None and now - last < self.settings.unknown_ack_interval_s:
            return False
        self._throttle[key] = now
        self._throttle.move_to_end(key)
        while len(self._throttle) > _MAX_THROTTLED:
            self._throttle.popitem(last=False)
        self._send_ack(client, ack)
        return True

    # -- the round clock ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire stalled uploads, then let the controller open/close/extend/fail the round."""
        self._write_health()
        for key in self._inbox.expire(now):
            self._forget(key)
            self._note_rejection(key.round, key.client, "expired", "upload TTL passed",
                                       now, late=True)  # fmt: skip
        ttl = self.settings.rounds.heartbeat_ttl_s
        live = live_clients(self._last_seen, now, ttl)  # the controller uses it between rounds
        self.prometheus.live(len(live))
        round_id = self.open_round
        self._report_progress(None, now)  # an arrival that completes the round: before closing
        event = self.rounds.tick(now, live)
        if event is Event.OPENED:
            self._last_seen = {c: t for c, t in self._last_seen.items() if c in live}  # bounded
            rnd = self.rounds.round
            assert rnd is not None
            self.prometheus.opened(rnd.round_id, sorted(rnd.state.selected))
        elif event in (Event.CLOSED, Event.FAILED) and self.rounds.last_record is not None:
            self.prometheus.ended(self.rounds.last_record)
        if event in (Event.OPENED, Event.EXTENDED):
            self._announce()
        elif event in (Event.CLOSED, Event.FAILED):
            assert round_id is not None
            for key in self._inbox.drop_round(round_id):  # in-flight uploads are late now
                self._forget(key)
            if event is Event.CLOSED:
                self._publish_global()
            self.rounds.downlink.collect_garbage()
        self._report_progress(event, now)

    # -- publishing --------------------------------------------------------------------------

    def _announce(self) -> None:
        self._publish_retained(round_topic(self._fleet), encode(self.rounds.announcement()))

    def _publish_global(self) -> None:
        manifest = self.rounds.current.manifest
        self._publish_retained(global_manifest_topic(self._fleet), encode(manifest))

    def _report_progress(self, event: Event | None, now: float) -> None:
        """The retained round progress for observers (not protocol traffic: not in the bytes)."""
        rounds = self.rounds
        progress = self._progress.poll(rounds.round, event, rounds.last_record, now)
        if progress is not None:
            handle = self._publish(progress_topic(self._fleet), encode(progress), retain=True)
            self._retained = [h for h in self._retained if not h.done()] + [handle]

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        handle = self._publish(topic, payload, retain=True)
        self.rounds.metrics.control_wire_bytes += handle.size
        self._retained = [h for h in self._retained if not h.done()] + [handle]

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
    ) -> PublishHandle:
        # Never publish_wait: a PUBACK proves nothing end to end, and the loop must not block.
        assert self._client is not None
        return self._client.publish(topic, payload, retain=retain, expiry_s=expiry_s)

    def _write_health(self) -> None:
        """Rewrite <state>/health with the wall-clock time (read by ``--check``)."""
        mono = time.monotonic()
        if mono < self._next_health:
            return
        self._next_health = mono + self.settings.health_interval_s
        atomic.write_text(self.settings.health_path, f"{time.time():.3f}\n")
