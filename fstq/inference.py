"""Inference-time token reduction (paper §2.7, decision 12).

The paper reuses "the same scoring rule (without gradients)"; with per-vocabulary-id scores
(decision 1) that is a table lookup: before the forward pass, drop the prompt tokens whose learned
``score[id]`` is lowest, keeping special / chat-template tokens and the last tokens of the prompt
(the generation point). No gradients, no extra model calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from fstq.errors import ConfigError, FstqError
from fstq.token_scores import TokenScores, rank_table

__all__ = ["protected_token_ids", "reduce_tokens"]


def protected_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids a reducer should never drop: the tokenizer's special and added tokens.

    For chat models this covers the template markers (e.g. ``<|im_start|>``, ``<|im_end|>``);
    plain-text parts of the template (role names, newlines) are ordinary tokens, protected by
    ``keep_last`` at the generation point or by passing them explicitly.
    """
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        ids.update(int(i) for i in decoder)
    return frozenset(ids)


@torch.no_grad()
def reduce_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scores: TokenScores | torch.Tensor,
    keep_ratio: float,
    *,
    protected_ids: Iterable[int] = (),
    keep_last: int = 0,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop low-score prompt tokens before a forward pass.

    Parameters
    ----------
    input_ids
        ``[L]`` (one sequence) or ``[B, L]`` (a batch, left- or right-padded: any layout where
        ``attention_mask == 0`` marks padding).
    attention_mask
        Same shape, 1 = real token; ``None`` means all real.
    scores
        A :class:`~fstq.token_scores.TokenScores` or its table (float ``[vocab]``, NaN = unseen).
        Unseen ids rank above every seen id, so they are kept.
    keep_ratio
        In ``(0, 1]``: of each row's *droppable* tokens (real, not protected, not in the last
        ``keep_last``), ``ceil(keep_ratio * n)`` with the highest scores are kept; ties keep the
        later token.
    protected_ids
        Ids always kept (e.g. :func:`protected_token_ids`).
    keep_last
        The last ``keep_last`` real tokens of each row are always kept.
    pad_id
        Filler for the output's padding.

    Returns
    -------
    ``(input_ids, attention_mask)``: the kept tokens in their original order, **left-padded** to
    the longest row (ready for generation), same dtype and device as the input; 1-D in, 1-D out.
    Position ids are renumbered by the model as for any shorter prompt.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if keep_last < 0:
        raise ConfigError(f"keep_last must be >= 0, got {keep_last}")
    single = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if single else input_ids
    if ids.dim() != 2:
        raise FstqError(f"input_ids must be [L] or [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            shapes = f"{tuple(attention_mask.shape)} vs {tuple(input_ids.shape)}"
            raise FstqError(f"attention_mask and input_ids shapes differ: {shapes}")
        real = (attention_mask.unsqueeze(0) if single else attention_mask).to(torch.bool)

    keep = _keep_mask(ids, real, _rank_values(ids, scores), keep_ratio, protected_ids, keep_last)
    out_ids, out_mask = _left_pack(ids, keep, pad_id)
    out_mask = out_mask.to(attention_mask.dtype if attention_mask is not None else torch.long)
    return (out_ids[0], out_mask[0]) if single else (out_ids, out_mask)


def _rank_values(ids: torch.Tensor, scores: TokenScores | torch.Tensor) -> torch.Tensor:
    table = rank_table(scores.table if isinstance(scores, TokenScores) else scores.detach()).cpu()
    if table.dim() != 1:
        raise FstqError(f"score table must be 1-D, got shape {tuple(table.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise FstqError(f"token ids must be in [0, {table.shape[0]})")
    return table[ids.cpu().long()].to(ids.device)


def _keep_mask(
    ids: torch.Tensor,
    real: torch.Tensor,
    rank: torch.Tensor,
    keep_ratio: float,
    protected_ids: Iterable[int],
    keep_last: int,
) -> torch.Tensor:
    protected = torch.tensor(sorted(set(protected_ids)), dtype=ids.dtype, device=ids.device)
    # Index of each real token counted from the row's end: 0 for the last real token.
    from_end = real.flip(1).cumsum(1).flip(1) - 1
    forced = real & (torch.isin(ids, protected) | (from_end < keep_last))
    droppable = real & ~forced
    k = torch.ceil(droppable.sum(1).double() * keep_ratio).long()  # per row
    # Rank droppable tokens per row, best first; flipping before a stable sort makes ties prefer
    # later positions.
    values = torch.where(droppable, rank, torch.full_like(rank, -math.inf)).flip(1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(ids.shape[1], device=ids.device).expand_as(order))
    place = place.flip(1)
    return forced | (droppable & (place < k.unsqueeze(1)))


def _left_pack(
    ids: torch.Tensor, keep: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros((ids.shape[0], width), dtype=torch.bool, device=ids.device)
    rows, cols = keep.nonzero(as_tuple=True)
    dest = (width - counts)[rows] + (keep.cumsum(1) - 1)[rows, cols]
    out[rows, dest] = ids[rows, cols]
    mask[rows, dest] = True
    return out, mask
