"""Fed-FSTQ inside a ``transformers.Trainer``: :class:`FstqTrainerCallback`, a thin adapter over
:class:`~fstq.training.FstqTrainingHook`.

Its own module because it subclasses ``transformers.TrainerCallback``: ``import fstq`` and the
codec (which the aggregator's decode path imports) stay free of transformers; a training script
imports this module explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from fstq.config import FstqConfig
from fstq.errors import FstqError
from fstq.token_scores import TokenScores, valid_targets
from fstq.training import FstqTrainingHook, RoundUpdate

__all__ = ["FstqTrainerCallback"]


class FstqTrainerCallback(TrainerCallback):
    """:class:`FstqTrainingHook` for ``transformers.Trainer``: one ``train()`` call is one round.

    * ``on_train_begin``: ``begin_round`` and a forward pre-hook on ``model`` that rewrites
      ``labels`` on masked steps (training forwards with labels only; evaluation is untouched).
    * ``on_pre_optimizer_step``: ``after_backward`` (gradients exist there; note the Trainer has
      already clipped them when ``max_grad_norm > 0``, so the Fisher sees the clipped gradient).
    * ``on_train_end``: ``end_round``; the result is in :attr:`update` (``delta``, ``fisher``).

    When the Trainer passes ``num_items_in_batch`` (token-count loss normalisation), the count is
    scaled by kept/valid targets of the micro-batch so the loss stays a mean over kept tokens
    (exact without gradient accumulation; with it, exact if every micro-batch keeps the same share).
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
        self.hook = FstqTrainingHook(
            model, config, token_scores, adapter_name=adapter_name, generator=generator
        )
        self.update: RoundUpdate | None = None
        self._pre_handle: torch.utils.hooks.RemovableHandle | None = None

    @property
    def delta(self) -> dict[str, torch.Tensor]:
        """Adapter delta of the finished round."""
        return self._finished().delta

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        """Coordinate Fisher of the finished round."""
        return self._finished().fisher

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.update = None
        self.hook.begin_round()
        self._pre_handle = self.hook.model.register_forward_pre_hook(
            self._rewrite_labels, with_kwargs=True
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.hook.active:
            self.hook.after_backward()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        if self.hook.active:
            self.update = self.hook.end_round()

    def _rewrite_labels(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        labels = kwargs.get("labels")
        if (
            labels is None
            or not module.training
            or not torch.is_grad_enabled()
            or not self.hook.active
        ):
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise FstqError("FstqTrainerCallback needs input_ids (inputs_embeds is not supported)")
        if kwargs.get("shift_labels") is not None:
            raise FstqError("FstqTrainerCallback cannot mask pre-shifted labels (shift_labels)")
        new_labels = self.hook.prepare_labels(input_ids, labels, kwargs.get("attention_mask"))
        if new_labels is labels:
            return None
        new_kwargs = {**kwargs, "labels": new_labels}
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None:
            valid = valid_targets(labels).sum()
            kept = valid_targets(new_labels).sum()
            new_kwargs["num_items_in_batch"] = num_items * kept / valid.clamp_min(1)
        return args, new_kwargs

    def _finished(self) -> RoundUpdate:
        if self.update is None:
            raise FstqError("no finished round: train() has not ended yet")
        return self.update
