"""Held-out quality: answer-token loss and accuracy, greedy batched generation, ROUGE-L."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workload.batches import IGNORE, Example, collate, encode_prompt

__all__ = ["Quality", "answer_metrics", "generate_answers", "generate_tokens", "rouge_l"]


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


def _as_ids(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("cannot generate from an empty prompt")
    return ids


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_at_eos: bool = True,
    logits_processor: Sequence[Any] = (),
) -> list[list[int]]:
    """Greedy continuations, batched: the new token ids of each prompt, cut before the first EOS.

    A prompt is a question (chat-formatted with :func:`workload.batches.encode_prompt`) or
    already-tokenised ids used as they are (e.g. a prompt reduced by ``fstq.inference``). Batches
    are left-padded with an attention mask, so every row continues right after its last token.
    The generation settings are explicit (not the model's ``generation_config``), so the result
    depends only on the model, the prompts and ``batch_size``.

    ``stop_at_eos=False`` generates exactly ``max_new_tokens`` for every row (the answers are
    still cut at the first EOS, so they do not change): the same decode work whatever the
    answers, for timing. ``logits_processor`` adds ``transformers`` logits processors (called
    once per generated token, e.g. a step clock).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}"
        )
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        # An empty list, not None: None would fall back to the model's own EOS.
        eos_token_id=eos if stop_at_eos else [],
        pad_token_id=pad,
    )
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [_as_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = collate([Example(r, [IGNORE] * len(r)) for r in rows], pad, left_pad=True)
            ids = batch["input_ids"]
            generated = model.generate(
                input_ids=ids,
                attention_mask=batch["attention_mask"],
                generation_config=config,
                logits_processor=LogitsProcessorList(logits_processor),
            )
            for row in generated[:, ids.shape[1] :].tolist():
                out.append(row[: row.index(eos)] if eos in row else row)
    finally:
        model.train(was_training)
    return out


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers (decoded :func:`generate_tokens`, special tokens skipped, stripped)."""
    tokens = generate_tokens(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
