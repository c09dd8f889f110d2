"""Conversion between named torch tensors and the flat float32 arrays the codec works on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from fstq.container import DecodeLimits, TensorSpec, specs_of
from fstq.errors import ConfigError

__all__ = ["UpdateArrays", "flat_f32", "prepare_update", "to_tensor"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class UpdateArrays:
    """An update ready to compress: specs and flat float32 arrays, in upload order.

    ``values`` may share memory with the caller's tensors: never write into them.
    """

    specs: list[TensorSpec]
    values: list[F32]
    fisher: list[F32] | None

    @property
    def n_coords(self) -> int:
        return sum(int(v.size) for v in self.values)


def flat_f32(t: torch.Tensor) -> F32:
    """A flat float32 numpy view (or copy) of ``t``; the caller must not write into it."""
    flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    return flat.numpy()


def to_tensor(values: F32, spec: TensorSpec) -> torch.Tensor:
    """The flat float32 ``values`` as a tensor of ``spec``'s shape and dtype (owns its memory)."""
    t = torch.from_numpy(values).reshape(spec.shape)
    return t.to(spec.dtype) if spec.dtype != torch.float32 else t


def _matching(what: str, specs: list[TensorSpec], other: Mapping[str, torch.Tensor]) -> list[F32]:
    names = [s.name for s in specs]
    if set(other) != set(names):
        missing = sorted(set(names) - set(other))[:3]
        extra = sorted(set(other) - set(names))[:3]
        raise ConfigError(f"{what} names differ from the update: missing {missing}, extra {extra}")
    out = []
    for spec in specs:
        t = other[spec.name]
        if tuple(t.shape) != spec.shape or not t.dtype.is_floating_point:
            raise ConfigError(f"{what}[{spec.name!r}] has shape/dtype {tuple(t.shape)}/{t.dtype}")
        out.append(flat_f32(t))
    return out


def _check_finite(what: str, name: str, values: F32) -> None:
    # A finite float32 sum proves every value finite (one fast reduction); an overflowing sum
    # of huge but finite values falls back to the elementwise test.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum()):
            return
    if not np.isfinite(values).all():
        raise ConfigError(f"{what}[{name!r}] holds NaN or Inf (after conversion to float32)")


def prepare_update(
    delta: Mapping[str, torch.Tensor],
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> UpdateArrays:
    """Validate and convert an update; ``values = delta + residual`` when a residual is given."""
    specs = specs_of(dict(delta), DecodeLimits())
    values = [flat_f32(delta[s.name]) for s in specs]
    if residual is not None:
        res = _matching("residual", specs, residual)
        values = [v + r for v, r in zip(values, res, strict=True)]
    for spec, v in zip(specs, values, strict=True):
        _check_finite("delta", spec.name, v)
    fisher_arrays = None
    if fisher is not None:
        fisher_arrays = _matching("fisher", specs, fisher)
        for spec, f in zip(specs, fisher_arrays, strict=True):
            _check_finite("fisher", spec.name, f)
            if f.size and float(f.min()) < 0:
                raise ConfigError(f"fisher[{spec.name!r}] has negative entries")
    return UpdateArrays(specs, values, fisher_arrays)
