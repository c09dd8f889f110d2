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
from fstq.adapter_state import adapter_parameters
from fstq.training import get_adapter_state, set_adapter_state
from workload.batches import IGNORE, Example, collate, encode_pair
from workload.data import read_jsonl
from workload.evaluation import answer_metrics
from workload.models import LoraSpec, load_base_model, make_peft_model

__all__ = ["FISHER_BATCH", "AdapterModel", "ModelLoader", "load_eval_examples"]

#: Held-out examples per backward pass of the downlink Fisher: the Fisher is the mean of the
#: squared gradients of these mini-batches' losses (more, smaller batches: a better diagonal).
FISHER_BATCH = 4

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

    def fisher(
        self, state: Mapping[str, torch.Tensor], examples: Sequence[Example]
    ) -> dict[str, torch.Tensor]:
        """Coordinate Fisher of the held-out answer-token loss at ``state``: the mean over
        mini-batches of ``FISHER_BATCH`` examples of each adapter coordinate's squared gradient
        (fp32, keyed like the adapter). Steers the catch-up downlink's bit allocation."""
        model, tokenizer = self._ensure()
        set_adapter_state(model, state)
        params = adapter_parameters(model)
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        was_training, batches = model.training, 0
        model.train(False)
        try:
            for start in range(0, len(examples), FISHER_BATCH):
                batch = collate(examples[start : start + FISHER_BATCH], tokenizer.pad_token_id)
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                targets = batch["labels"][:, 1:]
                if not bool((targets != IGNORE).any()):
                    continue
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                )
                grads = torch.autograd.grad(loss, list(params.values()))
                for name, g in zip(params, grads, strict=True):
                    total[name] += g.detach().float().square()
                batches += 1
        finally:
            model.train(was_training)
        return {name: t / max(batches, 1) for name, t in total.items()}
