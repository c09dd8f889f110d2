"""What a device tells observers (``fedfstq status``, the demo, the aggregator): its phase, its
progress within the phase, and that it is alive.

Every status is published **retained** on ``status/<me>``, with no expiry: an observer that
connects later (and the aggregator after a restart) gets the last one, whatever its age (its
timestamp says), and a retained copy must outlast a long training step. The aggregator takes
statuses at QoS 0, so none queue up for it while it is away. A new phase or stage goes out at
once, progress within a stage at most every ``progress_s``, and a heartbeat every
``heartbeat_s``. The ``offline`` will is retained too. Each phase also goes to systemd's
``STATUS=`` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from broker.codec import encode
from broker.messages import ClientState, ClientStatus, Scalar
from broker.progress import CAUSE_KEY, DeviceProgress, OfflineCause
from broker.topics import status_topic
from broker.transport import Transport, Will
from edge_agent.lifecycle import Notifier

__all__ = ["StatusReporter"]


class StatusReporter:
    """The device's phase and progress, published as its retained status."""

    def __init__(
        self,
        *,
        fleet: str,
        client_id: str,
        heartbeat_s: float,
        progress_s: float,
        clock: Callable[[], float],
        notifier: Notifier,
        global_version: Callable[[], int | None],
    ) -> None:
        self._me = client_id
        self._topic = status_topic(fleet, client_id)
        self._heartbeat_s = heartbeat_s
        self._progress_s = progress_s
        self._clock = clock
        self._notifier = notifier
        self._global_version = global_version
        #: Set once connected (and cleared on close): statuses before that are not published.
        self.client: Transport | None = None
        self.phase = ClientState.IDLE
        self.round_id: int | None = None
        self._progress: DeviceProgress | None = None  # within the phase
        self._progress_due = False  # a change the rate limit held back
        self._last_status = -math.inf
        self.next_heartbeat = 0.0

    def message(
        self, state: ClientState, round_id: int | None, cause: OfflineCause | None = None
    ) -> ClientStatus:
        """The status as it goes on the wire."""
        info: dict[str, Scalar] = {}
        version = self._global_version()
        if version is not None:
            info["global_version"] = version
        if cause is not None:
            info[CAUSE_KEY] = cause.value
        elif self._progress is not None:
            info.update(self._progress.to_info())
        return ClientStatus(
            client=self._me, state=state, timestamp=self._clock(), round=round_id, info=info
        )

    def will(self, delay_s: int) -> Will:
        """``offline`` (cause ``link_lost``), published by the broker if the link dies."""
        status = self.message(ClientState.OFFLINE, None, OfflineCause.LINK_LOST)
        return Will(self._topic, encode(status), retain=True, delay_s=delay_s)

    def set_phase(
        self, state: ClientState, round_id: int | None, progress: DeviceProgress | None = None
    ) -> None:
        """Enter a phase (of a round): published at once if it changed."""
        changed = (state, round_id) != (self.phase, self.round_id)
        self.phase, self.round_id = state, round_id
        if changed:
            self._progress = progress
            where = f"round {round_id}" if round_id is not None else "no round"
            self._notifier.status(f"{where}: {state.value}")
            self.publish(self._clock())

    def report(self, progress: DeviceProgress | None, now: float) -> None:
        """Progress within the phase: a new stage goes out at once, the rest rate-limited."""
        old = self._progress
        if progress is None or progress == old:
            return
        self._progress = progress
        interval = self._progress_s
        if old is None or progress.stage != old.stage or now - self._last_status >= interval > 0:
            self.publish(now)
        else:
            self._progress_due = interval > 0

    def on_training(self, progress: DeviceProgress) -> None:
        """Called between training steps, which block the loop: progress and any heartbeat due."""
        now = self._clock()
        self.report(progress, now)
        self.heartbeat(now)

    def heartbeat(self, now: float) -> None:
        """The status again if ``heartbeat_s`` passed since the last one."""
        if now >= self.next_heartbeat:
            self.publish(now)

    def flush(self, now: float) -> None:
        """Progress the rate limit held back, once ``progress_s`` has passed."""
        if self._progress_due and now - self._last_status >= self._progress_s:
            self.publish(now)

    def publish(self, now: float) -> None:
        """Phase, progress and heartbeat in one retained status."""
        client = self.client
        if client is None:
            return
        client.publish(
            self._topic, encode(self.message(self.phase, self.round_id)), qos=1, retain=True
        )
        self._last_status, self._progress_due = now, False
        self.next_heartbeat = now + self._heartbeat_s

    def publish_stopped(self, client: Transport) -> None:
        """``offline`` (cause ``stopped``) on a clean stop, waited for; raises TransportError."""
        status = self.message(ClientState.OFFLINE, None, OfflineCause.STOPPED)
        client.publish_wait(self._topic, encode(status), retain=True, timeout=5.0)
