"""The fault-injection relay itself, against a plain TCP echo server on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from relay import Relay


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback echo server; yields its port and, per connection, 'eof' once the peer closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    events: list[bytes] = []
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    conn.sendall(data)
                except OSError:
                    break
        events.append(b"eof")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], events
    finally:
        stop.set()
        acceptor.join(5)
        for t in threads:
            t.join(5)
        listener.close()


def roundtrip(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` and read the echo back (a writer thread, so big payloads cannot deadlock)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        writer = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        writer.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        writer.join(timeout)
        return bytes(got)


@pytest.mark.timeout(60)
def test_bytes_pass_through_intact() -> None:
    data = random.Random(1).randbytes(2 * 1024 * 1024)
    with echo_server() as (port, _), Relay("127.0.0.1", port, seed=1) as relay:
        assert relay.port != port and relay.port > 0
        got = roundtrip(relay.port, data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert relay.stats.bytes_up == len(data) and relay.stats.bytes_down == len(data)
        assert relay.stats.connections == 1 and relay.stats.random_cuts == 0


@pytest.mark.timeout(60)
def test_cut_on_cue_closes_both_sides() -> None:
    with echo_server() as (port, events), Relay("127.0.0.1", port) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"hello")
            assert s.recv(16) == b"hello"
            assert relay.cut_all() == 1
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(16) == b""  # the client sees the connection end
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert events == [b"eof"]  # ... and so does the server
        assert relay.open_connections == 0 and relay.stats.cued_cuts == 1


@pytest.mark.timeout(60)
def test_random_cuts_follow_the_seed_and_stop_at_the_planned_byte() -> None:
    def plans(seed: int) -> list[int | None]:
        with (
            echo_server() as (port, _),
            Relay(
                "127.0.0.1", port, seed=seed, cut_probability=0.5, cut_after_bytes=(100, 1000)
            ) as relay,
        ):
            for _ in range(8):
                up_before = relay.stats.bytes_up
                got = roundtrip(relay.port, b"x" * 2000, timeout=5)
                planned = relay.stats.planned[-1]
                forwarded = relay.stats.bytes_up - up_before
                if planned is None:
                    assert got == b"x" * 2000 and forwarded == 2000
                else:  # exactly the planned bytes reach the server, then both ends close
                    assert forwarded == planned and len(got) <= planned
            return list(relay.stats.planned)

    first = plans(3)
    assert first == plans(3)
    assert any(p is None for p in first) and any(p is not None for p in first)


@pytest.mark.timeout(60)
def test_throttle_limits_the_rate() -> None:
    data = b"y" * (96 * 1024)
    with echo_server() as (port, _):
        with Relay("127.0.0.1", port) as fast:
            t0 = time.monotonic()
            assert roundtrip(fast.port, data) == data
            free_s = time.monotonic() - t0
        with Relay("127.0.0.1", port, throttle_bps=128 * 1024) as slow:
            t0 = time.monotonic()
            assert roundtrip(slow.port, data) == data
            slow_s = time.monotonic() - t0
    # 96 KiB at 128 KiB/s needs >= 0.75 s; generous slack both ways, and a ratio, not a time.
    assert len(data) / slow_s <= 1.5 * 128 * 1024
    assert slow_s > 3 * free_s


@pytest.mark.timeout(60)
def test_stall_holds_bytes_until_resume() -> None:
    with (
        echo_server() as (port, _),
        Relay("127.0.0.1", port) as relay,
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s,
    ):
        relay.stall()
        s.sendall(b"held")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(16)
        relay.resume()
        s.settimeout(5)
        assert s.recv(16) == b"held"
