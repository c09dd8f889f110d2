"""Simulated round time, the FedScale way (paper §1, "Channel").

A synchronous round lasts as long as its slowest arrived client:
T_round = T_srv + max over arrived k of (T_comp,k + bits_k / R_k).
Compute time is measured for real on the fleet; the upload is charged at the client's link rate
for the bytes that actually crossed the wire (payload, framing and re-sent chunks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ClientTiming", "client_time", "round_time", "upload_time"]


@dataclass(frozen=True)
class ClientTiming:
    """One arrived client's share of a round."""

    compute_s: float  # local training and compression, measured
    wire_bytes: int  # uplink bytes on the wire for this client's upload
    rate_bps: float  # its uplink rate, bit/s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.compute_s) and self.compute_s >= 0):
            raise ValueError(f"compute_s must be finite and >= 0, got {self.compute_s}")
        if self.wire_bytes < 0:
            raise ValueError(f"wire_bytes must be >= 0, got {self.wire_bytes}")
        if not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ValueError(f"rate_bps must be positive and finite, got {self.rate_bps}")


def upload_time(t: ClientTiming) -> float:
    """Seconds to push ``t.wire_bytes`` through the client's uplink."""
    return t.wire_bytes * 8 / t.rate_bps


def client_time(t: ClientTiming) -> float:
    """Seconds from the round's start until this client's upload is in."""
    return t.compute_s + upload_time(t)


def round_time(arrived: Sequence[ClientTiming], server_s: float) -> float:
    """``server_s`` plus the slowest arrived client's time; just ``server_s`` with no arrivals."""
    if not (math.isfinite(server_s) and server_s >= 0):
        raise ValueError(f"server_s must be finite and >= 0, got {server_s}")
    return server_s + max((client_time(t) for t in arrived), default=0.0)
