"""The current global adapter in its three forms: fp32 master, peft directory, fp16 downlink.

* The **master** copy (fp32 tensors keyed like ``peft.get_peft_model_state_dict``) is what FedAvg
  updates: averaging into fp16 would lose the small steps of late rounds.
* The **peft directory** ``<state>/global/v%05d`` (stock layout, fp32) is the durable record and
  what anyone loads with ``PeftModel.from_pretrained(base, dir)``.
* The **full downlink payload** ``full(v)`` is the master cast to fp16 as safetensors bytes
  (:func:`workload.catchup.canonical_bytes`); its SHA-256 is the manifest's ``sha256``, the id
  every device's held state is compared with. How a device gets it (nothing, a catch-up, the
  full payload) is :mod:`aggregator.downlink`'s business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.chunking import global_manifest
from broker.messages import GlobalManifest
from workload.adapters import load_peft_dir, save_peft_dir
from workload.catchup import canonical_bytes
from workload.models import LoraSpec

__all__ = ["DOWNLINK_FORMAT", "GlobalAdapter", "InitialAdapter", "LoraMismatchError"]

DOWNLINK_FORMAT = "safetensors-fp16"


class LoraMismatchError(ValueError):
    """The stored global adapter was made with another LoRA configuration than the settings."""


@dataclass(frozen=True)
class InitialAdapter:
    """What the manifest tells devices about v0 so they derive it (``downlink.derive_v0``): the
    LoRA init seed and the SHA-256 of ``full(0)``."""

    seed: int
    sha256_hex: str

    def metadata(self) -> dict[str, str | bool | int | float]:
        return {"init_seed": self.seed, "v0_sha256": self.sha256_hex}


@dataclass(frozen=True)
class GlobalAdapter:
    """One version of the global adapter; immutable (a new version is a new object)."""

    version: int
    round_id: int
    master: dict[str, torch.Tensor]
    manifest: GlobalManifest
    payload: bytes  # full(v): the canonical fp16 bytes

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
        initial: InitialAdapter | None = None,
    ) -> GlobalAdapter:
        """Wrap fp32 ``master`` tensors and derive the fp16 downlink payload and manifest.

        ``initial`` (announced in the manifest's metadata) lets devices derive v0 themselves.
        """
        fp32 = {name: t.detach().to(torch.float32) for name, t in master.items()}
        payload = canonical_bytes(fp32)
        metadata = spec.to_metadata(base_model)
        if initial is not None:
            metadata |= initial.metadata()
        manifest = global_manifest(
            payload,
            version=version,
            round_id=round_id,
            format=DOWNLINK_FORMAT,
            chunk_size=chunk_size,
            metadata=metadata,
        )
        return cls(version, round_id, fp32, manifest, payload)

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
        initial: InitialAdapter | None = None,
    ) -> GlobalAdapter:
        """Read a stored version back; refuse one made with another LoRA configuration."""
        check_lora_config(directory, spec)
        master = load_peft_dir(directory)
        return cls.build(
            version, round_id, master, spec=spec, base_model=base_model, chunk_size=chunk_size,
            initial=initial,
        )  # fmt: skip


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
