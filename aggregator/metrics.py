"""Per-round counters and the JSON record appended to ``rounds.jsonl`` at the end of a round.

Byte accounting follows docs/architecture.md: chunk payload bytes, the encoded message bytes
plus MQTT framing (fixed header, topic, packet id, properties) as ``*_wire_bytes``, and
duplicates (re-sent chunks) separately. Everything received while a round is open is charged to
that round, whichever round a message names (late uploads cost uplink bytes too); traffic while
no round is open (fetches of the new global, stragglers) is charged to the next round.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.round_result import (
    ClientUpload,
    DownlinkAccount,
    DownlinkTraffic,
    HeldOutEval,
    RoundResult,
    RoundStatus,
    ratio,
)
from broker.framing import publish_size
from broker.transport import Message
from common.record import to_json

__all__ = ["DownlinkCounts", "RoundMetrics", "append_jsonl", "received_wire_bytes"]

_TRAFFIC = (
    "uplink_messages",
    "uplink_wire_bytes",
    "uplink_payload_bytes",
    "duplicate_chunks",
    "uplink_resent_bytes",
    "downlink_chunks",
    "downlink_payload_bytes",
    "downlink_wire_bytes",
    "control_wire_bytes",
)


def received_wire_bytes(msg: Message) -> int:
    """Size of the MQTT 5 PUBLISH packet that carried ``msg`` (as the publisher sent it)."""
    return publish_size(
        msg.topic, msg.payload, msg.qos, expiry_s=msg.expiry_s, user_properties=msg.user_properties
    )


@dataclass
class _Traffic:
    fetches: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0

    def add(self, fetches: int, payload_bytes: int, wire_bytes: int) -> None:
        self.fetches += fetches
        self.payload_bytes += payload_bytes
        self.wire_bytes += wire_bytes

    def record(self) -> DownlinkTraffic:
        return DownlinkTraffic(
            fetches=self.fetches, payload_bytes=self.payload_bytes, wire_bytes=self.wire_bytes
        )


@dataclass
class DownlinkCounts:
    """The round's downlink by route and by staleness, and what planning it cost."""

    routes: dict[str, _Traffic] = field(default_factory=dict)
    staleness: dict[str, _Traffic] = field(default_factory=dict)
    plans_computed: int = 0
    plans_reused: int = 0
    plan_compute_s: float = 0.0
    errors: list[tuple[float, float]] = field(default_factory=list)

    def add(
        self, route: str, staleness: str | None, fetches: int, payload_bytes: int, wire: int
    ) -> None:
        """Traffic of one answer: a plan (``fetches=1``) or the chunks of one fetch."""
        self.routes.setdefault(route, _Traffic()).add(fetches, payload_bytes, wire)
        if staleness is not None:
            self.staleness.setdefault(staleness, _Traffic()).add(fetches, payload_bytes, wire)

    def planned(self, computed: bool, seconds: float, error: float | None,
                error_vs_master: float | None) -> None:  # fmt: skip
        if not computed:
            self.plans_reused += 1
            return
        self.plans_computed += 1
        self.plan_compute_s += seconds
        if error is not None and error_vs_master is not None:
            self.errors.append((error, error_vs_master))

    def absorb(self, other: DownlinkCounts) -> None:
        for mine, theirs in ((self.routes, other.routes), (self.staleness, other.staleness)):
            for key, t in theirs.items():
                mine.setdefault(key, _Traffic()).add(t.fetches, t.payload_bytes, t.wire_bytes)
        self.plans_computed += other.plans_computed
        self.plans_reused += other.plans_reused
        self.plan_compute_s += other.plan_compute_s
        self.errors += other.errors

    def account(self, mode: str, budget_bytes: int, full_bytes: int) -> DownlinkAccount:
        n = len(self.errors)
        return DownlinkAccount(
            mode=mode,
            budget_bytes=budget_bytes,
            full_bytes=full_bytes,
            routes={k: v.record() for k, v in sorted(self.routes.items())},
            staleness={k: v.record() for k, v in sorted(self.staleness.items())},
            plans_computed=self.plans_computed,
            plans_reused=self.plans_reused,
            plan_compute_s=self.plan_compute_s,
            catchup_error=sum(e for e, _ in self.errors) / n if n else None,
            catchup_error_vs_master=sum(e for _, e in self.errors) / n if n else None,
        )


@dataclass
class RoundMetrics:
    """Mutable counters of one round; :meth:`record` is what it came to, written at its end."""

    round_id: int
    base_version: int
    selected: tuple[str, ...]
    opened_at: float
    resumed: bool = False
    extensions: int = 0
    uplink_messages: int = 0
    uplink_wire_bytes: int = 0
    uplink_payload_bytes: int = 0  # chunk data, first copies
    duplicate_chunks: int = 0
    uplink_resent_bytes: int = 0  # chunk data of re-sent chunks
    downlink_chunks: int = 0
    downlink_payload_bytes: int = 0
    downlink_wire_bytes: int = 0
    control_wire_bytes: int = 0  # acks, announcements, global manifests
    late: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    clients: dict[str, ClientUpload] = field(default_factory=dict)
    downlink: DownlinkCounts = field(default_factory=DownlinkCounts)

    def add_downlink(self, chunks: int, payload_bytes: int, wire_bytes: int) -> None:
        self.downlink_chunks += chunks
        self.downlink_payload_bytes += payload_bytes
        self.downlink_wire_bytes += wire_bytes

    def absorb(self, other: RoundMetrics) -> None:
        """Take over what was counted while no round was open."""
        for name in _TRAFFIC:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.late += other.late
        self.rejected.update(other.rejected)
        self.downlink.absorb(other.downlink)

    def record(
        self,
        *,
        status: RoundStatus,
        global_version: int,
        closed_at: float,
        evaluation: HeldOutEval | None = None,
        clipped: int = 0,
        close_s: float = 0.0,
        downlink: DownlinkAccount | None = None,
    ) -> RoundResult:
        accepted = sum(c.bytes for c in self.clients.values())
        dense = sum(c.dense_fp16_bytes for c in self.clients.values())
        return RoundResult(
            round=self.round_id,
            status=status,
            base_version=self.base_version,
            global_version=global_version,
            selected=self.selected,
            arrived=tuple(sorted(self.clients)),
            late=self.late,
            rejected=dict(sorted(self.rejected.items())),
            uplink_messages=self.uplink_messages,
            uplink_wire_bytes=self.uplink_wire_bytes,
            uplink_payload_bytes=self.uplink_payload_bytes,
            duplicate_chunks=self.duplicate_chunks,
            uplink_resent_bytes=self.uplink_resent_bytes,
            downlink_chunks=self.downlink_chunks,
            downlink_payload_bytes=self.downlink_payload_bytes,
            downlink_wire_bytes=self.downlink_wire_bytes,
            control_wire_bytes=self.control_wire_bytes,
            accepted_payload_bytes=accepted,
            ratio_vs_fp16=ratio(dense, accepted),
            clients=dict(sorted(self.clients.items())),
            clipped=clipped,
            eval=evaluation,
            extensions=self.extensions,
            resumed=self.resumed,
            opened_at=self.opened_at,
            closed_at=closed_at,
            duration_s=closed_at - self.opened_at,
            close_s=close_s,
            downlink=downlink,
        )


def append_jsonl(path: Path, record: RoundResult) -> None:
    """Append one JSON line (strict JSON: no NaN) and flush it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(to_json(record) + "\n")
        fh.flush()
