"""Round lifecycle and the global adapter, durable through the SQLite store; no MQTT here.

:class:`RoundController` owns the current :class:`GlobalAdapter`, the open round (its
:class:`RoundState`, running :class:`StreamingFedAvg` and :class:`RoundMetrics`) and the ledger
of rejections. The service feeds it verified uploads and clock ticks and publishes what it says
changed (a new round or deadline to announce, a new global manifest).

Crash safety comes from the order of writes: an upload is committed before it is folded in (and
before the service acknowledges it), so after a crash the running sum is rebuilt from the open
round's stored uploads; a new global is on disk and recorded before its round is finished, and
:meth:`RoundController.load` recognises a round whose close was interrupted.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aggregator.adapter_model import AdapterModel
from aggregator.downlink import Downlink
from aggregator.fedavg import CheckedUpdate, RejectedUpdate, StreamingFedAvg, apply_delta
from aggregator.global_adapter import GlobalAdapter, InitialAdapter
from aggregator.metrics import RoundMetrics, append_jsonl
from aggregator.round_result import (
    ClientUpload,
    DownlinkAccount,
    HeldOutEval,
    RoundResult,
    RoundStatus,
    ratio,
)
from aggregator.rounds import Decision, RoundState, decide, select_clients
from aggregator.settings import AggregatorSettings
from aggregator.store import AcceptedUpload, AggregatorStore, GlobalRecord, RoundRecord
from broker.messages import RoundAnnouncement, UploadManifest
from common import atomic
from common.record import jsonable
from fstq.compressors import DecodeLimits, decompress
from fstq.errors import DecodeError as PayloadDecodeError
from workload.adapters import (
    AdapterFormatError,
    adapter_from_bytes,
    adapter_to_bytes,
    load_peft_dir,
)
from workload.batches import Example
from workload.models import base_model_reference

__all__ = ["DERIVED", "Event", "OpenRound", "RoundController"]

log = logging.getLogger("aggregator.service")

#: Upload manifest metadata ``downlink_route`` of a device that derived v0 instead of fetching.
DERIVED = "derived"


class Event(enum.Enum):
    """What a tick changed, i.e. what the service must publish."""

    OPENED = "opened"  # announce the new round
    EXTENDED = "extended"  # re-announce with the new deadline
    CLOSED = "closed"  # publish the new global manifest
    FAILED = "failed"  # nothing: the global adapter stays as it was


@dataclass
class OpenRound:
    state: RoundState
    base_version: int
    fedavg: StreamingFedAvg
    metrics: RoundMetrics

    @property
    def round_id(self) -> int:
        return self.state.round_id


class RoundController:
    """Rounds and global adapter versions of one fleet (single-threaded; see module doc)."""

    def __init__(
        self,
        settings: AggregatorSettings,
        store: AggregatorStore,
        model: AdapterModel,
        eval_examples: Sequence[Example] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self._model = model
        self._eval_examples = list(eval_examples)
        self._policy = settings.rounds.policy()
        self._spec = settings.lora.spec()
        self._base_reference: str | None = None
        self._global: GlobalAdapter | None = None
        self.round: OpenRound | None = None
        self.between = _idle_metrics()  # traffic while no round is open
        self.last_round_id = store.last_round_id()
        self.decode_limits = DecodeLimits()
        #: Lifetime counters: rejections by reason, "late", and the service's own events.
        self.counters: Counter[str] = Counter()
        #: The ``rounds.jsonl`` record of the round that ended last (this process).
        self.last_record: RoundResult | None = None
        #: Plans how each device gets the current global adapter (decision 13).
        self.downlink = Downlink(
            settings.downlink, store, chunk_size=settings.chunk_size,
            load_master=self._load_master, fisher=self._fisher,
        )  # fmt: skip

    # -- state -------------------------------------------------------------------------------

    @property
    def current(self) -> GlobalAdapter:
        assert self._global is not None, "load() first"
        return self._global

    @property
    def metrics(self) -> RoundMetrics:
        """Where traffic is charged now: the open round, else the next one."""
        return self.round.metrics if self.round is not None else self.between

    @property
    def finished(self) -> bool:
        """True once ``rounds.max_rounds`` rounds have ended (never when it is 0)."""
        limit = self.settings.rounds.max_rounds
        return limit > 0 and self.round is None and self.last_round_id >= limit

    # -- start-up ----------------------------------------------------------------------------

    def load(self, now: float) -> None:
        """Load the latest global adapter (or create v0), then resume a round left open."""
        s = self.settings
        latest = self.store.latest_global()
        if latest is None:
            initial = self._model.initial_state()
            g = self._build(0, 0, initial)
            if s.downlink.derive_v0:  # the manifest names v0's own hash
                g = self._build(0, 0, initial, g.sha256_hex)
            self._save(g, None, now)
            log.info("created global adapter v0 (%d bytes on the downlink)", g.downlink_size)
        else:
            g = GlobalAdapter.load(
                s.global_dir(latest.version),
                latest.version,
                latest.round_id or 0,
                spec=self._spec,
                base_model=s.model,
                chunk_size=s.chunk_size,
                initial=self._initial(),
            )
            if g.sha256_hex != latest.sha256:
                log.warning("global v%d re-encodes to another SHA-256 than recorded", g.version)
        self._global = g
        self.downlink.publish(g)
        # An honest payload never describes more tensors or coordinates than the adapter has.
        self.decode_limits = DecodeLimits(
            max_tensors=len(g.master), max_total_elements=sum(t.numel() for t in g.master.values())
        )
        self._resume(now)

    def _resume(self, now: float) -> None:
        """Pick up a round a crash left open: rebuild the running sum from its stored uploads."""
        rec = self.store.open_round_record()
        if rec is None:
            return
        g = self.current
        if rec.base_version != g.version:
            # The crash came after the new global was recorded but before the round was
            # finished: its outcome is already on disk.
            state = "closed" if g.round_id == rec.round_id else "failed"
            self.store.finish_round(rec.round_id, state, now, {"round": rec.round_id})
            log.warning("round %d recovered as %s", rec.round_id, state,
                        extra={"round": rec.round_id})  # fmt: skip
            return
        rnd = OpenRound(
            RoundState(rec.round_id, frozenset(rec.selected), rec.opened_at, rec.deadline,
                       rec.quorum, extensions=rec.extensions),
            rec.base_version,
            StreamingFedAvg(g.master, self.settings.clip_norm),
            RoundMetrics(rec.round_id, rec.base_version, rec.selected, rec.opened_at,
                         resumed=True, extensions=rec.extensions),
        )  # fmt: skip
        for up in self.store.accepted_uploads(rec.round_id):  # one payload in memory at a time
            try:
                delta = decompress(up.payload, self.decode_limits)
                self._fold(rnd, up, rnd.fedavg.check(delta))
            except (PayloadDecodeError, RejectedUpdate) as exc:  # stored means validated once
                log.error("stored upload of %s no longer decodes: %s", up.client_id, exc,
                          extra={"round": rec.round_id, "client": up.client_id})  # fmt: skip
            rnd.metrics.uplink_wire_bytes += up.wire_bytes
        self.round = rnd
        log.info("resumed round %d with %d stored uploads", rec.round_id,
                 len(rnd.state.arrived), extra={"round": rec.round_id})  # fmt: skip

    # -- uploads -----------------------------------------------------------------------------

    def accept(
        self, client: str, manifest: UploadManifest, payload: bytes, wire_bytes: int, now: float
    ) -> None:
        """Decode and validate a reassembled upload, commit it, fold it into the running sum.

        Raises :class:`RejectedUpdate` (with a reason label) and then changes nothing.
        """
        rnd = self.round
        if rnd is None or manifest.round != rnd.round_id:
            raise RejectedUpdate("round_closed", f"round {manifest.round} is not open")
        try:
            delta = decompress(payload, self.decode_limits)
        except PayloadDecodeError as exc:
            raise RejectedUpdate("payload_decode", str(exc)) from None
        checked = rnd.fedavg.check(delta)
        if manifest.sample_count < 1:
            raise RejectedUpdate("bad_weight", "sample_count must be >= 1")
        upload = AcceptedUpload(
            manifest.round, client, manifest.upload_id, manifest.sha256.hex(),
            manifest.sample_count, manifest.method, payload, wire_bytes, now,
        )  # fmt: skip
        if not self.store.accept_upload(upload):
            raise RejectedUpdate("duplicate", f"{client} already has an upload this round")
        self._fold(rnd, upload, checked)
        if manifest.metadata.get("downlink_route") == DERIVED:  # no fetch told us about it
            rnd.metrics.downlink.add(DERIVED, None, 1, 0, 0)

    def _fold(self, rnd: OpenRound, up: AcceptedUpload, checked: CheckedUpdate) -> None:
        """Add a validated update to the running sum and the round's bookkeeping."""
        rnd.fedavg.add(checked, float(up.sample_count))
        delta, norm = checked.delta, checked.norm
        rnd.state = rnd.state.with_arrival(up.client_id)
        n_coords = sum(t.numel() for t in delta.values())
        sent, dense = len(up.payload), 2 * n_coords
        rnd.metrics.clients[up.client_id] = ClientUpload(
            bytes=sent, dense_fp16_bytes=dense, ratio_vs_fp16=ratio(dense, sent),
            method=up.method, sample_count=up.sample_count, norm=norm, wire_bytes=up.wire_bytes,
        )  # fmt: skip

    def note_rejection(
        self,
        round_id: int | None,
        client: str | None,
        reason: str,
        detail: str,
        now: float,
        *,
        late: bool = False,
    ) -> None:
        """Count (round metrics, lifetime counters), record (store) and log a rejection."""
        if late:
            self.metrics.late += 1
        else:
            self.metrics.rejected[reason] += 1
        self.counters["late" if late else reason] += 1
        self.store.record_rejection(round_id, client, reason, detail, now)
        log.warning(
            "%s from %s (round %s): %s",
            f"late upload ({reason})" if late else f"rejected {reason}",
            client,
            round_id,
            detail[:300],
            extra={"round": round_id, "client": client, "reason": reason},
        )

    # -- the round clock ---------------------------------------------------------------------

    def tick(self, now: float, live: Sequence[str]) -> Event | None:
        """Open a round (``live``: clients heard from recently) or close/extend/fail it."""
        rnd = self.round
        if rnd is None:
            return Event.OPENED if self._maybe_open(now, live) else None
        decision = decide(rnd.state, now, self._policy)
        if decision is Decision.CLOSE:
            self._close(rnd, now)
            return Event.CLOSED
        if decision is Decision.EXTEND:
            rnd.state = rnd.state.extended(self._policy.extension_s)
            rnd.metrics.extensions = rnd.state.extensions
            self.store.extend_round(rnd.round_id, rnd.state.deadline, rnd.state.extensions)
            log.info("round %d extended to %.0f", rnd.round_id, rnd.state.deadline,
                     extra={"round": rnd.round_id})  # fmt: skip
            return Event.EXTENDED
        if decision is Decision.FAIL:
            self._finish(rnd, "failed", self.current.version, now, None, self._downlink_of(rnd))
            log.warning(
                "round %d failed: %d of quorum %d arrived; global stays v%d",
                rnd.round_id, len(rnd.state.arrived), rnd.state.quorum, self.current.version,
                extra={"round": rnd.round_id, "reason": "no_quorum"},
            )  # fmt: skip
            return Event.FAILED
        return None

    def _maybe_open(self, now: float, live: Sequence[str]) -> bool:
        limit = self.settings.rounds.max_rounds
        if (limit and self.last_round_id >= limit) or len(live) < max(
            self._policy.min_clients, self._policy.quorum
        ):
            return False
        round_id = self.last_round_id + 1
        # Seeded per round, so a restarted aggregator selects the same way.
        rng = np.random.default_rng([self.settings.rounds.selection_seed, round_id])
        selected = tuple(sorted(select_clients(live, self._policy.clients_per_round, rng)))
        g = self.current
        deadline = now + self._policy.round_timeout_s
        self.store.open_round(
            RoundRecord(round_id, now, deadline, self._policy.quorum, selected, g.version)
        )
        metrics = RoundMetrics(round_id, g.version, selected, now)
        metrics.absorb(self.between)
        self.between = _idle_metrics()
        self.round = OpenRound(
            RoundState(round_id, frozenset(selected), now, deadline, self._policy.quorum),
            g.version,
            StreamingFedAvg(g.master, self.settings.clip_norm),
            metrics,
        )
        self.last_round_id = round_id
        log.info("round %d opened on v%d: %s", round_id, g.version, ", ".join(selected),
                 extra={"round": round_id})  # fmt: skip
        return True

    def _close(self, rnd: OpenRound, now: float) -> None:
        """Global v+1 = v + weighted mean delta: eval, directory, record, metrics."""
        started = time.perf_counter()
        old = self.current
        new = self._build(old.version + 1, rnd.round_id, apply_delta(old.master, rnd.fedavg.mean()))
        evaluation = None
        if self._eval_examples:
            evaluation = self._model.evaluate(
                new.master, self._eval_examples, self.settings.eval.batch_size
            )
        # Recorded after the (slow) evaluation: a crash during it leaves the round open, and the
        # restart closes it again from the stored uploads, rather than finding v+1 recorded and
        # the round's metrics line (with its eval) never written.
        self._save(new, rnd.round_id, now)
        downlink = self._downlink_of(rnd)
        self._global = new
        self.downlink.publish(new)
        if self.settings.downlink.fisher:  # now, so its cost shows in close_s, not in a fetch
            self.downlink.prepare()
        took = time.perf_counter() - started
        self._finish(rnd, "closed", new.version, now, evaluation, downlink, took)
        log.info(
            "round %d closed with %d/%d uploads: global v%d (eval %s)",
            rnd.round_id, len(rnd.state.arrived), len(rnd.state.selected), new.version,
            evaluation, extra={"round": rnd.round_id},
        )  # fmt: skip

    def _finish(
        self,
        rnd: OpenRound,
        status: RoundStatus,
        version: int,
        now: float,
        evaluation: HeldOutEval | None,
        downlink: DownlinkAccount,
        close_s: float = 0.0,
    ) -> None:
        record = rnd.metrics.record(
            status=status,
            global_version=version,
            closed_at=now,
            evaluation=evaluation,
            clipped=rnd.fedavg.clipped,
            close_s=close_s,
            downlink=downlink,
        )
        self.last_record = record
        append_jsonl(self.settings.rounds_path, record)
        self.store.finish_round(rnd.round_id, status, now, jsonable(record))
        self.round = None

    def announcement(self) -> RoundAnnouncement:
        """The retained announcement of the open round."""
        rnd, s = self.round, self.settings
        assert rnd is not None, "no open round"
        budget = s.rounds.budget_bytes
        return RoundAnnouncement(
            fleet=s.fleet,
            round=rnd.round_id,
            global_version=rnd.base_version,
            global_sha256=self.current.manifest.sha256,
            selected=tuple(sorted(rnd.state.selected)),
            deadline=rnd.state.deadline,
            quorum=rnd.state.quorum,
            upload_window_s=s.rounds.upload_window_s or s.rounds.round_timeout_s,
            chunk_size=s.chunk_size,
            budget_bytes={c: budget for c in rnd.state.selected} if budget else {},
        )

    def _downlink_of(self, rnd: OpenRound) -> DownlinkAccount:
        """The round's downlink record (before a new global replaces the one it started on)."""
        full = self.current.manifest.total_size
        d = self.settings.downlink
        return rnd.metrics.downlink.account(d.mode, self.downlink.budget, full)

    # -- global adapter versions -------------------------------------------------------------

    def _initial(self, v0_sha256_hex: str | None = None) -> InitialAdapter | None:
        """What the manifest says about v0 so devices derive it (None: derive_v0 is off)."""
        if not self.settings.downlink.derive_v0:
            return None
        if v0_sha256_hex is None:
            v0 = self.store.global_record(0)
            if v0 is None:
                return None
            v0_sha256_hex = v0.sha256
        return InitialAdapter(self.settings.init_seed, v0_sha256_hex)

    def _build(
        self,
        version: int,
        round_id: int,
        master: dict[str, torch.Tensor],
        v0_sha256_hex: str | None = None,
    ) -> GlobalAdapter:
        s = self.settings
        return GlobalAdapter.build(
            version, round_id, master, spec=self._spec, base_model=s.model,
            chunk_size=s.chunk_size, initial=self._initial(v0_sha256_hex),
        )  # fmt: skip

    def _load_master(self, version: int) -> dict[str, torch.Tensor] | None:
        """A stored global version's master (a catch-up root); None if it is gone."""
        try:
            return load_peft_dir(self.settings.global_dir(version))
        except (AdapterFormatError, OSError) as exc:
            log.warning("global v%d is not readable: %s", version, exc)
            return None

    def _fisher(self, g: GlobalAdapter) -> Mapping[str, torch.Tensor] | None:
        """The held-out coordinate Fisher at ``g`` (``downlink.fisher``): from its file, else
        computed (one backward pass over the held-out set) and saved; None without a held-out
        set."""
        path = self.settings.fisher_path(g.version)
        try:
            return adapter_from_bytes(path.read_bytes())
        except (OSError, AdapterFormatError):
            pass
        if not self._eval_examples:
            log.warning("downlink.fisher needs eval.path: catch-ups weigh by magnitude")
            return None
        fisher = self._model.fisher(g.master, self._eval_examples)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, adapter_to_bytes(fisher))
        return fisher

    def _save(self, g: GlobalAdapter, round_id: int | None, now: float) -> None:
        directory = self.settings.global_dir(g.version)
        if self._base_reference is None:  # the tiny model's is a directory written on first use
            self._base_reference = base_model_reference(
                self.settings.model, self.settings.model_cache_dir
            )
        g.save(directory, self._spec, self._base_reference)
        self.store.add_global(GlobalRecord(g.version, round_id, g.sha256_hex, str(directory), now))


def _idle_metrics() -> RoundMetrics:
    return RoundMetrics(0, 0, (), 0.0)
