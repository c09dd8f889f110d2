"""Token Fisher proxy (paper §2.1, decisions 1-3): per-vocabulary-id sensitivity scores and the
target-token mask they induce.

The proxy of a position is ``g_i = ||dL/de_i||^2``, the squared norm of the loss gradient with
respect to that position's input embedding, taken from the ordinary backward pass. Decision 1 keys
the EMA on the **vocabulary id** held at the position, so the table is transferable across
minibatches and rounds and reusable at inference without gradients (decision 12).

Everything here is pure tensor logic: no model, no hooks, no I/O. ``fstq.training`` wires it to a
model.

Conventions
-----------
* ``labels`` follow Hugging Face causal-LM semantics: ``labels[b, j]`` is the target predicted by
  the logits at position ``j - 1`` (the model shifts internally), so ``labels[:, 0]`` is never a
  target, and ``-100`` marks positions without a loss term (prompt, padding).
* The mask acts on **label positions**: dropping target ``j`` means ``labels[b, j] = -100``, which
  removes the term ``CE(logits[b, j-1], labels[b, j])`` and nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from fstq.errors import ConfigError, FstqError

__all__ = [
    "IGNORE_INDEX",
    "TokenScores",
    "apply_target_mask",
    "rank_table",
    "scored_positions",
    "select_targets",
    "token_grad_sq",
    "valid_targets",
]

IGNORE_INDEX = -100  # Hugging Face's "no loss here" label


class TokenScores:
    """EMA of the token Fisher proxy, one float32 score per vocabulary id (decision 1).

    Parameters
    ----------
    vocab_size
        Number of ids; ids outside ``[0, vocab_size)`` are an error.
    rho
        EMA decay (paper: 0.9): ``S <- rho * S + (1 - rho) * g``.
    normalize
        Divide each refresh's observations by their mean before the EMA (default). Raw ``g``
        depends on the loss scale (batch size, gradient accumulation) and shrinks as training
        converges, so without it ids last seen early would outrank ids seen late; after
        normalisation a score reads "times more sensitive than an average position".

    Notes
    -----
    * **Unseen ids** are stored as NaN and rank **above** every seen id (:meth:`rank_values` gives
      ``+inf``): a token never measured is kept, not dropped on an arbitrary guess. It gets a score
      on the first refresh step whose batch contains it.
    * **First observation** initialises the score to the observed value instead of
      ``(1 - rho) * g`` (an EMA started from 0 would rank rarely seen ids low only because they
      were seen rarely).
    * **Several positions with the same id** in one refresh are averaged first, so each refresh
      is one EMA step per id whatever the id's frequency.
    """

    def __init__(self, vocab_size: int, rho: float = 0.9, *, normalize: bool = True) -> None:
        if vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
        if not 0.0 <= rho < 1.0:
            raise ConfigError(f"rho must be in [0, 1), got {rho}")
        self.vocab_size = int(vocab_size)
        self.rho = float(rho)
        self.normalize = bool(normalize)
        self._table = torch.full((self.vocab_size,), math.nan, dtype=torch.float32)
        self.updates = 0  # refreshes applied (diagnostics only; not part of the persisted state)

    # -- reading -------------------------------------------------------------------------------
    @property
    def table(self) -> torch.Tensor:
        """A copy of the score table, float32 ``[vocab]``, NaN for unseen ids."""
        return self._table.clone()

    @property
    def seen(self) -> torch.Tensor:
        """Bool ``[vocab]``: ids that have a score."""
        return ~torch.isnan(self._table)

    def rank_values(self, ids: torch.Tensor) -> torch.Tensor:
        """Scores of ``ids`` for ranking (same shape, float32): unseen ids give ``+inf``."""
        self._check_ids(ids)
        return rank_table(self._table)[ids.detach().to("cpu", torch.long)].to(ids.device)

    # -- updating ------------------------------------------------------------------------------
    def update(self, ids: torch.Tensor, g: torch.Tensor) -> None:
        """Apply one refresh from flat observations: ``ids[n]`` held a position with proxy ``g[n]``.

        Non-finite observations are ignored (a diverged step must not poison persistent state).
        """
        if ids.shape != g.shape or ids.dim() != 1:
            raise FstqError(
                f"ids and g must be equal-length 1-D, got {tuple(ids.shape)}, {tuple(g.shape)}"
            )
        self._check_ids(ids)
        g = g.detach().to(device="cpu", dtype=torch.float64)
        ids = ids.detach().to(device="cpu", dtype=torch.long)
        finite = torch.isfinite(g)
        ids, g = ids[finite], g[finite]
        if ids.numel() == 0:
            return
        if self.normalize:
            mean = g.mean()
            if mean > 0:
                g = g / mean
        # Mean of g per id, vectorised: sums and counts with bincount.
        counts = torch.bincount(ids, minlength=self.vocab_size)
        sums = torch.bincount(ids, weights=g, minlength=self.vocab_size)
        hit = counts > 0
        obs = (sums[hit] / counts[hit]).to(torch.float32)
        old = self._table[hit]
        self._table[hit] = torch.where(
            torch.isnan(old), obs, self.rho * old + (1.0 - self.rho) * obs
        )
        self.updates += 1

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Persistable state: ``{"score": float32 [vocab]}`` (NaN = unseen), a copy."""
        return {"score": self._table.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; the vocabulary size must match."""
        score = state.get("score")
        if score is None or score.shape != (self.vocab_size,):
            shape = None if score is None else tuple(score.shape)
            raise FstqError(
                f"token score state must hold 'score' of shape ({self.vocab_size},), got {shape}"
            )
        self._table = score.detach().to(device="cpu", dtype=torch.float32).clone()

    def to_numpy(self) -> npt.NDArray[np.float32]:
        """The table as a float32 numpy array (a copy; NaN = unseen)."""
        return self._table.numpy().copy()

    @classmethod
    def from_numpy(
        cls, table: npt.ArrayLike, rho: float = 0.9, *, normalize: bool = True
    ) -> TokenScores:
        """Build from a table saved with :meth:`to_numpy`."""
        arr = np.asarray(table, dtype=np.float32)
        if arr.ndim != 1:
            raise FstqError(f"token score table must be 1-D, got shape {arr.shape}")
        scores = cls(arr.shape[0], rho, normalize=normalize)
        scores._table = torch.from_numpy(arr.copy())
        return scores

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            got = f"[{int(ids.min())}, {int(ids.max())}]"
            raise FstqError(f"token ids must be in [0, {self.vocab_size}), got {got}")


def rank_table(table: torch.Tensor) -> torch.Tensor:
    """Ranking form of a score table: NaN (unseen) becomes ``+inf``."""
    return torch.nan_to_num(table.to(torch.float32), nan=math.inf)


def token_grad_sq(embedding_grad: torch.Tensor) -> torch.Tensor:
    """``g_i = ||dL/de_i||^2`` per position: ``[..., d]`` -> ``[...]``, float32."""
    return embedding_grad.detach().to(torch.float32).pow(2).sum(dim=-1)


def valid_targets(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask of label positions that carry a loss term: ``labels != -100`` and column >= 1.

    Column 0 is excluded because the causal shift never predicts it (Hugging Face drops it too).
    """
    valid = labels != IGNORE_INDEX
    valid[..., 0] = False
    return valid


def scored_positions(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of input positions whose ``g_i`` is a measurement, ``[B, L]``.

    A position counts if it is a real token (``attention_mask == 1``) and some target follows it
    in its row (``i < j`` for a valid target ``j``): by causality the embedding at ``i`` only
    reaches the logits at ``i..L-1``, i.e. the targets ``i+1..L``. Positions after a row's last
    target have ``g_i = 0`` structurally, which says nothing about the token, so they are not
    scored. Prompt tokens are scored (decision 2: scoring covers all input tokens).
    """
    valid = valid_targets(labels)
    if valid.dim() != 2:
        raise FstqError(f"labels must be [batch, length], got shape {tuple(labels.shape)}")
    length = labels.shape[1]
    cols = torch.arange(length, device=labels.device)
    # Last valid target column per row (-1 if none); input position i is scored iff i < last.
    last = torch.where(valid, cols, torch.full_like(cols, -1)).amax(dim=1, keepdim=True)
    scored = cols.unsqueeze(0) < last
    if attention_mask is not None:
        scored &= attention_mask.to(torch.bool)
    return scored


def select_targets(
    labels: torch.Tensor,
    rank_values: torch.Tensor,
    keep_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decision 2: which target positions keep their loss term on a masked step.

    Parameters
    ----------
    labels
        ``[B, L]`` Hugging Face labels (``-100`` = no target).
    rank_values
        ``[B, L]`` score of each position's **target** id, i.e. ``score[labels]`` (unseen ids
        ``+inf``); read only at valid target positions.
    keep_ratio
        ``r_tok`` in ``(0, 1]``: ``ceil(r_tok * T)`` positions are kept, ``T`` = number of valid
        targets in the whole batch (the top-k is over the batch, not per row).
    generator
        Breaks ties (equal scores: repeated ids, unseen ids) uniformly at random; ``None`` breaks
        them by position (row-major), which is deterministic but favours early rows.

    Returns
    -------
    Bool ``[B, L]``: kept target positions (a subset of :func:`valid_targets`).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if rank_values.shape != labels.shape:
        raise FstqError(
            f"rank_values {tuple(rank_values.shape)} must match labels {tuple(labels.shape)}"
        )
    valid = valid_targets(labels)
    flat_pos = valid.flatten().nonzero().squeeze(1)
    total = flat_pos.numel()
    keep = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    if total == 0:
        return keep.view_as(labels)
    k = min(total, math.ceil(keep_ratio * total))
    if generator is not None:
        flat_pos = flat_pos[torch.randperm(total, generator=generator).to(flat_pos.device)]
    values = rank_values.flatten()[flat_pos].to(torch.float32)
    # Stable sort: equal scores keep the (random or positional) order given above.
    order = torch.sort(values, descending=True, stable=True).indices
    keep[flat_pos[order[:k]]] = True
    return keep.view_as(labels)


def apply_target_mask(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """New labels with every target outside ``keep`` set to ``-100`` (``labels`` is not modified).

    With Hugging Face's mean cross-entropy this gives decision 3: the mean over kept targets.
    """
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))
