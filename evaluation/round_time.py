"""Simulated round time, the FedScale way (paper §1, "Channel").

A synchronous round lasts as long as its slowest arrived client:
T_round = T_srv + max over arrived k of (down_k / D_k + T_comp,k + up_k / R_k).
Compute time is measured for real on the fleet; the download (whatever the device fetched to
start the round: nothing, a catch-up or the full adapter) is charged at the client's downlink
rate D_k and the upload at its uplink rate R_k, each for the bytes that actually crossed the wire
(payload, framing and re-sent chunks). FedScale charges (upload + download) / one bandwidth; the
two directions are kept apart here because mobile links are asymmetric (evaluation/links.py).
``downlink=False`` gives the uplink-only time that run records before the downlink accounting
hold as ``round_time_s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ClientTiming", "client_time", "download_time", "round_time", "upload_time"]


@dataclass(frozen=True)
class ClientTiming:
    """One arrived client's share of a round."""

    compute_s: float  # local training and compression, measured
    wire_bytes: int  # uplink bytes on the wire for this client's upload
    rate_bps: float  # its uplink rate, bit/s
    downlink_bytes: int = 0  # what it fetched to start the round, on the wire
    downlink_bps: float | None = None  # its downlink rate, bit/s (needed when it fetched bytes)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.compute_s) and self.compute_s >= 0):
            raise ValueError(f"compute_s must be finite and >= 0, got {self.compute_s}")
        if self.wire_bytes < 0 or self.downlink_bytes < 0:
            raise ValueError(
                f"wire_bytes and downlink_bytes must be >= 0, got {self.wire_bytes}, "
                f"{self.downlink_bytes}"
            )
        for name, rate in (("rate_bps", self.rate_bps), ("downlink_bps", self.downlink_bps)):
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be positive and finite, got {rate}")
        if self.downlink_bytes and self.downlink_bps is None:
            raise ValueError("downlink_bps must be given when downlink_bytes > 0")


def upload_time(t: ClientTiming) -> float:
    """Seconds to push ``t.wire_bytes`` through the client's uplink."""
    return t.wire_bytes * 8 / t.rate_bps


def download_time(t: ClientTiming) -> float:
    """Seconds to pull ``t.downlink_bytes`` through the client's downlink (0 when it fetched
    nothing)."""
    if not t.downlink_bytes or t.downlink_bps is None:
        return 0.0
    return t.downlink_bytes * 8 / t.downlink_bps


def client_time(t: ClientTiming, *, downlink: bool = True) -> float:
    """Seconds from the round's start until this client's upload is in (``downlink=False``:
    without its download, as run records before the downlink accounting charged it)."""
    return (download_time(t) if downlink else 0.0) + t.compute_s + upload_time(t)


def round_time(arrived: Sequence[ClientTiming], server_s: float, *, downlink: bool = True) -> float:
    """``server_s`` plus the slowest arrived client's time; just ``server_s`` with no arrivals."""
    if not (math.isfinite(server_s) and server_s >= 0):
        raise ValueError(f"server_s must be finite and >= 0, got {server_s}")
    slowest = max((client_time(t, downlink=downlink) for t in arrived), default=0.0)
    return server_s + slowest
