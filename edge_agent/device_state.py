"""Device state that outlives a round: token-score table, error-feedback residual, progress.

Written atomically and durably (:mod:`common.atomic`) so a crash mid-write keeps the previous
version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save as np_save
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save as torch_save

from common import atomic

__all__ = ["DeviceState"]


class DeviceState:
    """Files under the agent's state directory (systemd's StateDirectory= on a board)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def outbox_dir(self) -> Path:
        return self.root / "outbox"

    # token scores ---------------------------------------------------------------------------
    def load_token_scores(self) -> dict[str, np.ndarray] | None:
        path = self.root / "token_scores.safetensors"
        if not path.is_file():
            return None
        return dict(np_load_file(str(path)))

    def save_token_scores(self, arrays: Mapping[str, np.ndarray]) -> None:
        path = self.root / "token_scores.safetensors"
        data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        atomic.write_bytes(path, np_save(data))

    # error-feedback residual ----------------------------------------------------------------
    def load_residual(self) -> dict[str, torch.Tensor] | None:
        path = self.root / "residual.safetensors"
        if not path.is_file():
            return None
        return dict(torch_load_file(str(path)))

    def save_residual(self, residual: Mapping[str, torch.Tensor] | None) -> None:
        path = self.root / "residual.safetensors"
        if residual is None:
            path.unlink(missing_ok=True)
            return
        tensors = {k: v.detach().contiguous() for k, v in residual.items()}
        atomic.write_bytes(path, torch_save(tensors))

    # global adapter cache -------------------------------------------------------------------
    def load_global(self) -> tuple[dict[str, Any], bytes] | None:
        """The cached global adapter `(meta, payload)`, or None if absent or not matching meta."""
        try:
            meta = json.loads((self.root / "global.json").read_text())
            payload = (self.root / "global.safetensors").read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(payload).hexdigest():
            return None
        return meta, payload

    def save_global(self, meta: Mapping[str, Any], payload: bytes) -> None:
        """Cache the current global adapter; `meta["sha256"]` (hex) is checked on load."""
        atomic.write_bytes(self.root / "global.safetensors", payload)
        atomic.write_text(self.root / "global.json", json.dumps(dict(meta)))

    # progress -------------------------------------------------------------------------------
    def load_progress(self) -> dict[str, Any]:
        path = self.root / "progress.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_progress(self, progress: Mapping[str, Any]) -> None:
        atomic.write_text(self.root / "progress.json", json.dumps(dict(progress)))
