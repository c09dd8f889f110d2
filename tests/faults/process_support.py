"""Helpers of the process-fault tests: the services as OS processes, watched over MQTT.

* :class:`Service` runs ``fedfstq agent|aggregator --config FILE`` (the console script of this
  virtualenv) with its output in one log file per start; it is SIGKILLed, paused (SIGSTOP) or
  stopped by its PID only. :class:`Services` kills whatever is still running when a test ends.
* :class:`Watcher` is an MQTT client of the test subscribed to a fleet's whole topic tree: it
  records what the broker really routed (upload chunks, acks, status, global chunks), which is
  what a kill is timed on and what the outcome is checked against.
* :func:`audit` compares the aggregator's store with what the devices declared and what the
  aggregator acknowledged; :func:`check_globals` recomputes every global adapter from it.

The settings come from ``e2e_support`` (tiny model, fast timers) and are written as TOML.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch
from e2e_support import expected_global, global_state, sha256_hex, unique
from pydantic import BaseModel

from aggregator.settings import AggregatorSettings
from aggregator.store import AcceptedUpload, AggregatorStore
from broker.codec import decode
from broker.errors import TopicError, WireError
from broker.local import LocalBroker
from broker.messages import (
    AckStatus,
    ClientStatus,
    GlobalChunk,
    UploadAck,
    UploadChunk,
    UploadManifest,
)
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import PREFIX, Topic, parse_topic
from edge_agent.outbox import Outbox
from fedfstq.demo import write_toml

__all__ = [
    "Audit",
    "Seen",
    "Service",
    "Services",
    "Watcher",
    "audit",
    "check_globals",
    "sent_stats",
    "write_config",
]

#: The console script next to this interpreter (.venv/bin/fedfstq).
FEDFSTQ = Path(sys.executable).with_name("fedfstq")
#: Tolerance of "equal" globals (float32 storage of a float64 mean), as in the e2e tests.
ATOL = 1e-6


def write_config(path: Path, settings: BaseModel) -> Path:
    """Write validated settings as the TOML file a service process reads back."""
    write_toml(path, settings.model_dump(mode="json", exclude_none=True))
    return path


# -- processes ------------------------------------------------------------------------------


class Service:
    """One service run as an OS process; each ``start`` writes its own log ``<name>.<n>.log``."""

    def __init__(self, kind: str, name: str, config: Path, log_dir: Path) -> None:
        self.kind, self.name, self.config, self.log_dir = kind, name, config, log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        assert not self.running, f"{self.name} is already running"
        log = self.log_dir / f"{self.name}.{len(self.logs) + 1}.log"
        self.logs.append(log)
        # No FEDFSTQ_* variable of the test environment may override the config file. One
        # torch thread each: several services share two cores, and OpenMP threads spinning
        # against each other make a step 10-20x slower.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFSTQ_")}
        env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with log.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [str(FEDFSTQ), self.kind, "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        return self

    def kill(self) -> None:
        """SIGKILL by PID (a crash: no handler runs, nothing is flushed or said goodbye)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def wait(self, timeout: float) -> int:
        """The exit code; AssertionError (with the log tail) if it does not exit in time."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still runs after {timeout}s\n{self.tail()}"
            ) from None

    def log(self, run: int = -1) -> str:
        """The output of one start (default: the latest)."""
        return self.logs[run].read_text(errors="replace")

    def tail(self, lines: int = 25) -> str:
        text = "\n".join(self.log().splitlines()[-lines:]) if self.logs else ""
        return f"--- {self.name} (pid {self.proc.pid if self.proc else '-'}) ---\n{text}"

    def cleanup(self) -> None:
        if self.running:
            if self.paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGCONT)
            self.kill()


class Services:
    """The service processes of one test; ``with`` kills (by PID) what is still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.all: list[Service] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s in self.all:
            s.cleanup()

    def add(self, kind: str, name: str, settings: BaseModel) -> Service:
        config = write_config(self.log_dir / f"{name}.toml", settings)
        self.all.append(Service(kind, name, config, self.log_dir))
        return self.all[-1]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``predicate``; fail early (with logs) if a service process died with an error."""
        deadline = time.monotonic() + timeout
        while not predicate():
            failed = [  # the test's own SIGKILLs aside
                s
                for s in self.all
                if s.proc is not None and s.proc.poll() not in (None, 0, -signal.SIGKILL)
            ]
            if failed:
                logs = "\n".join(s.tail() for s in failed)
                raise AssertionError(f"a service failed while waiting for {what}\n{logs}")
            if time.monotonic() > deadline:
                logs = "\n".join(s.tail(8) for s in self.all)
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            time.sleep(0.02)

    def finish(self, services: Iterable[Service], timeout: float) -> None:
        """Wait for ``services`` to exit by themselves (max_rounds) and assert they exited 0."""
        deadline = time.monotonic() + timeout
        for s in services:
            code = s.wait(max(0.1, deadline - time.monotonic()))
            assert code == 0, f"{s.name} exited with {code}\n{s.tail()}"


# -- log lines ------------------------------------------------------------------------------

_SENT = re.compile(
    r"round (\d+) (\w+).*?: upload (\S+) \d+ B in (\d+) chunks; sent (\d+) manifests, chunks "
    r"first (\d+) \((\d+) B\) resent (\d+) \((\d+) B\)"
)


@dataclass(frozen=True)
class SentStats:
    """An agent's own account of one finished upload (its log line at the final ack)."""

    round_id: int
    state: str
    upload_id: str
    chunks: int
    chunks_first: int
    chunks_resent: int
    bytes_resent: int


