"""Streaming FedAvg (decision 11): each accepted update is folded into a running weighted sum.

Memory stays O(adapter size) however many clients arrive. Accumulation is float64 so the
streaming result equals the batch weighted mean to float32 precision in any arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["CheckedUpdate", "RejectedUpdate", "StreamingFedAvg", "apply_delta", "fedavg"]


class RejectedUpdate(ValueError):
    """A decoded client update cannot be aggregated; `reason` is a short metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CheckedUpdate:
    """A client delta that passed :meth:`StreamingFedAvg.check`, and its global L2 norm."""

    delta: Mapping[str, torch.Tensor]
    norm: float


class StreamingFedAvg:
    """Weighted mean of client deltas, computed incrementally.

    Parameters
    ----------
    template:
        Tensors naming every adapter tensor with its shape (the current global adapter).
    clip_norm:
        If set, each update is scaled down to at most this global L2 norm before it is added
        (norm bounding against poisoned or broken updates); None disables it.
    """

    def __init__(
        self, template: Mapping[str, torch.Tensor], clip_norm: float | None = None
    ) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self._shapes = {name: tuple(t.shape) for name, t in template.items()}
        self._sum = {
            name: torch.zeros(shape, dtype=torch.float64) for name, shape in self._shapes.items()
        }
        self._clip_norm = clip_norm
        self.total_weight = 0.0
        self.count = 0
        self.clipped = 0

    def check(self, delta: Mapping[str, torch.Tensor]) -> CheckedUpdate:
        """Validate names, shapes and finiteness, and measure the update's L2 norm.

        One float64 pass per tensor: a sum of squares of float32/float16 values is finite
        exactly when every value is, so the finiteness test runs only to word a failure.
        """
        missing = self._shapes.keys() - delta.keys()
        extra = delta.keys() - self._shapes.keys()
        if missing or extra:
            raise RejectedUpdate(
                "tensor_names", f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        sq = 0.0
        for name, shape in self._shapes.items():
            t = delta[name]
            if tuple(t.shape) != shape:
                raise RejectedUpdate("shape_mismatch", f"{name}: {tuple(t.shape)} != {shape}")
            part = float(t.double().square().sum())
            if not math.isfinite(part) and not bool(torch.isfinite(t).all()):
                raise RejectedUpdate("non_finite", f"{name} has NaN or Inf")
            sq += part
        norm = math.sqrt(sq)
        if not math.isfinite(norm):
            raise RejectedUpdate("non_finite", "update norm overflows")
        return CheckedUpdate(delta, norm)

    def add(self, update: Mapping[str, torch.Tensor] | CheckedUpdate, weight: float) -> None:
        """Fold one client's delta in with FedAvg weight `weight` (its sample count).

        A raw delta is checked first; a :class:`CheckedUpdate` from :meth:`check` is not
        checked again.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise RejectedUpdate("bad_weight", f"weight must be positive and finite, got {weight}")
        checked = update if isinstance(update, CheckedUpdate) else self.check(update)
        scale = 1.0
        if self._clip_norm is not None and checked.norm > self._clip_norm:
            scale = self._clip_norm / checked.norm
            self.clipped += 1
        for name, acc in self._sum.items():
            acc.add_(checked.delta[name].double(), alpha=weight * scale)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean delta (float32); zeros when nothing was added."""
        if self.count == 0:
            return {name: torch.zeros(shape) for name, shape in self._shapes.items()}
        return {name: (acc / self.total_weight).float() for name, acc in self._sum.items()}


def fedavg(
    deltas: list[Mapping[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Batch FedAvg, sum_k w_k * delta_k / sum_k w_k: the reference for the streaming form."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("need one weight per delta and at least one delta")
    total = sum(weights)
    out: dict[str, torch.Tensor] = {}
    for name in deltas[0]:
        acc = torch.zeros(deltas[0][name].shape, dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            acc += w * d[name].double()
        out[name] = (acc / total).float()
    return out


def apply_delta(
    global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New global adapter = old + mean delta (server step 1, plain FedAvg), dtypes preserved."""
    return {
        name: (t.double() + delta[name].double()).to(t.dtype) for name, t in global_state.items()
    }
