"""The downlink side of the protocol: fetch the global adapter a round needs, and cache it.

:class:`broker.chunking.Download` does the reassembly (CRC per chunk, SHA-256 at the end); this
module decides *when* to ask: a window of ``window`` missing chunks per ``FetchRequest``, the
next window once the current one has arrived, and the missing ones of the current window again
after ``fetch_timeout_s`` without progress (a dropped chunk costs one timeout, not a restart).

The verified adapter is cached in the state directory, so a restarted agent does not fetch a
version it already has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from broker.chunking import Download
from broker.codec import encode
from broker.errors import StaleVersionError, WireError
from broker.messages import GlobalChunk, GlobalManifest, Scalar
from broker.progress import DeviceProgress, Stage
from broker.topics import fetch_topic
from broker.transport import Transport
from edge_agent.device_state import DeviceState

__all__ = ["GlobalFetcher", "HeldAdapter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldAdapter:
    """A verified global adapter: safetensors bytes plus what its manifest said about them."""

    version: int
    round: int
    sha256: bytes
    format: str
    payload: bytes
    metadata: dict[str, Scalar]

    def cache_meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "round": self.round,
            "sha256": self.sha256.hex(),
            "format": self.format,
            "metadata": self.metadata,
        }

    @classmethod
    def from_cache(cls, meta: dict[str, Any], payload: bytes) -> HeldAdapter:
        return cls(
            version=int(meta["version"]),
            round=int(meta["round"]),
            sha256=bytes.fromhex(meta["sha256"]),
            format=str(meta["format"]),
            payload=payload,
            metadata=dict(meta["metadata"]),
        )


class GlobalFetcher:
    """Holds the current global adapter and downloads another version on request."""

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
        self._download: Download | None = None
        self._outstanding: set[int] = set()
        self._last_progress = 0.0
        #: A manifest whose download failed for good (limits, SHA-256): not retried as such.
        self._refused: GlobalManifest | None = None
        self.requests_sent = 0
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
        """Version being downloaded, if any."""
        return self._download.manifest.version if self._download is not None else None

    def progress(self) -> DeviceProgress | None:
        """Chunks of the version being downloaded received so far; None when not fetching."""
        download = self._download
        if download is None:
            return None
        return DeviceProgress(
            Stage.FETCHING, download.reassembler.received, download.manifest.chunk_count
        )

    def want(self, manifest: GlobalManifest, now: float) -> None:
        """Download ``manifest``'s version unless it is current or already on its way."""
        if self.current is not None and self.current.sha256 == manifest.sha256:
            return
        if self._download is not None and self._download.manifest == manifest:
            return
        if manifest == self._refused:
            return  # asked again every loop turn; a new manifest gets a new chance
        try:
            self._download = Download(manifest, expires_at=math.inf)
        except WireError as exc:  # over the transfer limits: refused before allocating
            log.error("cannot download global v%d: %s", manifest.version, exc, extra=self._ctx())
            self._download, self._refused = None, manifest
            return
        log.info(
            "fetching global adapter v%d (%d bytes, %d chunks)",
            manifest.version,
            manifest.total_size,
            manifest.chunk_count,
            extra=self._ctx(),
        )
        self._request(now)

    def on_chunk(self, chunk: GlobalChunk, now: float) -> HeldAdapter | None:
        """Store a chunk; returns the adapter when this chunk completed and verified it."""
        download = self._download
        if download is None:
            return None
        try:
            new = download.add(chunk)
        except StaleVersionError:
            return None  # left over from an earlier fetch (QoS 1 queues survive restarts)
        except WireError as exc:
            # Bad CRC/size/index: drop it; the re-request after the timeout fetches it again.
            log.warning("dropping global chunk %d: %s", chunk.index, exc, extra=self._ctx())
            return None
        if not new:
            return None
        self._outstanding.discard(chunk.index)
        self._last_progress = now
        if download.complete:
            return self._finish(download)
        if not self._outstanding:
            self._request(now)
        return None

    def tick(self, now: float) -> None:
        """Re-request the missing chunks after ``fetch_timeout_s`` without progress."""
        if self._download is not None and now - self._last_progress >= self._timeout_s:
            log.info(
                "no global chunk for %.1f s; re-requesting the missing ones",
                now - self._last_progress,
                extra=self._ctx(),
            )
            self._request(now)

    def next_timer(self) -> float | None:
        return None if self._download is None else self._last_progress + self._timeout_s

    def _request(self, now: float) -> None:
        download = self._download
        assert download is not None
        request = download.fetch_request(self._window)
        self._outstanding = set(download.reassembler.missing()[: self._window])
        self._last_progress = now
        # Expires with the timeout: a request the aggregator reads later than that has already
        # been superseded by the next one.
        expiry = max(1, math.ceil(self._timeout_s))
        self._client.publish(self._topic, encode(request), qos=1, expiry_s=expiry)
        self.requests_sent += 1

    def _finish(self, download: Download) -> HeldAdapter | None:
        self._download, self._outstanding = None, set()
        m = download.manifest
        try:
            payload = download.payload()  # SHA-256 checked here
        except WireError as exc:
            log.error("global v%d failed verification: %s", m.version, exc, extra=self._ctx())
            self._refused = m
            return None
        adapter = HeldAdapter(m.version, m.round, m.sha256, m.format, payload, dict(m.metadata))
        self._state.save_global(adapter.cache_meta(), payload)
        self.current = adapter
        log.info("global adapter v%d verified and cached", m.version, extra=self._ctx())
        return adapter

    def _ctx(self) -> dict[str, object]:
        return {"round": None, "client": self._me, "phase": "downloading"}
