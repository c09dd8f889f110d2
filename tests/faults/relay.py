"""A userspace TCP relay for fault injection: clients -> relay (127.0.0.1:free port) -> target.

Every accepted connection gets an upstream connection to the target and two pump threads. The
relay can

* cut connections at random: with probability ``cut_probability`` a new connection is doomed
  to be cut (both sockets closed) once ``cut_after_bytes`` (drawn uniformly from the range) have
  gone client -> target; the decisions come from ``random.Random(seed)`` in accept order, so the
  plan is the same on every run (which bytes are in flight when the cut comes is up to timing);
* cut on cue: ``cut_all()``;
* stall: ``stall()`` holds every byte until ``resume()`` (``stall(up_only=True)``: only what
  the clients send; bytes held when a connection is cut are dropped, never forwarded);
* throttle: ``throttle_bps`` bytes/s per connection and direction;
* delay: ``delay_s`` before each forwarded write.

``start()``/``stop()`` or ``with Relay(...) as relay``; ``stop`` closes everything it opened and
joins its threads (bounded).
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["Relay", "RelayStats"]

_BUF = 16 * 1024
_POLL_S = 0.1


@dataclass
class RelayStats:
    connections: int = 0
    random_cuts: int = 0
    cued_cuts: int = 0
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    planned: list[int | None] = field(default_factory=list)  # cut-after bytes per connection


class _Link:
    """One relayed connection: the client socket, the upstream socket, two pumps."""

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket,
                 cut_after: int | None) -> None:  # fmt: skip
        self.relay, self.client, self.upstream = relay, client, upstream
        self.cut_after = cut_after
        self.sent_up = 0
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True,
                             name="relay-up"),
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True,
                             name="relay-down"),
        ]  # fmt: skip

    def start(self) -> None:
        for s in (self.client, self.upstream):  # blocking: a slow reader must not look like a cut
            s.settimeout(None)
        for t in self.threads:
            t.start()

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        relay = self.relay
        started = time.monotonic()
        moved = 0
        try:
            while not self.closed.is_set():
                readable, _, _ = select.select([src], [], [], _POLL_S)
                if not readable:
                    continue
                data = src.recv(_BUF if relay.throttle_bps is None else
                                max(1, min(_BUF, relay.throttle_bps // 10)))  # fmt: skip
                if not data:
                    break
                while (relay.stalled.is_set() or (up and relay.stalled_up.is_set())) and (
                    not self.closed.is_set()
                ):
                    time.sleep(_POLL_S / 2)
                if relay.delay_s:
                    time.sleep(relay.delay_s)
                if up and self.cut_after is not None and self.sent_up + len(data) >= self.cut_after:
                    # Forward only what fits before the cut point, then cut both sides.
                    keep = max(0, self.cut_after - self.sent_up)
                    relay._count(up, keep)
                    with contextlib.suppress(OSError):
                        dst.sendall(data[:keep])
                    relay._note_random_cut()
                    break
                relay._count(up, len(data))  # before the send: the peer cannot outrun the count
                dst.sendall(data)
                if up:
                    self.sent_up += len(data)
                moved += len(data)
                if relay.throttle_bps is not None:  # sleep until the average rate fits
                    ahead = moved / relay.throttle_bps - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except (OSError, ValueError):  # closed under us (a cut from another thread)
            pass
        finally:
            self.close()


class Relay:
    """See the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        seed: int = 0,
        cut_probability: float = 0.0,
        cut_after_bytes: tuple[int, int] = (1024, 64 * 1024),
        throttle_bps: int | None = None,
        delay_s: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.rng = random.Random(seed)
        self.cut_probability = cut_probability
        self.cut_after_bytes = cut_after_bytes
        self.throttle_bps = throttle_bps
        self.delay_s = delay_s
        self.stalled = threading.Event()
        self.stalled_up = threading.Event()
        self.stats = RelayStats()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []  # every pump ever started, joined by stop()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="relay-accept")
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.stalled.clear()
        self.stalled_up.clear()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            links, self._links = list(self._links), []
        for link in links:
            link.close()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads, self._threads = list(self._threads), []
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults on cue ---------------------------------------------------------------------

    def cut_all(self) -> int:
        """Close every open connection now (both sides); returns how many were cut."""
        with self._lock:
            links = [link for link in self._links if not link.closed.is_set()]
            self.stats.cued_cuts += len(links)
        for link in links:
            link.close()
        return len(links)

    def stall(self, *, up_only: bool = False) -> None:
        (self.stalled_up if up_only else self.stalled).set()

    def resume(self) -> None:
        self.stalled.clear()
        self.stalled_up.clear()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(not link.closed.is_set() for link in self._links)

    # -- internals -------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                doomed = self.rng.random() < self.cut_probability
                cut_after = self.rng.randint(*self.cut_after_bytes) if doomed else None
                self.stats.connections += 1
                self.stats.planned.append(cut_after)
                link = _Link(self, client, upstream, cut_after)
                self._links = [lk for lk in self._links if not lk.closed.is_set()] + [link]
                self._threads = [t for t in self._threads if t.is_alive()] + link.threads
            link.start()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n

    def _note_random_cut(self) -> None:
        with self._lock:
            self.stats.random_cuts += 1
