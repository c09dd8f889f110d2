"""FstqConfig: the algorithm settings that change results (they travel in the upload manifest)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fstq.errors import ConfigError

__all__ = ["Allocation", "FstqConfig", "Rounding"]

Allocation = Literal["budget", "percentile"]
Rounding = Literal["nearest", "stochastic"]


@dataclass(frozen=True)
class FstqConfig:
    """Fed-FSTQ settings; defaults follow the paper where it gives a value, else decisions.md."""

    rho: float = 0.9  # EMA decay of token scores and coordinate Fisher (paper)
    refresh_every: int = 10  # H: full-loss refresh of scores and mask every H steps (paper)
    token_keep_ratio: float = 0.5  # r_tok: share of targets kept on masked steps (paper: unset)
    allocation: Allocation = "budget"  # decision 6: marginal gain; "percentile" = paper bands
    # Percentile bands on u (paper: values unset): below p_low pruned, [p_low,p_mid) INT2,
    # [p_mid,p_high) INT4, >= p_high fp16.
    percentiles: tuple[float, float, float] = (70.0, 90.0, 98.0)
    rounding: Rounding = "nearest"  # decision 7; "stochastic" = unbiased stochastic rounding
    error_feedback: bool = False  # decision 8: off by default (not in the paper)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho < 1.0:
            raise ConfigError(f"rho must be in [0, 1), got {self.rho}")
        if self.refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if not 0.0 < self.token_keep_ratio <= 1.0 or math.isnan(self.token_keep_ratio):
            raise ConfigError(f"token_keep_ratio must be in (0, 1], got {self.token_keep_ratio}")
        if self.allocation not in ("budget", "percentile"):
            raise ConfigError(f"allocation must be budget or percentile, got {self.allocation!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        lo, mid, hi = self.percentiles
        if not 0.0 <= lo <= mid <= hi <= 100.0:
            raise ConfigError(f"need 0 <= low <= mid <= high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for manifests and logs)."""
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FstqConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError (settings change results)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown FstqConfig keys: {sorted(unknown)}")
        kw = dict(data)
        if "percentiles" in kw:
            p = tuple(float(x) for x in kw["percentiles"])
            if len(p) != 3:
                raise ConfigError("percentiles must have three values")
            kw["percentiles"] = p
        return cls(**kw)
