"""The demo's live view: the fleet as the broker shows it, while the services run.

The demo connects to its broker as a read-only observer (:mod:`fedfstq.observer`), the way
``fedfstq status`` does, and shows every device's phase (fetching, training step i/n with the
loss, compressing, uploading, waiting for the acknowledgement) and the round (selected,
arrived, time left, bytes so far): a live table on a terminal, one line per change otherwise.
The per-round results come from the aggregator's ``rounds.jsonl`` as rounds close.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from aggregator.round_result import RoundResult, read_rounds
from fedfstq.demo_report import result_line, rounds_table
from fedfstq.fleet_view import FleetView
from fedfstq.fleet_watch import FleetOutput, Mode, pump
from fedfstq.observer import connect, target

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["Run", "watch"]


@dataclass
class Run:
    """What the demo started: the aggregator first, then the agents."""

    procs: list[subprocess.Popen[bytes]]
    metrics: Path
    logs: Path
    host: str
    port: int
    fleet: str = "demo"
    protocol: str = "5"  # the MQTT version the demo's services speak (--mqtt-protocol)
    records: list[RoundResult] = field(default_factory=list)

    def outcome(self) -> int | None:
        """The demo's exit code once it is decided, else None (keep watching)."""
        if self.procs[0].poll() is not None:
            return self.procs[0].returncode or 0
        dead = [p for p in self.procs[1:] if p.poll() not in (None, 0)]
        return 1 if dead else None


def watch(run: Run, timeout: float, stream: TextIO) -> int:
    """Follow the run until the aggregator exits (or an agent dies, or ``timeout``); an
    :class:`~fedfstq.observer.ObserverError` if the broker cannot be watched."""
    where = target(
        broker=f"mqtt://{run.host}:{run.port}", config=None, fleet=run.fleet, protocol=run.protocol
    )
    client = connect(where, timeout=10.0)
    mode: Mode = "live" if stream.isatty() else "lines"
    view = FleetView(run.fleet)
    started = time.monotonic()

    def extra() -> RenderableType | None:
        return rounds_table(run.records) if run.records else None

    try:
        with FleetOutput(mode, stream, extra=extra) as out:
            while True:
                code = run.outcome()  # first: the aggregator's last record is then on disk
                pump(client, view, out, wait_s=0.5)
                records = read_rounds(run.metrics)
                for rec in records[len(run.records) :]:
                    out.line(result_line(rec))
                run.records = records
                out.refresh(view)
                if code is not None:
                    if code and run.procs[0].poll() is None:
                        dead = next(p for p in run.procs[1:] if p.poll() not in (None, 0))
                        out.line(f"an agent exited with code {dead.returncode}; see {run.logs}")
                    return code
                if time.monotonic() - started > timeout:
                    out.line(f"timed out after {timeout:.0f} s")
                    return 1
    finally:
        client.close()
