"""One broker process owned by a launcher: started in its own session, stopped by its PID.

Shared by the private-broker launchers (:mod:`broker.local` for Mosquitto,
:mod:`broker.local_ejabberd`, :mod:`broker.local_nats`). Nothing here knows a broker: it starts
an argv with its output appended to a file, and stops it with SIGTERM, then SIGKILL after a grace
period, by PID only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "BrokerError",
    "LocalService",
    "NodeProcess",
    "find_binary",
    "free_port",
    "port_open",
    "wait_until",
]


class BrokerError(RuntimeError):
    """A local broker could not be found, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], timeout_s: float, *, alive: Callable[[], bool]) -> bool:
    """Poll ``ready`` until true (True), ``timeout_s`` passes or ``alive`` turns false (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            return False
        if ready():
            return True
        time.sleep(0.05)
    return False


def find_binary(name: str, install_hint: str, dirs: Sequence[str] = ("/usr/sbin",)) -> str:
    """Path of an executable (PATH, then ``dirs``); BrokerError naming the package if missing."""
    for candidate in (shutil.which(name), *(f"{d}/{name}" for d in dirs)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    looked = ", ".join(("PATH", *dirs))
    raise BrokerError(f"{name} not found (looked in {looked}); install it with `{install_hint}`")


class LocalService(ABC):
    """A private broker (or cluster) in a work dir: a context manager that stops it on exit and
    removes a work dir it made itself, unless the block failed (its logs are kept then)."""

    def __init__(self, workdir: Path | None, prefix: str) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=prefix))

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> object: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._own_workdir and et is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class NodeProcess:
    """A process this object started (one ``start`` at a time), its output appended to a file."""

    def __init__(
        self,
        argv: Sequence[str],
        output: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv, self.output, self.cwd = list(argv), output, cwd
        self.env = None if env is None else dict(env)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        with self.output.open("ab") as out:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd,
                start_new_session=True,  # Ctrl-C on a test run does not reach it
            )  # fmt: skip

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace_s``; returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self._signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait(grace_s)
        self._proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal(signal.SIGKILL)
            proc.wait(5.0)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: a frozen node (its sockets stay open, it answers nothing)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def output_tail(self, lines: int = 40) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)
