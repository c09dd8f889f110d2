"""The retained round-progress message for observers (``fedfstq status``, the demo); no MQTT.

What goes out is a :class:`~broker.messages.RoundProgress` built from the open round (or, when
the round ends, from its ``rounds.jsonl`` record). :class:`ProgressReporter` decides when: at
once when a round opens, is extended, gets an upload or ends; otherwise when something changed
(a rejection, bytes on the wire) and at most every ``interval_s``, so a burst of chunks (or of
hostile messages) costs one message, not one each.
"""

from __future__ import annotations

from aggregator.round_controller import Event, OpenRound
from aggregator.round_result import RoundResult
from broker.messages import RoundPhase, RoundProgress

__all__ = ["ProgressReporter", "ended_progress", "open_progress"]


def open_progress(fleet: str, rnd: OpenRound, now: float) -> RoundProgress:
    """The open round as it stands at ``now``."""
    m, st = rnd.metrics, rnd.state
    return RoundProgress(
        fleet=fleet,
        round=rnd.round_id,
        phase=RoundPhase.OPEN,
        base_version=rnd.base_version,
        selected=tuple(sorted(st.selected)),
        arrived=tuple(sorted(st.arrived)),
        rejected=sum(m.rejected.values()),
        late=m.late,
        opened_at=st.opened_at,
        deadline=st.deadline,
        uplink_wire_bytes=m.uplink_wire_bytes,
        downlink_wire_bytes=m.downlink_wire_bytes,
        timestamp=now,
    )


def ended_progress(fleet: str, record: RoundResult, deadline: float, now: float) -> RoundProgress:
    """A round that just ended, from its ``rounds.jsonl`` record."""
    return RoundProgress(
        fleet=fleet,
        round=record.round,
        phase=RoundPhase(record.status),
        base_version=record.base_version,
        selected=tuple(sorted(record.selected)),
        arrived=record.arrived,
        rejected=sum(record.rejected.values()),
        late=record.late,
        opened_at=record.opened_at,
        deadline=deadline,
        uplink_wire_bytes=record.uplink_wire_bytes,
        downlink_wire_bytes=record.downlink_wire_bytes,
        timestamp=now,
    )


class ProgressReporter:
    """When the round progress is worth publishing (see the module doc)."""

    def __init__(self, fleet: str, interval_s: float) -> None:
        self._fleet = fleet
        self._interval_s = interval_s
        self._last_key: tuple[object, ...] | None = None
        self._last_sent = float("-inf")
        self._deadline = 0.0  # of the open round, for the record of its end

    def poll(
        self,
        rnd: OpenRound | None,
        event: Event | None,
        last_record: RoundResult | None,
        now: float,
    ) -> RoundProgress | None:
        """The message to publish now, if any (``event``: what this tick of the round changed)."""
        if event in (Event.CLOSED, Event.FAILED) and last_record is not None:
            return self._sent(ended_progress(self._fleet, last_record, self._deadline, now), now)
        if rnd is None:
            return None
        m, st = rnd.metrics, rnd.state
        key = (
            rnd.round_id, st.arrived, st.deadline, sum(m.rejected.values()), m.late,
            m.uplink_wire_bytes, m.downlink_wire_bytes,
        )  # fmt: skip
        self._deadline = st.deadline
        forced = (
            event in (Event.OPENED, Event.EXTENDED)
            or self._last_key is None
            or self._last_key[:3] != key[:3]  # another round, an arrival, a new deadline
        )
        if key == self._last_key or (not forced and now - self._last_sent < self._interval_s):
            return None
        self._last_key = key
        return self._sent(open_progress(self._fleet, rnd, now), now)

    def _sent(self, progress: RoundProgress, now: float) -> RoundProgress:
        self._last_sent = now
        if progress.phase is not RoundPhase.OPEN:
            self._last_key = None
        return progress
