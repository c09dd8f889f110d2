"""sd_notify over a real AF_UNIX datagram socket and the watchdog rate (the stop signals:
tests/common/test_common_signals.py)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.lifecycle import Notifier, notify, watchdog_interval


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket at a short filesystem path (sun_path holds only 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="sd-"))
    path = str(folder / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_notify_sends_one_datagram_per_state(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.ready() and notifier.status("round 3:\ntraining") and notifier.stopping()
    got = [sock.recv(256).decode() for _ in range(3)]
    assert got == ["READY=1", "STATUS=round 3: training", "STOPPING=1"]


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"@fedfstq-lifecycle-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.settimeout(2)
        assert notify("READY=1", name)
        assert sock.recv(64) == b"READY=1"


def test_notify_without_a_socket_is_a_no_op(tmp_path: Path) -> None:
    assert notify("READY=1", None) is False
    assert Notifier(None).watchdog() is False
    assert notify("READY=1", str(tmp_path / "nobody-listens")) is False  # logged, not raised


def test_watchdog_pings_at_most_once_per_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    now = [100.0]
    notifier = Notifier(path, watchdog_s=5.0, clock=lambda: now[0])
    assert notifier.watchdog()
    now[0] += 4.9
    assert not notifier.watchdog()
    now[0] += 0.1
    assert notifier.watchdog()
    assert [sock.recv(64), sock.recv(64)] == [b"WATCHDOG=1", b"WATCHDOG=1"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "4242", 15.0),
        ("30000000", "1", None),  # meant for another process
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    assert watchdog_interval(usec, pid, own_pid=4242) == expected
