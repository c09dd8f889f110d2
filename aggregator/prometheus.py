"""Prometheus metrics of the aggregator, served on ``metrics_host:metrics_port`` (0 = off).

Lifetime counters, gauges and histograms complementing the per-round ``rounds.jsonl`` records
(``aggregator.metrics``). Each :class:`ServiceMetrics` has its own ``CollectorRegistry`` (never
the process-global default), so several aggregators in one process (tests) do not collide.
Only the service loop thread updates them; the HTTP server thread only reads (prometheus_client
metrics are thread-safe).

Uplink bytes split three ways, summing to every PUBLISH received on ``up/`` topics (the rounds'
``uplink_wire_bytes``): ``payload`` (chunk data, first copies), ``resent`` (chunk data of
duplicate chunks) and ``framing`` (everything else: msgpack envelopes, MQTT headers, topics,
properties, manifests and messages that were refused before their data counted).
Downlink bytes (``GlobalChunk`` messages answering fetches) split the same way into ``payload``
and ``framing``, summing to the rounds' ``downlink_wire_bytes``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from aggregator.round_result import RoundResult

__all__ = ["NAMESPACE", "ServiceMetrics"]

log = logging.getLogger(__name__)

NAMESPACE = "fedfstq_aggregator"

#: Upload completion (manifest to last chunk) over slow, flaky links: seconds to many minutes.
_UPLOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: Aggregation + writing the new global + evaluation.
_CLOSE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: A round ends when all selected clients arrived, or at its timeout plus extensions (default
#: 300 s + 2 x 60 s); fleets of slow boards run rounds of an hour or more.
_ROUND_BUCKETS = (10, 30, 60, 120, 300, 420, 600, 900, 1800, 3600, 7200, 14400)


class ServiceMetrics:
    """The aggregator's Prometheus metrics, updated by the service loop."""

    def __init__(self, fleet: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg, ns = self.registry, NAMESPACE
        self.fleet = fleet
        self.rounds_opened = Counter("rounds_opened", "Rounds opened.", namespace=ns,
                                     registry=reg)  # fmt: skip
        self.rounds_closed = Counter(
            "rounds_closed",
            "Rounds ended, by status (closed: new global published; failed: no quorum).",
            ["status"],
            namespace=ns,
            registry=reg,
        )
        self.clients_selected = Counter(
            "clients_selected", "Clients selected, summed over rounds.", namespace=ns, registry=reg
        )
        self.clients_arrived = Counter(
            "clients_arrived",
            "Uploads accepted into a round (committed and folded into FedAvg).",
            namespace=ns,
            registry=reg,
        )
        self.uploads_late = Counter(
            "uploads_late",
            "Uploads too late for their round, by reason (round_closed, expired).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self.uploads_rejected = Counter(
            "uploads_rejected",
            "Refused uploads and messages, by reason (aggregator/README.md lists them).",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self.received_bytes = Counter(
            "uplink_received_bytes",
            "Bytes received on upload topics (MQTT PUBLISH size), by kind: payload, resent, "
            "framing.",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self.sent_bytes = Counter(
            "downlink_sent_bytes",
            "Bytes of global adapter chunks sent on down topics (MQTT PUBLISH size), by kind: "
            "payload, framing.",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self.upload_seconds = Histogram(
            "upload_completion_seconds",
            "From an upload's first manifest to its last chunk (accepted uploads).",
            namespace=ns,
            registry=reg,
            buckets=_UPLOAD_BUCKETS,
        )
        self.aggregation_seconds = Histogram(
            "aggregation_seconds",
            "Closing a round: FedAvg, writing the new global adapter, evaluation.",
            namespace=ns,
            registry=reg,
            buckets=_CLOSE_BUCKETS,
        )
        self.round_seconds = Histogram(
            "round_duration_seconds",
            "From opening a round to its end, by status (closed, failed).",
            ["status"],
            namespace=ns,
            registry=reg,
            buckets=_ROUND_BUCKETS,
        )
        self.current_round = Gauge(
            "current_round", "Id of the latest round opened (0: none yet).", namespace=ns,
            registry=reg,
        )  # fmt: skip
        self.round_open = Gauge(
            "round_open", "1 while a round is open, else 0.", namespace=ns, registry=reg
        )
        self.global_version = Gauge(
            "global_version", "Version of the current global adapter.", namespace=ns, registry=reg
        )
        self.round_selected = Gauge(
            "round_selected_clients", "Clients selected for the open round (0: none open).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.clients_live = Gauge(
            "clients_live", "Clients heard from within rounds.heartbeat_ttl_s.", namespace=ns,
            registry=reg,
        )  # fmt: skip
        # Expose the label values before they first happen (rate() needs a starting sample).
        for status in ("closed", "failed"):
            self.rounds_closed.labels(status)
            self.round_seconds.labels(status)
        for kind in ("payload", "resent", "framing"):
            self.received_bytes.labels(kind)
        for kind in ("payload", "framing"):
            self.sent_bytes.labels(kind)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- updates (service loop thread) ---------------------------------------------------------

    def uplink(self, wire_bytes: int, chunk_kind: str | None, chunk_bytes: int) -> None:
        """One message on an upload topic; ``chunk_kind`` is payload/resent for counted chunks."""
        _split_bytes(self.received_bytes, wire_bytes, chunk_kind, chunk_bytes)

    def downlink(self, wire_bytes: int, payload_bytes: int) -> None:
        """Global adapter chunks sent in answer to one fetch."""
        _split_bytes(self.sent_bytes, wire_bytes, "payload", payload_bytes)

    def live(self, clients: int) -> None:
        self.clients_live.set(clients)

    def rejection(self, reason: str, *, late: bool) -> None:
        (self.uploads_late if late else self.uploads_rejected).labels(reason).inc()

    def accepted(self, seconds: float | None) -> None:
        self.clients_arrived.inc()
        if seconds is not None:
            self.upload_seconds.observe(max(seconds, 0.0))

    def opened(self, round_id: int, selected: Sequence[str]) -> None:
        self.rounds_opened.inc()
        self.clients_selected.inc(len(selected))
        self.current_round.set(round_id)
        self.round_open.set(1)
        self.round_selected.set(len(selected))

    def ended(self, record: RoundResult) -> None:
        """A round's ``rounds.jsonl`` record (closed or failed)."""
        self.rounds_closed.labels(record.status).inc()
        if record.status == "closed":
            self.aggregation_seconds.observe(record.close_s)
        self.round_seconds.labels(record.status).observe(max(record.duration_s, 0.0))
        self.round_open.set(0)
        self.round_selected.set(0)
        self.global_version.set(record.global_version)

    def state(self, last_round: int, open_selected: Collection[str] | None, version: int) -> None:
        """Gauges at start-up: the latest round, the resumed round's selection (None: no round
        open), the stored global."""
        self.current_round.set(last_round)
        self.round_open.set(0 if open_selected is None else 1)
        self.round_selected.set(0 if open_selected is None else len(open_selected))
        self.global_version.set(version)

    # -- the HTTP endpoint ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the endpoint listens on, None when not serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` from a daemon thread (``port`` 0 picks a free port)."""
        if self._server is not None:
            return
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("Prometheus metrics on http://%s:%d/metrics", *self.address or (host, port),
                 extra={"fleet": self.fleet})  # fmt: skip

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _split_bytes(counter: Counter, wire_bytes: int, kind: str | None, kind_bytes: int) -> None:
    """Count ``kind_bytes`` of a message under ``kind`` and the rest of it as ``framing``."""
    if kind is not None:
        counter.labels(kind).inc(kind_bytes)
        wire_bytes -= kind_bytes
    counter.labels("framing").inc(max(wire_bytes, 0))
