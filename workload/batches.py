"""Tokenising Q/A pairs with the chat template, response-only labels, padding into batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workload.data import QAPair

__all__ = ["IGNORE", "Example", "batches", "collate", "encode_pair", "encode_prompt"]

IGNORE = -100  # label value the loss skips (prompt and padding positions)
SYSTEM_PROMPT = "Answer briefly."  # short on purpose: the template's default costs ~20 tokens


@dataclass(frozen=True)
class Example:
    """One tokenised example: labels are IGNORE on the prompt (decision 2: loss on responses)."""

    input_ids: list[int]
    labels: list[int]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt up to the assistant turn (for generation)."""
    text = tokenizer.apply_chat_template(
        _messages(prompt), add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, pair: QAPair, max_len: int) -> Example:
    """Chat-format `pair`; the prompt is cut from the left and the answer from the right to fit."""
    prompt_ids = encode_prompt(tokenizer, pair.prompt)
    answer_text = pair.response + "<|im_end|>"
    answer_ids = list(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
    answer_ids = answer_ids[: max(1, max_len // 2)]
    prompt_ids = prompt_ids[-(max_len - len(answer_ids)) :]
    return Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def collate(
    examples: Sequence[Example], pad_id: int, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest example (right by default; left for batched generation):
    input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, cols] = torch.tensor(e.input_ids)
        labels[row, cols] = torch.tensor(e.labels)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    rng: np.random.Generator,
    steps: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` shuffled minibatches, reshuffling each pass over the data."""
    if not examples:
        return
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(int(i) for i in rng.permutation(len(examples)))
        take, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in take], pad_id)
