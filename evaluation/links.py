"""Per-client link model: uplink/downlink rates and availability windows.

Two sources: a clipped log-normal draw (`lognormal_links`, the default "heterogeneous LTE with
a slow tail") and a JSON device trace in the spirit of FedScale's (`load_trace`; the schema is in
evaluation/README.md). `links_from_spec` turns the run config's ``link_model`` table into
profiles for a list of fleet clients.

With the defaults (median 4 Mbit/s, sigma 1, clipped to [0.5, 20] Mbit/s) about 24% of clients
fall below 2 Mbit/s (the paper's "0.5–2 Mbps stragglers"), 1.9% sit at the 0.5 Mbit/s floor
and 5.4% at the 20 Mbit/s ceiling (the paper's controlled LTE rate); with 10 clients a round,
about 94% of rounds include at least one client under 2 Mbit/s.

Downlink (`with_downlinks`): a trace's own ``downlink_kbps`` where it gives one, otherwise the
uplink times :data:`DOWNLINK_ASYMMETRY` (13/6: the LTE medians of Huang et al., MobiSys 2012,
13 Mbit/s down and 6 Mbit/s up over 3,000+ phones; see evaluation/README.md, "Link model").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "DOWNLINK_ASYMMETRY",
    "EXAMPLE_TRACE",
    "TRACE_FORMAT",
    "LinkProfile",
    "TraceError",
    "assign_links",
    "fraction_below",
    "links_from_spec",
    "load_trace",
    "lognormal_links",
    "with_downlinks",
]

TRACE_FORMAT = "fedfstq-link-trace/1"
EXAMPLE_TRACE = Path(__file__).parent / "traces" / "example.json"  # shipped as package data
_MBPS = 1e6
_LOGNORMAL_PARAMS = frozenset({"median_mbps", "sigma", "lo_mbps", "hi_mbps"})
_KBPS = 1e3
#: Downlink / uplink rate of a device whose trace gives no downlink rate. Anchor: the median LTE
#: throughput measured by the 4GTest app on more than 3,000 Android phones, 13 Mbit/s downlink
#: and 6 Mbit/s uplink (J. Huang et al., "A close examination of performance and power
#: characteristics of 4G LTE networks", MobiSys 2012, abstract). For comparison, Ookla's
#: Speedtest Global Index for October 2020 gave 39.18 / 11.63 Mbit/s (3.4x) on mobile worldwide
#: and 12.34 / 4.52 Mbit/s (2.7x) in India: the LTE figure is the least asymmetric, so it charges
#: the downlink the most.
DOWNLINK_ASYMMETRY = 13 / 6

Window = tuple[float, float]


class TraceError(ValueError):
    """A device trace that cannot be used: bad JSON, missing or invalid fields."""


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@dataclass(frozen=True)
class LinkProfile:
    """One client's link: rates in bit/s and when it is reachable.

    ``windows`` are half-open intervals [start_s, end_s) of simulated time during which the
    client is available; empty means always available. With ``period_s`` the windows repeat
    (FedScale's ``finish_time``): availability at t is looked up at t mod period_s.
    """

    uplink_bps: float
    downlink_bps: float | None = None
    windows: tuple[Window, ...] = ()
    period_s: float | None = None

    def __post_init__(self) -> None:
        if not _positive(self.uplink_bps):
            raise ValueError(f"uplink_bps must be positive and finite, got {self.uplink_bps}")
        if self.downlink_bps is not None and not _positive(self.downlink_bps):
            raise ValueError(f"downlink_bps must be positive and finite, got {self.downlink_bps}")
        if self.period_s is not None and not _positive(self.period_s):
            raise ValueError(f"period_s must be positive and finite, got {self.period_s}")
        limit = self.period_s if self.period_s is not None else math.inf
        for start, end in self.windows:
            if not (0 <= start < end <= limit):
                raise ValueError(
                    f"window ({start}, {end}) must satisfy 0 <= start < end <= {limit}"
                )

    def available(self, t: float) -> bool:
        """Whether the client is reachable at simulated time ``t`` (seconds)."""
        if not self.windows:
            return True
        if self.period_s is not None:
            t = t % self.period_s
        return any(start <= t < end for start, end in self.windows)


def fraction_below(
    mbps: float, *, median_mbps: float = 4.0, sigma: float = 1.0, lo_mbps: float = 0.5
) -> float:
    """Share of `lognormal_links` clients strictly slower than ``mbps`` (0 at or below the floor).

    Clipping moves the lower tail onto ``lo_mbps`` exactly, so nothing is slower than the floor;
    above it the clipped and the plain log-normal agree.
    """
    if mbps <= lo_mbps:
        return 0.0
    if sigma == 0:
        return 1.0 if median_mbps < mbps else 0.0
    return NormalDist().cdf(math.log(mbps / median_mbps) / sigma)


def lognormal_links(
    clients: Sequence[str],
    rng: np.random.Generator,
    *,
    median_mbps: float = 4.0,
    sigma: float = 1.0,
    lo_mbps: float = 0.5,
    hi_mbps: float = 20.0,
) -> dict[str, LinkProfile]:
    """Uplink rates ~ LogNormal(ln median, sigma) clipped to [lo, hi] Mbit/s; always available.

    Clipped rather than truncated: the 0.5 Mbit/s floor then holds a visible group of the
    slowest stragglers, as in the paper's "0.5–2 Mbps" tail, instead of spreading it upwards.
    """
    if not (0 < lo_mbps <= median_mbps <= hi_mbps) or not math.isfinite(hi_mbps):
        raise ValueError("need 0 < lo_mbps <= median_mbps <= hi_mbps < inf")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    _check_unique(clients)
    mbps = np.clip(rng.lognormal(math.log(median_mbps), sigma, len(clients)), lo_mbps, hi_mbps)
    return {c: LinkProfile(uplink_bps=float(r) * _MBPS) for c, r in zip(clients, mbps, strict=True)}


def with_downlinks(
    links: Mapping[str, LinkProfile], asymmetry: float = DOWNLINK_ASYMMETRY
) -> dict[str, LinkProfile]:
    """Every profile with a downlink rate: its own (a trace's ``downlink_kbps``), else the uplink
    times ``asymmetry`` (one device's channel decides both directions, so they go together)."""
    if not _positive(asymmetry):
        raise ValueError(f"asymmetry must be positive and finite, got {asymmetry}")
    return {
        c: p if p.downlink_bps is not None else replace(p, downlink_bps=p.uplink_bps * asymmetry)
        for c, p in links.items()
    }


def assign_links(
    clients: Sequence[str], profiles: Mapping[str, LinkProfile], rng: np.random.Generator
) -> dict[str, LinkProfile]:
    """Give every fleet client one of ``profiles``.

    When the trace names every fleet client, each gets its own entry. Otherwise entries are dealt
    out in shuffled passes over the whole trace, so each is used floor(n/m) or ceil(n/m) times
    (n clients, m entries): distinct entries when the trace is large enough, and the trace's
    spread of rates preserved when it is small.
    """
    _check_unique(clients)
    if not profiles:
        raise ValueError("no link profiles to assign")
    if all(c in profiles for c in clients):
        return {c: profiles[c] for c in clients}
    entries = list(profiles.values())
    passes = -(-len(clients) // len(entries))
    order = np.concatenate([rng.permutation(len(entries)) for _ in range(passes)])
    return {c: entries[int(i)] for c, i in zip(clients, order, strict=False)}


def links_from_spec(
    spec: Mapping[str, Any], clients: Sequence[str], rng: np.random.Generator
) -> dict[str, LinkProfile]:
    """Profiles from a run config's ``link_model`` table.

    ``{"kind": "lognormal", "median_mbps", "sigma", "lo_mbps", "hi_mbps"}`` (all optional),
    ``{"kind": "fixed", "mbps": 20.0}`` (the paper's controlled LTE) or
    ``{"kind": "trace", "path": "..."}``.
    """
    params = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec.get("kind")
    if kind == "lognormal" and set(params) <= _LOGNORMAL_PARAMS:
        return lognormal_links(clients, rng, **{k: float(v) for k, v in params.items()})
    if kind == "fixed" and set(params) == {"mbps"}:
        _check_unique(clients)
        profile = LinkProfile(uplink_bps=float(params["mbps"]) * _MBPS)
        return dict.fromkeys(clients, profile)
    if kind == "trace" and set(params) == {"path"}:
        return assign_links(clients, load_trace(params["path"]), rng)
    raise ValueError(f"unknown link model {dict(spec)!r}")


def _check_unique(clients: Sequence[str]) -> None:
    if len(set(clients)) != len(clients):
        raise ValueError("client ids must be unique")


# --- trace loading -------------------------------------------------------------------------

# FedScale's own fields that mean nothing here: compute is measured for real, not traced.
_IGNORED = frozenset({"computation", "duration", "model"})
_FEDSCALE = frozenset({"communication", "inactive", "finish_time"})
_KNOWN = frozenset({"uplink_kbps", "downlink_kbps", "active", "period_s"}) | _FEDSCALE | _IGNORED


def load_trace(path: str | Path) -> dict[str, LinkProfile]:
    """Read a JSON device trace (schema in evaluation/README.md), keyed by the trace's ids."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), dict):
        raise TraceError(f'{path}: expected an object with a "clients" object')
    if doc.get("format", TRACE_FORMAT) != TRACE_FORMAT:
        raise TraceError(f"{path}: unsupported format {doc['format']!r}, want {TRACE_FORMAT!r}")
    if not doc["clients"]:
        raise TraceError(f"{path}: no clients")
    profiles: dict[str, LinkProfile] = {}
    for cid, entry in doc["clients"].items():
        try:
            profiles[cid] = _profile(entry)
        except ValueError as exc:  # TraceError, or LinkProfile's own checks
            raise TraceError(f"{path}: client {cid!r}: {exc}") from exc
    return profiles


def _profile(entry: object) -> LinkProfile:
    if not isinstance(entry, dict):
        raise TraceError("entry must be an object")
    unknown = sorted(set(entry) - _KNOWN)
    if unknown:
        raise TraceError(f"unknown fields {unknown}")
    up = _one_of(entry, "uplink_kbps", "communication")
    if up is None:
        raise TraceError('needs "uplink_kbps" (or FedScale\'s "communication")')
    down = entry.get("downlink_kbps")
    return LinkProfile(
        uplink_bps=_number(up, "uplink_kbps") * _KBPS,
        downlink_bps=None if down is None else _number(down, "downlink_kbps") * _KBPS,
        windows=_windows(entry),
        period_s=_optional_number(_one_of(entry, "period_s", "finish_time"), "period_s"),
    )


def _one_of(entry: dict[str, object], ours: str, fedscale: str) -> object:
    if ours in entry and fedscale in entry:
        raise TraceError(f'give "{ours}" or "{fedscale}", not both')
    return entry.get(ours, entry.get(fedscale))


def _number(value: object, name: str) -> float:
    # bool is an int to Python but never a rate or a time in a trace.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TraceError(f"{name} must be finite, got {value!r}")
    return float(value)


def _optional_number(value: object, name: str) -> float | None:
    return None if value is None else _number(value, name)


def _windows(entry: dict[str, object]) -> tuple[Window, ...]:
    """Our ``active: [[start, end], ...]`` or FedScale's parallel ``active``/``inactive`` lists."""
    active = entry.get("active", [])
    inactive = entry.get("inactive")
    if not isinstance(active, list):
        raise TraceError("active must be a list")
    if inactive is not None:
        if not isinstance(inactive, list) or len(inactive) != len(active):
            raise TraceError("inactive must be a list as long as active")
        pairs: list[object] = [[a, b] for a, b in zip(active, inactive, strict=True)]
    else:
        pairs = active
    windows = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise TraceError(f"each active window must be [start_s, end_s], got {pair!r}")
        windows.append((_number(pair[0], "window start"), _number(pair[1], "window end")))
    return tuple(sorted(windows))
