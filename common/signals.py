"""Stop signals of a service process: SIGTERM (systemd, ``docker stop``) and SIGINT (Ctrl-C) set
a :class:`threading.Event`; the service's main loop sees it and shuts down in its own time.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "stop_handler", "stop_signals"]

log = logging.getLogger(__name__)

#: The signals that stop a service.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_handler(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    """The signal handler: it only sets ``stop``; the main loop does the actual shutdown."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    return handle


@contextlib.contextmanager
def stop_signals(stop: threading.Event) -> Iterator[None]:
    """Route SIGTERM/SIGINT to ``stop`` for the duration of the block.

    Only the main thread may install signal handlers; elsewhere (a service run in a thread by a
    test or a harness) the block installs nothing and the caller stops it through ``stop``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = stop_handler(stop)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
