"""What a finished round came to: the line the aggregator appends to ``<state>/rounds.jsonl``
(and keeps in its store), read back by the demo and the evaluation.

Field meanings are in aggregator/README.md ("Per-round metrics"). One field is named otherwise
in the file: ``uplink_resent_bytes`` (the chunk data of re-sent chunks) keeps the key
``duplicate_bytes`` that existing ``rounds.jsonl`` files and their readers use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from common.record import RECORD_CONFIG, from_json, omitted_if_none

__all__ = [
    "ClientUpload",
    "DownlinkAccount",
    "DownlinkTraffic",
    "HeldOutEval",
    "RoundResult",
    "RoundStatus",
    "ratio",
    "read_rounds",
]

RoundStatus = Literal["closed", "failed"]


def ratio(dense_fp16_bytes: int, sent_bytes: int) -> float | None:
    """How many times smaller than dense fp16 (None when nothing was sent)."""
    return dense_fp16_bytes / sent_bytes if sent_bytes else None


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class HeldOutEval:
    """A global adapter on held-out questions: token-weighted answer-token loss and accuracy
    (None when there were no answer tokens, or the loss was not finite)."""

    loss: float | None
    accuracy: float | None
    tokens: int


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class ClientUpload:
    """What one accepted upload cost and how much it was compressed."""

    bytes: int
    dense_fp16_bytes: int  # 2 bytes per coordinate: the uncompressed reference
    ratio_vs_fp16: float | None
    method: str
    sample_count: int
    norm: float
    wire_bytes: int


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class DownlinkTraffic:
    """Downlink of one route or staleness: plans served, chunk data and MQTT bytes sent."""

    fetches: int  # plans served (route "derived": devices that derived v0, no bytes)
    payload_bytes: int  # chunk data
    wire_bytes: int  # PUBLISH packets: the plan messages and the chunks


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class DownlinkAccount:
    """How the round's devices got the global adapter it started from (decision 13)."""

    mode: str  # downlink.mode: catchup | full
    budget_bytes: int  # catch-up budget
    full_bytes: int  # the full fp16 adapter of the round's base version
    routes: dict[str, DownlinkTraffic]  # none | catchup | full | derived
    staleness: dict[str, DownlinkTraffic]  # versions behind ("0", "1", ...), new, unknown
    plans_computed: int  # catch-up payloads compressed this round
    plans_reused: int  # plans answered from memory or the store (shared, asked again)
    plan_compute_s: float
    #: Mean over the computed catch-ups of ||master - result|| / ||master - held|| (what the
    #: catch-up left of the gap) and of ||master - result|| / ||master||.
    catchup_error: float | None
    catchup_error_vs_master: float | None


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class RoundResult:
    """One round as it ended (closed or failed); one line of ``rounds.jsonl``."""

    round: int
    status: RoundStatus
    base_version: int
    global_version: int
    selected: tuple[str, ...]
    arrived: tuple[str, ...]
    late: int
    rejected: dict[str, int]  # reason -> uploads refused
    uplink_messages: int
    uplink_wire_bytes: int
    uplink_payload_bytes: int
    duplicate_chunks: int
    uplink_resent_bytes: Annotated[
        int, Field(validation_alias="duplicate_bytes", serialization_alias="duplicate_bytes")
    ]
    downlink_chunks: int
    downlink_payload_bytes: int
    downlink_wire_bytes: int
    control_wire_bytes: int
    accepted_payload_bytes: int
    ratio_vs_fp16: float | None
    clients: dict[str, ClientUpload]
    clipped: int
    eval: HeldOutEval | None  # None: failed, or no held-out set configured
    extensions: int
    resumed: bool
    opened_at: float
    closed_at: float
    duration_s: float
    close_s: float  # aggregation, evaluation and saving of the new global adapter
    #: Downlink by route and staleness (absent from records written before issue 12).
    downlink: DownlinkAccount | None = omitted_if_none()


def read_rounds(path: Path) -> list[RoundResult]:
    """The records of ``rounds.jsonl`` so far (none before the first round ends); a
    :class:`~common.record.RecordError` naming the line when one is not a round record."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        from_json(RoundResult, line, f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip()
    ]
