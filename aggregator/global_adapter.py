"""The current global adapter in its three forms: fp32 master, peft directory, fp16 downlink.

* The **master** copy (fp32 tensors keyed like ``peft.get_peft_model_state_dict``) is what FedAvg
  updates: averaging into fp16 would lose the small steps of late rounds.
* The **peft directory** ``<state>/global/v%05d`` (stock layout, fp32) is the durable record and
  what anyone loads with ``PeftModel.from_pretrained(base, dir)``.
* The **downlink** is the master cast to fp16 as safetensors bytes (decision 13: half the bytes
  on the slow direction of most links), split into ``GlobalChunk``s once per version and kept in
  memory to answer fetch requests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.chunking import global_messages
from broker.messages import GlobalChunk, GlobalManifest
from workload.adapters import adapter_to_bytes, load_peft_dir, save_peft_dir
from workload.models import LoraSpec

__all__ = ["DOWNLINK_FORMAT", "GlobalAdapter", "LoraMismatchError"]

DOWNLINK_FORMAT = "safetensors-fp16"


class LoraMismatchError(ValueError):
    """The stored global adapter was made with another LoRA configuration than the settings."""


@dataclass(frozen=True)
class GlobalAdapter:
    """One version of the global adapter; immutable (a new version is a new object)."""

    version: int
    round_id: int
    master: dict[str, torch.Tensor]
    manifest: GlobalManifest
    chunks: tuple[GlobalChunk, ...]

    @classmethod
    def build(
        cls,
        version: int,
        round_id: int,
        master: Mapping[str, torch.Tensor],
        *,
        spec: LoraSpec,
        base_model: str,
        chunk_size: int,
    ) -> GlobalAdapter:
        """Wrap fp32 ``master`` tensors and derive the fp16 downlink manifest and chunks."""
        fp32 = {name: t.detach().to(torch.float32) for name, t in master.items()}
        payload = adapter_to_bytes(fp32, dtype=torch.float16)
        manifest, chunks = global_messages(
            payload,
            version=version,
            round_id=round_id,
            format=DOWNLINK_FORMAT,
            chunk_size=chunk_size,
            metadata=spec.to_metadata(base_model),
        )
        return cls(version, round_id, fp32, manifest, chunks)

    @property
    def sha256_hex(self) -> str:
        """SHA-256 of the downlink bytes (what devices verify and the store records)."""
        return self.manifest.sha256.hex()

    @property
    def downlink_size(self) -> int:
        return self.manifest.total_size

    def save(self, directory: Path, spec: LoraSpec, base_model: str) -> None:
        """Write the stock peft directory (atomically; an existing one is replaced)."""
        save_peft_dir(
            directory,
            self.master,
            spec,
            base_model,
            metadata={"fedfstq_version": str(self.version), "fedfstq_round": str(self.round_id)},
        )

    @classmethod
    def load(
        cls,
        directory: Path,
        version: int,
        round_id: int,
        *,
        spec: LoraSpec,
        base_model: str,
        chunk_size: int,
    ) -> GlobalAdapter:
        """Read a stored version back; refuse one made with another LoRA configuration."""
        check_lora_config(directory, spec)
        master = load_peft_dir(directory)
        return cls.build(
            version, round_id, master, spec=spec, base_model=base_model, chunk_size=chunk_size
        )


def check_lora_config(directory: Path, spec: LoraSpec) -> None:
    """Compare a peft directory's adapter_config.json with ``spec`` (r, alpha, targets)."""
    try:
        cfg = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoraMismatchError(f"cannot read {directory}/adapter_config.json: {exc}") from None
    stored = (cfg.get("r"), cfg.get("lora_alpha"), sorted(cfg.get("target_modules") or []))
    wanted = (spec.r, spec.alpha, sorted(spec.target_modules))
    if stored != wanted:
        raise LoraMismatchError(
            f"global adapter in {directory} has (r, alpha, targets) = {stored}, settings say "
            f"{wanted}; use a fresh state_dir or the original LoRA settings"
        )
