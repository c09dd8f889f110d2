"""The one stop-signal handling of both services: SIGTERM/SIGINT set an event, nothing more."""

from __future__ import annotations

import signal
import threading

import pytest

from common.signals import stop_handler, stop_signals


def test_stop_handler_sets_the_event() -> None:
    stop = threading.Event()
    stop_handler(stop)(signal.SIGTERM, None)
    assert stop.is_set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_route_to_the_event_and_restore_the_old_handlers(
    sig: signal.Signals,
) -> None:
    stop = threading.Event()
    before = signal.getsignal(sig)
    with stop_signals(stop):
        signal.raise_signal(sig)
        assert stop.is_set()
    assert signal.getsignal(sig) is before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    # A service run in a thread (tests, harnesses) is stopped through its event instead.
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def run() -> None:
        with stop_signals(threading.Event()):
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [before]
