"""Held-out quality: answer-token loss and accuracy, and ROUGE-L for generated answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workload.batches import IGNORE, Example, collate

__all__ = ["Quality", "answer_metrics", "rouge_l"]


@dataclass(frozen=True)
class Quality:
    """Token-weighted mean cross-entropy and next-token accuracy over answer tokens."""

    loss: float
    accuracy: float
    tokens: int


@torch.no_grad()
def answer_metrics(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16
) -> Quality:
    """Evaluate on answer tokens only (labels != IGNORE), token-weighted over the whole set."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        pred = logits[:, :-1]
        valid = targets != IGNORE
        ce = torch.nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total_loss += float(ce)
        correct += int(((pred.argmax(-1) == targets) & valid).sum())
        count += int(valid.sum())
    model.train(was_training)
    if count == 0:
        return Quality(float("nan"), float("nan"), 0)
    return Quality(total_loss / count, correct / count, count)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (characters for scripts without spaces)."""

    def tokens(s: str) -> list[str]:
        words = s.lower().split()
        return list(s.replace(" ", "")) if len(words) <= 1 and len(s) > 12 else words

    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)
