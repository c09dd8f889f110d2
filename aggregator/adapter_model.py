"""The base model wrapped with the LoRA adapter, built at most once per process, lazily.

The aggregator needs a model only to create the initial adapter (version 0) and to evaluate new
global adapters on a held-out set; a restart with neither (the common case) never loads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from aggregator.round_result import HeldOutEval
from fstq.training import get_adapter_state, set_adapter_state
from workload.batches import Example, encode_pair
from workload.data import read_jsonl
from workload.evaluation import answer_metrics
from workload.models import LoraSpec, load_base_model, make_peft_model

__all__ = ["AdapterModel", "ModelLoader", "load_eval_examples"]

#: Returns ``(base model, tokenizer)``; injected by tests to share one loaded model.
ModelLoader = Callable[[], tuple[torch.nn.Module, Any]]


def default_loader(source: str, cache_dir: Path | None) -> ModelLoader:
    return lambda: load_base_model(source, cache_dir)


def load_eval_examples(
    tokenizer: Any, path: Path, max_examples: int, max_len: int
) -> list[Example]:
    """The first ``max_examples`` held-out pairs, chat-formatted (answer-only labels)."""
    return [encode_pair(tokenizer, pair, max_len) for pair in read_jsonl(path)[:max_examples]]


class AdapterModel:
    """A peft model around the base, built on first use and reused for every evaluation."""

    def __init__(self, loader: ModelLoader, spec: LoraSpec, seed: int) -> None:
        self._loader = loader
        self._spec = spec
        self._seed = seed
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _ensure(self) -> tuple[Any, Any]:
        if self._model is None:
            base, self._tokenizer = self._loader()
            self._model = make_peft_model(base, self._spec, self._seed)
        return self._model, self._tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._ensure()[1]

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The freshly initialised adapter (same seed, same tensors), fp32."""
        model, _ = self._ensure()
        return {k: v.float() for k, v in get_adapter_state(model).items()}

    def evaluate(
        self, state: Mapping[str, torch.Tensor], examples: Sequence[Example], batch_size: int
    ) -> HeldOutEval:
        """Answer-token loss and accuracy of ``state`` (None when there are no answer tokens)."""
        model, tokenizer = self._ensure()
        set_adapter_state(model, state)
        q = answer_metrics(model, examples, tokenizer.pad_token_id, batch_size)
        if q.tokens == 0 or not math.isfinite(q.loss):
            return HeldOutEval(loss=None, accuracy=None, tokens=q.tokens)
        return HeldOutEval(loss=q.loss, accuracy=q.accuracy, tokens=q.tokens)
