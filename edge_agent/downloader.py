"""The downlink side of the protocol: get the global adapter a round needs, verified, and keep it.

The device holds one adapter state (:class:`HeldAdapter`: canonical fp16 bytes, their SHA-256
id, the global version they stand for). For another version it asks the aggregator how to get
there, naming what it holds (a ``FetchRequest`` without a plan); the answer is a
``DownlinkPlan`` (decision 13):

* ``none``: what it holds is already served for that version;
* ``catchup``: an fstq payload to apply on top of what it holds
  (:func:`workload.catchup.apply_update`), the result's id announced in the plan;
* ``full``: the whole fp16 adapter, whose id is the global manifest's.

The plan's payload comes in windows of ``window`` chunks per ``FetchRequest``, the next window
once the current one has arrived, and the missing ones of the current window again after
``fetch_timeout_s`` without progress (:class:`broker.chunking.Download` reassembles: CRC per
chunk, SHA-256 at the end). A catch-up whose payload, decoding or result does not verify makes
the device ask for the full adapter instead (it keeps what it holds meanwhile): it never trains
from an unverified state. Plans for another held state or version, and chunks of another plan,
are ignored. The held state is saved in the state directory (atomically), so a restarted agent
neither fetches again nor forgets what it holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from broker.chunking import Download
from broker.codec import encode
from broker.errors import StaleVersionError, WireError
from broker.framing import publish_size
from broker.messages import (
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    Scalar,
)
from broker.progress import DeviceProgress, Stage
from broker.topics import fetch_topic
from broker.transport import Message, Transport
from edge_agent.device_state import DeviceState
from fstq.compressors import DecodeLimits, decompress
from fstq.errors import FstqError
from workload.adapters import AdapterFormatError
from workload.catchup import apply_update, canonical_bytes, state_from_bytes, state_id

__all__ = ["DERIVED", "HELD", "DeviceDownlink", "GlobalFetcher", "HeldAdapter"]

log = logging.getLogger(__name__)

#: Routes of a round's adapter besides the plans' own (none, catchup, full): the initial adapter
#: derived on the device, and an adapter it already held from an earlier round (no request).
DERIVED, HELD = "derived", "held"


@dataclass(frozen=True)
class HeldAdapter:
    """The adapter state a device trains from, verified against its id."""

    version: int  # the global version it stands for
    round: int
    sha256: bytes  # its id: the SHA-256 of ``payload``
    target_sha256: bytes  # the id of that version's full adapter (what announcements name)
    format: str
    payload: bytes  # canonical fp16 safetensors bytes
    metadata: dict[str, Scalar]  # the global manifest's (LoRA) metadata
    route: str  # how it came: derived, full, catchup (a none plan keeps the route it had)

    def cache_meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "round": self.round,
            "sha256": self.sha256.hex(),
            "target_sha256": self.target_sha256.hex(),
            "format": self.format,
            "metadata": self.metadata,
            "route": self.route,
        }

    @classmethod
    def from_cache(cls, meta: dict[str, Any], payload: bytes) -> HeldAdapter:
        sha = bytes.fromhex(meta["sha256"])
        return cls(
            version=int(meta["version"]),
            round=int(meta["round"]),
            sha256=sha,
            # A cache written before catch-ups held full adapters only.
            target_sha256=bytes.fromhex(meta.get("target_sha256", meta["sha256"])),
            format=str(meta["format"]),
            payload=payload,
            metadata=dict(meta["metadata"]),
            route=str(meta.get("route", DownlinkRoute.FULL.value)),
        )


@dataclass(frozen=True)
class DeviceDownlink:
    """How a device got the adapter one round trained from (``EdgeAgent.downlinks``)."""

    route: str  # derived, held (no request), none, catchup or full
    staleness: int | None  # versions its held state was behind; None: it held nothing
    first_contact: bool  # it held nothing fetched before (nothing, or the derived v0)
    payload_bytes: int  # chunk data received (first copies and re-sends alike)
    wire_bytes: int  # PUBLISH bytes of the plans and chunks received
    plans: int  # plan messages taken
    fallbacks: int  # catch-ups that did not verify (the full adapter was fetched then)


@dataclass
class _Fetch:
    """One fetch in progress: the manifest it gets, what it asked with, what it cost."""

    manifest: GlobalManifest
    asked: bytes | None  # the held id named in the plan request (None: the full adapter)
    staleness: int | None
    first_contact: bool
    download: Download | None = None
    payload_bytes: int = 0
    wire_bytes: int = 0
    plans: int = 0
    fallbacks: int = 0

    def record(self, route: str) -> DeviceDownlink:
        return DeviceDownlink(
            route=route, staleness=self.staleness, first_contact=self.first_contact,
            payload_bytes=self.payload_bytes, wire_bytes=self.wire_bytes, plans=self.plans,
            fallbacks=self.fallbacks,
        )  # fmt: skip


class GlobalFetcher:
    """Holds the device's adapter state and fetches another version on request."""

    def __init__(
        self,
        client: Transport,
        state: DeviceState,
        *,
        fleet: str,
        client_id: str,
        fetch_timeout_s: float,
        window: int,
    ) -> None:
        self._client = client
        self._state = state
        self._topic = fetch_topic(fleet, client_id)
        self._me = client_id
        self._timeout_s = fetch_timeout_s
        self._window = window
        self._fetch: _Fetch | None = None
        self._outstanding: set[int] = set()
        self._last_progress = 0.0
        #: A manifest whose full download failed for good (limits, SHA-256): not retried as such.
        self._refused: GlobalManifest | None = None
        self._last: DeviceDownlink | None = None
        self.requests_sent = 0
        #: Plans and chunks dropped as not ours to take (other held state, version or plan).
        self.ignored = 0
        self.current: HeldAdapter | None = self._load_cache()

    def _load_cache(self) -> HeldAdapter | None:
        cached = self._state.load_global()
        if cached is None:
            return None
        try:
            return HeldAdapter.from_cache(*cached)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring unreadable global adapter cache: %s", exc)
            return None

    @property
    def downloading(self) -> int | None:
        """Version being fetched, if any."""
        return self._fetch.manifest.version if self._fetch is not None else None

    def progress(self) -> DeviceProgress | None:
        """Chunks of the plan being downloaded received so far; None when not fetching."""
        fetch = self._fetch
        if fetch is None:
            return None
        if fetch.download is None:
            return DeviceProgress(Stage.FETCHING, 0, fetch.manifest.chunk_count)
        download = fetch.download
        return DeviceProgress(
            Stage.FETCHING, download.reassembler.received, download.plan.chunk_count
        )

    def take_record(self) -> DeviceDownlink:
        """How the current adapter came, once; afterwards (a later round on the same adapter)
        it was simply held."""
        record, self._last = self._last, None
        if record is None:
            return DeviceDownlink(route=HELD, staleness=0, first_contact=False, payload_bytes=0,
                                  wire_bytes=0, plans=0, fallbacks=0)  # fmt: skip
        return record

    def pending_record(self) -> DeviceDownlink | None:
        """How the adapter not (yet) trained from came, without taking it: the last finished
        fetch, else the plan being downloaded; None when neither (for a round given up)."""
        if self._last is not None:
            return self._last
        fetch = self._fetch
        if fetch is not None and fetch.download is not None:
            return fetch.record(fetch.download.plan.route.value)
        return None

    def adopt(self, held: HeldAdapter) -> None:
        """Hold ``held`` (verified by the caller: the derived initial adapter) from now on."""
        record = DeviceDownlink(route=held.route, staleness=None, first_contact=True,
                                payload_bytes=0, wire_bytes=0, plans=0, fallbacks=0)  # fmt: skip
        self._keep(held, record)

    def want(self, manifest: GlobalManifest, now: float) -> None:
        """Get ``manifest``'s version unless it is held or already on its way."""
        current = self.current
        if current is not None and current.target_sha256 == manifest.sha256:
            return
        if self._fetch is not None and self._fetch.manifest == manifest:
            return
        if manifest == self._refused:
            return  # asked again every loop turn; a new manifest gets a new chance
        self._fetch = _Fetch(
            manifest,
            asked=None if current is None else current.sha256,
            staleness=None if current is None else manifest.version - current.version,
            first_contact=current is None or current.route == DERIVED,
        )
        log.info("fetching global adapter v%d, holding %s", manifest.version,
                 "nothing" if current is None else f"v{current.version} ({current.route})",
                 extra=self._ctx())  # fmt: skip
        self._request_plan(now)

    # -- answers -----------------------------------------------------------------------------

    def on_plan(self, plan: DownlinkPlan, msg: Message, now: float) -> HeldAdapter | None:
        """Take a plan that answers our request; returns the adapter when it is ``none``."""
        fetch = self._fetch
        why = self._foreign(plan, fetch)
        if why is not None:
            self.ignored += 1
            log.info("ignoring a %s plan for v%d: %s", plan.route.value, plan.version, why,
                     extra=self._ctx())  # fmt: skip
            return None
        assert fetch is not None
        fetch.plans += 1
        fetch.wire_bytes += _wire_size(msg)
        if plan.route is DownlinkRoute.NONE:
            current = self.current
            assert current is not None
            m = fetch.manifest
            held = dataclasses.replace(
                current, version=m.version, round=m.round, target_sha256=m.sha256,
                metadata=dict(m.metadata),
            )  # fmt: skip
            return self._finish(fetch, held, DownlinkRoute.NONE.value)
        try:
            fetch.download = Download(plan, held=fetch.asked, expires_at=math.inf)
        except WireError as exc:  # over the transfer limits: refused before allocating
            self._failed(fetch, f"plan refused: {exc}", now)
            return None
        log.info("v%d by %s: %d bytes in %d chunks", plan.version, plan.route.value,
                 plan.total_size, plan.chunk_count, extra=self._ctx())  # fmt: skip
        self._request_chunks(now)
        return None

    def _foreign(self, plan: DownlinkPlan, fetch: _Fetch | None) -> str | None:
        """Why ``plan`` is not an answer to the fetch in progress (None: it is one)."""
        if fetch is None or plan.version != fetch.manifest.version:
            return "not the version being fetched"
        if fetch.download is not None and fetch.download.plan == plan:
            return "a duplicate"
        if plan.route is DownlinkRoute.FULL:
            return None if plan.result == fetch.manifest.sha256 else "not the announced adapter"
        current = self.current
        if current is None or fetch.asked is None or plan.base != fetch.asked:
            return "made for another held state"
        return None if fetch.asked == current.sha256 else "made for another held state"

    def on_chunk(self, chunk: GlobalChunk, msg: Message, now: float) -> HeldAdapter | None:
        """Store a chunk; returns the adapter when this chunk completed and verified it."""
        fetch = self._fetch
        download = None if fetch is None else fetch.download
        if fetch is None or download is None:
            return None
        try:
            new = download.add(chunk)
        except StaleVersionError:
            self.ignored += 1  # another plan's, or left over from an earlier fetch
            return None
        except WireError as exc:
            # Bad CRC/size/index: drop it; the re-request after the timeout fetches it again.
            log.warning("dropping global chunk %d: %s", chunk.index, exc, extra=self._ctx())
            return None
        fetch.wire_bytes += _wire_size(msg)
        fetch.payload_bytes += len(chunk.data)
        if not new:
            return None
        self._outstanding.discard(chunk.index)
        self._last_progress = now
        if download.complete:
            return self._complete(fetch, download, now)
        if not self._outstanding:
            self._request_chunks(now)
        return None

    # -- timers ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Ask again after ``fetch_timeout_s`` without progress: the plan, or missing chunks."""
        fetch = self._fetch
        if fetch is None or now - self._last_progress < self._timeout_s:
            return
        log.info("no answer for %.1f s; asking again", now - self._last_progress,
                 extra=self._ctx())  # fmt: skip
        if fetch.download is None:
            self._request_plan(now)
        else:
            self._request_chunks(now)

    def next_timer(self) -> float | None:
        return None if self._fetch is None else self._last_progress + self._timeout_s

    # -- internals ---------------------------------------------------------------------------

    def _publish(self, request: FetchRequest, now: float) -> None:
        self._last_progress = now
        # Expires with the timeout: a request the aggregator reads later than that has already
        # been superseded by the next one.
        expiry = max(1, math.ceil(self._timeout_s))
        self._client.publish(self._topic, encode(request), qos=1, expiry_s=expiry)
        self.requests_sent += 1

    def _request_plan(self, now: float) -> None:
        fetch = self._fetch
        assert fetch is not None
        self._outstanding = set()
        self._publish(FetchRequest(version=fetch.manifest.version, held=fetch.asked), now)

    def _request_chunks(self, now: float) -> None:
        fetch = self._fetch
        assert fetch is not None and fetch.download is not None
        download = fetch.download
        self._outstanding = set(download.reassembler.missing()[: self._window])
        self._publish(download.fetch_request(self._window), now)

    def _complete(self, fetch: _Fetch, download: Download, now: float) -> HeldAdapter | None:
        plan, m = download.plan, fetch.manifest
        try:
            payload = download.payload()  # SHA-256 checked here
            data = payload if plan.route is DownlinkRoute.FULL else self._caught_up(payload)
            if state_id(data) != plan.result:
                raise _Unverified("the result does not hash to the plan's result")
        except (WireError, FstqError, AdapterFormatError, _Unverified) as exc:
            self._failed(fetch, f"{plan.route.value} of v{m.version} failed: {exc}", now)
            return None
        held = HeldAdapter(m.version, m.round, plan.result, m.sha256, m.format, data,
                           dict(m.metadata), plan.route.value)  # fmt: skip
        return self._finish(fetch, held, plan.route.value)

    def _caught_up(self, payload: bytes) -> bytes:
        """The held state with a catch-up payload applied, as canonical bytes."""
        current = self.current
        assert current is not None
        base = state_from_bytes(current.payload)
        limits = DecodeLimits(
            max_tensors=len(base), max_total_elements=sum(t.numel() for t in base.values())
        )
        return canonical_bytes(apply_update(base, decompress(payload, limits)))

    def _failed(self, fetch: _Fetch, why: str, now: float) -> None:
        """A plan that cannot be used: ask for the full adapter, or give this version up."""
        fetch.download, self._outstanding = None, set()
        if fetch.asked is None:  # the full adapter itself failed: not retried as such
            log.error("global v%d: %s", fetch.manifest.version, why, extra=self._ctx())
            self._refused, self._fetch = fetch.manifest, None
            return
        log.warning("%s; fetching the full adapter instead", why, extra=self._ctx())
        fetch.asked = None
        fetch.fallbacks += 1
        self._request_plan(now)

    def _finish(self, fetch: _Fetch, held: HeldAdapter, route: str) -> HeldAdapter:
        self._fetch, self._outstanding = None, set()
        self._keep(held, fetch.record(route))
        log.info("global adapter v%d verified and cached (%s)", held.version, route,
                 extra=self._ctx())  # fmt: skip
        return held

    def _keep(self, held: HeldAdapter, record: DeviceDownlink) -> None:
        self._state.save_global(held.cache_meta(), held.payload)
        self.current, self._last = held, record

    def _ctx(self) -> dict[str, object]:
        return {"round": None, "client": self._me, "phase": "downloading"}


class _Unverified(ValueError):
    """A downloaded state that does not hash to what its plan announced."""


def _wire_size(msg: Message) -> int:
    return publish_size(msg.topic, msg.payload, msg.qos, expiry_s=msg.expiry_s,
                        user_properties=msg.user_properties)  # fmt: skip
