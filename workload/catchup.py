"""Adapter states on the downlink: their canonical bytes, their id, and applying a catch-up.

Both services import this module so that the aggregator computes exactly the state a device will
hold after a catch-up (decision 13, docs/architecture.md "The downlink"):

* the **canonical bytes** of an adapter state are its fp16 safetensors bytes
  (:func:`canonical_bytes`, deterministic); their SHA-256 is the state's **id**
  (:func:`state_id`). The canonical bytes of the fp32 master of version v are ``full(v)``, whose
  id is the global manifest's ``sha256``;
* :func:`apply_update` is ``fp16(fp32(held) + update)``, elementwise and tensor by tensor, with
  keys and shapes required to match exactly: no reduction, so any IEEE platform computes the
  same bits, and the device can verify the result against the id the aggregator announced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from workload.adapters import AdapterFormatError, adapter_from_bytes, adapter_to_bytes

__all__ = ["apply_update", "canonical_bytes", "state_from_bytes", "state_id"]


def canonical_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """The state as fp16 safetensors bytes: what ``full(v)`` is and what a device holds."""
    return adapter_to_bytes(state, dtype=torch.float16)


def state_id(data: bytes) -> bytes:
    """The id of a state: the SHA-256 (32 bytes) of its canonical bytes."""
    return hashlib.sha256(data).digest()


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Canonical bytes back to fp16 tensors (AdapterFormatError if they are not an fp16 state)."""
    return adapter_from_bytes(data, dtype=torch.float16)


def apply_update(
    held: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``fp16(fp32(held) + fp32(update))`` per tensor; the new state's tensors (fp16).

    Raises :class:`~workload.adapters.AdapterFormatError` when the names or shapes differ or a
    value leaves the fp16 range: such a result is never a state worth holding.
    """
    if held.keys() != update.keys():
        missing, extra = sorted(held.keys() - update.keys()), sorted(update.keys() - held.keys())
        raise AdapterFormatError(
            f"update does not match the held adapter: missing {missing[:2]}, extra {extra[:2]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, base in held.items():
        delta = update[name]
        if delta.shape != base.shape:
            raise AdapterFormatError(
                f"{name}: update of shape {tuple(delta.shape)}, held {tuple(base.shape)}"
            )
        value = (base.to(torch.float32) + delta.to(torch.float32)).to(torch.float16)
        if not bool(torch.isfinite(value).all()):
            raise AdapterFormatError(f"{name}: the updated values overflow fp16")
        out[name] = value
    return out
