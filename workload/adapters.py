"""Adapter tensors as bytes and as stock peft directories.

The global adapter travels as safetensors bytes (fp16 on the downlink, decision 13) and is kept on
disk in peft's own layout (`adapter_model.safetensors` + `adapter_config.json`) so that
`PeftModel.from_pretrained(base, directory)` loads it without this project.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common import atomic
from workload.models import LoraSpec

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFormatError",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "load_peft_dir",
    "save_peft_dir",
    "sha256_hex",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME


class AdapterFormatError(ValueError):
    """Bytes or a directory do not hold a readable adapter."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_to_bytes(
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise named tensors (optionally cast) as safetensors bytes; deterministic."""
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None else t.detach()).contiguous().clone()
        for name, t in state.items()
    }
    meta = {"format": "pt", **(metadata or {})}
    return bytes(st_save(tensors, metadata=meta))


def adapter_from_bytes(data: bytes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; any malformation is an AdapterFormatError."""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterFormatError(f"not a safetensors adapter: {exc}") from None
    return {name: t.to(dtype) for name, t in tensors.items()}


def save_peft_dir(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    spec: LoraSpec,
    base_model: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a stock peft adapter directory atomically and durably.

    :func:`common.atomic.replace_dir`: a reader never sees half a directory, and once this
    returns (before the aggregator's store records the version) the files survive a power cut.
    """
    from peft import LoraConfig

    with atomic.replace_dir(directory) as tmp:
        LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        ).save_pretrained(str(tmp))
        (tmp / ADAPTER_WEIGHTS).write_bytes(adapter_to_bytes(state, metadata=metadata))


def load_peft_dir(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a peft directory (float32)."""
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterFormatError(f"{path} does not exist")
    return adapter_from_bytes(path.read_bytes())
