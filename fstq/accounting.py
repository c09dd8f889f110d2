"""Exact byte accounting of one encoded update (every byte of the payload is in one part)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ByteReport", "PartCounter"]


@dataclass(frozen=True)
class ByteReport:
    """Where the bytes of one payload went.

    ``header + indices + tags + values + scales == total == len(payload)``. ``header`` holds the
    framing (magic, version, method, tensor table, per-tensor section headers, CRC32 trailer).
    ``dense_fp16``/``dense_fp32`` are the value bytes a dense upload would take (2/4 per
    coordinate, no framing), the reference the ratios are taken against.
    """

    total: int
    header: int
    indices: int
    tags: int
    values: int
    scales: int
    dense_fp16: int
    dense_fp32: int
    n_coords: int
    n_sent: int
    bits_histogram: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = self.header + self.indices + self.tags + self.values + self.scales
        if parts != self.total:
            raise AssertionError(f"byte parts sum to {parts}, total is {self.total}")

    def ratio_vs_fp16(self) -> float:
        """Dense fp16 bytes over payload bytes (higher is better)."""
        return self.dense_fp16 / self.total if self.total else float("inf")

    def ratio_vs_fp32(self) -> float:
        """Dense fp32 bytes over payload bytes (higher is better)."""
        return self.dense_fp32 / self.total if self.total else float("inf")

    def bits_per_coord(self) -> float:
        """Payload bits per coordinate of the update (all side information included)."""
        return 8 * self.total / self.n_coords if self.n_coords else 0.0


@dataclass
class PartCounter:
    """Mutable tally used while encoding; :meth:`report` freezes it."""

    header: int = 0
    indices: int = 0
    tags: int = 0
    values: int = 0
    scales: int = 0
    n_coords: int = 0
    n_sent: int = 0
    bits: Counter[int] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.header + self.indices + self.tags + self.values + self.scales

    def report(self) -> ByteReport:
        return ByteReport(
            total=self.total,
            header=self.header,
            indices=self.indices,
            tags=self.tags,
            values=self.values,
            scales=self.scales,
            dense_fp16=2 * self.n_coords,
            dense_fp32=4 * self.n_coords,
            n_coords=self.n_coords,
            n_sent=self.n_sent,
            bits_histogram=dict(sorted(self.bits.items())),
        )
