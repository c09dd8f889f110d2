"""The catch-up downlink (decision 13): for a device holding state ``h``, the cheapest correct way
to the current global adapter ``v``.

A device says what it holds (the SHA-256 of its canonical fp16 adapter bytes) and gets a plan:

* ``none``: ``h`` already is a state served for ``v`` (``full(v)`` itself, or a catch-up to ``v``);
* ``catchup``: an fstq payload of ``master_v - state(h)`` at the downlink budget; the device ends
  with ``apply(state(h), payload)`` (:func:`workload.catchup.apply_update`), whose id the plan
  announces. The next catch-up of that device starts from that state, so what this one left out
  is carried (error feedback per device); the master is never perturbed;
* ``full``: ``full(v)``, when ``h`` is unknown (or None), the chain of catch-ups behind ``h`` is
  at ``downlink.max_chain`` or its payloads would outweigh the full adapter, or the mode is
  ``full``.

A plan is a pure function of (``h``, ``v``, budget, Fisher source): its id is a hash of that key,
so every device holding ``h`` (all first contacts hold the derived v0) shares one plan, computed
once. States are reconstructed from their root (a stored global version) and the chain of stored
payloads (:mod:`aggregator.downlink_store`), with a small LRU of reconstructed states; served
plans (message and chunks) are kept in an LRU too. Nothing here publishes: the service does.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from aggregator.downlink_store import DeviceRecord, StateNode, StoredPlan
from aggregator.global_adapter import GlobalAdapter
from aggregator.settings import DownlinkSettings
from aggregator.store import AggregatorStore
from broker.chunking import plan_messages
from broker.messages import DownlinkPlan, DownlinkRoute, GlobalChunk
from fstq.compressors import DecodeLimits, decompress, make_compressor
from fstq.errors import FstqError
from workload.adapters import AdapterFormatError
from workload.catchup import apply_update, canonical_bytes, state_id

__all__ = ["Downlink", "PlanOutcome", "ServedPlan", "plan_id"]

log = logging.getLogger("aggregator.downlink")

#: Served plans (message + chunks) kept in memory; the store has every catch-up payload.
PLAN_CACHE = 256
#: Reconstructed states (fp16 tensors) kept in memory.
STATE_CACHE = 16
#: Labels of a fetch's staleness besides "versions behind": a device served for the first time,
#: and one whose held state the aggregator does not know (or that holds nothing again).
NEW, UNKNOWN = "new", "unknown"

State = dict[str, torch.Tensor]
#: The fp32 master of a stored global version (None when it is gone or unreadable).
LoadMaster = Callable[[int], Mapping[str, torch.Tensor] | None]
#: The coordinate Fisher to weigh the catch-up of a global version by (None: magnitude).
FisherSource = Callable[[GlobalAdapter], Mapping[str, torch.Tensor] | None]


def plan_id(
    route: DownlinkRoute, target: bytes, held: bytes | None, budget: int, source: str
) -> bytes:
    """The content address of a plan: a hash of everything that determines it."""
    h = hashlib.sha256(b"fedfstq-downlink-plan\n")
    for part in (route.value.encode(), target, held or b"", str(budget).encode(), source.encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


@dataclass(frozen=True)
class ServedPlan:
    """A plan as the service sends it: the message and the chunks of its payload."""

    message: DownlinkPlan
    chunks: tuple[GlobalChunk, ...]

    @property
    def route(self) -> DownlinkRoute:
        return self.message.route


@dataclass(frozen=True)
class PlanOutcome:
    """The answer to one plan request, with what the round's accounting needs."""

    served: ServedPlan
    staleness: str  # versions behind ("0", "1", ...), NEW or UNKNOWN
    computed: bool  # False: an existing plan (memory or store) was reused
    compute_s: float
    #: ||master - result|| / ||master - held|| and / ||master|| of a computed catch-up.
    error: float | None = None
    error_vs_master: float | None = None


