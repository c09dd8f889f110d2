"""Held-out quality of a global adapter: per group (language or category) and overall.

Answer-token loss and accuracy over every held-out example (token-weighted, so a group's weight
is its answer tokens), and ROUGE-L of greedy generations on a fixed, seeded subset. The same
examples and prompts are used for every round and method of a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aggregator.round_result import HeldOutEval
from evaluation.run_record import FleetEval
from fstq.training import set_adapter_state
from workload.batches import Example, encode_pair
from workload.data import QAPair
from workload.evaluation import answer_metrics, generate_answers, rouge_l

__all__ = ["HeldOut", "evaluate_adapter"]


@dataclass(frozen=True)
class HeldOut:
    """Tokenised held-out examples grouped by label, and the generation subset."""

    groups: dict[str, list[Example]]
    generation: list[QAPair]

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        pairs: Sequence[QAPair],
        *,
        by: str,
        max_len: int,
        generation_examples: int,
        rng: np.random.Generator,
    ) -> HeldOut:
        groups: dict[str, list[Example]] = {}
        for p in pairs:
            groups.setdefault(p.label(by), []).append(encode_pair(tokenizer, p, max_len))
        n = min(generation_examples, len(pairs))
        picks = sorted(int(i) for i in rng.choice(len(pairs), size=n, replace=False))
        return cls(dict(sorted(groups.items())), [pairs[i] for i in picks])


def evaluate_adapter(
    model: Any,
    tokenizer: Any,
    state: Mapping[str, torch.Tensor],
    held_out: HeldOut,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
) -> FleetEval:
    """Loss, accuracy (overall and per group) and ROUGE-L of ``state`` loaded into ``model``."""
    set_adapter_state(model, state)
    pad = int(tokenizer.pad_token_id)
    groups: dict[str, HeldOutEval] = {}
    loss_sum, correct, tokens = 0.0, 0.0, 0
    for name, examples in held_out.groups.items():
        q = answer_metrics(model, examples, pad, batch_size)
        if q.tokens == 0:
            continue
        groups[name] = HeldOutEval(loss=q.loss, accuracy=q.accuracy, tokens=q.tokens)
        loss_sum += q.loss * q.tokens
        correct += q.accuracy * q.tokens
        tokens += q.tokens
    rouge: float | None = None
    gen = held_out.generation
    if gen:
        answers = generate_answers(
            model, tokenizer, [p.prompt for p in gen], max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )  # fmt: skip
        rouge = float(np.mean([rouge_l(a, p.response) for a, p in zip(answers, gen, strict=True)]))
    return FleetEval(
        loss=loss_sum / tokens if tokens else None,
        accuracy=correct / tokens if tokens else None,
        tokens=tokens,
        rouge_l=rouge,
        groups=groups,
    )
