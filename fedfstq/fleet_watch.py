"""Following a fleet live: observer messages in, the fold updated, the changes shown.

:class:`FleetOutput` is where they are shown: a rich live table when stdout is a terminal, one
timestamped line per change otherwise (logs, CI, pipes), or one JSON document per change.
:func:`pump` moves what the observer client received into the view and the output; the demo and
``fedfstq status --watch`` call it in their loops.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TextIO

from broker.transport import Transport
from fedfstq.fleet_render import describe, render
from fedfstq.fleet_view import FleetView, Update

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

__all__ = ["FleetOutput", "Mode", "pump"]

Mode = Literal["live", "lines", "json"]


class FleetOutput:
    """Shows a :class:`FleetView` as it changes (see the module doc); use as a context manager.

    ``extra`` adds a renderable under the live table (the demo's finished rounds).
    """

    def __init__(
        self,
        mode: Mode,
        stream: TextIO,
        *,
        extra: Callable[[], RenderableType | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mode = mode
        self._stream = stream
        self._extra = extra
        self._clock = clock
        self._console: Console | None = None
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._console = Console(file=self._stream)
            self._live = Live(
                Text("connecting..."), console=self._console, refresh_per_second=4,
                transient=False,
            )  # fmt: skip
            self._live.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
            self._live = None

    def line(self, text: str) -> None:
        """A line of its own (above the live table, or timestamped in the log)."""
        if self._console is not None:
            self._console.print(text, highlight=False, markup=False)
        else:
            print(f"{_stamp(self._clock())} {text}", file=self._stream, flush=True)

    def show(self, view: FleetView, updates: list[Update]) -> None:
        """Present what changed: refresh the table, or one line per change worth one."""
        now = self._clock()
        if self.mode == "live":
            self.refresh(view)
        elif self.mode == "json":
            if updates:
                print(json.dumps(view.snapshot(now).to_json()), file=self._stream, flush=True)
        else:
            for u in updates:
                text = describe(u, now)
                if text is not None:
                    print(f"{_stamp(now)} {text}", file=self._stream, flush=True)

    def refresh(self, view: FleetView) -> None:
        """Redraw the live table (time left moves even when nothing arrives)."""
        if self._live is None:
            return
        from rich.console import Group

        table = render(view.snapshot(self._clock()))
        extra = self._extra() if self._extra is not None else None
        self._live.update(table if extra is None else Group(table, extra))


def _stamp(now: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(now))


def pump(
    client: Transport,
    view: FleetView,
    output: FleetOutput,
    wait_s: float,
    clock: Callable[[], float] = time.time,
) -> int:
    """Fold in what arrived within ``wait_s`` (then whatever else is already queued) and show
    it: every change as it comes (a line, a JSON document), the live table once at the end.
    Returns the number of messages."""
    n = 0
    msg = client.receive(timeout=wait_s)
    while msg is not None:
        n += 1
        updates = view.apply(msg.topic, msg.payload, clock(), retained=msg.retain)
        if output.mode != "live":
            output.show(view, updates)
        msg = client.receive(timeout=0)
    if output.mode == "live":
        output.show(view, [])
    return n
