"""The fleet as an observer sees it on the broker: a pure fold over MQTT messages.

:class:`FleetView` takes the messages an observer receives (the retained round announcement,
global manifest and round progress, and every device's retained status) one at a time,
``apply(topic, payload, now)``, and says what changed. No I/O and no clock of its own: the demo's
live view, its plain log lines and ``fedfstq status`` (table or JSON) all render the same
:class:`FleetSnapshot`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from broker.codec import decode
from broker.errors import TopicError, WireError
from broker.messages import (
    ClientState,
    ClientStatus,
    GlobalManifest,
    RoundAnnouncement,
    RoundPhase,
    RoundProgress,
)
from broker.progress import CAUSE_KEY, DeviceProgress, OfflineCause
from broker.topics import GlobalManifestTopic, ProgressTopic, RoundTopic, StatusTopic, parse_topic

__all__ = [
    "DeviceChanged",
    "DeviceView",
    "FleetSnapshot",
    "FleetView",
    "GlobalChanged",
    "GlobalView",
    "Ignored",
    "RoundChanged",
    "RoundView",
    "Update",
]

#: A device not heard from for this long (and not offline) shows as ``silent``; the
#: aggregator's default ``rounds.heartbeat_ttl_s`` (it stops selecting such a device).
SILENT_AFTER_S = 90.0


@dataclass(frozen=True, slots=True)
class DeviceView:
    """A device's last status."""

    client: str
    state: ClientState
    round: int | None
    progress: DeviceProgress | None
    global_version: int | None
    #: Unix time it was last heard from (None: unknown, e.g. only its will was seen).
    last_seen: float | None
    #: Why it is offline (``stopped``, ``link_lost``), else None.
    cause: str | None = None

    def connection(self, now: float, silent_after_s: float = SILENT_AFTER_S) -> str:
        """``online``, ``silent`` (nothing heard for ``silent_after_s``) or ``offline``."""
        if self.state is ClientState.OFFLINE:
            return "offline"
        if self.last_seen is None or now - self.last_seen > silent_after_s:
            return "silent"
        return "online"


@dataclass(frozen=True, slots=True)
class GlobalView:
    version: int
    round: int
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class RoundView:
    """The latest round: from its announcement, then from the aggregator's progress."""

    round: int
    phase: RoundPhase
    base_version: int
    selected: tuple[str, ...]
    arrived: tuple[str, ...]
    deadline: float
    quorum: int | None = None
    rejected: int = 0
    late: int = 0
    opened_at: float | None = None
    #: Bytes charged to the round so far (None until the aggregator's first progress message).
    uplink_wire_bytes: int | None = None
    downlink_wire_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceChanged:
    before: DeviceView | None
    after: DeviceView | None  # None: its retained status was cleared


@dataclass(frozen=True, slots=True)
class RoundChanged:
    before: RoundView | None
    after: RoundView


@dataclass(frozen=True, slots=True)
class GlobalChanged:
    before: GlobalView | None
    after: GlobalView


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message that was not understood (bad topic or payload); counted, never raised."""

    topic: str
    reason: str


Update = DeviceChanged | RoundChanged | GlobalChanged | Ignored


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything known at ``at`` (unix s), ready to render."""

    fleet: str
    at: float
    global_adapter: GlobalView | None
    round: RoundView | None
    devices: tuple[DeviceView, ...]
    ignored: int = 0
    silent_after_s: float = SILENT_AFTER_S

    def seconds_left(self) -> float | None:
        """Until the open round's deadline (negative once it passed); None without one."""
        if self.round is None or self.round.phase is not RoundPhase.OPEN:
            return None
        return self.round.deadline - self.at

    def to_json(self) -> dict[str, Any]:
        """One JSON document (``fedfstq status --json``)."""
        rnd = None
        if self.round is not None:
            rnd = asdict(self.round) | {
                "phase": self.round.phase.value,
                "selected": list(self.round.selected),
                "arrived": list(self.round.arrived),
                "seconds_left": self.seconds_left(),
            }
        devices = []
        for d in self.devices:
            p = d.progress
            devices.append(
                {
                    "client": d.client,
                    "connection": d.connection(self.at, self.silent_after_s),
                    "state": d.state.value,
                    "round": d.round,
                    "progress": None if p is None else p.to_info(),
                    "global_version": d.global_version,
                    "last_seen": d.last_seen,
                    "cause": d.cause,
                }
            )
        glob = None if self.global_adapter is None else asdict(self.global_adapter)
        return {
            "fleet": self.fleet,
            "at": self.at,
            "global": glob,
            "round": rnd,
            "devices": devices,
            "ignored_messages": self.ignored,
        }


