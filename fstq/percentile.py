"""The paper's percentile bands (section 2.3), the alternative to the budget rule.

Global bands on the importance ``u = w * x**2`` over every coordinate of the update, with exact
order statistics (numpy's ``method="lower"``): below ``P_low`` pruned, then INT2, INT4 and fp16
from ``P_low``, ``P_mid`` and ``P_high``; ``u = 0`` is never sent. The size follows from the
bands: a budget is only checked (``FstqConfig(allocation="percentile")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fstq.ladder import HIST_BINS, KEY_SHIFT
from fstq.sparse_plan import Coding, PayloadPlan, make_plans

__all__ = ["percentile_levels", "percentile_plans"]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def percentile_plans(
    xs: Sequence[F32],
    weights: Sequence[F32 | None],
    percentiles: tuple[float, float, float],
    coding: Coding,
) -> PayloadPlan:
    """Section plans of the paper's bands on ``u = w * x**2`` (see :func:`percentile_levels`);
    INT scales are the absmax of each band's coordinates."""
    importance = [
        np.square(x) if w is None else np.square(x) * w for x, w in zip(xs, weights, strict=True)
    ]
    levels = percentile_levels(importance, percentiles)
    return make_plans(levels, coding, tagged=True, xs=list(xs))


def percentile_levels(
    importance: Sequence[F32], percentiles: tuple[float, float, float]
) -> list[U8]:
    """Levels 1/2/3 (INT2/INT4/fp16) for ``u >= P_low/P_mid/P_high``; ``u = 0`` is never sent."""
    n = sum(int(u.size) for u in importance)
    if n == 0:
        return [np.zeros(0, dtype=np.uint8) for _ in importance]
    ranks = [int(np.floor(p / 100.0 * (n - 1))) for p in percentiles]
    cuts = _order_statistics(importance, ranks)
    out = []
    for u in importance:
        positive = u > 0
        levels = (positive & (u >= cuts[0])).view(np.uint8)
        levels += positive & (u >= cuts[1])
        levels += positive & (u >= cuts[2])
        out.append(levels)
    return out


def _keys(u: F32) -> npt.NDArray[np.int32]:
    keys = u.view(np.int32).copy()
    np.maximum(keys, 0, out=keys)  # -0.0 sorts as +0
    return keys


def _order_statistics(arrays: Sequence[F32], ranks: Sequence[int]) -> list[np.float32]:
    """Exact k-th smallest values over several arrays (two-level histogram, then partition)."""
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for u in arrays:
        hist += np.bincount(_keys(u) >> KEY_SHIFT, minlength=HIST_BINS)
    below = np.cumsum(hist) - hist
    found = []
    for rank in ranks:
        b = int(np.searchsorted(below, rank, side="right")) - 1
        members = np.concatenate([k[(k >> KEY_SHIFT) == b] for k in map(_keys, arrays)])
        kth = rank - int(below[b])
        found.append(np.int32(np.partition(members, kth)[kth]).view(np.float32))
    return found
