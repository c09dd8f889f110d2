"""Fed-FSTQ: Fisher-guided token selection and mixed-precision quantisation of LoRA updates.

The algorithm only: torch, numpy and peft; no networking, no msgpack (see README.md).
"""

from fstq.compressors import (
    ByteReport,
    CompressedUpdate,
    Compressor,
    DecodeLimits,
    DenseCompressor,
    FstqCompressor,
    QsgdCompressor,
    TopkCompressor,
    decompress,
    make_compressor,
)
from fstq.config import FstqConfig
from fstq.coordinate_fisher import CoordinateFisher
from fstq.errors import BudgetError, ConfigError, DecodeError, FstqError
from fstq.inference import protected_token_ids, reduce_tokens
from fstq.token_scores import TokenScores
from fstq.training import (
    FstqTrainerCallback,
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
    "FstqCompressor",
    "FstqConfig",
    "FstqError",
    "FstqTrainerCallback",
    "FstqTrainingHook",
    "QsgdCompressor",
    "RoundUpdate",
    "TokenScores",
    "TopkCompressor",
    "decompress",
    "get_adapter_state",
    "make_compressor",
    "protected_token_ids",
    "reduce_tokens",
    "set_adapter_state",
]