def sent_stats(log: str) -> list[SentStats]:
    out = []
    for m in _SENT.finditer(log):
        r, state, uid, n, _, first, _, resent, resent_b = m.groups()
        out.append(SentStats(int(r), state, uid, int(n), int(first), int(resent), int(resent_b)))
    return out


# -- the watcher ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One message the broker routed to the watcher: monotonic arrival time, topic, body."""

    t: float
    topic: Topic
    body: Any

    @property
    def client(self) -> str | None:
        return getattr(self.topic, "client", None)


class Watcher:
    """Records every message of a fleet (``fstq/v1/<fleet>/#``) that the broker routes.

    ``persistent=True`` keeps its MQTT session across a broker restart (nothing routed while it
    reconnects is missed).
    """

    def __init__(self, broker: LocalBroker, fleet: str, *, persistent: bool = False) -> None:
        self.settings = MqttSettings(
            host=broker.host, port=broker.port, client_id=unique("watch"),
            clean_start=not persistent, session_expiry_s=300 if persistent else 0,
            backoff_base_s=0.05, backoff_max_s=0.3, keepalive_s=10,
        )  # fmt: skip
        self.fleet = fleet
        self._client = MqttClient(self.settings)
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="watcher")

    def __enter__(self) -> Self:
        self._client.connect(10)
        self._client.subscribe(f"{PREFIX}/{self.fleet}/#", 1)
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client.close()  # receive() returns None: the pump ends
        self._thread.join(5)

    def _pump(self) -> None:
        while (msg := self._client.receive()) is not None:
            if not msg.payload:
                continue
            try:
                seen = Seen(time.monotonic(), parse_topic(msg.topic), decode(msg.payload))
            except (TopicError, WireError):  # not ours to judge
                continue
            with self._lock:
                self._seen.append(seen)

    def seen(
        self,
        kind: type[Any],
        *,
        client: str | None = None,
        since: float | None = None,
        until: float | None = None,
        where: Callable[[Any], bool] | None = None,
    ) -> list[Seen]:
        """Messages of one kind in arrival order, filtered by topic client and time."""
        with self._lock:
            seen = list(self._seen)
        return [
            s
            for s in seen
            if isinstance(s.body, kind)
            and (client is None or s.client == client)
            and (since is None or s.t >= since)
            and (until is None or s.t < until)
            and (where is None or where(s.body))
        ]

    def chunks(self, upload_id: str, **kw: Any) -> list[int]:
        """Indexes of the upload's chunks routed by the broker (re-sends included)."""
        seen = self.seen(UploadChunk, where=lambda c: c.upload_id == upload_id, **kw)
        return [s.body.index for s in seen]

    def acked_complete(self) -> dict[str, UploadAck]:
        """Upload id -> the ``complete`` ack the aggregator sent for it."""
        done = self.seen(UploadAck, where=lambda a: a.status is AckStatus.COMPLETE)
        return {s.body.upload_id: s.body for s in done}

    def in_state(self, client: str, *states: str) -> bool:
        return any(s.body.state.value in states for s in self.seen(ClientStatus, client=client))

    def global_chunks(self, version: int, **kw: Any) -> list[Seen]:
        return self.seen(GlobalChunk, where=lambda c: c.version == version, **kw)

    def quiet(self, kind: type[Any], seconds: float) -> bool:
        """Nothing of ``kind`` arrived for ``seconds``."""
        last = self.seen(kind)
        return not last or time.monotonic() - last[-1].t >= seconds


# -- checks ---------------------------------------------------------------------------------


@dataclass
class Audit:
    """The store against the devices and the acks (the reliability table's two zero columns)."""

    stored: dict[int, list[AcceptedUpload]]  # round -> accepted uploads
    acked: set[str]  # upload ids acknowledged `complete`
    corrupted: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    @property
    def aggregated(self) -> int:
        return sum(len(v) for v in self.stored.values())


def audit(
    settings: AggregatorSettings, rounds: int, watcher: Watcher, device_dirs: Iterable[Path]
) -> Audit:
    """Acked uploads missing from the store (``lost``) and stored uploads whose bytes differ
    from what the device declared (``corrupted``): its manifest on the wire and, while the
    device still keeps it, its outbox entry."""
    store = AggregatorStore(settings.db_path)
    try:
        stored = {k: list(store.accepted_uploads(k)) for k in range(1, rounds + 1)}
    finally:
        store.close()
    declared = {s.body.upload_id: s.body.sha256.hex() for s in watcher.seen(UploadManifest)}
    for d in device_dirs:
        outbox = Outbox(d / "outbox")
        for e in outbox.entries():
            declared.setdefault(e.upload_id, e.sha256)
            assert declared[e.upload_id] == e.sha256 == sha256_hex(outbox.payload(e.upload_id))
    result = Audit(stored, set(watcher.acked_complete()))
    ids = {u.upload_id for ups in stored.values() for u in ups}
    result.lost = sorted(result.acked - ids)
    for u in (u for ups in stored.values() for u in ups):
        digest = sha256_hex(u.payload)
        if not (digest == u.sha256 == declared.get(u.upload_id)):
            result.corrupted.append(u.upload_id)
    return result


def check_globals(settings: AggregatorSettings, stored: dict[int, list[AcceptedUpload]]) -> None:
    """Each global v_k on disk == v_{k-1} + FedAvg of exactly round k's accepted uploads."""
    previous = global_state(settings, 0)
    for k in sorted(stored):
        got = global_state(settings, k)
        want = expected_global(previous, [(u.payload, u.sample_count) for u in stored[k]])
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0)
        previous = got
