"""The device's model side of a round: data, base model, LoRA adapter, and the state it trains.

Loaded once at start-up (data first, then the base model: each failure has its own exit code);
the peft adapter is built on first use from the global manifest's LoRA metadata
(:meth:`workload.models.LoraSpec.from_metadata`) and rebuilt only if that metadata changes.
Token scores and the error-feedback residual persist in the state directory across rounds and
restarts. What the compressor and the budget are is ``edge_agent/compression.py``'s business.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from edge_agent.compression import fstq_config, make_uplink_compressor, uses_residual
from edge_agent.device_state import DeviceState
from edge_agent.downloader import HeldAdapter
from edge_agent.settings import AgentSettings
from edge_agent.shared_model import SharedBaseModel
from edge_agent.trainer import LocalTrainer, ProgressCallback, TrainResult, TrainSpec
from fstq.token_scores import TokenScores
from workload.adapters import adapter_from_bytes
from workload.batches import Example, encode_pair
from workload.catchup import canonical_bytes
from workload.data import QAPair, read_jsonl
from workload.models import LoraSpec, initial_adapter_state, load_base_model, make_peft_model

__all__ = ["LocalModel"]

log = logging.getLogger(__name__)


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

    def initial_adapter(self, metadata: Mapping[str, object]) -> bytes:
        """The initial global adapter (v0) derived here from the manifest's LoRA metadata and
        ``init_seed``, as canonical fp16 bytes (the caller checks them against ``v0_sha256``).

        Raises LoraMetadataError (a ValueError) for bad metadata or seed.
        """
        seed = metadata.get("init_seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"global manifest metadata init_seed={seed!r} is not a seed")
        spec = LoraSpec.from_metadata(metadata)
        with self._model_use():
            self.ensure_adapter(spec)
            assert self._trainer is not None
            state = initial_adapter_state(self._trainer.model, spec, seed)
        return canonical_bytes(state)

    def load_global(self, current: HeldAdapter) -> dict[str, torch.Tensor]:
        """The global adapter's tensors, the peft model built for its LoRA metadata first.

        Raises LoraMetadataError (a ValueError), AdapterFormatError or ModelLoadError.
        """
        with self._model_use():
            self.ensure_adapter(LoraSpec.from_metadata(current.metadata))
        return adapter_from_bytes(current.payload)

    def train(
        self,
        global_state: Mapping[str, torch.Tensor],
        budget_bytes: int | None,
        round_id: int,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """One round: load the global adapter, train, compress within ``budget_bytes``.

        Raises FstqError: a budget below the minimal payload, adapter keys not matching the
        model.
        """
        assert self._trainer is not None, "ensure_adapter() first"
        c = self._settings.compression
        residual = self._state.load_residual() if uses_residual(c) else None
        # Seeded per round: a round retrained after a crash draws the same batches.
        rng = np.random.default_rng([self._seed, round_id])
        with self._model_use():
            result = self._trainer.train_round(
                global_state, self._compressor, budget_bytes=budget_bytes, residual=residual,
                rng=rng, progress=progress,
            )  # fmt: skip
        update = result.update
        log.info(
            "round %d: trained %d steps in %.2f s (loss %.4f, tokens kept %.2f); update %d B "
            "(budget %s B, %.1fx smaller than fp16)",
            round_id, self._settings.training.steps, result.compute.wall_s, result.train_loss,
            result.tokens_kept, len(update.payload), budget_bytes, update.report.ratio_vs_fp16(),
            extra={"round": round_id, "client": self._settings.client_id, "phase": "training"},
        )  # fmt: skip
        return result

    def save_state(self, result: TrainResult) -> None:
        """Persist what outlives the round: the EF residual and the token scores."""
        assert self._trainer is not None
        if uses_residual(self._settings.compression):
            self._state.save_residual(result.update.residual)
        self._state.save_token_scores({"score": self._trainer.token_scores.to_numpy()})
