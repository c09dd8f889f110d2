"""The edge agent's round loop (docs/architecture.md, "Edge agent").

A round is a sequence of steps, each a call into the module that holds it:

1. fetch: :meth:`EdgeAgent._advance_round` derives the initial adapter on the device when the
   manifest allows it, or has ``downloader.GlobalFetcher`` get the announced global adapter (a
   plan: nothing, a catch-up on what it holds, or the full adapter) and verify it;
2. train: :meth:`EdgeAgent._run_round` has ``local_model.LocalModel`` build the LoRA the
   adapter's metadata names and ``trainer.LocalTrainer`` train the local steps;
3. compress: the trainer hands the delta and Fisher to the compressor
   (``compression.py``: compressor, byte budget);
4. outbox: ``Uploader.store`` writes the upload (fsync'd) under a new upload id;
5. upload: ``Uploader.start`` publishes the manifest and chunks;
6. ack: ``Uploader.on_ack`` drives the upload to a final state, then
   :meth:`EdgeAgent._on_upload_finished` records the round.

What observers see of it (phase, progress, heartbeats) is ``status.StatusReporter``'s.

One thread: paho's network thread only fills the client's receive queue; :meth:`EdgeAgent.run`
takes messages with a timeout, dispatches them by topic and then runs every timer (heartbeat,
ack and fetch timeouts, watchdog). Training blocks the loop for its duration; messages queue
meanwhile and nothing is lost.

Start-up order: data, base model, outbox and device state, then the broker (so a bad data file
fails fast with its own exit code without touching the broker), subscriptions, ``online``,
``READY=1``, and the oldest pending outbox entry is resumed before any new round is taken.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable

from broker.codec import decode
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
    DownlinkPlan,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
    UploadAck,
    chunk_count_for,
)
from broker.progress import DeviceProgress, Stage
from broker.settings import MqttSettings
from broker.topics import (
    AckTopic,
    DownTopic,
    GlobalManifestTopic,
    RoundTopic,
    device_filters,
    parse_topic,
)
from broker.transport import Message, Transport, Will
from common.exit_codes import ExitCode, for_connect_refusal
from edge_agent.compression import budget_for
from edge_agent.device_state import DeviceState
from edge_agent.downloader import DERIVED, DeviceDownlink, GlobalFetcher, HeldAdapter
from edge_agent.lifecycle import Notifier
from edge_agent.local_model import LocalModel
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.settings import AgentSettings
from edge_agent.shared_model import SharedBaseModel
from edge_agent.status import StatusReporter
from edge_agent.trainer import ComputeTime
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
        self._status = StatusReporter(
            fleet=self._fleet, client_id=self._me, heartbeat_s=settings.heartbeat_s,
            progress_s=settings.progress_s, clock=clock, notifier=self._notifier,
            global_version=self._global_version,
        )  # fmt: skip
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
        #: What each round this instance trained took to train and compress, by round. Kept
        #: here, not on the wire: the evaluation's fleet runner reads it for its round times.
        self.compute_times: dict[int, ComputeTime] = {}
        #: How each round this instance trained got its adapter (route, bytes, staleness), by
        #: round; read in-process by the evaluation's fleet runner, like ``compute_times``.
        self.downlinks: dict[int, DeviceDownlink] = {}
        self._derived_tried = False

    def pending_downlink(self) -> DeviceDownlink | None:
        """How the adapter of a round not trained (given up, or cut off) came, if it did."""
        return None if self._fetcher is None else self._fetcher.pending_record()

    @property
    def rounds_given_up(self) -> frozenset[int]:
        """Rounds this device could not train (e.g. a budget below the minimal payload)."""
        return frozenset(self._given_up)

    @property
    def current_round(self) -> int | None:
        """The round the agent is working on (None while idle); for log context."""
        return self._status.round_id

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
            log.exception("unexpected error", extra=self._ctx(self._status.round_id, "loop"))
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
        self._status.set_phase(ClientState.ONLINE, None)
        self._notifier.ready()
        if pending:
            self._status.set_phase(ClientState.UPLOADING, pending[0].round_id)
            # What arrived with the session is handled after the resume (the uploader drops
            # the acks meant for the previous process).
            for msg in self._uploader.resume(pending, self._clock()):
                self._dispatch(msg)

    def _connect(self) -> None:
        s = self.settings
        client = self._client = self._make_transport(s.mqtt, self._status.will(s.will_delay_s))
        self._status.client = client
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
        client, self._client, self._status.client = self._client, None, None
        if client is None:
            return
        if client.is_connected:  # else the will says it, after its delay
            try:
                self._status.publish_stopped(client)
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
        timers = [
            self._status.next_heartbeat,
            self._uploader.next_timer(),
            self._fetcher.next_timer(),
        ]
        soonest = min(t for t in timers if t is not None)
        return min(_MAX_POLL_S, max(0.0, soonest - self._clock()))

    def _timers(self, now: float) -> None:
        assert self._uploader is not None and self._fetcher is not None
        self._status.heartbeat(now)
        self._uploader.tick(now)
        self._fetcher.tick(now)
        if self._status.phase is ClientState.UPLOADING:
            self._status.report(self._uploader.progress(), now)
        elif self._status.phase is ClientState.DOWNLOADING:
            self._status.report(self._fetcher.progress(), now)
        self._status.flush(now)
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
                body = decode(msg.payload)
                adapter: HeldAdapter | None = None
                if isinstance(body, DownlinkPlan):
                    adapter = self._fetcher.on_plan(body, msg, now)
                elif isinstance(body, GlobalChunk):
                    adapter = self._fetcher.on_chunk(body, msg, now)
                else:
                    log.debug("ignoring %s on %s", body.kind, msg.topic)
                if adapter is not None:
                    self._status.set_phase(ClientState.IDLE, self._status.round_id)
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
        if current is None or current.target_sha256 != ann.global_sha256:
            self._fetch_global(ann, now)
            return
        self._announcement = None
        self._run_round(ann, current)

    def _fetch_global(self, ann: RoundAnnouncement, now: float) -> None:
        assert self._fetcher is not None
        m = self._manifest
        if m is None or m.version != ann.global_version or m.sha256 != ann.global_sha256:
            # The retained manifest of the announced version has not arrived (or the two
            # disagree); it comes as soon as the aggregator publishes it.
            self._log_once(ann.round, "waiting for the global manifest of the announced version")
            return
        if self._fetcher.current is None and not self._derived_tried:
            self._derived_tried = True
            self._derive_initial(m)
            current = self._fetcher.current
            if current is not None and current.target_sha256 == m.sha256:
                return  # the round is on v0: nothing to fetch
        starting = self._fetcher.downloading != m.version
        self._fetcher.want(m, now)
        if starting:
            self._status.set_phase(ClientState.DOWNLOADING, ann.round, self._fetcher.progress())

    def _derive_initial(self, m: GlobalManifest) -> None:
        """Hold the initial adapter (v0) derived on the device when the manifest names its seed
        and hash and the derived bytes have that hash; else it is fetched like any version."""
        assert self._fetcher is not None
        want = m.metadata.get("v0_sha256")
        if not isinstance(want, str) or "init_seed" not in m.metadata:
            return
        try:
            data = self._model.initial_adapter(m.metadata)
        except (ValueError, FstqError, ModelLoadError) as exc:
            log.warning(
                "cannot derive the initial adapter: %s", exc, extra=self._ctx(None, "fetch")
            )
            return
        sha = hashlib.sha256(data)
        if sha.hexdigest() != want:  # another base model, peft or platform: fetch it instead
            log.info("derived initial adapter differs from v0 (%s, announced %s); fetching",
                     sha.hexdigest()[:12], want[:12], extra=self._ctx(None, "fetch"))  # fmt: skip
            return
        v0 = sha.digest()
        self._fetcher.adopt(HeldAdapter(0, 0, v0, v0, m.format, data, dict(m.metadata), DERIVED))
        log.info("initial adapter v0 derived on the device and verified",
                 extra=self._ctx(None, "fetch"))  # fmt: skip

    def _run_round(self, ann: RoundAnnouncement, current: HeldAdapter) -> None:
        """Round ``ann`` from its fetched and verified global adapter: train and compress, store
        the upload in the outbox, publish it. Its ack comes later (:meth:`_on_upload_finished`).
        """
        assert self._uploader is not None
        r = ann.round
        steps = self.settings.training.steps
        self._status.set_phase(ClientState.TRAINING, r, DeviceProgress(Stage.TRAINING, 0, steps))
        try:
            global_state = self._model.load_global(current)  # peft model from its LoRA metadata
            budget = budget_for(self.settings, ann, sum(t.numel() for t in global_state.values()))
            result = self._model.train(global_state, budget, r, progress=self._status.on_training)
        except (ValueError, FstqError, AdapterFormatError, ModelLoadError) as exc:
            # ValueError covers bad LoRA metadata (LoraMetadataError); FstqError an unmeetable
            # budget and a global adapter that does not fit the model. None of them improves by
            # retrying this round, so it is given up.
            log.error("round %d: cannot train: %s", r, exc, extra=self._ctx(r, "training"))
            self._given_up.add(r)
            self._status.set_phase(ClientState.ERROR, r)
            return
        self.rounds_trained += 1
        self.compute_times[r] = result.compute
        assert self._fetcher is not None
        downlink = self.downlinks[r] = self._fetcher.take_record()
        entry = self._uploader.store(
            ann, base_version=current.version, result=result, now=self._clock(),
            downlink_route=downlink.route,
        )  # fmt: skip
        # After the outbox: a crash before it retrains the round from the state it started with.
        self._model.save_state(result)
        if self._stop.is_set():
            log.info("stopping: upload of round %d stays in the outbox", r)
            return
        chunks = chunk_count_for(entry.size, entry.chunk_size)
        self._status.set_phase(ClientState.UPLOADING, r, DeviceProgress(Stage.UPLOADING, 0, chunks))
        self._uploader.start(entry, result.update.payload, self._clock())

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
        self._status.set_phase(ClientState.IDLE, None)

    def _global_version(self) -> int | None:
        """The version of the global adapter the device holds, for its status."""
        current = self._fetcher.current if self._fetcher is not None else None
        return None if current is None else current.version

    # -- logging -----------------------------------------------------------------------------

    def _ctx(self, round_id: int | None, phase: str) -> dict[str, object]:
        return {"round": round_id, "client": self._me, "phase": phase}

    def _log_once(self, round_id: int, what: str) -> None:
        if self._waiting_logged != (round_id, what):
            self._waiting_logged = (round_id, what)
            log.info("round %d: %s", round_id, what, extra=self._ctx(round_id, "waiting"))
