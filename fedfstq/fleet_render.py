"""Rendering a :class:`~fedfstq.fleet_view.FleetSnapshot`: one log line per change, or tables.

:func:`describe` turns an update of the fold into a plain line (or None when the change is not
worth a line on its own, e.g. bytes moving); :func:`render` builds the rich tables of the live
view (the demo on a terminal, ``fedfstq status``). Wording lives here once for both.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from broker.messages import ClientState, RoundPhase
from broker.progress import Stage
from fedfstq.fleet_view import (
    DeviceChanged,
    DeviceView,
    FleetSnapshot,
    GlobalChanged,
    Ignored,
    RoundChanged,
    RoundView,
    Update,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["activity", "ago", "describe", "render", "round_line"]

_OFFLINE = {"stopped": "offline (stopped)", "link_lost": "offline (connection lost)"}


def ago(seconds: float) -> str:
    """``12 s``, ``3 min``, ``2 h``."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def activity(d: DeviceView) -> str:
    """What the device is doing, in words."""
    p = d.progress
    if d.state is ClientState.OFFLINE:
        return _OFFLINE.get(d.cause or "", "offline")
    if p is not None and p.stage is Stage.TRAINING:
        loss = f", loss {p.loss:.3f}" if p.loss is not None else ""
        return f"training step {p.done}/{p.total}{loss}"
    if p is not None and p.stage is Stage.COMPRESSING:
        return "compressing the update"
    if p is not None and p.stage is Stage.FETCHING:
        return f"fetching the global adapter, chunk {p.done}/{p.total}"
    if p is not None and p.stage is Stage.UPLOADING:
        return f"uploading, {p.done}/{p.total} chunks through to the broker"
    if p is not None and p.stage is Stage.AWAITING_ACK:
        return "upload sent, waiting for the aggregator's acknowledgement"
    if d.state is ClientState.ERROR:
        return "error: gave the round up (see its log)"
    if d.state is ClientState.IDLE and d.round is not None:  # the agent's state after a fetch
        held = f" v{d.global_version}" if d.global_version is not None else ""
        return f"global adapter{held} fetched and verified"
    return {
        ClientState.IDLE: "idle, waiting for a round",
        ClientState.ONLINE: "online",
        ClientState.TRAINING: "training",
        ClientState.UPLOADING: "uploading",
        ClientState.DOWNLOADING: "fetching the global adapter",
    }.get(d.state, d.state.value)


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


def round_line(r: RoundView, now: float) -> str:
    """One line about a round: who was selected, who arrived, time left or outcome, bytes."""
    head = f"round {r.round} {r.phase.value} (on v{r.base_version})"
    got = f"{len(r.arrived)}/{len(r.selected)} arrived"
    if r.arrived:
        got += f" ({', '.join(r.arrived)})"
    parts = [head, got]
    if r.phase is RoundPhase.OPEN:
        left = r.deadline - now
        parts.append(f"deadline in {ago(left)}" if left >= 0 else f"deadline {ago(-left)} ago")
    if r.rejected or r.late:
        parts.append(f"{r.rejected} rejected, {r.late} late")
    if r.uplink_wire_bytes is not None:
        parts.append(
            f"uplink {_bytes(r.uplink_wire_bytes)}, downlink {_bytes(r.downlink_wire_bytes)}"
        )
    return "; ".join(parts)


def _describe_round(before: RoundView | None, after: RoundView, now: float) -> str | None:
    r = after.round
    if before is None or before.round != r:
        if after.phase is not RoundPhase.OPEN:
            return round_line(after, now)
        return (
            f"round {r} opened on v{after.base_version}: selected {', '.join(after.selected)}; "
            f"deadline in {ago(after.deadline - now)}"
        )
    if after.phase is not before.phase:
        return round_line(after, now)
    new = [c for c in after.arrived if c not in before.arrived]
    if new:
        got = f"round {r}: {', '.join(new)} arrived ({len(after.arrived)}/{len(after.selected)})"
        if set(after.arrived) >= set(after.selected):
            return f"{got}: all in, the aggregator averages and evaluates the new global"
        return f"{got}, deadline in {ago(after.deadline - now)}"
    if (after.rejected, after.late) != (before.rejected, before.late):
        return f"round {r}: {after.rejected} uploads rejected, {after.late} late so far"
    if after.deadline != before.deadline:
        return f"round {r}: deadline extended, now in {ago(after.deadline - now)}"
    return None  # only bytes moved: the table shows them, a line each time would be a flood


def describe(update: Update, now: float) -> str | None:
    """A log line for ``update``, or None if it is not worth one."""
    if isinstance(update, DeviceChanged):
        d = update.after
        if d is None:
            return f"{update.before.client if update.before else '?'}: status cleared"
        where = f" round {d.round}" if d.round is not None else ""
        return f"{d.client}{where}: {activity(d)}"
    if isinstance(update, RoundChanged):
        return _describe_round(update.before, update.after, now)
    if isinstance(update, GlobalChanged):
        g = update.after
        return f"global adapter v{g.version} published (sha256 {g.sha256[:12]}, {g.size:,} B)"
    if isinstance(update, Ignored):
        return f"ignored a message on {update.topic}: {update.reason}"
    return None


def render(snap: FleetSnapshot) -> RenderableType:
    """The live view: global adapter and round on top, one row per device below."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = snap.at
    g = snap.global_adapter
    head = Text(f"fleet {snap.fleet}  ", style="bold")
    head.append(
        f"global v{g.version} sha256 {g.sha256[:16]} ({g.size:,} B)"
        if g is not None
        else "no global adapter published"
    )
    rnd = Text(round_line(snap.round, now) if snap.round is not None else "no round yet")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("device", "link", "round", "doing", "global", "last seen"):
        table.add_column(col)
    selected = set(snap.round.selected) if snap.round is not None else set()
    for d in snap.devices:
        link = d.connection(now, snap.silent_after_s)
        style = {"online": "green", "silent": "yellow", "offline": "red"}[link]
        seen = "?" if d.last_seen is None else f"{ago(now - d.last_seen)} ago"
        table.add_row(
            d.client + (" *" if d.client in selected else ""),
            Text(link, style=style),
            "-" if d.round is None else str(d.round),
            activity(d),
            "-" if d.global_version is None else f"v{d.global_version}",
            seen,
        )
    foot = Text(f"* selected for the round   {time.strftime('%H:%M:%S', time.localtime(now))}",
                style="dim")  # fmt: skip
    return Group(head, rnd, table, foot)
