"""Downlink accounting of the fleet runs: which route each fetch took, how stale the device was,
and what the catch-up left out (decision 13; docs in evaluation/README.md, "Downlink").

A device starting a round gets one of four routes: ``none`` (it already holds a state for the
version), ``catchup`` (a compressed ``master - held`` it applies), ``full`` (the fp16 adapter) or
``derived`` (it built v0 itself from the LoRA init seed: 0 bytes, counted as an event). Its
staleness is how many versions behind its held state was (``"new"``: it held nothing).

Run records written before this accounting hold only each round's ``downlink_wire_bytes``. What
they did is still known exactly: every selected device that saw the round (not ``silent``, not
``offline``) fetched the full adapter, the same bytes each (:func:`device_downlinks` splits the
round's count; their staleness follows from the rounds each device took part in), and their
round time with the downlink is rebuilt with the downlink rate model (:func:`time_with_downlink`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic.dataclasses import dataclass as record

from common.record import RECORD_CONFIG, omitted_if_none
from evaluation.links import DOWNLINK_ASYMMETRY
from evaluation.round_time import ClientTiming, round_time

if TYPE_CHECKING:
    from evaluation.run_record import DeviceRound, FleetRound

__all__ = [
    "FIRST_CONTACT",
    "ROUTES",
    "CatchupError",
    "DeviceDownlink",
    "DownlinkCount",
    "DownlinkRound",
    "Route",
    "Staleness",
    "VersionsHeld",
    "add_counts",
    "client_timings",
    "device_downlinks",
    "round_downlinks",
    "sort_staleness",
    "staleness_key",
    "tally",
    "time_with_downlink",
]

Route = Literal["none", "catchup", "full", "derived"]
ROUTES: tuple[Route, ...] = ("none", "catchup", "full", "derived")
#: Staleness of a device that held nothing (its first contact, without a derived v0).
FIRST_CONTACT: Literal["new"] = "new"
Staleness = int | Literal["new"]
#: Fates of a selected device that never saw the round, so never fetched (evaluation.fleet_wire).
_UNSEEN = ("silent", "offline")
K = TypeVar("K", bound=str)


@record(frozen=True, kw_only=True, config=RECORD_CONFIG)
class DownlinkCount:
    """Fetches (plans served, or derivations) and their bytes on the wire."""

    fetches: int
    wire_bytes: int


@record(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CatchupError:
    """Where the round's catch-ups left devices (the aggregator's numbers, means over the
    catch-ups it computed): ``||master_v - result|| / ||master_v - held||`` (what the budget left
    of the gap) and ``||master_v - result|| / ||master_v||``."""

    vs_gap: float
    vs_master: float


@record(frozen=True, kw_only=True, config=RECORD_CONFIG)
class DownlinkRound:
    """One round's downlink by route and by staleness (keys: versions behind as text, ``"new"``,
    or the aggregator's ``"unknown"``); the catch-up error and what planning cost when the
    aggregator reports them."""

    by_route: dict[Route, DownlinkCount]
    by_staleness: dict[str, DownlinkCount]
    catchup_error: CatchupError | None = omitted_if_none()
    plans_computed: int | None = omitted_if_none()
    plans_reused: int | None = omitted_if_none()  # answered from memory or the store
    plan_compute_s: float | None = omitted_if_none()


@dataclass(frozen=True)
class DeviceDownlink:
    """What one device got to start one round."""

    route: Route
    wire_bytes: int
    staleness: Staleness
    first_contact: bool = False  # it held nothing fetched before (nothing, or a derived v0)


def staleness_key(staleness: Staleness) -> str:
    """The ``by_staleness`` key: versions behind as text, or ``"new"``."""
    return str(staleness)


def add_counts(
    a: Mapping[K, DownlinkCount], b: Mapping[K, DownlinkCount]
) -> dict[K, DownlinkCount]:
    """Two breakdowns added key by key."""
    out = dict(a)
    for key, c in b.items():
        old = out.get(key)
        if old is not None:
            c = DownlinkCount(
                fetches=old.fetches + c.fetches, wire_bytes=old.wire_bytes + c.wire_bytes
            )
        out[key] = c
    return out


def tally(devices: Iterable[DeviceDownlink]) -> DownlinkRound:
    """The round's breakdown from what its devices got (no catch-up error: the aggregator's)."""
    by_route: dict[Route, DownlinkCount] = {}
    by_staleness: dict[str, DownlinkCount] = {}
    for d in devices:
        one = DownlinkCount(fetches=1, wire_bytes=d.wire_bytes)
        by_route = add_counts(by_route, {d.route: one})
        by_staleness = add_counts(by_staleness, {staleness_key(d.staleness): one})
    routes: dict[Route, DownlinkCount] = {r: by_route[r] for r in ROUTES if r in by_route}
    return DownlinkRound(by_route=routes, by_staleness=sort_staleness(by_staleness))


def sort_staleness(counts: Mapping[str, DownlinkCount]) -> dict[str, DownlinkCount]:
    """A by-staleness breakdown in reading order: ``"new"`` first, then 0, 1, 2, ... behind."""
    return {k: counts[k] for k in sorted(counts, key=lambda k: (k != FIRST_CONTACT, len(k), k))}


class VersionsHeld:
    """The version each device's held adapter targets, as rounds go by (the harness's view: the
    base version of the last round it fetched for, or none yet)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def staleness(self, client: str, base_version: int) -> Staleness:
        held = self._held.get(client)
        return FIRST_CONTACT if held is None else base_version - held

    def served(self, client: str, base_version: int) -> None:
        self._held[client] = base_version


