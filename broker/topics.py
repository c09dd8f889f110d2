"""MQTT topic namespace of fedfstq: one value object and one builder per family, one parser.

Layout (``<fleet>`` and ``<client>`` are ids, ``<round>`` a decimal round number)::

    fstq/v1/<fleet>/round                   round announcement          aggregator -> all, retained
    fstq/v1/<fleet>/up/<client>/<round>     upload manifest + chunks    device -> aggregator
    fstq/v1/<fleet>/ack/<client>            upload acknowledgements     aggregator -> device
    fstq/v1/<fleet>/global/manifest         global adapter manifest     aggregator -> all, retained
    fstq/v1/<fleet>/fetch/<client>          global chunk fetch request  device -> aggregator
    fstq/v1/<fleet>/down/<client>           global adapter chunks       aggregator -> device
    fstq/v1/<fleet>/status/<client>         status, progress, will      device -> all, retained
    fstq/v1/<fleet>/progress                round progress              aggregator -> all, retained

The client id is always the segment right after the family name, so one Mosquitto ACL
``pattern`` line per family can pin it to the authenticated user (``%u``) or client id (``%c``),
e.g. ``pattern write fstq/v1/+/up/%u/+``.

Ids match ``[A-Za-z0-9_.-]{1,64}``: no ``/``, no wildcards, no ``$``, nothing Mosquitto refuses to
substitute into an ACL pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar

from broker.errors import TopicError

__all__ = [
    "ID_PATTERN",
    "MAX_ROUND",
    "PREFIX",
    "AckTopic",
    "DownTopic",
    "FetchTopic",
    "GlobalManifestTopic",
    "ProgressTopic",
    "RoundTopic",
    "StatusTopic",
    "Topic",
    "UploadTopic",
    "ack_topic",
    "aggregator_filters",
    "device_filters",
    "down_topic",
    "fetch_filter",
    "fetch_topic",
    "global_manifest_topic",
    "observer_filters",
    "parse_topic",
    "progress_topic",
    "round_topic",
    "status_filter",
    "status_topic",
    "topic_as",
    "topic_matches",
    "upload_filter",
    "upload_topic",
    "validate_id",
]

PREFIX = "fstq/v1"
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ROUND_PATTERN = re.compile(r"0|[1-9][0-9]{0,18}")
MAX_ROUND = 2**63 - 1


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet/client/upload id, else raise :class:`TopicError`."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise TopicError(f"invalid {what} {value!r}: must match {ID_PATTERN.pattern}")
    return value


def _validate_round(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise TopicError(f"invalid round {value!r}: must be an int in [0, 2**63)")
    return value


def _parse_round(segment: str) -> int:
    if _ROUND_PATTERN.fullmatch(segment) is None:
        raise TopicError(f"invalid round segment {segment!r}")
    return _validate_round(int(segment))


def _segments(topic: str, family: str, n_after: int) -> list[str]:
    """Split ``topic``, check prefix and family; return the fleet and the ``n_after`` after it."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 4 + n_after or f"{parts[0]}/{parts[1]}" != PREFIX or parts[3] != family:
        raise TopicError(f"not a {PREFIX}/<fleet>/{family} topic: {topic!r}")
    return [parts[2], *parts[4:]]


@dataclass(frozen=True, slots=True)
class _FleetTopic:
    """``fstq/v1/<fleet>/<family>`` and, in subclasses, the segments after the family."""

    family: ClassVar[str] = ""
    fleet: str

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")

    def __str__(self) -> str:
        return "/".join((PREFIX, self.fleet, self.family, *self._after()))

    def _after(self) -> tuple[str, ...]:
        return ()

    @classmethod
    def _parse(cls, topic: str) -> Self:
        (fleet,) = _segments(topic, cls.family, 0)
        return cls(fleet)


@dataclass(frozen=True, slots=True)
class RoundTopic(_FleetTopic):
    """``fstq/v1/<fleet>/round`` (retained RoundAnnouncement)."""

    family: ClassVar[str] = "round"


@dataclass(frozen=True, slots=True)
class ProgressTopic(_FleetTopic):
    """``fstq/v1/<fleet>/progress`` (retained RoundProgress, for observers)."""

    family: ClassVar[str] = "progress"


@dataclass(frozen=True, slots=True)
class GlobalManifestTopic(_FleetTopic):
    """``fstq/v1/<fleet>/global/manifest`` (retained GlobalManifest)."""

    family: ClassVar[str] = "global"

    def _after(self) -> tuple[str, ...]:
        return ("manifest",)

    @classmethod
    def _parse(cls, topic: str) -> Self:
        fleet, leaf = _segments(topic, cls.family, 1)
        if leaf != "manifest":
            raise TopicError(f"not a global manifest topic: {topic!r}")
        return cls(fleet)


@dataclass(frozen=True, slots=True)
class _ClientTopic(_FleetTopic):
    """``fstq/v1/<fleet>/<family>/<client>``: the client id right after the family (ACLs)."""

    client: str

    # The base methods are called by name, not through super(): slots=True makes a new class.
    def __post_init__(self) -> None:
        _FleetTopic.__post_init__(self)
        validate_id(self.client, "client")

    def _after(self) -> tuple[str, ...]:
        return (self.client,)

    @classmethod
    def _parse(cls, topic: str) -> Self:
        fleet, client = _segments(topic, cls.family, 1)
        return cls(fleet, client)


