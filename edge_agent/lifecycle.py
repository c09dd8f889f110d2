"""systemd's notify protocol (``sd_notify``); the stop signals are :mod:`common.signals`.

Nothing here reads the environment: the entry point passes ``$NOTIFY_SOCKET`` and the watchdog
interval in, so tests (and non-systemd runs) construct a :class:`Notifier` explicitly.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

__all__ = ["Notifier", "notify", "watchdog_interval"]

log = logging.getLogger(__name__)


def notify(state: str, socket_path: str | None) -> bool:
    """Send one ``sd_notify`` datagram (e.g. ``"READY=1"``) to ``socket_path``.

    A leading ``@`` names a Linux abstract-namespace socket (systemd's own convention for
    ``$NOTIFY_SOCKET``). Returns False when there is no socket or sending failed: a missing
    supervisor must never stop the agent, so errors are logged, not raised.
    """
    if not socket_path:
        return False
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", state, socket_path, exc)
        return False
    return True


def watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings from ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` values.

    Half the timeout, as sd_watchdog_enabled(3) recommends; None when the watchdog is off or
    aimed at another process (``WATCHDOG_PID`` set and not ours).
    """
    if not usec or (pid and pid != str(own_pid)):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """``sd_notify`` bound to one socket, with the watchdog ping rate-limited.

    ``socket_path=None`` makes every call a no-op (not running under systemd).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        watchdog_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = socket_path
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._last_ping = -float("inf")

    def notify(self, state: str) -> bool:
        return notify(state, self.socket_path)

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        # STATUS= is one line of free text (shown by `systemctl status`).
        return self.notify("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping the watchdog if it is enabled and the last ping is older than ``watchdog_s``."""
        if self.watchdog_s is None:
            return False
        now = self._clock()
        if now - self._last_ping < self.watchdog_s:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
