"""The device's model side of a round: data, base model, LoRA adapter, compressor, fstq state.

Loaded once at start-up (data first, then the base model: each failure has its own exit code);
the peft adapter is built on first use from the global manifest's LoRA metadata and rebuilt only
if that metadata changes. Token scores and the error-feedback residual persist in the state
directory across rounds and restarts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from broker.messages import RoundAnnouncement, Scalar
from edge_agent.device_state import DeviceState
from edge_agent.downloader import GlobalAdapter
from edge_agent.outbox import OutboxEntry
from edge_agent.settings import AgentSettings, CompressionSettings
from edge_agent.shared_model import SharedBaseModel
from edge_agent.trainer import LocalTrainer, ProgressCallback, TrainResult, TrainSpec
from fstq.compressors import Compressor, make_compressor
from fstq.config import FstqConfig
from fstq.token_scores import TokenScores
from workload.adapters import adapter_from_bytes, sha256_hex
from workload.batches import Example, encode_pair
from workload.data import QAPair, read_jsonl
from workload.models import LoraSpec, load_base_model, make_peft_model

__all__ = [
    "LocalModel",
    "budget_for",
    "lora_spec_from",
    "make_uplink_compressor",
    "uses_residual",
]

log = logging.getLogger(__name__)


def lora_spec_from(metadata: Mapping[str, Scalar]) -> LoraSpec:
    """The LoRA settings a global manifest carries (``lora_r``, ``lora_alpha``, ``lora_targets``).

    Raises ValueError naming the bad key: the adapter cannot be built without them.
    """
    r, alpha, targets = (metadata.get(k) for k in ("lora_r", "lora_alpha", "lora_targets"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"global manifest metadata lora_r={r!r} is not a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ValueError(f"global manifest metadata lora_alpha={alpha!r} is not positive")
    if not isinstance(targets, str):
        raise ValueError(f"global manifest metadata lora_targets={targets!r} is not a string")
    modules = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not modules:
        raise ValueError("global manifest metadata lora_targets names no module")
    return LoraSpec(r=r, alpha=int(alpha), target_modules=modules)


def budget_for(settings: AgentSettings, ann: RoundAnnouncement, n_coords: int) -> int | None:
    """Upload byte budget per ``compression.budget_mode`` (decision 10: slow links send less).

    ``announced`` falls back to ``budget_bytes`` when the round names no hint for this device;
    ``rate`` is ``uplink_rate_bps`` (bits per second) over the round's upload window. fstq's
    budgeted allocation always gets a budget: ``default_budget_fraction`` of the dense fp16 size
    of the update (``n_coords`` adapter coordinates) when nothing else applies.
    """
    c = settings.compression
    if c.budget_mode == "rate":
        assert c.uplink_rate_bps is not None  # the settings validator guarantees it
        return int(c.uplink_rate_bps * ann.upload_window_s / 8)
    budget = c.budget_bytes
    if c.budget_mode == "announced":
        budget = ann.budget_bytes.get(settings.client_id, budget)
    if budget is None and c.method == "fstq" and c.allocation == "budget":
        budget = math.ceil(c.default_budget_fraction * 2 * n_coords)
    return budget


def fstq_config(c: CompressionSettings) -> FstqConfig:
    return FstqConfig(
        token_keep_ratio=c.token_keep_ratio,
        allocation=c.allocation,
        rounding=c.rounding,
        error_feedback=c.error_feedback,
    )


def make_uplink_compressor(c: CompressionSettings) -> Compressor:
    """The compressor the settings name (options of other methods are ignored)."""
    if c.method == "fstq":
        return make_compressor("fstq", config=fstq_config(c))
    if c.method == "qsgd":
        return make_compressor("qsgd", bits=c.qsgd_bits)
    if c.method == "topk":
        return make_compressor("topk", fraction=c.topk_fraction, error_feedback=c.error_feedback)
    return make_compressor(c.method)


def uses_residual(c: CompressionSettings) -> bool:
    """Only fstq and top-k carry an error-feedback residual (the others refuse one)."""
    return c.error_feedback and c.method in ("fstq", "topk")


class LocalModel:
    """Base model, tokenised local examples, the peft adapter and fstq state of one device."""

    def __init__(
        self,
        settings: AgentSettings,
        state: DeviceState,
        *,
        seed: int,
        shared: SharedBaseModel | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._seed = seed
        #: Set when this device is one of many logical devices in one process (the fleet).
        self._shared = shared
        self._base: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._pairs: list[QAPair] = []
        self._examples: list[Example] = []
        self._lora: LoraSpec | None = None
        self._trainer: LocalTrainer | None = None
        self._compressor = make_uplink_compressor(settings.compression)

    @property
    def sample_count(self) -> int:
        return len(self._examples)

    def load_data(self) -> None:
        """Read the local JSONL data (DataError, OSError, UnicodeError)."""
        self._pairs = read_jsonl(self._settings.data_path)
        log.info("read %d local examples from %s", len(self._pairs), self._settings.data_path)

    def load_model(self) -> None:
        """Load the base model and tokenizer (ModelLoadError, OSError), tokenise the data."""
        self._load_base()
        max_len = self._settings.training.max_len
        self._examples = [encode_pair(self._tokenizer, p, max_len) for p in self._pairs]

    def _load_base(self) -> None:
        if self._shared is not None:
            self._base, self._tokenizer = self._shared.base, self._shared.tokenizer
            return
        s = self._settings
        self._base, self._tokenizer = load_base_model(s.model, s.model_cache_dir)

    @contextlib.contextmanager
    def _model_use(self) -> Iterator[None]:
        # Only a shared model needs the lock: a device's own model has one user.
        if self._shared is None:
            yield
            return
        with self._shared.lock:
            yield

    def ensure_adapter(self, spec: LoraSpec) -> None:
        """Build the peft model for ``spec`` (first round, or the aggregator changed LoRA)."""
        if self._trainer is not None and spec == self._lora:
            return
        if self._shared is not None:
            model = self._shared.peft_model(spec, seed=self._seed)
        else:
            if self._trainer is not None:
                # get_peft_model wraps the base in place; a different LoRA needs a clean base.
                log.warning("LoRA changed (%s -> %s); reloading the base model", self._lora, spec)
                self._load_base()
            assert self._base is not None, "load() first"
            model = make_peft_model(self._base, spec, seed=self._seed)
        t = self._settings.training
        self._trainer = LocalTrainer(
            model,
            self._examples,
            int(self._tokenizer.pad_token_id),
            fstq_config(self._settings.compression),
            self._load_token_scores(model),
            TrainSpec(steps=t.steps, batch_size=t.batch_size, lr=t.lr),
        )
        self._lora = spec

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter's current tensors (``ensure_adapter()`` first)."""
        assert self._trainer is not None, "ensure_adapter() first"
        return {k: v.detach().clone() for k, v in self._trainer.adapter_state().items()}

    def _load_token_scores(self, model: Any) -> TokenScores:
        vocab = int(model.get_input_embeddings().num_embeddings)
        rho = fstq_config(self._settings.compression).rho
        saved = self._state.load_token_scores()
        table = None if saved is None else saved.get("score")
        if table is not None and table.shape == (vocab,):
            return TokenScores.from_numpy(table, rho)
        if table is not None:
            log.warning("token scores of shape %s, vocab %d: starting fresh", table.shape, vocab)
        return TokenScores(vocab, rho)

    def train(
        self,
        global_state: Mapping[str, torch.Tensor],
        budget_bytes: int | None,
        round_id: int,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """One round: load the global adapter, train, compress within ``budget_bytes``."""
        assert self._trainer is not None, "ensure_adapter() first"
        c = self._settings.compression
        residual = self._state.load_residual() if uses_residual(c) else None
        # Seeded per round: a round retrained after a crash draws the same batches.
        rng = np.random.default_rng([self._seed, round_id])
        with self._model_use():
            return self._trainer.train_round(
                global_state, self._compressor, budget_bytes=budget_bytes, residual=residual,
                rng=rng, progress=progress,
            )  # fmt: skip

    def run_round(
        self,
        current: GlobalAdapter,
        ann: RoundAnnouncement,
        *,
        created_at: float,
        progress: ProgressCallback | None = None,
    ) -> tuple[OutboxEntry, TrainResult]:
        """Train round ``ann`` from ``current`` and describe the upload for the outbox.

        Raises ValueError (bad LoRA metadata), AdapterFormatError, ModelLoadError or FstqError
        (budget below the minimal payload, adapter keys not matching the model).
        """
        with self._model_use():
            self.ensure_adapter(lora_spec_from(current.metadata))
        global_state = adapter_from_bytes(current.payload)
        budget = budget_for(self._settings, ann, sum(t.numel() for t in global_state.values()))
        result = self.train(global_state, budget, ann.round, progress)
        update = result.update
        # Travels in the manifest: what the aggregator may want to log about this update.
        meta: dict[str, Scalar] = {
            "tokens_kept": round(result.tokens_kept, 6),
            "compute_s": round(result.compute_s, 3),
            "cpu_s": round(result.cpu_s, 3),
        }
        if math.isfinite(result.train_loss):  # metadata refuses NaN
            meta["train_loss"] = round(result.train_loss, 6)
        if budget is not None:
            meta["budget_bytes"] = budget
        entry = OutboxEntry(
            upload_id=f"r{ann.round}-{secrets.token_hex(8)}",
            round_id=ann.round,
            base_version=current.version,
            sha256=sha256_hex(update.payload),
            size=len(update.payload),
            sample_count=result.sample_count,
            method=update.method,
            metadata=meta,
            created_at=created_at,
            chunk_size=ann.chunk_size,
            deadline=ann.deadline,
        )
        log.info(
            "round %d: trained %d steps in %.2f s (loss %.4f, tokens kept %.2f); update %d B "
            "(budget %s B, %.1fx smaller than fp16)",
            ann.round, self._settings.training.steps, result.compute_s, result.train_loss,
            result.tokens_kept, len(update.payload), budget, update.report.ratio_vs_fp16(),
            extra={"round": ann.round, "client": self._settings.client_id, "phase": "training"},
        )  # fmt: skip
        return entry, result

    def save_state(self, result: TrainResult) -> None:
        """Persist what outlives the round: the EF residual and the token scores."""
        assert self._trainer is not None
        if uses_residual(self._settings.compression):
            self._state.save_residual(result.update.residual)
        self._state.save_token_scores({"score": self._trainer.token_scores.to_numpy()})