@dataclass(frozen=True, slots=True)
class UploadTopic(_ClientTopic):
    """``fstq/v1/<fleet>/up/<client>/<round>`` (UploadManifest and UploadChunk)."""

    family: ClassVar[str] = "up"
    round: int

    def __post_init__(self) -> None:
        _ClientTopic.__post_init__(self)
        _validate_round(self.round)

    def _after(self) -> tuple[str, ...]:
        return (self.client, str(self.round))

    @classmethod
    def _parse(cls, topic: str) -> Self:
        fleet, client, round_seg = _segments(topic, cls.family, 2)
        return cls(fleet, client, _parse_round(round_seg))


@dataclass(frozen=True, slots=True)
class AckTopic(_ClientTopic):
    """``fstq/v1/<fleet>/ack/<client>`` (UploadAck to one device)."""

    family: ClassVar[str] = "ack"


@dataclass(frozen=True, slots=True)
class FetchTopic(_ClientTopic):
    """``fstq/v1/<fleet>/fetch/<client>`` (FetchRequest from one device)."""

    family: ClassVar[str] = "fetch"


@dataclass(frozen=True, slots=True)
class DownTopic(_ClientTopic):
    """``fstq/v1/<fleet>/down/<client>`` (GlobalChunk to one device)."""

    family: ClassVar[str] = "down"


@dataclass(frozen=True, slots=True)
class StatusTopic(_ClientTopic):
    """``fstq/v1/<fleet>/status/<client>`` (ClientStatus heartbeat and will)."""

    family: ClassVar[str] = "status"


Topic = (
    RoundTopic
    | GlobalManifestTopic
    | UploadTopic
    | AckTopic
    | FetchTopic
    | DownTopic
    | StatusTopic
    | ProgressTopic
)
_T = TypeVar("_T", bound=Topic)

_PARSERS: dict[str, Callable[[str], Topic]] = {
    RoundTopic.family: RoundTopic._parse,
    GlobalManifestTopic.family: GlobalManifestTopic._parse,
    UploadTopic.family: UploadTopic._parse,
    AckTopic.family: AckTopic._parse,
    FetchTopic.family: FetchTopic._parse,
    DownTopic.family: DownTopic._parse,
    StatusTopic.family: StatusTopic._parse,
    ProgressTopic.family: ProgressTopic._parse,
}


# -- builders (one per family) ---------------------------------------------------------------


def round_topic(fleet: str) -> str:
    return str(RoundTopic(fleet))


def upload_topic(fleet: str, client: str, round_id: int) -> str:
    return str(UploadTopic(fleet, client, round_id))


def ack_topic(fleet: str, client: str) -> str:
    return str(AckTopic(fleet, client))


def global_manifest_topic(fleet: str) -> str:
    return str(GlobalManifestTopic(fleet))


def fetch_topic(fleet: str, client: str) -> str:
    return str(FetchTopic(fleet, client))


def down_topic(fleet: str, client: str) -> str:
    return str(DownTopic(fleet, client))


def status_topic(fleet: str, client: str) -> str:
    return str(StatusTopic(fleet, client))


def progress_topic(fleet: str) -> str:
    return str(ProgressTopic(fleet))


# -- parsing ---------------------------------------------------------------------------------


def parse_topic(topic: str) -> Topic:
    """Parse any fedfstq topic into its value object; :class:`TopicError` otherwise."""
    parts = topic.split("/") if isinstance(topic, str) else []
    parser = _PARSERS.get(parts[3]) if len(parts) >= 4 else None
    if parser is None:
        raise TopicError(f"not a {PREFIX} topic: {topic!r}")
    return parser(topic)


def topic_as(topic: str, kind: type[_T]) -> _T | None:
    """``topic`` parsed if it is a valid topic of family ``kind`` (e.g. ``UploadTopic``), else None.

    For code that only asks "is this an upload?"; code that rejects bad topics wants
    :func:`parse_topic` and its :class:`TopicError` (reason and detail).
    """
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return None
    return parsed if isinstance(parsed, kind) else None


# -- subscription filters ----------------------------------------------------------------------


def upload_filter(fleet: str) -> str:
    """Every device's uploads of every round: ``fstq/v1/<fleet>/up/+/+``."""
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/up/+/+"


def fetch_filter(fleet: str) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/fetch/+"


def status_filter(fleet: str) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/status/+"


def aggregator_filters(fleet: str) -> tuple[str, str, str]:
    """What the aggregator subscribes to: uploads, fetch requests, device status."""
    return (upload_filter(fleet), fetch_filter(fleet), status_filter(fleet))


def device_filters(fleet: str, client: str) -> tuple[str, str, str, str]:
    """What a device subscribes to: round, global manifest, its acks, its downlink chunks."""
    return (
        round_topic(fleet),
        global_manifest_topic(fleet),
        ack_topic(fleet, client),
        down_topic(fleet, client),
    )


def observer_filters(fleet: str) -> tuple[str, str, str, str]:
    """What an observer (``fedfstq status``, the demo) reads: all retained state of a fleet.

    The round announcement, the global manifest, the round progress and every device's status.
    """
    return (
        round_topic(fleet),
        global_manifest_topic(fleet),
        progress_topic(fleet),
        status_filter(fleet),
    )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest; ``$`` topics only literal)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f_parts[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_parts):
        if f == "#":
            return i == len(f_parts) - 1
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
