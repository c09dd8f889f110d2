"""What ``fedfstq bench codec`` and ``fedfstq bench inference`` measure, as written to ``--json``
(BENCHMARKS.md's numbers come from these files). The fleet benchmark writes
:class:`evaluation.run_record.FleetRun`.

Imported only when a benchmark runs (pydantic), never for ``--help``.
"""

from __future__ import annotations

import platform

from pydantic.dataclasses import dataclass

from common.record import RECORD_CONFIG, omitted_if_none
from fedfstq.bench_inference import InferenceBenchSpec

__all__ = [
    "Best",
    "BestWithin",
    "CodecInput",
    "CodecParts",
    "CodecResults",
    "CodecRow",
    "CodecTargets",
    "InferenceResults",
    "InferenceRow",
    "InferenceSetting",
    "Machine",
    "ScoreTable",
    "Stream",
    "Tolerance",
    "this_machine",
]

#: One stream of a payload: (bytes it takes, its entropy bound in bytes).
Stream = tuple[int, float]


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class Machine:
    """Where a benchmark ran."""

    python: str
    platform: str
    processor: str
    torch: str
    threads: int  # torch's, while measuring
    load_average_at_start: float
    numpy: str | None = omitted_if_none()  # bench codec
    cpus: int | None = omitted_if_none()  # bench inference
    load_average_at_end: float | None = omitted_if_none()  # bench inference


def this_machine(load_average_at_start: float) -> Machine:
    """This machine, with torch's current thread count."""
    import torch

    return Machine(
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average_at_start=load_average_at_start,
    )


# --- bench codec -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CodecParts:
    """A payload's bytes by part (fstq.accounting.ByteReport), with entropy bounds."""

    header: int
    indices: Stream
    tags: Stream
    values: Stream
    scales: Stream


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CodecRow:
    """One uplink method on one input."""

    method: str
    bytes: int
    ratio_vs_fp16: float
    ratio_vs_fp32: float
    bits_per_coord: float
    compress_mb_s: float  # median; MB of fp32 input per second
    decompress_mb_s: float
    compress_mb_s_best: float
    decompress_mb_s_best: float
    entropy_ratio: float  # payload bytes / (header + entropy bound of the streams)
    parts: CodecParts
    fisher_distortion: float  # Fisher-weighted squared error / Fisher-weighted energy
    mse_distortion: float
    bits_histogram: dict[int, int]  # bit-width -> coordinates


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CodecInput:
    """Every method on one update."""

    input: str
    coords: int
    tensors: int
    budget_bytes: int
    rows: tuple[CodecRow, ...]


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CodecTargets:
    compress_mb_s: float
    decompress_mb_s: float
    entropy_ratio: float


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class CodecResults:
    machine: Machine
    quick: bool
    budget: str
    targets: CodecTargets
    inputs: tuple[CodecInput, ...]


# --- bench inference -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class ScoreTable:
    """Where the token-score table came from; the training figures when it was learned."""

    source: str
    ids_with_score: int
    train_seconds: float | None = omitted_if_none()
    train_loss: float | None = omitted_if_none()
    target_tokens_kept_in_training: float | None = omitted_if_none()


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class Tolerance:
    """Whether a keep ratio's quality stays within the tolerance of keep 1.0, per metric."""

    rouge_l: bool
    accuracy: bool
    loss: bool


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class InferenceRow:
    """One keep ratio: times (medians over the repeats), quality, and gains over keep 1.0."""

    keep: float
    prompt_tokens: float  # mean per question
    kept_share: float
    e2e_s: float
    e2e_s_runs: tuple[float, ...]
    e2e_cpu_s: float
    e2e_cpu_s_runs: tuple[float, ...]
    ttft_s: float  # summed over batches: reduction + prompt forward + 1 token
    ttft_cpu_s: float
    decode_s: float
    reduce_s: float
    answer_tokens: float
    loss: float
    accuracy: float
    rouge_l: float
    rouge_l_diff_se: float  # paired standard error of the change vs keep 1.0
    same_answer_as_full: float
    example_prompt: str
    example_answer: str
    speedup: float
    cpu_speedup: float
    ttft_speedup: float
    ttft_cpu_speedup: float
    within_tolerance: Tolerance


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class Best:
    """The fastest reduced ratio within the tolerance."""

    keep: float
    speedup: float
    cpu_speedup: float


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class BestWithin:
    """Per quality metric, and for all three together: the best ratio (None: none within)."""

    rouge_l: Best | None
    accuracy: Best | None
    loss: Best | None
    all: Best | None


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class InferenceSetting:
    """Every keep ratio at one number of few-shot examples."""

    shots: int
    examples: int
    mean_prompt_tokens: float
    droppable_share: float
    droppable_with_score: float  # NaN: nothing droppable
    rows: tuple[InferenceRow, ...]
    best_within_tolerance: BestWithin


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class InferenceResults:
    machine: Machine
    spec: InferenceBenchSpec
    scores: ScoreTable
    tolerance: float
    target_speedup: float
    settings: tuple[InferenceSetting, ...]
