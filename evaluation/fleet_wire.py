"""What the fleet runner puts between a logical device and its real MQTT client.

* :class:`FleetClock` — one clock for the aggregator and every device: wall time plus an offset
  the runner moves forward when nothing but a deadline is left to wait for (a round whose
  non-dropped clients have all finished waits for its dropouts only until the deadline; the
  runner skips that idle wait instead of sleeping through it). Services never see time go back.
* :func:`dropout_fate` — whether a device drops out of a round, and how: ``silent`` (it never
  answers the announcement) or ``halfway`` (its link dies after half of the upload's chunks).
  A pure function of (seed, round, device), so every device decides on its own, in its thread,
  at the moment the announcement arrives, and a rerun drops the same devices.
* :class:`FleetWire` — the device's transport: applies the fate (holding a round's announcement
  while its fate is not known yet: with availability windows it depends on the simulated time
  the round starts at, known once the previous round is accounted) and counts what the device
  publishes on its upload topic per round (MQTT packet bytes, re-sends included) and what it
  receives on its downlink topic to start the round (plans and chunks), which is what the
  round-time model charges to the device's uplink and downlink.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np

from broker.codec import decode, peek_kind
from broker.errors import WireError
from broker.messages import RoundAnnouncement, UploadManifest
from broker.topics import DownTopic, RoundTopic, UploadTopic, topic_as
from broker.transport import Completion, DelegatingTransport, Message, PublishHandle, Transport

__all__ = ["Fate", "FleetClock", "FleetWire", "dropout_fate"]

#: "offline": outside the device's availability windows (a link trace) when the round started.
Fate = Literal["ok", "silent", "halfway", "offline"]


class FleetClock:
    """Unix time plus a forward-only offset (thread-safe)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._wall() + self._offset

    @property
    def skipped_s(self) -> float:
        """Seconds of idle waiting skipped so far."""
        return self._offset

    def advance_to(self, t: float) -> float:
        """Move the clock forward to at least ``t``; returns the seconds skipped (>= 0)."""
        with self._lock:
            gap = t - (self._wall() + self._offset)
            if gap <= 0:
                return 0.0
            self._offset += gap
            return gap


def dropout_fate(seed: int, round_id: int, device_index: int, rate: float) -> Fate:
    """Each device drops out of a round with probability ``rate``, half of them halfway."""
    if rate <= 0:
        return "ok"
    u, how = np.random.default_rng([seed, round_id, device_index, 0xD7]).random(2)
    if u >= rate:
        return "ok"
    return "silent" if how < 0.5 else "halfway"


class FleetWire(DelegatingTransport):
    """A device's MQTT client as the fleet runner sees it (see the module docstring)."""

    def __init__(self, inner: Transport, fate: Callable[[int], Fate | None]) -> None:
        """``fate(round)``: None while it cannot be known yet (the announcement is held)."""
        super().__init__(inner)
        self._fate = fate
        self._held: list[tuple[int, Message]] = []
        self._lock = threading.Lock()
        self._upload_bytes: defaultdict[int, int] = defaultdict(int)
        self._chunks_sent: defaultdict[int, int] = defaultdict(int)
        self._chunk_count: dict[int, int] = {}
        self._downlink_bytes: defaultdict[int, int] = defaultdict(int)
        self._round: int | None = None  # the round whose announcement the device got last
        #: Rounds this device dropped out of, and how.
        self.dropped: dict[int, Fate] = {}

    def upload_bytes(self, round_id: int) -> int:
        """MQTT PUBLISH bytes this device sent on its upload topic for ``round_id``."""
        with self._lock:
            return self._upload_bytes.get(round_id, 0)

    def downlink_bytes(self, round_id: int) -> int:
        """MQTT PUBLISH bytes this device received on its downlink topic while on ``round_id``
        (a device fetches only to start an announced round)."""
        with self._lock:
            return self._downlink_bytes.get(round_id, 0)

    def receive(self, timeout: float | None = None) -> Message | None:
        released = self._release()
        if released is not None:
            return released
        if self._held:  # poll briefly: a held announcement may be decided any moment
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        msg = self.inner.receive(timeout)
        if msg is not None and self._round is not None and topic_as(msg.topic, DownTopic):
            with self._lock:
                self._downlink_bytes[self._round] += msg.wire_size
        if msg is None or not msg.payload or topic_as(msg.topic, RoundTopic) is None:
            return msg
        try:
            ann = decode(msg.payload, expect=RoundAnnouncement)
        except WireError:
            return msg  # the agent logs and drops it
        self._held.append((ann.round, msg))
        return self._release()

    def _release(self) -> Message | None:
        """The first held announcement whose fate lets it through; drops the refused ones."""
        for item in list(self._held):
            round_id, msg = item
            fate = self._fate(round_id)
            if fate is None:
                continue
            self._held.remove(item)
            if fate in ("silent", "offline"):
                with self._lock:
                    self.dropped[round_id] = fate
                continue  # as if the device were off the air for this round
            self._round = round_id
            return msg
        return None

    def send(self, message: Message) -> PublishHandle:
        upload = topic_as(message.topic, UploadTopic)
        if upload is None:
            return self.inner.send(message)
        if self._link_dead(upload.round, message.payload):
            # The link died mid-upload: nothing more of this round's upload leaves the device.
            return PublishHandle(0, message.topic, len(message.payload), Completion())
        with self._lock:
            self._upload_bytes[upload.round] += message.wire_size
        return self.inner.send(message)

    def _link_dead(self, round_id: int, payload: bytes) -> bool:
        if self._fate(round_id) != "halfway":
            return False
        try:
            kind = peek_kind(payload)
            if kind == "up.manifest":
                count = decode(payload, expect=UploadManifest).chunk_count
                with self._lock:
                    self._chunk_count.setdefault(round_id, count)
        except WireError:
            return False
        with self._lock:
            limit = self._chunk_count.get(round_id, 0) // 2
            if self._chunks_sent[round_id] >= limit:
                self.dropped[round_id] = "halfway"
                return True
            if kind == "up.chunk":
                self._chunks_sent[round_id] += 1
        return False
