"""The edge agent's round loop (docs/architecture.md, "Edge agent").

One thread: paho's network thread only fills the client's receive queue; :meth:`EdgeAgent.run`
takes messages with a timeout, dispatches them by topic and then runs every timer (heartbeat,
ack and fetch timeouts, watchdog). Training blocks the loop for its duration; messages queue
meanwhile and nothing is lost.

Start-up order: data, base model, outbox and device state, then the broker (so a bad data file
fails fast with its own exit code without touching the broker), subscriptions, ``online``,
``READY=1``, and the oldest pending outbox entry is resumed before any new round is taken.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable

from broker.codec import decode, encode
from broker.errors import (
    ConnectError,
    ConnectRefusedError,
    SubscribeError,
    TopicError,
    TransportError,
    WireError,
)
from broker.messages import (
    ClientState,
    ClientStatus,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
    Scalar,
    UploadAck,
    chunk_count_for,
)
from broker.progress import CAUSE_KEY, DeviceProgress, OfflineCause, Stage
from broker.settings import MqttSettings
from broker.topics import (
    AckTopic,
    DownTopic,
    GlobalManifestTopic,
    RoundTopic,
    ack_topic,
    device_filters,
    parse_topic,
    status_topic,
)
from broker.transport import Message, Transport, Will
from edge_agent.device_state import DeviceState
from edge_agent.downloader import GlobalAdapter, GlobalFetcher
from edge_agent.exit_codes import ExitCode, for_connect_refusal
from edge_agent.lifecycle import Notifier
from edge_agent.local_model import LocalModel
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.settings import AgentSettings
from edge_agent.shared_model import SharedBaseModel
from edge_agent.uploader import Uploader, UploadOutcome
from fstq.errors import FstqError
from workload.adapters import AdapterFormatError
from workload.data import DataError
from workload.models import ModelLoadError

__all__ = ["EdgeAgent", "TransportFactory"]

log = logging.getLogger(__name__)

#: Builds the (unconnected) MQTT client; tests inject wrappers around the real one.
TransportFactory = Callable[[MqttSettings, Will], Transport]

#: Longest the loop blocks in receive(): bounds how late a stop request or timer is noticed.
_MAX_POLL_S = 0.5


def _default_transport(seed: int) -> TransportFactory:
    def make(settings: MqttSettings, will: Will) -> Transport:
        from broker.mqtt import MqttClient  # only the real daemon needs paho

        return MqttClient(settings, will=will, rng=random.Random(seed))

    return make


class _StartupError(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class EdgeAgent:
    """A device daemon taking part in Fed-FSTQ rounds; :meth:`run` until stopped."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        transport_factory: TransportFactory | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        notifier: Notifier | None = None,
        shared_model: SharedBaseModel | None = None,
    ) -> None:
        """``shared_model``: host this device on a base model shared with other logical devices
        in the process (the evaluation's fleet) instead of loading its own."""
        self.settings = settings
        self._me = settings.client_id
        self._fleet = settings.fleet
        # Wall clock on purpose: round deadlines are unix times set by the aggregator; the
        # timeouts measured with it are seconds long, so an NTP step only shifts one resend.
        self._clock = clock
        self._seed = settings.training.seed if seed is None else seed
        self._make_transport = transport_factory or _default_transport(self._seed)
        self._notifier = notifier or Notifier(None)
        self._stop = threading.Event()
        self._client: Transport | None = None
        self._state = DeviceState(settings.state_dir)
        self._model = LocalModel(settings, self._state, seed=self._seed, shared=shared_model)
        self._outbox: Outbox | None = None
        self._uploader: Uploader | None = None
        self._fetcher: GlobalFetcher | None = None
        self._phase = ClientState.IDLE
        self._phase_round: int | None = None
        self._progress: DeviceProgress | None = None  # within the phase, for observers
        self._progress_due = False  # a change the rate limit held back
        self._last_status = -math.inf
        self._next_heartbeat = 0.0
        self._manifest: GlobalManifest | None = None
        self._announcement: RoundAnnouncement | None = None
        self._latest_round = -1
        self._given_up: set[int] = set()
        self._waiting_logged: tuple[int, str] | None = None
        progress = self._state.load_progress()
        self._last_finished = int(progress.get("last_finished_round", -1))
        self._finished_total = int(progress.get("rounds_finished_total", 0))
        #: Rounds trained / finished (any final ack state) by this instance; read by tests.
        self.rounds_trained = 0
        self.rounds_finished = 0
        #: Every upload finished by this instance, in order.
        self.reports: list[UploadOutcome] = []

    @property
    def rounds_given_up(self) -> frozenset[int]:
        """Rounds this device could not train (e.g. a budget below the minimal payload)."""
        return frozenset(self._given_up)

    @property
    def current_round(self) -> int | None:
        """The round the agent is working on (None while idle); for log context."""
        return self._phase_round

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return (what the SIGTERM handler does, via the stop event)."""
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> int:
        """Run until ``stop`` is set or ``max_rounds`` rounds finished; returns an exit code."""
        if stop is not None:
            self._stop = stop
        code = ExitCode.OK
        try:
            self._start()
            self._loop()
        except _StartupError as exc:
            log.error("%s: %s", exc.code.help, exc, extra=self._ctx(None, "start"))
            code = exc.code
        except Exception:
            log.exception("unexpected error", extra=self._ctx(self._phase_round, "loop"))
            code = ExitCode.UNEXPECTED
        finally:
            self._close()
        return code

    def _start(self) -> None:
        try:
            self._model.load_data()
        except (DataError, OSError, UnicodeError) as exc:
            raise _StartupError(ExitCode.DATA, str(exc)) from None
        try:
            self._model.load_model()
        except (ModelLoadError, OSError) as exc:
            raise _StartupError(ExitCode.MODEL, str(exc)) from None
        try:
            self._outbox = Outbox(self._state.outbox_dir)
            pending = self._outbox.pending()
        except (OutboxError, OSError) as exc:
            raise _StartupError(ExitCode.UNEXPECTED, f"state directory: {exc}") from None
        self._connect()
        client = self._client
        assert client is not None
        s = self.settings
        self._fetcher = GlobalFetcher(
            client, self._state, fleet=self._fleet, client_id=self._me,
            fetch_timeout_s=s.fetch_timeout_s, window=s.fetch_window,
        )  # fmt: skip
        self._uploader = Uploader(
            client, self._outbox, fleet=self._fleet, client_id=self._me,
            ack_timeout_s=s.ack_timeout_s, settle_s=s.ack_settle_s,
            expiry_grace_s=s.expiry_grace_s, on_finished=self._on_upload_finished,
        )  # fmt: skip
        self._set_phase(ClientState.ONLINE, None)
        self._notifier.ready()
        if pending:
            # Acks our persistent session kept for the previous process (a killed process never
            # PUBACKed them) arrived with the session, before the SUBACKs: they cannot answer the
            # status query the resume sends. Taken for its reply, a stale `receiving` with an
            # empty bitmap would make every chunk go out again, so they are dropped; the rest of
            # what arrived is handled after the resume, as before.
            early = list(iter(lambda: client.receive(timeout=0), None))
            self._set_phase(ClientState.UPLOADING, pending[0].round_id)
            self._uploader.resume(pending, self._clock())
            for msg in early:
                if msg.topic != ack_topic(self._fleet, self._me):
                    self._dispatch(msg)

    def _connect(self) -> None:
        s = self.settings
        will = Will(
            status_topic(self._fleet, self._me),
            encode(self._status(ClientState.OFFLINE, None, OfflineCause.LINK_LOST)),
            retain=True,
            delay_s=s.will_delay_s,
        )
        client = self._client = self._make_transport(s.mqtt, will)
        try:
            client.connect(timeout=s.broker_wait_s)
            for topic_filter in device_filters(self._fleet, self._me):
                client.subscribe(topic_filter, qos=1)
        except ConnectRefusedError as exc:
            raise _StartupError(for_connect_refusal(exc.reason_code), str(exc)) from None
        except SubscribeError as exc:
            # A refused subscription is an ACL that does not match this device id.
            code = ExitCode.CONFIG if exc.reason_code is not None else ExitCode.BROKER_UNREACHABLE
            raise _StartupError(code, str(exc)) from None
        except ConnectError as exc:
            raise _StartupError(ExitCode.BROKER_UNREACHABLE, str(exc)) from None
        log.info(
            "connected to %s:%d as %s (fleet %s)",
            s.mqtt.host, s.mqtt.port, self._me, self._fleet, extra=self._ctx(None, "start"),
        )  # fmt: skip

    def _close(self) -> None:
        self._notifier.stopping()
        client, self._client = self._client, None
        if client is None:
            return
        if client.is_connected:  # else the will says it, after its delay
            try:
                client.publish_wait(
                    status_topic(self._fleet, self._me),
                    encode(self._status(ClientState.OFFLINE, None, OfflineCause.STOPPED)),
                    retain=True,
                    timeout=5.0,
                )
            except TransportError as exc:
                log.warning("could not publish offline status: %s", exc)
        client.close()
        log.info("stopped", extra=self._ctx(None, "stop"))

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        client = self._client
        assert client is not None
        while not self._stop.is_set() and not self._max_rounds_done():
            msg = client.receive(timeout=self._poll_timeout())
            if msg is not None:
                self._dispatch(msg)
            now = self._clock()
            self._timers(now)
            self._advance_round(now)

    def _max_rounds_done(self) -> bool:
        limit = self.settings.max_rounds
        return limit > 0 and self.rounds_finished >= limit

    def _poll_timeout(self) -> float:
        assert self._uploader is not None and self._fetcher is not None
        timers = [self._next_heartbeat, self._uploader.next_timer(), self._fetcher.next_timer()]
        soonest = min(t for t in timers if t is not None)
        return min(_MAX_POLL_S, max(0.0, soonest - self._clock()))

    def _timers(self, now: float) -> None:
        assert self._uploader is not None and self._fetcher is not None
        if now >= self._next_heartbeat:
            self._publish_status(now)
        self._uploader.tick(now)
        self._fetcher.tick(now)
        if self._phase is ClientState.UPLOADING:
            self._report(self._uploader.progress(), now)
        elif self._phase is ClientState.DOWNLOADING:
            self._report(self._fetcher.progress(), now)
        if self._progress_due and now - self._last_status >= self.settings.progress_s:
            self._publish_status(now)
        self._notifier.watchdog()

    def _dispatch(self, msg: Message) -> None:
        assert self._uploader is not None and self._fetcher is not None
        now = self._clock()
        if not msg.payload:
            return  # a retained message being deleted
        try:
            topic = parse_topic(msg.topic)
            if isinstance(topic, RoundTopic):
                self._on_announcement(decode(msg.payload, expect=RoundAnnouncement), now)
            elif isinstance(topic, GlobalManifestTopic):
                self._manifest = decode(msg.payload, expect=GlobalManifest)
            elif isinstance(topic, AckTopic) and topic.client == self._me:
                self._uploader.on_ack(decode(msg.payload, expect=UploadAck), now)
            elif isinstance(topic, DownTopic) and topic.client == self._me:
                adapter = self._fetcher.on_chunk(decode(msg.payload, expect=GlobalChunk), now)
                if adapter is not None:
                    self._set_phase(ClientState.IDLE, self._phase_round)
            else:
                log.debug("ignoring message on %s", msg.topic)
        except (TopicError, WireError) as exc:
            log.warning(
                "dropping message on %s: %s (%s)", msg.topic, exc, exc.reason,
                extra=self._ctx(None, "receive"),
            )  # fmt: skip

    # -- rounds ------------------------------------------------------------------------------

    def _on_announcement(self, ann: RoundAnnouncement, now: float) -> None:
        assert self._uploader is not None
        if ann.fleet != self._fleet or ann.round <= self._last_finished:
            return
        if ann.round > self._latest_round:
            self._latest_round = ann.round
            self._uploader.supersede(ann.round, now)
        self._uploader.extend_deadline(ann.round, ann.deadline)
        if ann.selected and self._me not in ann.selected:
            log.info("round %d: not selected", ann.round, extra=self._ctx(ann.round, "idle"))
            return
        if ann.round in self._given_up or self._in_outbox(ann.round):
            return
        self._announcement = ann

    def _in_outbox(self, round_id: int) -> bool:
        assert self._outbox is not None
        return any(e.round_id == round_id for e in self._outbox.entries())

    def _advance_round(self, now: float) -> None:
        """Move the announced round on: wait for its global adapter, fetch it, train."""
        ann = self._announcement
        assert self._uploader is not None and self._fetcher is not None
        if ann is None or self._uploader.busy or self._stop.is_set():
            return
        if ann.round <= self._last_finished or ann.round < self._latest_round:
            self._announcement = None
            return
        if now >= ann.deadline:
            log.info(
                "round %d: deadline passed (%.0f s ago); skipping", ann.round, now - ann.deadline,
                extra=self._ctx(ann.round, "idle"),
            )  # fmt: skip
            self._announcement = None
            return
        current = self._fetcher.current
        if current is None or current.sha256 != ann.global_sha256:
            self._fetch_global(ann, now)
            return
        self._announcement = None
        self._train_and_upload(ann, current)

    def _fetch_global(self, ann: RoundAnnouncement, now: float) -> None:
        assert self._fetcher is not None
        m = self._manifest
        if m is None or m.version != ann.global_version or m.sha256 != ann.global_sha256:
            # The retained manifest of the announced version has not arrived (or the two
            # disagree); it comes as soon as the aggregator publishes it.
            self._log_once(ann.round, "waiting for the global manifest of the announced version")
            return
        starting = self._fetcher.downloading != m.version
        self._fetcher.want(m, now)
        if starting:
            self._set_phase(ClientState.DOWNLOADING, ann.round, self._fetcher.progress())

    def _train_and_upload(self, ann: RoundAnnouncement, current: GlobalAdapter) -> None:
        assert self._outbox is not None and self._uploader is not None
        r = ann.round
        steps = self.settings.training.steps
        self._set_phase(ClientState.TRAINING, r, DeviceProgress(Stage.TRAINING, 0, steps))
        try:
            entry, result = self._model.run_round(
                current, ann, created_at=self._clock(), progress=self._on_training
            )
        except (ValueError, FstqError, AdapterFormatError, ModelLoadError) as exc:
            # FstqError covers an unmeetable budget and a global adapter that does not fit the
            # model; neither improves by retrying this round, so it is given up.
            log.error("round %d: cannot train: %s", r, exc, extra=self._ctx(r, "training"))
            self._given_up.add(r)
            self._set_phase(ClientState.ERROR, r)
            return
        self.rounds_trained += 1
        payload = result.update.payload
        self._outbox.put(entry, payload)  # durable before the first byte is published
        self._model.save_state(result)
        if self._stop.is_set():
            log.info("stopping: upload of round %d stays in the outbox", r)
            return
        chunks = chunk_count_for(entry.size, entry.chunk_size)
        self._set_phase(ClientState.UPLOADING, r, DeviceProgress(Stage.UPLOADING, 0, chunks))
        self._uploader.start(entry, payload, self._clock())

    def _on_upload_finished(self, outcome: UploadOutcome) -> None:
        assert self._outbox is not None
        r = outcome.entry.round_id
        self.reports.append(outcome)
        self.rounds_finished += 1
        self._finished_total += 1
        self._last_finished = max(self._last_finished, r)
        self._state.save_progress(
            {
                "last_finished_round": self._last_finished,
                "last_state": outcome.state,
                "rounds_finished_total": self._finished_total,
            }
        )
        self._outbox.prune(keep_round_from=r)
        self._set_phase(ClientState.IDLE, None)

    # -- status ------------------------------------------------------------------------------

    def _status(
        self, state: ClientState, round_id: int | None, cause: OfflineCause | None = None
    ) -> ClientStatus:
        current = self._fetcher.current if self._fetcher is not None else None
        info: dict[str, Scalar] = {}
        if current is not None:
            info["global_version"] = current.version
        if cause is not None:
            info[CAUSE_KEY] = cause.value
        elif self._progress is not None:
            info.update(self._progress.to_info())
        return ClientStatus(
            client=self._me, state=state, timestamp=self._clock(), round=round_id, info=info
        )

    def _set_phase(
        self, state: ClientState, round_id: int | None, progress: DeviceProgress | None = None
    ) -> None:
        changed = (state, round_id) != (self._phase, self._phase_round)
        self._phase, self._phase_round = state, round_id
        if changed:
            self._progress = progress
            where = f"round {round_id}" if round_id is not None else "no round"
            self._notifier.status(f"{where}: {state.value}")
            self._publish_status(self._clock())

    def _report(self, progress: DeviceProgress | None, now: float) -> None:
        """Progress within the phase: a new stage goes out at once, the rest rate-limited."""
        old = self._progress
        if progress is None or progress == old:
            return
        self._progress = progress
        interval = self.settings.progress_s
        if old is None or progress.stage != old.stage or now - self._last_status >= interval > 0:
            self._publish_status(now)
        else:
            self._progress_due = interval > 0

    def _on_training(self, progress: DeviceProgress) -> None:
        """Called between training steps, which block the loop: progress and any heartbeat due."""
        now = self._clock()
        self._report(progress, now)
        if now >= self._next_heartbeat:
            self._publish_status(now)

    def _publish_status(self, now: float) -> None:
        """Phase, progress and heartbeat, retained: an observer that connects later (and the
        aggregator after a restart) gets the last one, whatever its age (its timestamp says).

        No expiry: a retained copy must outlast a long training step. The aggregator takes
        statuses at QoS 0, so none queue up for it while it is away."""
        client = self._client
        if client is None:
            return
        client.publish(
            status_topic(self._fleet, self._me),
            encode(self._status(self._phase, self._phase_round)),
            qos=1,
            retain=True,
        )
        self._last_status, self._progress_due = now, False
        self._next_heartbeat = now + self.settings.heartbeat_s

    # -- logging -----------------------------------------------------------------------------

    def _ctx(self, round_id: int | None, phase: str) -> dict[str, object]:
        return {"round": round_id, "client": self._me, "phase": phase}

    def _log_once(self, round_id: int, what: str) -> None:
        if self._waiting_logged != (round_id, what):
            self._waiting_logged = (round_id, what)
            log.info("round %d: %s", round_id, what, extra=self._ctx(round_id, "waiting"))
