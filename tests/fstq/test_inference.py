"""Inference-time token reduction (fstq.inference) on real chat prompts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from factories import chat_batch, chatterbot_pairs, smollm2_tokenizer, tiny_llama

from fstq.errors import ConfigError, FstqError
from fstq.inference import protected_token_ids, reduce_tokens
from fstq.token_scores import TokenScores

VOCAB = 49152


def _scores(seed: int = 0, unseen: tuple[int, ...] = ()) -> TokenScores:
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(VOCAB, generator=gen)
    table[list(unseen)] = math.nan
    return TokenScores.from_numpy(table.numpy())


def _expected_row(
    ids: list[int],
    real: list[bool],
    table: torch.Tensor,
    ratio: float,
    protected: set[int],
    last: int,
) -> list[int]:
    """Reference: protected + last ``last`` real + top ceil(ratio * n) of the rest (ties: later)."""
    positions = [i for i, r in enumerate(real) if r]
    forced = {i for i in positions if ids[i] in protected} | set(positions[len(positions) - last :])
    droppable = [i for i in positions if i not in forced]
    value = {i: math.inf if math.isnan(table[ids[i]]) else float(table[ids[i]]) for i in droppable}
    best = sorted(droppable, key=lambda i: (-value[i], -i))[: math.ceil(ratio * len(droppable))]
    return [ids[i] for i in sorted(forced | set(best))]


@pytest.mark.parametrize("left_pad", [True, False])
def test_keeps_exactly_top_scores_protected_and_last(left_pad: bool) -> None:
    # Arrange
    tok = smollm2_tokenizer()
    batch = chat_batch(tok, chatterbot_pairs("trivia")[:5], max_len=64, left_pad=left_pad)
    prompt_only = batch["labels"] == -100  # keep the prompt part: what inference would see
    ids = torch.where(prompt_only, batch["input_ids"], torch.full_like(batch["input_ids"], 2))
    mask = batch["attention_mask"] * prompt_only
    protected = protected_token_ids(tok)
    scores = _scores(unseen=(ids[0, -1].item(),))

    # Act
    out_ids, out_mask = reduce_tokens(
        ids, mask, scores, 0.5, protected_ids=protected, keep_last=3, pad_id=int(tok.pad_token_id)
    )

    # Assert: per row, the kept tokens are exactly the reference set, in order, left-padded.
    table = scores.table
    assert out_ids.shape == out_mask.shape and out_ids.shape[0] == ids.shape[0]
    assert out_mask.dtype == mask.dtype and not out_ids.requires_grad
    for r in range(ids.shape[0]):
        want = _expected_row(
            ids[r].tolist(), mask[r].bool().tolist(), table, 0.5, set(protected), 3
        )
        n = int(out_mask[r].sum())
        assert out_ids[r, out_ids.shape[1] - n :].tolist() == want
        assert out_mask[r].tolist() == [0] * (out_ids.shape[1] - n) + [1] * n
        assert n < int(mask[r].sum())  # something was dropped
    assert int(out_mask.sum(1).max()) == out_ids.shape[1]


def test_single_sequence_and_full_ratio() -> None:
    # Arrange
    tok = smollm2_tokenizer()
    ids = torch.tensor(
        tok("What is the capital of France? Paris.", add_special_tokens=False)["input_ids"]
    )
    scores = _scores()

    # Act
    kept_all, mask_all = reduce_tokens(ids, None, scores, 1.0)
    half, half_mask = reduce_tokens(ids, torch.ones_like(ids), scores.table, 0.5, keep_last=2)

    # Assert
    assert torch.equal(kept_all, ids) and mask_all.tolist() == [1] * len(ids)
    assert half.dim() == 1 and half_mask.dim() == 1
    assert len(half) == 2 + math.ceil(0.5 * (len(ids) - 2))
    assert half[-2:].tolist() == ids[-2:].tolist()


def test_unseen_ids_are_kept() -> None:
    ids = torch.tensor([[10, 11, 12, 13]])
    scores = _scores(unseen=(11, 13))
    out, _ = reduce_tokens(ids, None, scores, 0.25)
    assert out.tolist() == [[13]]  # one slot; both unseen tie at +inf, the later one wins
    out, _ = reduce_tokens(ids, None, scores, 0.5)
    assert out.tolist() == [[11, 13]]


def test_model_forward_runs_on_reduced_ids() -> None:
    # Arrange
    tok = smollm2_tokenizer()
    model: Any = tiny_llama()
    pairs = chatterbot_pairs("trivia")[10:13]
    batch = chat_batch(tok, pairs, max_len=48, left_pad=True)

    # Act
    ids, mask = reduce_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        _scores(),
        0.3,
        protected_ids=protected_token_ids(tok),
        keep_last=4,
        pad_id=int(tok.pad_token_id),
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits

    # Assert
    assert logits.shape == (ids.shape[0], ids.shape[1], VOCAB)
    assert ids.shape[1] < batch["input_ids"].shape[1]
    assert torch.isfinite(logits[mask.bool()]).all()


def test_errors() -> None:
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ConfigError):
        reduce_tokens(ids, None, _scores(), 0.0)
    with pytest.raises(ConfigError):
        reduce_tokens(ids, None, _scores(), 0.5, keep_last=-1)
    with pytest.raises(FstqError):
        reduce_tokens(ids, torch.ones(1, 3), _scores(), 0.5)
    with pytest.raises(FstqError):
        reduce_tokens(torch.tensor([[VOCAB]]), None, _scores(), 0.5)
