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

from aggregator.round_result import ClientUpload, HeldOutEval, RoundResult, RoundStatus, ratio
from broker.framing import publish_size
from broker.transport import Message
from common.record import to_json

__all__ = ["RoundMetrics", "append_jsonl", "received_wire_bytes"]

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

    def record(
        self,
        *,
        status: RoundStatus,
        global_version: int,
        closed_at: float,
        evaluation: HeldOutEval | None = None,
        clipped: int = 0,
        close_s: float = 0.0,
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
        )


def append_jsonl(path: Path, record: RoundResult) -> None:
    """Append one JSON line (strict JSON: no NaN) and flush it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(to_json(record) + "\n")
        fh.flush()
