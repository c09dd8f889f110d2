"""Reading and writing a peft adapter as named tensors, only through peft's own state-dict API.

Keys are exactly those of ``peft.get_peft_model_state_dict`` (no adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so what fstq produces loads
with stock peft. Parameters are matched to keys by storage identity, never by string mangling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fstq.errors import FstqError

__all__ = ["adapter_name_of", "adapter_parameters", "get_adapter_state", "set_adapter_state"]


def adapter_name_of(model: Any, adapter_name: str | None = None) -> str:
    """``adapter_name`` if given, else the model's active adapter."""
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapter", None)
    if not isinstance(active, str):
        raise FstqError(
            f"cannot tell which adapter to use (active_adapter={active!r}); pass adapter_name"
        )
    return active


def get_adapter_state(model: Any, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed like ``get_peft_model_state_dict``: detached, cloned copies."""
    name = adapter_name_of(model, adapter_name)
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {key: value.detach().clone() for key, value in state.items()}


def set_adapter_state(
    model: Any, state: Mapping[str, torch.Tensor], adapter_name: str | None = None
) -> None:
    """Load ``state`` (keys of ``get_peft_model_state_dict``) into the adapter via peft.

    The key set must match the adapter's exactly: a partial or foreign state is an error rather
    than a silent partial load. ``state`` is not modified (values are copied into the model).
    """
    name = adapter_name_of(model, adapter_name)
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FstqError(
            f"adapter state does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    try:
        result = set_peft_model_state_dict(model, dict(state), adapter_name=name)
    except RuntimeError as exc:  # shape mismatch from load_state_dict
        raise FstqError(f"cannot load adapter state: {exc}") from exc
    unplaced = sorted(getattr(result, "unexpected_keys", ()))
    if unplaced:
        raise FstqError(f"peft did not place keys {unplaced[:3]}")


def adapter_parameters(
    model: Any, adapter_name: str | None = None
) -> dict[str, torch.nn.Parameter]:
    """Map each ``get_peft_model_state_dict`` key to the model parameter holding it.

    peft's state dict holds detached views of the parameters, so the match is on storage identity
    (data pointer, shape, strides), which survives any renaming peft does (``.default.`` etc.).
    """
    name = adapter_name_of(model, adapter_name)
    by_storage = {(p.data_ptr(), tuple(p.shape), p.stride()): p for p in model.parameters()}
    found: dict[str, torch.nn.Parameter] = {}
    for key, value in get_peft_model_state_dict(model, adapter_name=name).items():
        param = by_storage.get((value.data_ptr(), tuple(value.shape), value.stride()))
        if param is None:
            raise FstqError(
                f"adapter tensor {key!r} is not a parameter of the model (a computed tensor?)"
            )
        found[key] = param
    return found
