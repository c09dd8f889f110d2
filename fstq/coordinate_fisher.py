"""Coordinate Fisher (paper §2.2, decision 5): an EMA of squared adapter gradients.

``F <- rho * F + (1 - rho) * grad^2`` after every local step, with the gradient of the loss that
step actually used (full loss on refresh steps, token-masked loss otherwise), started from zero at
the beginning of each round (paper Algorithm 1). The codec then weights coordinates by
``u_j = F_j * delta_j^2``.

No bias correction is applied: the zero start scales every coordinate by the same
``1 - rho^steps``, which changes neither percentile bands nor the budgeted allocation order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fstq.errors import ConfigError, FstqError

__all__ = ["CoordinateFisher"]


class CoordinateFisher:
    """Per-coordinate EMA of squared gradients for a fixed set of named parameters.

    Parameters
    ----------
    params
        Name -> parameter (typically :func:`fstq.adapter_state.adapter_parameters`); the names
        become the keys of :meth:`values`.
    rho
        EMA decay (paper: 0.9).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], rho: float = 0.9) -> None:
        if not 0.0 <= rho < 1.0:
            raise ConfigError(f"rho must be in [0, 1), got {rho}")
        self.rho = float(rho)
        self._params = dict(params)
        self._ema = {
            key: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for key, p in self._params.items()
        }
        self.steps = 0

    def reset(self) -> None:
        """Start a new round: every coordinate back to zero."""
        for ema in self._ema.values():
            ema.zero_()
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """One EMA step from the parameters' current ``.grad`` (``None`` = zero gradient)."""
        self.accumulate_grads({key: p.grad for key, p in self._params.items()})

    @torch.no_grad()
    def accumulate_grads(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """One EMA step from explicit gradients keyed like the parameters (missing = zero)."""
        unknown = set(grads) - set(self._ema)
        if unknown:
            raise FstqError(f"gradients for unknown parameters: {sorted(unknown)[:3]}")
        for key, ema in self._ema.items():
            ema.mul_(self.rho)
            grad = grads.get(key)
            if grad is not None:
                ema.add_(
                    grad.detach().to(device=ema.device, dtype=torch.float32).square(),
                    alpha=1.0 - self.rho,
                )
        self.steps += 1

    def values(self) -> dict[str, torch.Tensor]:
        """The Fisher estimate: float32 CPU copies keyed like ``params``."""
        return {key: ema.detach().to("cpu").clone() for key, ema in self._ema.items()}
