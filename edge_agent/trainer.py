"""Local training of one round on a device: global adapter in, compressed update out.

No networking here: the round loop hands in the global adapter and gets back the encoded update,
so the same trainer serves the daemon, the demo and the evaluation's fleet runner.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from broker.progress import DeviceProgress, Stage
from fstq.compressors import CompressedUpdate, Compressor, compress_round
from fstq.config import FstqConfig
from fstq.token_scores import TokenScores
from fstq.training import FstqTrainingHook, get_adapter_state, set_adapter_state
from workload.batches import Example, batches

__all__ = ["ComputeTime", "LocalTrainer", "ProgressCallback", "TrainResult", "TrainSpec"]

#: Told after every local step (``training``, steps done, loss) and when compression starts; it
#: runs in the training thread, so it must be quick (the agent publishes a status from it).
ProgressCallback = Callable[[DeviceProgress], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """Local optimisation settings (matched across methods in any comparison)."""

    steps: int = 10
    batch_size: int = 8
    lr: float = 2e-4  # paper: AdamW, lr 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class ComputeTime:
    """What one round's local training and compression took on the device."""

    wall_s: float
    #: CPU seconds of the process over the same span (all torch threads): unlike wall time it
    #: does not grow when other work shares the cores, so the evaluation's round time uses it.
    cpu_s: float


@dataclass(frozen=True)
class TrainResult:
    """One round's output and what it cost."""

    update: CompressedUpdate
    sample_count: int
    budget_bytes: int | None  # what the update was compressed to fit (None: no budget)
    compute: ComputeTime
    train_loss: float  # mean loss over the round's steps
    tokens_kept: float  # share of target tokens kept by the token mask

    def manifest_metadata(self) -> dict[str, float | int]:
        """What the upload manifest says about the update, for the aggregator's logs.

        Device timings stay off the wire: the evaluation reads them from the agent."""
        meta: dict[str, float | int] = {"tokens_kept": round(self.tokens_kept, 6)}
        if math.isfinite(self.train_loss):  # metadata refuses NaN
            meta["train_loss"] = round(self.train_loss, 6)
        if self.budget_bytes is not None:
            meta["budget_bytes"] = self.budget_bytes
        return meta


class LocalTrainer:
    """Holds the peft model and the device's examples; trains one round per call."""

    def __init__(
        self,
        model: Any,
        examples: Sequence[Example],
        pad_id: int,
        config: FstqConfig,
        token_scores: TokenScores,
        spec: TrainSpec,
    ) -> None:
        if not examples:
            raise ValueError("a device needs at least one training example")
        self.model = model
        self.examples = examples
        self.pad_id = pad_id
        self.config = config
        self.token_scores = token_scores
        self.spec = spec

    def train_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        compressor: Compressor,
        *,
        budget_bytes: int | None,
        residual: Mapping[str, torch.Tensor] | None,
        rng: np.random.Generator,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """Load the global adapter, run `spec.steps` local steps, compress the delta.

        The round's Fisher weighs the compression (fstq; the other methods ignore it); the
        update fits ``budget_bytes`` and folds in ``residual`` (error feedback) if given.
        """
        report = progress or (lambda _: None)
        start, cpu_start = time.perf_counter(), time.process_time()
        set_adapter_state(self.model, global_state)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        seed = int(rng.integers(2**31))
        hook = FstqTrainingHook(
            self.model,
            self.config,
            self.token_scores,
            generator=torch.Generator().manual_seed(seed),
        )
        losses: list[float] = []
        hook.begin_round()
        try:
            steps = batches(self.examples, self.spec.batch_size, self.pad_id, rng, self.spec.steps)
            for batch in steps:
                loss = hook.loss(batch)
                torch.autograd.backward(loss)
                hook.after_backward()
                torch.nn.utils.clip_grad_norm_(params, self.spec.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                report(DeviceProgress(Stage.TRAINING, len(losses), self.spec.steps, losses[-1]))
            stats = hook.stats
            delta, fisher = hook.end_round()
            report(DeviceProgress(Stage.COMPRESSING))
            update = compress_round(
                compressor,
                delta,
                fisher=fisher,
                budget_bytes=budget_bytes,
                residual=residual,
                rng=rng,
            )
        finally:
            hook.close()
            self.model.train(False)
        kept = stats.targets_kept / stats.targets_total if stats.targets_total else 1.0
        return TrainResult(
            update=update,
            sample_count=len(self.examples),
            budget_bytes=budget_bytes,
            compute=ComputeTime(time.perf_counter() - start, time.process_time() - cpu_start),
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            tokens_kept=kept,
        )

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return get_adapter_state(self.model)
