"""Wire messages: frozen, strict pydantic models, one per envelope ``kind``.

Every model is ``frozen`` (hashable-ish values, no mutation), ``extra="forbid"`` (unknown fields
are a decode error, not silently ignored) and ``strict`` (no str->int coercion; bytes must be
msgpack bin, tuples msgpack arrays). Size limits are part of the schema, so a decoded message
already satisfies them. :mod:`broker.codec` turns them into msgpack and back.

Bitmaps (``UploadAck.have``, ``FetchRequest.wanted``) are little-endian bit sets: chunk ``i``
is bit ``i % 8`` of byte ``i // 8``; padding bits of the last byte are zero.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_CLIENTS",
    "MAX_META_ENTRIES",
    "MAX_META_STR",
    "MAX_TRANSFER_BYTES",
    "PROTOCOL_VERSION",
    "AckStatus",
    "ClientState",
    "ClientStatus",
    "DownlinkPlan",
    "DownlinkRoute",
    "FetchRequest",
    "GlobalChunk",
    "GlobalManifest",
    "Metadata",
    "RoundAnnouncement",
    "RoundPhase",
    "RoundProgress",
    "Scalar",
    "UploadAck",
    "UploadChunk",
    "UploadManifest",
    "WireMessage",
    "bitmap_len",
    "chunk_count_for",
]

#: 2: the catch-up downlink (FetchRequest.held/plan, DownlinkPlan, GlobalChunk.plan).
PROTOCOL_VERSION = 2

#: Largest transfer (upload or global adapter) the protocol can describe.
MAX_TRANSFER_BYTES = 1 << 30
#: Largest chunk the protocol can describe; the broker's max_packet_size is the practical cap.
MAX_CHUNK_BYTES = 8 << 20
#: Most chunks in one transfer (bitmaps are at most MAX_CHUNKS / 8 = 8 KiB).
MAX_CHUNKS = 1 << 16
#: Most clients named in one round announcement.
MAX_CLIENTS = 4096
MAX_META_ENTRIES = 64
MAX_META_STR = 256
#: Default chunk size: 256 KiB, well under the 1 MiB max_packet_size of broker/mosquitto/*.conf.
DEFAULT_CHUNK_SIZE = 256 * 1024


def bitmap_len(chunk_count: int) -> int:
    """Bytes of a bitmap covering ``chunk_count`` chunks."""
    return (chunk_count + 7) // 8


def chunk_count_for(total_size: int, chunk_size: int) -> int:
    """Chunks needed for ``total_size`` bytes; an empty payload is one empty chunk."""
    return max(1, -(-total_size // chunk_size))


Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
RoundId = Annotated[int, Field(ge=0, le=2**63 - 1)]
Version = Annotated[int, Field(ge=0, le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
Sha256 = Annotated[bytes, Field(min_length=32, max_length=32)]
Crc32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
TotalSize = Annotated[int, Field(ge=0, le=MAX_TRANSFER_BYTES)]
ChunkCount = Annotated[int, Field(ge=1, le=MAX_CHUNKS)]
ChunkSize = Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)]
ChunkIndex = Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
ChunkData = Annotated[bytes, Field(max_length=MAX_CHUNK_BYTES)]
Bitmap = Annotated[bytes, Field(max_length=MAX_CHUNKS // 8)]
UnixTime = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, le=365 * 86400, allow_inf_nan=False)]
Reason = Annotated[str, StringConstraints(max_length=MAX_META_STR)]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Scalar = (
    Annotated[str, StringConstraints(max_length=MAX_META_STR)]
    | bool
    | Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what msgpack can carry
    | Annotated[float, Field(allow_inf_nan=False)]
)
#: Small free-form ``str -> scalar`` map (compressed-update metadata, round parameters, info).
Metadata = Annotated[dict[MetaKey, Scalar], Field(max_length=MAX_META_ENTRIES)]


class AckStatus(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    REJECTED = "rejected"
    LATE = "late"
    UNKNOWN = "unknown"


class ClientState(StrEnum):
    ONLINE = "online"
    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"
    DOWNLOADING = "downloading"
    ERROR = "error"
    OFFLINE = "offline"


class DownlinkRoute(StrEnum):
    """How a device gets the global adapter of a round (decision 13)."""

    NONE = "none"  # it already holds a state served for that version
    CATCHUP = "catchup"  # an fstq payload on top of what it holds
    FULL = "full"  # the whole fp16 adapter


class RoundPhase(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    kind: ClassVar[str]


def _check_chunking(total_size: int, chunk_count: int, chunk_size: int) -> None:
    if chunk_count != chunk_count_for(total_size, chunk_size):
        raise ValueError(
            f"chunk_count {chunk_count} inconsistent with total_size {total_size} "
            f"and chunk_size {chunk_size}"
        )


class RoundAnnouncement(_Wire):
    """A round opens (retained on ``round``). ``selected`` empty means every client may join."""

    kind: ClassVar[str] = "round"
    fleet: Id
    round: RoundId
    global_version: Version
    global_sha256: Sha256
    selected: Annotated[tuple[Id, ...], Field(max_length=MAX_CLIENTS)]
    deadline: UnixTime
    quorum: Annotated[int, Field(ge=1, le=MAX_CLIENTS)]
    upload_window_s: Seconds
    chunk_size: ChunkSize
    budget_bytes: Annotated[dict[Id, Count], Field(max_length=MAX_CLIENTS)]
    params: Metadata = {}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.selected)) != len(self.selected):
            raise ValueError("selected client ids must be unique")
        if self.selected and self.quorum > len(self.selected):
            raise ValueError("quorum larger than the number of selected clients")
        if self.selected and not set(self.budget_bytes) <= set(self.selected):
            raise ValueError("budget_bytes names a client that is not selected")
        return self


class UploadManifest(_Wire):
    """First message of an upload; re-sending it asks the aggregator for a fresh ack."""

    kind: ClassVar[str] = "up.manifest"
    upload_id: Id
    round: RoundId
    client: Id
    base_version: Version
    total_size: TotalSize
    chunk_count: ChunkCount
    chunk_size: ChunkSize
    sha256: Sha256
    sample_count: Count
    method: Id
    metadata: Metadata = {}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_chunking(self.total_size, self.chunk_count, self.chunk_size)
        return self


class UploadChunk(_Wire):
    kind: ClassVar[str] = "up.chunk"
    upload_id: Id
    round: RoundId
    client: Id
    index: ChunkIndex
    crc32: Crc32
    data: ChunkData


class UploadAck(_Wire):
    """Aggregator -> device. ``have`` is empty or a full bitmap of ``chunk_count`` chunks."""

    kind: ClassVar[str] = "up.ack"
    upload_id: Id
    round: RoundId
    status: AckStatus = Field(strict=False)
    chunk_count: Annotated[int, Field(ge=0, le=MAX_CHUNKS)]
    have: Bitmap
    reason: Reason = ""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.have and len(self.have) != bitmap_len(self.chunk_count):
            raise ValueError("have bitmap length does not match chunk_count")
        return self


class GlobalManifest(_Wire):
    """The current global adapter (retained on ``global/manifest``)."""

    kind: ClassVar[str] = "global.manifest"
    version: Version
    round: RoundId
    total_size: TotalSize
    chunk_count: ChunkCount
    chunk_size: ChunkSize
    sha256: Sha256
    format: Id
    metadata: Metadata = {}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_chunking(self.total_size, self.chunk_count, self.chunk_size)
        return self


class FetchRequest(_Wire):
    """Device -> aggregator: how do I get global adapter ``version``, holding state ``held``?

    Without ``plan`` the answer is a :class:`DownlinkPlan`; with it, the chunks of that plan
    named by ``wanted`` (empty = every chunk). ``held`` is the SHA-256 of the device's canonical
    adapter bytes (None: it holds nothing, or wants the full adapter).
    """

    kind: ClassVar[str] = "fetch"
    version: Version
    held: Sha256 | None = None
    plan: Sha256 | None = None
    wanted: Bitmap = b""


class DownlinkPlan(_Wire):
    """Aggregator -> device (on ``down/<client>``): the cheapest correct way to ``version``.

    ``plan`` names it (its chunks carry it); ``base`` is the held state it applies to (None for
    ``full``); ``result`` is the state id after applying it; the transfer fields describe the
    payload (empty for ``none``): the full fp16 adapter, or an fstq catch-up payload.
    """

    kind: ClassVar[str] = "down.plan"
    version: Version
    route: DownlinkRoute = Field(strict=False)
    plan: Sha256
    base: Sha256 | None
    result: Sha256
    total_size: TotalSize
    chunk_count: ChunkCount
    chunk_size: ChunkSize
    sha256: Sha256

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_chunking(self.total_size, self.chunk_count, self.chunk_size)
        if (self.route is DownlinkRoute.FULL) != (self.base is None):
            raise ValueError("a full plan has no base and every other plan has one")
        if self.route is DownlinkRoute.NONE and (self.base != self.result or self.total_size):
            raise ValueError("a none plan keeps its base and carries no payload")
        if self.route is DownlinkRoute.FULL and self.result != self.sha256:
            raise ValueError("a full plan's result is its payload")
        return self


class GlobalChunk(_Wire):
    """One chunk of the payload of plan ``plan`` (for global ``version``)."""

    kind: ClassVar[str] = "global.chunk"
    version: Version
    plan: Sha256
    index: ChunkIndex
    crc32: Crc32
    data: ChunkData


class ClientStatus(_Wire):
    """Heartbeat; the same message with ``state=offline`` is the device's will."""

    kind: ClassVar[str] = "status"
    client: Id
    state: ClientState = Field(strict=False)
    timestamp: UnixTime
    round: RoundId | None = None
    info: Metadata = {}


