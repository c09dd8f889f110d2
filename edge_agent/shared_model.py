"""One frozen base model shared by several logical devices hosted in one process.

A real device loads its own base model (:class:`~edge_agent.local_model.LocalModel` does). The
evaluation's fleet runner hosts many logical devices in one process, which cannot afford a base
model each: they share this one. Sharing is sound because a device's LoRA weights are not kept
in the model between rounds (every round starts by loading the global adapter), while what is
per device (data, token scores, residual, outbox) stays in each device's own objects. The peft
wrapper is built once (``get_peft_model`` changes the base in place) and every use of the model
holds :attr:`lock`, so one device's round never sees another's weights.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from workload.models import LoraSpec, make_peft_model

__all__ = ["SharedBaseModel"]


class SharedBaseModel:
    """A base model, its tokenizer and (once built) its single peft wrapper."""

    def __init__(self, base: torch.nn.Module, tokenizer: Any) -> None:
        self.base = base
        self.tokenizer = tokenizer
        #: Held for a whole round of training (and by the harness while it evaluates).
        self.lock = threading.RLock()
        self._peft: Any = None
        self._spec: LoraSpec | None = None

    def peft_model(self, spec: LoraSpec, seed: int = 0) -> Any:
        """The peft model for ``spec``; one LoRA configuration per process (ValueError else)."""
        with self.lock:
            if self._peft is None:
                self._peft = make_peft_model(self.base, spec, seed=seed)
                self._spec = spec
            elif spec != self._spec:
                raise ValueError(f"shared model already wraps LoRA {self._spec}, not {spec}")
            return self._peft
