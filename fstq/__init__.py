"""Fed-FSTQ: Fisher-guided token selection and mixed-precision quantisation of LoRA updates.

The algorithm only: torch, numpy and peft; no networking, no msgpack (see README.md).

The names below are re-exported lazily (PEP 562): each is imported from its home module on
first use, so ``import fstq`` costs nothing and the codec (``fstq.compressors``,
``fstq.decoding``, on the aggregator's decode path) never pulls in transformers or peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fstq.compressors import (
        ByteReport,
        CompressedUpdate,
        Compressor,
        DecodeLimits,
        DenseCompressor,
        ErrorFeedbackCompressor,
        FisherCompressor,
        FstqCompressor,
        QsgdCompressor,
        TopkCompressor,
        compress_round,
        decompress,
        make_compressor,
    )
    from fstq.config import FstqConfig
    from fstq.coordinate_fisher import CoordinateFisher
    from fstq.errors import BudgetError, ConfigError, DecodeError, FstqError
    from fstq.inference import protected_token_ids, reduce_tokens
    from fstq.token_scores import TokenScores
    from fstq.trainer_callback import FstqTrainerCallback
    from fstq.training import (
        FstqTrainingHook,
        RoundUpdate,
        get_adapter_state,
        set_adapter_state,
    )

__all__ = [
    "BudgetError",
    "ByteReport",
    "CompressedUpdate",
    "Compressor",
    "ConfigError",
    "CoordinateFisher",
    "DecodeError",
    "DecodeLimits",
    "DenseCompressor",
    "ErrorFeedbackCompressor",
    "FisherCompressor",
    "FstqCompressor",
    "FstqConfig",
    "FstqError",
    "FstqTrainerCallback",
    "FstqTrainingHook",
    "QsgdCompressor",
    "RoundUpdate",
    "TokenScores",
    "TopkCompressor",
    "compress_round",
    "decompress",
    "get_adapter_state",
    "make_compressor",
    "protected_token_ids",
    "reduce_tokens",
    "set_adapter_state",
]

_HOMES = {
    "fstq.compressors": (
        "ByteReport",
        "CompressedUpdate",
        "Compressor",
        "DecodeLimits",
        "DenseCompressor",
        "ErrorFeedbackCompressor",
        "FisherCompressor",
        "FstqCompressor",
        "QsgdCompressor",
        "TopkCompressor",
        "compress_round",
        "decompress",
        "make_compressor",
    ),
    "fstq.config": ("FstqConfig",),
    "fstq.coordinate_fisher": ("CoordinateFisher",),
    "fstq.errors": ("BudgetError", "ConfigError", "DecodeError", "FstqError"),
    "fstq.inference": ("protected_token_ids", "reduce_tokens"),
    "fstq.token_scores": ("TokenScores",),
    "fstq.trainer_callback": ("FstqTrainerCallback",),
    "fstq.training": ("FstqTrainingHook", "RoundUpdate", "get_adapter_state", "set_adapter_state"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fstq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