def device_downlinks(rounds: Sequence[FleetRound]) -> list[dict[str, DeviceDownlink]]:
    """Per round (in order), what each selected device that saw the round got to start it.

    Recorded rows (``downlink_route`` set) are taken as they are; a record written before the
    downlink accounting is read as what it did: every device that saw the round fetched the full
    adapter, the round's downlink bytes split evenly (each fetch is the same chunks), and its
    staleness counted from the rounds it took part in.
    """
    held = VersionsHeld()
    version = 0  # the global version a round trains on, for records that do not say
    out: list[dict[str, DeviceDownlink]] = []
    for rnd in rounds:
        base = version if rnd.base_version is None else rnd.base_version
        got: dict[str, DeviceDownlink] = {}
        legacy = {
            d.client for d in rnd.clients if d.downlink_bytes is None and d.dropped not in _UNSEEN
        }
        share = rnd.downlink_wire_bytes // len(legacy) if legacy else 0
        for d in rnd.clients:
            if d.downlink_route is not None:
                staleness = d.staleness if d.staleness is not None else FIRST_CONTACT
                first = (
                    d.first_contact if d.first_contact is not None else staleness == FIRST_CONTACT
                )
                got[d.client] = DeviceDownlink(
                    d.downlink_route, d.downlink_bytes or 0, staleness, first
                )
            elif d.client in legacy:
                staleness = held.staleness(d.client, base)
                got[d.client] = DeviceDownlink("full", share, staleness, staleness == FIRST_CONTACT)
        for client in got:
            held.served(client, base)
        out.append(got)
        if rnd.round > 0 and rnd.status == "closed":
            version = base + 1
    return out


def round_downlinks(rounds: Sequence[FleetRound]) -> list[DownlinkRound]:
    """Per round (in order): its recorded breakdown, else the one its devices add up to."""
    devices = device_downlinks(rounds)
    return [
        rnd.downlink if rnd.downlink is not None else tally(got.values())
        for rnd, got in zip(rounds, devices, strict=True)
    ]


def client_timings(
    clients: Sequence[DeviceRound], downlinks: Mapping[str, DeviceDownlink]
) -> list[ClientTiming]:
    """The round-time inputs of the arrived devices that computed: their download (``downlinks``;
    the rate recorded, else the uplink times :data:`DOWNLINK_ASYMMETRY`), compute and upload."""
    out: list[ClientTiming] = []
    for d in clients:
        if not d.arrived or d.compute_s is None:
            continue
        got = downlinks.get(d.client)
        rate = d.downlink_rate_bps
        if rate is None:
            rate = d.rate_bps * DOWNLINK_ASYMMETRY
        out.append(
            ClientTiming(d.compute_s, d.wire_bytes, d.rate_bps, got.wire_bytes if got else 0, rate)
        )
    return out


def time_with_downlink(rounds: Sequence[FleetRound]) -> list[float]:
    """Per round (in order): the simulated round time with the downlink, as recorded or, for a
    record written before the downlink accounting, rebuilt (round 0 costs nothing)."""
    out: list[float] = []
    for rnd, got in zip(rounds, device_downlinks(rounds), strict=True):
        if rnd.round_time_with_downlink_s is not None:
            out.append(rnd.round_time_with_downlink_s)
        elif rnd.round == 0:
            out.append(0.0)
        else:
            out.append(round_time(client_timings(rnd.clients, got), rnd.server_s))
    return out
