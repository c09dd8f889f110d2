"""Inference-time token reduction benchmark (paper §2.7, decision 12): speedup vs quality.

Run ``fedfstq bench inference [options]`` or ``python -m fedfstq.bench_inference``.

The reducer (``fstq.inference.reduce_tokens``) drops the prompt tokens whose learned
``score[id]`` is lowest before the forward pass, keeping special tokens, the chat template's own
tokens (role names, newlines) and the last ``--keep-last`` prompt tokens. The score table is the
one a device learns while training:

* ``--scores PATH``: a device's persisted table (``token_scores.safetensors`` in its state
  directory, ``{"score": float32[vocab]}``, NaN = unseen); the base model answers;
* by default: learned on the spot by fine-tuning a LoRA adapter for ``--train-steps`` steps on the
  chatterbot-corpus training split with the devices' own trainer (``edge_agent.trainer``, i.e.
  ``fstq.training.FstqTrainingHook``); the adapter is merged and that model answers.

On held-out questions (optionally after ``--shots K`` other Q/A pairs from the training split as
chat turns: longer, more realistic prompts), for each keep ratio (keep 1.0 is the plain model,
without the reducer):

* end-to-end time of reduction + batched greedy generation, wall clock and CPU time of this
  single-threaded process (steadier on a shared machine), and time to first token (reduction +
  prompt forward + one token): the median of ``--repeats`` passes after an untimed warm-up, all
  ratios on the same batches (questions sorted by prompt length), taking turns batch by batch.
  A batch decodes until its longest answer ends, so changed answers move the time too;
  ``--ignore-eos`` decodes exactly ``--max-new-tokens`` steps to time the prompt's effect alone;
* quality: answer-token loss/accuracy with the reduced prompt (teacher-forced reference answer)
  and ROUGE-L of the greedy answers against the references; a ratio "stays within 1%" on a
  metric when it is at most 1% (relative) worse than keep 1.0.

Heavy imports are lazy: ``fedfstq --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfstq.option_types import fraction, non_negative_int, positive_int

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedfstq.bench_results import (
        Best,
        BestWithin,
        InferenceResults,
        InferenceRow,
        InferenceSetting,
        ScoreTable,
    )
    from fstq.token_scores import TokenScores
    from workload.data import QAPair

__all__ = [
    "InferenceBenchSpec",
    "add_arguments",
    "encode_chat_prompt",
    "main",
    "markdown_table",
    "reduce_prompts",
    "run_inference_bench",
    "template_token_ids",
]

log = logging.getLogger(__name__)

DEFAULT_KEEP = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
QUALITY_TOLERANCE = 0.01  # "within 1% of the unreduced model", relative
TARGET_SPEEDUP = 1.55  # the paper's end-to-end figure (Jetson)
MAX_PAIR_TOKENS = 96  # a device's default max_len: longer pairs are not used as prompts or shots
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class InferenceBenchSpec:
    """Everything that changes the numbers (written into the JSON)."""

    model: str = "smollm2"
    scores: str | None = None
    train_steps: int = 40
    train_batch_size: int = 8
    refresh_every: int = 10
    examples: int = 32
    shots: tuple[int, ...] = (0, 4)
    max_new_tokens: int = 24
    ignore_eos: bool = False
    keep: tuple[float, ...] = DEFAULT_KEEP
    keep_last: int = 8
    batch_size: int = 16
    repeats: int = 3
    seed: int = 0
    threads: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq bench inference``."""
    d = InferenceBenchSpec()
    parser.add_argument("--model", default=d.model, help='"smollm2", "tiny" or a model directory')
    parser.add_argument(
        "--scores",
        metavar="PATH",
        help="a device's token_scores.safetensors (or its state directory) instead of training;"
        " the base model then answers",
    )
    for flag, kind, text in (
        ("--train-steps", positive_int, "LoRA steps that learn the scores"),
        ("--train-batch-size", positive_int, "training batch"),
        ("--refresh-every", positive_int, "token-score refresh interval H while training"),
        ("--examples", positive_int, "held-out questions"),
        ("--max-new-tokens", positive_int, "answer tokens at most"),
        ("--keep-last", non_negative_int, "last prompt tokens always kept"),
        ("--batch-size", positive_int, "generation batch"),
        ("--repeats", positive_int, "timed passes per ratio"),
        ("--seed", non_negative_int, "data split, shots, adapter initialisation"),
        ("--threads", positive_int, "torch threads"),
    ):
        default = getattr(d, flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--shots",
        type=non_negative_int,
        nargs="+",
        default=list(d.shots),
        metavar="K",
        help="few-shot Q/A pairs before each question; one table per value",
    )
    parser.add_argument(
        "--keep",
        type=fraction,
        nargs="+",
        default=list(d.keep),
        metavar="RATIO",
        help="keep ratios of droppable prompt tokens (1.0 is always added as the baseline)",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="time exactly --max-new-tokens decode steps per batch (answers are still cut at"
        " EOS): equal decode work at every ratio, so time differences are the prompt's alone",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def spec_from_args(args: argparse.Namespace) -> InferenceBenchSpec:
    """The spec of parsed ``add_arguments`` options (validated)."""
    values = {f.name: getattr(args, f.name) for f in fields(InferenceBenchSpec)}
    values["shots"] = tuple(args.shots)
    values["keep"] = tuple(sorted({1.0, *(float(k) for k in args.keep)}, reverse=True))
    spec = InferenceBenchSpec(**values)
    counts = (spec.train_steps, spec.train_batch_size, spec.refresh_every, spec.examples)
    if min(counts) < 1 or min(spec.max_new_tokens, spec.batch_size, spec.repeats) < 1:
        raise ValueError("steps, batch sizes, examples, max-new-tokens and repeats must be >= 1")
    if not all(0.0 < k <= 1.0 for k in spec.keep) or min(spec.shots) < 0 or spec.keep_last < 0:
        raise ValueError("keep ratios must be in (0, 1]; shots and keep-last must be >= 0")
    return spec


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print Markdown tables, optionally write JSON; returns the exit code."""
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    results = run_inference_bench(spec)
    if args.json:
        from common.record import to_json

        text = to_json(results, indent=2, sort_keys=True, allow_nan=True)
        Path(args.json).write_text(text, encoding="utf-8")
    print(markdown_table(results))
    return 0


# --------------------------------------------------------------------------------------------
# prompts


def template_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the chat template's own text (role names, newlines), beyond the special tokens.

    Found by rendering empty turns, so whatever the template adds is what gets protected
    (decision 12 keeps "special/chat-template tokens"; ``protected_token_ids`` covers only the
    special ones).
    """
    turns = [{"role": role, "content": ""} for role in ("system", "user", "assistant")]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return frozenset(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat_prompt(tokenizer: Any, question: str, shots: Sequence[QAPair] = ()) -> list[int]:
    """Chat prompt ids: the system prompt, each shot as a user/assistant exchange, the question.

    Without shots this is exactly ``workload.batches.encode_prompt`` (what devices train on).
    """
    from workload.batches import SYSTEM_PROMPT, encode_prompt

    if not shots:
        return encode_prompt(tokenizer, question)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for shot in shots:
        messages.append({"role": "user", "content": shot.prompt})
        messages.append({"role": "assistant", "content": shot.response})
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reduce_prompts(
    prompts: Sequence[Sequence[int]],
    scores: TokenScores,
    keep_ratio: float,
    *,
    protected_ids: frozenset[int],
    keep_last: int,
) -> list[list[int]]:
    """Each prompt after ``fstq.inference.reduce_tokens`` (rows are independent: one at a time)."""
    import torch

    from fstq.inference import reduce_tokens

    out = []
    for prompt in prompts:
        ids, _ = reduce_tokens(
            torch.tensor(prompt, dtype=torch.long),
            None,
            scores,
            keep_ratio,
            protected_ids=protected_ids,
            keep_last=keep_last,
        )
        out.append(ids.tolist())
    return out


def _answer_ids(tokenizer: Any, pair: QAPair) -> list[int]:
    """The answer's target ids exactly as training encodes them (with the closing marker)."""
    from workload.batches import IGNORE, encode_pair

    return [t for t in encode_pair(tokenizer, pair, 1 << 16).labels if t != IGNORE]


# --------------------------------------------------------------------------------------------
# the score table


def _load_scores(path: str, vocab: int) -> TokenScores:
    from safetensors.numpy import load_file

    from fstq.token_scores import TokenScores

    file = Path(path)
    if file.is_dir():  # an agent's state directory
        file = file / "token_scores.safetensors"
    table = load_file(str(file)).get("score")
    if table is None or table.shape != (vocab,):
        shape = None if table is None else table.shape
        raise ValueError(f"{file}: expected 'score' of shape ({vocab},), got {shape}")
    return TokenScores.from_numpy(table)  # rho only matters for updates, none happen here


def _learn_scores(
    base: Any,
    tokenizer: Any,
    train: Sequence[QAPair],
    spec: InferenceBenchSpec,
    rng: np.random.Generator,
) -> tuple[Any, TokenScores, ScoreTable]:
    """Fine-tune a LoRA adapter with the devices' trainer; return the merged model and table."""
    from edge_agent.trainer import LocalTrainer, TrainSpec
    from fedfstq.bench_results import ScoreTable
    from fstq.compressors import DenseCompressor
    from fstq.config import FstqConfig
    from fstq.token_scores import TokenScores
    from fstq.training import get_adapter_state
    from workload.batches import encode_pair
    from workload.models import LoraSpec, make_peft_model

    config = FstqConfig(refresh_every=spec.refresh_every)
    peft = make_peft_model(base, LoraSpec(), seed=spec.seed)
    scores = TokenScores(int(peft.get_input_embeddings().num_embeddings), config.rho)
    examples = [encode_pair(tokenizer, pair, MAX_PAIR_TOKENS) for pair in train]
    trainer = LocalTrainer(
        peft,
        examples,
        int(tokenizer.pad_token_id),
        config,
        scores,
        TrainSpec(steps=spec.train_steps, batch_size=spec.train_batch_size),
    )
    start = time.perf_counter()
    # One round from the fresh adapter; the (cheap, dense) compression result is not used.
    result = trainer.train_round(
        get_adapter_state(peft),
        DenseCompressor("fp16"),
        budget_bytes=None,
        residual=None,
        rng=rng,
    )
    info = ScoreTable(
        source=f"learned: {spec.train_steps} LoRA steps (r=16, batch {spec.train_batch_size})"
        f" with FstqTrainingHook, refresh every {spec.refresh_every}",
        ids_with_score=int(scores.seen.sum()),
        train_seconds=time.perf_counter() - start,
        train_loss=result.train_loss,
        target_tokens_kept_in_training=result.tokens_kept,
    )
    # Merged weights: the deployed model, without LoRA's extra matmuls in every forward.
    return peft.merge_and_unload(), scores, info


# --------------------------------------------------------------------------------------------
# measurement


class _StepClock:
    """A logits processor noting when each new token of one ``generate`` call is chosen.

    The first call comes right after the prompt's forward, each later one after a decode step,
    so last minus first is the decode time. Wall and CPU clocks both: on a shared machine the
    CPU time of this (single-threaded) process is the steadier measure of work.
    """

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] = (0.0, 0.0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = (time.perf_counter(), time.process_time())
        self.first = self.first or self.last
        return scores

    def decode(self) -> tuple[float, float]:
        first = self.first or self.last
        return self.last[0] - first[0], self.last[1] - first[1]


@dataclass
class _Run:
    """One or more batches at one keep ratio; times are sums over the batches."""

    prompts: list[list[int]]
    answers: list[list[int]]
    reduce_s: float = 0.0
    decode_s: float = 0.0  # forwards after each batch's first token
    total_s: float = 0.0
    decode_cpu_s: float = 0.0
    total_cpu_s: float = 0.0

    def __iadd__(self, other: _Run) -> _Run:
        self.prompts += other.prompts
        self.answers += other.answers
        self.reduce_s += other.reduce_s
        self.decode_s += other.decode_s
        self.total_s += other.total_s
        self.decode_cpu_s += other.decode_cpu_s
        self.total_cpu_s += other.total_cpu_s
        return self


def _few_shot_prompts(
    tokenizer: Any, held_out: Sequence[QAPair], pool: Sequence[QAPair], shots: int, seed: int
) -> list[list[int]]:
    import numpy as np

    # Shots differ per question but not per ratio: one seeded draw per setting.
    rng = np.random.default_rng([seed, shots])
    return [
        encode_chat_prompt(
            tokenizer,
            pair.prompt,
            [pool[int(i)] for i in rng.choice(len(pool), size=shots, replace=False)],
        )
        for pair in held_out
    ]


def _time_ratios(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    reduce: Callable[[Sequence[list[int]], float], list[list[int]]],
    spec: InferenceBenchSpec,
) -> dict[float, list[_Run]]:
    """``spec.repeats`` timed passes over all prompts per ratio, after an untimed warm-up.

    Ratios take turns batch by batch (rotating who goes first), so a burst of load from other
    jobs lands on every ratio alike instead of on whichever pass was running.
    """
    from workload.evaluation import generate_tokens

    def run(ratio: float, batch: Sequence[list[int]]) -> _Run:
        clock = _StepClock()
        start, start_cpu = time.perf_counter(), time.process_time()
        ids = list(batch) if ratio == 1.0 else reduce(batch, ratio)  # 1.0: no reducer at all
        reduced = time.perf_counter()
        answers = generate_tokens(
            model,
            tokenizer,
            ids,
            max_new_tokens=spec.max_new_tokens,
            batch_size=len(ids),
            stop_at_eos=not spec.ignore_eos,
            logits_processor=[clock],
        )
        end, end_cpu = time.perf_counter(), time.process_time()
        decode_s, decode_cpu_s = clock.decode()
        return _Run(
            ids, answers, reduced - start, decode_s, end - start, decode_cpu_s, end_cpu - start_cpu
        )

    batches = [prompts[i : i + spec.batch_size] for i in range(0, len(prompts), spec.batch_size)]
    for ratio in spec.keep:  # warm-up: allocator growth, first-touch pages, lazy imports
        run(ratio, batches[0])
    runs: dict[float, list[_Run]] = {r: [] for r in spec.keep}
    for repeat in range(spec.repeats):
        passes = {r: _Run([], []) for r in spec.keep}
        for b, batch in enumerate(batches):
            turn = (repeat + b) % len(spec.keep)
            for ratio in spec.keep[turn:] + spec.keep[:turn]:
                passes[ratio] += run(ratio, batch)
        for ratio, one in passes.items():
            if runs[ratio] and one.answers != runs[ratio][0].answers:
                log.warning("keep %.2f: answers changed between repeats", ratio)
            runs[ratio].append(one)
        log.info("repeat %d/%d done", repeat + 1, spec.repeats)
    return runs


def _bench_setting(
    model: Any,
    tokenizer: Any,
    scores: TokenScores,
    held_out: Sequence[QAPair],
    pool: Sequence[QAPair],
    shots: int,
    spec: InferenceBenchSpec,
) -> InferenceSetting:
    from fedfstq.bench_results import InferenceRow, InferenceSetting, Tolerance
    from fstq.inference import protected_token_ids
    from workload.batches import IGNORE, Example
    from workload.evaluation import answer_metrics, rouge_l

    prompts = _few_shot_prompts(tokenizer, held_out, pool, shots, spec.seed)
    # Batches of similar lengths, as a batching server would form them; the same for all ratios.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[i] for i in order]
    held_out = [held_out[i] for i in order]
    protected = protected_token_ids(tokenizer) | template_token_ids(tokenizer)
    runs = _time_ratios(
        model,
        tokenizer,
        prompts,
        lambda batch, ratio: reduce_prompts(
            batch, scores, ratio, protected_ids=protected, keep_last=spec.keep_last
        ),
        spec,
    )

    refs = [pair.response for pair in held_out]
    answers = [_answer_ids(tokenizer, pair) for pair in held_out]
    full_tokens = sum(len(p) for p in prompts)
    base_rouge: list[float] = []
    rows: list[InferenceRow] = []
    for ratio in spec.keep:
        r = runs[ratio][0]
        examples = [
            Example(p + a, [IGNORE] * len(p) + a) for p, a in zip(r.prompts, answers, strict=True)
        ]
        quality = answer_metrics(model, examples, int(tokenizer.pad_token_id), spec.batch_size)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in r.answers]
        rouge = [rouge_l(t, ref) for t, ref in zip(texts, refs, strict=True)]
        base_rouge = base_rouge or rouge  # keep 1.0 comes first
        row = InferenceRow(
            keep=ratio,
            prompt_tokens=sum(len(p) for p in r.prompts) / len(prompts),
            kept_share=sum(len(p) for p in r.prompts) / full_tokens,
            e2e_s=statistics.median(x.total_s for x in runs[ratio]),
            e2e_s_runs=tuple(x.total_s for x in runs[ratio]),
            e2e_cpu_s=statistics.median(x.total_cpu_s for x in runs[ratio]),
            e2e_cpu_s_runs=tuple(x.total_cpu_s for x in runs[ratio]),
            # Time to first token, summed over batches: reduction + prompt forward + 1 token.
            ttft_s=statistics.median(x.total_s - x.decode_s for x in runs[ratio]),
            ttft_cpu_s=statistics.median(x.total_cpu_s - x.decode_cpu_s for x in runs[ratio]),
            decode_s=statistics.median(x.decode_s for x in runs[ratio]),
            reduce_s=statistics.median(x.reduce_s for x in runs[ratio]),
            answer_tokens=sum(len(a) for a in r.answers) / len(prompts),
            loss=quality.loss,
            accuracy=quality.accuracy,
            rouge_l=statistics.fmean(rouge),
            # Paired standard error of the ROUGE-L change: how much of it is noise.
            rouge_l_diff_se=_paired_se(rouge, base_rouge),
            same_answer_as_full=statistics.fmean(
                float(a == b) for a, b in zip(r.answers, runs[1.0][0].answers, strict=True)
            ),
            example_prompt=tokenizer.decode(r.prompts[0]),
            example_answer=texts[0],
            # Keep 1.0 against itself; every row is compared with keep 1.0 below.
            speedup=1.0,
            cpu_speedup=1.0,
            ttft_speedup=1.0,
            ttft_cpu_speedup=1.0,
            within_tolerance=Tolerance(rouge_l=True, accuracy=True, loss=True),
        )
        rows.append(_against(row, rows[0] if rows else row))
    seen = scores.seen.numpy()
    droppable = [
        t for p in prompts for t in p[: max(0, len(p) - spec.keep_last)] if t not in protected
    ]
    return InferenceSetting(
        shots=shots,
        examples=len(prompts),
        mean_prompt_tokens=full_tokens / len(prompts),
        droppable_share=len(droppable) / full_tokens,
        droppable_with_score=statistics.fmean(bool(seen[t]) for t in droppable)
        if droppable
        else math.nan,
        rows=tuple(rows),
        best_within_tolerance=_best_within_tolerance(rows),
    )


def _paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan


def _against(row: InferenceRow, base: InferenceRow) -> InferenceRow:
    """Speedups vs keep 1.0 (``base``) and, per quality metric, whether it stays within the
    tolerance."""
    from fedfstq.bench_results import Tolerance

    return replace(
        row,
        speedup=base.e2e_s / row.e2e_s,
        cpu_speedup=base.e2e_cpu_s / row.e2e_cpu_s,
        ttft_speedup=base.ttft_s / row.ttft_s,
        ttft_cpu_speedup=base.ttft_cpu_s / row.ttft_cpu_s,
        within_tolerance=Tolerance(
            rouge_l=row.rouge_l >= (1 - QUALITY_TOLERANCE) * base.rouge_l,
            accuracy=row.accuracy >= (1 - QUALITY_TOLERANCE) * base.accuracy,
            loss=row.loss <= (1 + QUALITY_TOLERANCE) * base.loss,
        ),
    )


def _best_within_tolerance(rows: Sequence[InferenceRow]) -> BestWithin:
    """Per metric (and for all three together): the fastest reduced ratio still within 1%."""
    from fedfstq.bench_results import Best, BestWithin

    def best(within: Callable[[InferenceRow], bool]) -> Best | None:
        ok = [r for r in rows if r.keep < 1.0 and within(r)]
        top = max(ok, key=lambda r: r.speedup, default=None)
        return None if top is None else Best(keep=top.keep, speedup=top.speedup,
                                             cpu_speedup=top.cpu_speedup)  # fmt: skip

    return BestWithin(
        rouge_l=best(lambda r: r.within_tolerance.rouge_l),
        accuracy=best(lambda r: r.within_tolerance.accuracy),
        loss=best(lambda r: r.within_tolerance.loss),
        all=best(
            lambda r: (
                r.within_tolerance.rouge_l
                and r.within_tolerance.accuracy
                and r.within_tolerance.loss
            )
        ),
    )


def run_inference_bench(spec: InferenceBenchSpec) -> InferenceResults:
    """Learn (or load) the score table, then measure every shots setting; returns the results."""
    import numpy as np
    import torch

    from fedfstq.bench_results import InferenceResults, ScoreTable, this_machine
    from workload.batches import encode_pair
    from workload.data import load_chatterbot, train_test_split
    from workload.models import load_base_model

    if spec.keep[0] != 1.0:
        raise ValueError("keep ratios must start with the 1.0 baseline, descending")
    torch.set_num_threads(spec.threads)
    load_at_start = os.getloadavg()[0]
    rng = np.random.default_rng(spec.seed)
    base: Any
    base, tokenizer = load_base_model(spec.model)
    train, test = train_test_split(load_chatterbot(["english"]), TEST_FRACTION, rng, by="category")

    def short(pairs: Sequence[QAPair]) -> list[QAPair]:
        # Long tech-support answers would make a few prompts dominate every timing.
        return [
            p for p in pairs if len(encode_pair(tokenizer, p, 1 << 16).input_ids) <= MAX_PAIR_TOKENS
        ]

    candidates = short(test)
    chosen = rng.choice(len(candidates), size=min(spec.examples, len(candidates)), replace=False)
    held_out = [candidates[int(i)] for i in sorted(chosen)]
    if spec.scores:
        model = base
        vocab = int(base.get_input_embeddings().num_embeddings)
        scores = _load_scores(spec.scores, vocab)
        info = ScoreTable(
            source=f"file: {spec.scores} (base model, no adapter)",
            ids_with_score=int(scores.seen.sum()),
        )
    else:
        model, scores, info = _learn_scores(base, tokenizer, train, spec, rng)
    log.info("score table: %s; %d ids scored", info.source, info.ids_with_score)
    pool = short(train)
    settings = []
    for shots in spec.shots:
        settings.append(_bench_setting(model, tokenizer, scores, held_out, pool, shots, spec))
        log.info("shots=%d done", shots)
    machine = replace(
        this_machine(load_at_start), cpus=os.cpu_count(), load_average_at_end=os.getloadavg()[0]
    )
    return InferenceResults(
        machine=machine,
        spec=spec,
        scores=info,
        tolerance=QUALITY_TOLERANCE,
        target_speedup=TARGET_SPEEDUP,
        settings=tuple(settings),
    )


def markdown_table(results: InferenceResults) -> str:
    """The results as Markdown: one table per shots setting and the best speedup within 1%."""
    pct = f"{results.tolerance:.0%}"
    decoding = "fixed length (--ignore-eos)" if results.spec.ignore_eos else "until EOS"
    lines = [f"score table: {results.scores.source}; timed decoding: {decoding}"]
    for s in results.settings:
        lines.append(
            f"\n**{s.shots}-shot prompts** - {s.examples} held-out questions, "
            f"{s.mean_prompt_tokens:.1f} prompt tokens on average, "
            f"{s.droppable_share:.0%} droppable, {s.droppable_with_score:.0%} of those "
            "with a learned score\n"
        )
        lines.append(
            "| keep | prompt tok | kept | e2e s | speedup | CPU s | CPU speedup | TTFT CPU s "
            "| TTFT CPU speedup | answer tok | loss | acc | ROUGE-L | same answer |"
        )
        lines.append("|---:" * 14 + "|")
        for r in s.rows:
            lines.append(
                f"| {r.keep:.2f} | {r.prompt_tokens:.1f} | {r.kept_share:.0%} "
                f"| {r.e2e_s:.2f} | {r.speedup:.2f}x | {r.e2e_cpu_s:.2f} "
                f"| {r.cpu_speedup:.2f}x | {r.ttft_cpu_s:.2f} | {r.ttft_cpu_speedup:.2f}x "
                f"| {r.answer_tokens:.1f} | {r.loss:.4f} | {r.accuracy:.4f} "
                f"| {r.rouge_l:.4f} | {r.same_answer_as_full:.0%} |"
            )
        verdicts = []
        b = s.best_within_tolerance
        for best, label in (
            (b.rouge_l, "ROUGE-L"),
            (b.accuracy, "accuracy"),
            (b.loss, "loss"),
            (b.all, "all three"),
        ):
            verdicts.append(
                f"{label}: none"
                if best is None
                else f"{label}: {best.speedup:.2f}x wall, {best.cpu_speedup:.2f}x CPU "
                f"(keep {best.keep:.2f})"
            )
        lines.append(f"\nlargest speedup with quality within {pct} - " + "; ".join(verdicts))
    return "\n".join(lines)


def _cli(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m fedfstq.bench_inference", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Run the imported module, not this __main__ copy: the result records name its spec class.
    from fedfstq import bench_inference

    sys.exit(bench_inference._cli())