class RoundProgress(_Wire):
    """Where the round stands (retained on ``progress``): for observers, never for devices.

    Published by the aggregator on arrivals, rejections and deadline changes (rate-limited) and
    when the round ends. Byte counts are MQTT packet bytes charged to the round so far, as in
    ``rounds.jsonl`` (``uplink_wire_bytes``, ``downlink_wire_bytes``).
    """

    kind: ClassVar[str] = "progress"
    fleet: Id
    round: RoundId
    phase: RoundPhase = Field(strict=False)
    base_version: Version
    selected: Annotated[tuple[Id, ...], Field(max_length=MAX_CLIENTS)]
    arrived: Annotated[tuple[Id, ...], Field(max_length=MAX_CLIENTS)]
    rejected: Count
    late: Count
    opened_at: UnixTime
    deadline: UnixTime
    uplink_wire_bytes: Count
    downlink_wire_bytes: Count
    timestamp: UnixTime

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not set(self.arrived) <= set(self.selected):
            raise ValueError("arrived names a client that is not selected")
        if len(set(self.arrived)) != len(self.arrived):
            raise ValueError("arrived client ids must be unique")
        return self


WireMessage = (
    RoundAnnouncement
    | UploadManifest
    | UploadChunk
    | UploadAck
    | GlobalManifest
    | FetchRequest
    | DownlinkPlan
    | GlobalChunk
    | ClientStatus
    | RoundProgress
)
