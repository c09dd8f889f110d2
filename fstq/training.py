"""Fed-FSTQ on the training side: token-masked loss, token-score refresh and coordinate Fisher,
for a plain PyTorch loop (:class:`FstqTrainingHook`; for a ``transformers.Trainer``, the
adapter over the same hook is :class:`fstq.trainer_callback.FstqTrainerCallback`).

One round on a device::

    hook = FstqTrainingHook(peft_model, config, token_scores)  # token_scores persist across rounds
    hook.begin_round()
    for batch in loader:                  # input_ids, attention_mask, labels (-100 = no loss)
        loss = hook.loss(batch)           # full loss on refresh steps, token-masked loss otherwise
        loss.backward()
        hook.after_backward()             # token-score refresh (refresh steps) + Fisher EMA
        opt.step(); opt.zero_grad()
    delta, fisher = hook.end_round()      # keyed like peft.get_peft_model_state_dict
    update = FstqCompressor(config).compress(delta, fisher=fisher, budget_bytes=...)

Schedule (decision 4): local step ``s`` is a refresh step iff ``s % refresh_every == 0`` (so step 0
is one). On a refresh step the loss is the full loss over all targets and ``g_i = ||dL/de_i||^2``
is captured from the same backward pass (a forward hook makes the embedding output require grad
and a tensor hook reads its gradient; no extra forward or backward). Other steps keep the targets
whose ids rank in the top ``ceil(r_tok * T)`` of the batch by the current scores (decisions 2, 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fstq.adapter_state import (
    adapter_name_of,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
)
from fstq.config import FstqConfig
from fstq.coordinate_fisher import CoordinateFisher
from fstq.errors import ConfigError, FstqError
from fstq.token_scores import (
    TokenScores,
    apply_target_mask,
    scored_positions,
    select_targets,
    token_grad_sq,
    valid_targets,
)

__all__ = [
    "FstqTrainingHook",
    "RoundStats",
    "RoundUpdate",
    "get_adapter_state",
    "set_adapter_state",
]


class RoundUpdate(NamedTuple):
    """What a round produced: float32 CPU tensors keyed like ``get_peft_model_state_dict``."""

    delta: dict[str, torch.Tensor]  # adapter at end_round minus adapter at begin_round
    fisher: dict[str, torch.Tensor]  # coordinate Fisher EMA (decision 5)


@dataclass(frozen=True)
class RoundStats:
    """Counters of the current/last round (for logs and the evaluation's "tokens kept")."""

    steps: int = 0  # local steps completed (after_backward calls)
    refresh_steps: int = 0  # of which refresh steps
    targets_total: int = 0  # valid target positions over all training forwards
    targets_kept: int = 0  # of which kept in the loss


@dataclass
class _Capture:
    """One training forward on a refresh step, waiting for its embedding gradient."""

    input_ids: torch.Tensor  # [B, L]
    scored: torch.Tensor  # bool [B, L]: positions whose g_i counts (see scored_positions)
    attached: bool = False
    g: torch.Tensor | None = field(default=None)  # [B, L] float32 once the backward ran

    def add_grad(self, grad: torch.Tensor) -> None:
        g = token_grad_sq(grad)
        self.g = g if self.g is None else self.g + g  # like .grad: repeated backwards accumulate


class FstqTrainingHook:
    """Fed-FSTQ's training-side state for one device, driven from a plain PyTorch loop.

    Parameters
    ----------
    model
        A peft model (LoRA). Its input embedding receives a forward hook during a round only.
    config
        ``rho``, ``refresh_every`` and ``token_keep_ratio`` are used here.
    token_scores
        The device's persistent token table (decision 1); updated in place on refresh steps.
        Its ``rho`` must equal ``config.rho``.
    adapter_name
        Adapter to train and report; default: the model's active adapter.
    generator
        Breaks ties between equal scores in the token mask at random; ``None``: by position.

    Notes
    -----
    Call :meth:`loss` once per micro-batch and :meth:`after_backward` once per optimizer step,
    after all of its backward passes and before ``zero_grad`` (gradient accumulation works: the
    micro-batches of one step share its refresh/mask decision and one Fisher update).
    """

    def __init__(
        self,
        model: Any,
        config: FstqConfig,
        token_scores: TokenScores,
        *,
        adapter_name: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if token_scores.rho != config.rho:
            raise ConfigError(
                f"token_scores.rho={token_scores.rho} differs from config.rho={config.rho}"
            )
        self.model = model
        self.config = config
        self.token_scores = token_scores
        self.adapter_name = adapter_name_of(model, adapter_name)
        self.generator = generator
        self._active = False
        self._step = 0
        self._before: dict[str, torch.Tensor] = {}
        self._fisher: CoordinateFisher | None = None
        self._pending: list[_Capture] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._stats = RoundStats()
        self.last_token_grad_sq: list[torch.Tensor] = []  # raw g per micro-batch, last refresh

    # -- schedule --------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Local steps completed in this round (0 before the first :meth:`after_backward`)."""
        return self._step

    @property
    def is_refresh_step(self) -> bool:
        """Whether the current step uses the full loss and refreshes token scores (decision 4)."""
        return self._step % self.config.refresh_every == 0

    @property
    def stats(self) -> RoundStats:
        """Counters of the current (or last finished) round."""
        return self._stats

    @property
    def active(self) -> bool:
        """Whether a round is running (between :meth:`begin_round` and :meth:`end_round`)."""
        return self._active

    # -- round lifecycle ---------------------------------------------------------------------------
    def begin_round(self) -> None:
        """Snapshot the adapter, reset Fisher and step counter, install the embedding hook."""
        if self._active:
            raise FstqError("begin_round called while a round is running")
        params = adapter_parameters(self.model, self.adapter_name)
        self._before = get_adapter_state(self.model, self.adapter_name)
        self._fisher = CoordinateFisher(params, self.config.rho)
        self._step = 0
        self._pending = []
        self._stats = RoundStats()
        self.last_token_grad_sq = []
        self._handle = self.model.get_input_embeddings().register_forward_hook(self._on_embedding)
        self._active = True

    def end_round(self) -> RoundUpdate:
        """Remove the hook and return ``(delta, fisher)`` for this round."""
        self._require_active()
        assert self._fisher is not None  # set by begin_round
        after = get_adapter_state(self.model, self.adapter_name)
        delta = {key: (after[key].float() - self._before[key].float()).cpu() for key in after}
        update = RoundUpdate(delta=delta, fisher=self._fisher.values())
        self.close()
        return update

    def close(self) -> None:
        """Remove the model hook and drop round state (idempotent; no update is produced)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending = []
        self._active = False

    # -- per step --------------------------------------------------------------------------------
    def prepare_labels(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Labels for this step's forward: unchanged on refresh steps, token-masked otherwise.

        On a refresh step (with grad enabled) this also arms the capture of ``g_i`` for the
        forward that follows. ``labels`` is never modified in place.
        """
        self._require_active()
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            shapes = f"{tuple(input_ids.shape)}, {tuple(labels.shape)}"
            raise FstqError(f"input_ids and labels must both be [B, L], got {shapes}")
        total = int(valid_targets(labels).sum())
        if self.is_refresh_step:
            if torch.is_grad_enabled():
                scored = scored_positions(labels, attention_mask)
                self._pending.append(_Capture(input_ids.detach(), scored))
            new_labels, kept = labels, total
        else:
            ranks = self.token_scores.rank_values(labels.clamp_min(0))
            keep = select_targets(labels, ranks, self.config.token_keep_ratio, self.generator)
            new_labels, kept = apply_target_mask(labels, keep), int(keep.sum())
        s = self._stats
        self._stats = RoundStats(
            s.steps, s.refresh_steps, s.targets_total + total, s.targets_kept + kept
        )
        return new_labels

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward ``batch`` (input_ids, attention_mask, labels) with this step's labels.

        Returns the model's mean cross-entropy over the targets used: all of them on refresh
        steps, the kept ones otherwise (decision 3).
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        if not bool(valid_targets(labels).any()):
            raise FstqError("batch has no target tokens (every label is -100)")
        new_labels = self.prepare_labels(input_ids, labels, attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=new_labels)
        loss: torch.Tensor = out.loss
        return loss

    def after_backward(self) -> None:
        """Finish the step: refresh token scores (refresh steps), update the Fisher, advance."""
        self._require_active()
        assert self._fisher is not None
        refresh = self.is_refresh_step
        if refresh:
            done = [c for c in self._pending if c.g is not None]
            self.last_token_grad_sq = [c.g for c in done if c.g is not None]
            if done:
                ids = torch.cat([c.input_ids[c.scored].cpu() for c in done])
                g = torch.cat([c.g[c.scored].cpu() for c in done if c.g is not None])
                self.token_scores.update(ids, g)
        self._pending = []
        self._fisher.accumulate()
        self._step += 1
        s = self._stats
        self._stats = RoundStats(
            s.steps + 1, s.refresh_steps + int(refresh), s.targets_total, s.targets_kept
        )

    # -- internals -------------------------------------------------------------------------------
    def _on_embedding(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook on the input embedding: capture ``dL/de`` of an armed refresh forward."""
        if not self._pending or self._pending[-1].attached or not torch.is_grad_enabled():
            return
        capture = self._pending[-1]
        ids = args[0] if args else None
        if not isinstance(output, torch.Tensor) or not isinstance(ids, torch.Tensor):
            raise FstqError(
                "input embedding was not called with token ids (inputs_embeds is not supported)"
            )
        if ids.shape != capture.input_ids.shape:
            raise FstqError(
                f"embedding saw ids {tuple(ids.shape)}, expected {tuple(capture.input_ids.shape)}"
            )
        if not output.requires_grad:
            # Frozen embedding: its output is a leaf; asking for its gradient is what makes g_i
            # available from the normal backward (peft's enable_input_require_grads does the same).
            output.requires_grad_(True)
        output.register_hook(_grad_reader(capture))  # type: ignore[no-untyped-call]  # torch stub
        capture.attached = True

    def _require_active(self) -> None:
        if not self._active:
            raise FstqError("no round is running: call begin_round first")


def _grad_reader(capture: _Capture) -> Any:
    def read(grad: torch.Tensor) -> None:
        capture.add_grad(grad)

    return read