@dataclass
class FleetView:
    """The fold: ``apply`` each received message, read :meth:`snapshot`."""

    fleet: str
    silent_after_s: float = SILENT_AFTER_S
    _announcement: RoundAnnouncement | None = field(default=None, init=False)
    _progress: RoundProgress | None = field(default=None, init=False)
    _global: GlobalView | None = field(default=None, init=False)
    _devices: dict[str, DeviceView] = field(default_factory=dict, init=False)
    _ignored: int = field(default=0, init=False)

    def apply(
        self, topic: str, payload: bytes, now: float, *, retained: bool = False
    ) -> list[Update]:
        """Fold one message in; returns what changed (empty if nothing did).

        ``retained``: delivered from the broker's store when subscribing, so it was published
        earlier; a live status means the device was heard from at ``now``, a retained one at its
        own timestamp.
        """
        try:
            parsed = parse_topic(topic)
            if parsed.fleet != self.fleet:
                raise TopicError(f"topic of fleet {parsed.fleet!r}, watching {self.fleet!r}")
            if isinstance(parsed, StatusTopic):
                return self._on_status(parsed.client, payload, now, retained)
            if not payload:  # a retained message deleted: nothing to show for it any more
                return []
            if isinstance(parsed, RoundTopic):
                return self._on_round(decode(payload, expect=RoundAnnouncement), None)
            if isinstance(parsed, ProgressTopic):
                return self._on_round(None, decode(payload, expect=RoundProgress))
            if isinstance(parsed, GlobalManifestTopic):
                return self._on_global(decode(payload, expect=GlobalManifest))
            raise TopicError(f"not an observer topic: {topic!r}")
        except (TopicError, WireError) as exc:
            self._ignored += 1
            return [Ignored(topic, exc.reason)]

    def snapshot(self, now: float) -> FleetSnapshot:
        return FleetSnapshot(
            fleet=self.fleet,
            at=now,
            global_adapter=self._global,
            round=self.round(),
            devices=tuple(self._devices[c] for c in sorted(self._devices)),
            ignored=self._ignored,
            silent_after_s=self.silent_after_s,
        )

    def round(self) -> RoundView | None:
        """The latest round known, merged from its announcement and its progress."""
        ann, prog = self._announcement, self._progress
        if prog is not None and (ann is None or prog.round >= ann.round):
            quorum = ann.quorum if ann is not None and ann.round == prog.round else None
            return RoundView(
                round=prog.round, phase=prog.phase, base_version=prog.base_version,
                selected=prog.selected, arrived=prog.arrived, deadline=prog.deadline,
                quorum=quorum, rejected=prog.rejected, late=prog.late, opened_at=prog.opened_at,
                uplink_wire_bytes=prog.uplink_wire_bytes,
                downlink_wire_bytes=prog.downlink_wire_bytes,
            )  # fmt: skip
        if ann is None:
            return None
        return RoundView(
            round=ann.round, phase=RoundPhase.OPEN, base_version=ann.global_version,
            selected=ann.selected, arrived=(), deadline=ann.deadline, quorum=ann.quorum,
        )  # fmt: skip

    # -- per topic ---------------------------------------------------------------------------

    def _on_status(self, client: str, payload: bytes, now: float, retained: bool) -> list[Update]:
        before = self._devices.get(client)
        if not payload:
            if before is None:
                return []
            del self._devices[client]
            return [DeviceChanged(before, None)]
        status = decode(payload, expect=ClientStatus)
        if status.client != client:
            raise TopicError(f"status of {status.client!r} on the topic of {client!r}")
        cause = status.info.get(CAUSE_KEY) if status.state is ClientState.OFFLINE else None
        if cause == OfflineCause.LINK_LOST.value:
            # The will was written when the device connected: its timestamp is no sign of life.
            seen = before.last_seen if before is not None else None
        else:
            seen = min(status.timestamp, now) if retained else now
        version = status.info.get("global_version")
        after = DeviceView(
            client=client,
            state=status.state,
            round=status.round,
            progress=DeviceProgress.from_info(status.info),
            global_version=version if isinstance(version, int) and version >= 0 else None,
            last_seen=seen,
            cause=str(cause) if cause is not None else None,
        )
        if before is not None and before.last_seen is not None and after.last_seen is not None:
            after = replace(after, last_seen=max(before.last_seen, after.last_seen))
        self._devices[client] = after
        if before is not None and replace(before, last_seen=after.last_seen) == after:
            return []  # a heartbeat: only the time it was heard from moved
        return [DeviceChanged(before, after)]

    def _on_round(self, ann: RoundAnnouncement | None, prog: RoundProgress | None) -> list[Update]:
        before = self.round()
        if ann is not None:
            if ann.fleet != self.fleet:
                raise TopicError(f"announcement of fleet {ann.fleet!r}")
            self._announcement = ann
        if prog is not None:
            if prog.fleet != self.fleet:
                raise TopicError(f"progress of fleet {prog.fleet!r}")
            self._progress = prog
        after = self.round()
        if after is None or after == before:
            return []
        return [RoundChanged(before, after)]

    def _on_global(self, m: GlobalManifest) -> list[Update]:
        before = self._global
        after = GlobalView(m.version, m.round, m.sha256.hex(), m.total_size)
        self._global = after
        return [] if after == before else [GlobalChanged(before, after)]
