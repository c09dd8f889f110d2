from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from workload.batches import IGNORE, batches, collate, encode_pair
from workload.data import QAPair
from workload.evaluation import answer_metrics, rouge_l


def test_labels_cover_exactly_the_response(tokenizer: Any) -> None:
    ex = encode_pair(tokenizer, QAPair("Who was the 37th President?", "Richard Nixon"), max_len=96)
    answer = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(answer) == "Richard Nixon<|im_end|>"
    prompt = tokenizer.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE]
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "37th President" in prompt


def test_long_examples_are_cut_to_max_len(tokenizer: Any) -> None:
    ex = encode_pair(tokenizer, QAPair("word " * 200, "answer " * 200), max_len=32)
    assert len(ex.input_ids) == 32
    assert sum(label != IGNORE for label in ex.labels) == 16


def test_collate_pads_right_and_masks_padding(tokenizer: Any) -> None:
    exs = [
        encode_pair(tokenizer, QAPair(q, a), 64)
        for q, a in [("hi", "hello"), ("a longer one?", "yes it is")]
    ]
    b = collate(exs, pad_id=tokenizer.pad_token_id)
    short = 0 if len(exs[0].input_ids) < len(exs[1].input_ids) else 1
    n = len(exs[short].input_ids)
    assert b["attention_mask"][short, n:].sum() == 0
    assert (b["labels"][short, n:] == IGNORE).all()
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape


def test_batches_yield_requested_steps_even_with_tiny_data(tokenizer: Any) -> None:
    exs = [encode_pair(tokenizer, QAPair(f"q{i}", "a"), 32) for i in range(3)]
    out = list(batches(exs, batch_size=4, pad_id=0, rng=np.random.default_rng(0), steps=5))
    assert len(out) == 5 and all(b["input_ids"].shape[0] == 4 for b in out)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("", "x", 0.0),
        ("a b c d", "a x c y", 0.5),  # LCS "a c": P = R = 2/4
        ("richard nixon", "Richard Nixon was president", 2 * (1.0 * 0.5) / 1.5),
    ],
)
def test_rouge_l_against_hand_values(pred: str, ref: str, expected: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(expected)


class _Oracle(torch.nn.Module):
    """Predicts the next token exactly (logit 0 vs -inf), so loss is 0 and accuracy 1."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        logits.scatter_(2, nxt.unsqueeze(-1), 0.0)
        return type("Out", (), {"logits": logits})()


def test_answer_metrics_counts_only_answer_tokens(tokenizer: Any) -> None:
    exs = [encode_pair(tokenizer, QAPair("q", "some answer"), 32) for _ in range(3)]
    q = answer_metrics(_Oracle(len(tokenizer)), exs, pad_id=tokenizer.pad_token_id)
    assert q.accuracy == 1.0 and q.loss == pytest.approx(0.0, abs=1e-3)
    assert q.tokens == 3 * sum(label != IGNORE for label in exs[0].labels)