class Downlink:
    """Plans for the current global adapter (single-threaded, like the service)."""

    def __init__(
        self,
        settings: DownlinkSettings,
        store: AggregatorStore,
        *,
        chunk_size: int,
        load_master: LoadMaster,
        fisher: FisherSource | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._chunk_size = chunk_size
        self._load_master = load_master
        self._fisher_source = fisher
        self._compressor = make_compressor("fstq")
        self._global: GlobalAdapter | None = None
        self._full: ServedPlan | None = None
        self._fisher: Mapping[str, torch.Tensor] | None = None
        self._limits = DecodeLimits()
        self._served: OrderedDict[bytes, ServedPlan] = OrderedDict()
        self._states: OrderedDict[bytes, State] = OrderedDict()

    # -- the current version -----------------------------------------------------------------

    def publish(self, g: GlobalAdapter) -> None:
        """Serve plans to ``g`` from now on (a new version, or the one loaded at start)."""
        self._global = g
        self._fisher = None
        self._limits = DecodeLimits(
            max_tensors=len(g.master), max_total_elements=sum(t.numel() for t in g.master.values())
        )
        sha = g.manifest.sha256
        message, chunks = plan_messages(
            g.payload, version=g.version, route=DownlinkRoute.FULL,
            plan=plan_id(DownlinkRoute.FULL, sha, None, 0, ""), base=None, result=sha,
            chunk_size=self._chunk_size,
        )  # fmt: skip
        self._full = ServedPlan(message, chunks)
        self._served.clear()  # plans to older versions are never asked for again

    def prepare(self) -> None:
        """Load or compute what catch-ups to the current version need (its Fisher) now."""
        self._fisher_for(self.current)

    @property
    def current(self) -> GlobalAdapter:
        assert self._global is not None, "publish() first"
        return self._global

    @property
    def budget(self) -> int:
        return self.settings.budget_for(self.current.manifest.total_size)

    # -- answering a device ------------------------------------------------------------------

    def plan(self, client: str, held: bytes | None, now: float) -> PlanOutcome:
        """The plan for ``client`` holding ``held``; committed to the store before it returns."""
        g = self.current
        staleness = self.staleness(client, held)
        outcome: PlanOutcome | None = None
        if held is not None and self._holds(held, g):
            none_id = plan_id(DownlinkRoute.NONE, g.manifest.sha256, held, 0, "")
            message, chunks = plan_messages(
                b"", version=g.version, route=DownlinkRoute.NONE, plan=none_id, base=held,
                result=held, chunk_size=self._chunk_size,
            )  # fmt: skip
            outcome = PlanOutcome(ServedPlan(message, chunks), staleness, False, 0.0)
        elif held is not None and self.settings.mode == "catchup":
            outcome = self._catchup(client, held, staleness, now)
        if outcome is None:
            assert self._full is not None
            outcome = PlanOutcome(self._full, staleness, False, 0.0)
        if outcome.served.route is not DownlinkRoute.CATCHUP or not outcome.computed:
            served = outcome.served.message.result
            self._store.downlink.record(DeviceRecord(client, held, served, g.version, now))
        return outcome

    def served(self, plan: bytes) -> ServedPlan | None:
        """A plan of the current version by id (memory, else the store), or None."""
        full = self._full
        if full is not None and plan == full.message.plan:
            return full
        cached = self._served.get(plan)
        if cached is not None:
            self._served.move_to_end(plan)
            return cached
        stored = self._store.downlink.plan(plan)
        if stored is None or stored.version != self.current.version:
            return None
        return self._remember(self._served_catchup(stored))

    def staleness(self, client: str, held: bytes | None) -> str:
        """How far behind the current version ``held`` is (NEW: never served ``client``)."""
        if self._store.downlink.device(client) is None:
            return NEW
        version = None if held is None else self._target_version(held)
        return UNKNOWN if version is None else str(self.current.version - version)

    def collect_garbage(self) -> None:
        """Drop states and plans no device's chain needs any more (after each round)."""
        states, plans = self._store.downlink.collect_garbage()
        if states or plans:
            log.info("downlink store: dropped %d states and %d plans no device needs",
                     states, plans)  # fmt: skip

    # -- catch-ups ---------------------------------------------------------------------------

    def _catchup(self, client: str, held: bytes, staleness: str, now: float) -> PlanOutcome | None:
        g, budget = self.current, self.budget
        fisher = self._fisher_for(g)
        source = "fisher" if fisher is not None else "magnitude"
        pid = plan_id(DownlinkRoute.CATCHUP, g.manifest.sha256, held, budget, source)
        existing = self.served(pid)
        if existing is not None:  # a device holding the same state was planned for already
            return PlanOutcome(existing, staleness, False, 0.0)
        depth, chain = self._chain(held)
        if depth is None or depth >= self.settings.max_chain:
            return None
        started = time.perf_counter()
        base = self.state(held)
        if base is None:
            return None
        delta = {name: g.master[name] - t.to(torch.float32) for name, t in base.items()}
        try:
            payload = self._compressor.compress(
                delta, budget_bytes=budget, fisher=fisher, rng=np.random.default_rng(0)
            ).payload
            result = apply_update(base, decompress(payload, self._limits))
        except (FstqError, AdapterFormatError, KeyError) as exc:
            log.warning("no catch-up from %s: %s", held.hex()[:12], exc,
                        extra={"client": client})  # fmt: skip
            return None
        full_size = g.manifest.total_size
        if len(payload) >= full_size or chain + len(payload) > full_size:
            return None
        rid = state_id(canonical_bytes(result))
        stored = StoredPlan(pid, g.version, held, rid, payload, now)
        node = StateNode(rid, held, pid, g.version, depth + 1, chain + len(payload), now)
        # Durable before anyone hears of it: a device must never hold a state we cannot rebuild.
        self._store.downlink.record(DeviceRecord(client, held, rid, g.version, now), stored, node)
        self._remember_state(rid, result)
        err, err_master = _errors(g.master, base, result)
        took = time.perf_counter() - started
        served = self._remember(self._served_catchup(stored))
        return PlanOutcome(served, staleness, True, took, err, err_master)

    def _served_catchup(self, stored: StoredPlan) -> ServedPlan:
        message, chunks = plan_messages(
            stored.payload, version=stored.version, route=DownlinkRoute.CATCHUP, plan=stored.id,
            base=stored.base_id, result=stored.result_id, chunk_size=self._chunk_size,
        )  # fmt: skip
        return ServedPlan(message, chunks)

    def _remember(self, served: ServedPlan) -> ServedPlan:
        self._served[served.message.plan] = served
        while len(self._served) > PLAN_CACHE:
            self._served.popitem(last=False)
        return served

    def _fisher_for(self, g: GlobalAdapter) -> Mapping[str, torch.Tensor] | None:
        if not self.settings.fisher or self._fisher_source is None:
            return None
        if self._fisher is None:
            self._fisher = self._fisher_source(g)
        return self._fisher

    # -- states ------------------------------------------------------------------------------

    def _holds(self, held: bytes, g: GlobalAdapter) -> bool:
        return held == g.manifest.sha256 or self._target_version(held) == g.version

    def _root_version(self, held: bytes) -> int | None:
        if held == self.current.manifest.sha256:
            return self.current.version
        rec = self._store.global_with_sha256(held.hex())
        return None if rec is None else rec.version

    def _target_version(self, held: bytes) -> int | None:
        root = self._root_version(held)
        if root is not None:
            return root
        node = self._store.downlink.node(held)
        return None if node is None else node.target_version

    def _chain(self, held: bytes) -> tuple[int | None, int]:
        """(catch-ups since a full adapter, their payload bytes) behind ``held``; None: unknown."""
        if self._root_version(held) is not None:
            return 0, 0
        node = self._store.downlink.node(held)
        return (None, 0) if node is None else (node.depth, node.chain_bytes)

    def state(self, sid: bytes) -> State | None:
        """The fp16 tensors of state ``sid``: a stored global version, or rebuilt along its chain
        of stored catch-ups; None when a link is gone or the result does not hash to ``sid``."""
        chain: list[StateNode] = []
        at, state = sid, self._cached_state(sid)
        while state is None:
            root = self._root_version(at)
            if root is not None:
                state = self._root_state(root, at)
                break
            node = self._store.downlink.node(at)
            if node is None or len(chain) > self.settings.max_chain:
                return None
            chain.append(node)
            at = node.parent_id
            state = self._cached_state(at)
        if state is None:
            return None
        for node in reversed(chain):
            plan = self._store.downlink.plan(node.plan_id)
            if plan is None:
                return None
            try:
                state = apply_update(state, decompress(plan.payload, self._limits))
            except (FstqError, AdapterFormatError) as exc:
                log.error("stored catch-up %s does not apply: %s", plan.id.hex()[:12], exc)
                return None
            if state_id(canonical_bytes(state)) != node.id:
                log.error("rebuilt state %s hashes otherwise; serving full", node.id.hex()[:12])
                return None
            self._remember_state(node.id, state)
        return state

    def _root_state(self, version: int, sid: bytes) -> State | None:
        g = self.current
        master = g.master if version == g.version else self._load_master(version)
        if master is None:
            return None
        state = {name: t.to(torch.float16) for name, t in master.items()}
        if state_id(canonical_bytes(state)) != sid:  # e.g. re-encoded by another library
            log.warning("global v%d no longer hashes to its recorded SHA-256", version)
            return None
        self._remember_state(sid, state)
        return state

    def _cached_state(self, sid: bytes) -> State | None:
        state = self._states.get(sid)
        if state is not None:
            self._states.move_to_end(sid)
        return state

    def _remember_state(self, sid: bytes, state: State) -> None:
        self._states[sid] = state
        while len(self._states) > STATE_CACHE:
            self._states.popitem(last=False)


def _errors(
    master: Mapping[str, torch.Tensor], held: State, result: State
) -> tuple[float | None, float | None]:
    """Relative start error of a catch-up: vs. the gap it closes, and vs. the master."""
    gap = rest = norm = 0.0
    for name, m in master.items():
        gap += float((m - held[name].float()).square().sum())
        rest += float((m - result[name].float()).square().sum())
        norm += float(m.square().sum())
    return (rest / gap) ** 0.5 if gap else None, (rest / norm) ** 0.5 if norm else None
