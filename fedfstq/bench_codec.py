"""Codec benchmark: throughput, compression ratio and entropy efficiency of every uplink method.

Run ``fedfstq bench codec [--json PATH] [--quick]`` or ``python -m fedfstq.bench_codec``.
Everything is measured on ONE thread: ``torch.set_num_threads(1)``, and when run as
``__main__`` the OMP/MKL/OpenBLAS thread counts are pinned to 1 before numpy is imported (from
the ``fedfstq`` CLI the caller's environment applies; numpy's elementwise kernels are
single-threaded anyway and the codec uses no BLAS).

Inputs:

1. a SmolLM2-135M LoRA delta (r=16 on q/k/v/o, 1.84M coordinates) and its coordinate Fisher
   after a few real AdamW steps on chatterbot-corpus; ``--quick`` (or a missing model) uses
   a synthetic delta of the same shapes instead, and the result says which;
2. a synthetic 40M-coordinate update with the shapes of an r=16 LoRA on every linear layer of
   a Llama-2-7B (``--quick``: 4 of its 32 layers).

Synthetic deltas are per-row scaled Student-t (3 dof); synthetic Fisher is log-normal (sigma 2)
with a per-column factor. Heavy imports are lazy: ``fedfstq --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedfstq.bench_results import CodecInput, CodecResults
    from fstq.compressors import Compressor

__all__ = ["add_arguments", "main", "markdown_table", "run_codec_bench"]

log = logging.getLogger(__name__)

Update = dict[str, "torch.Tensor"]

# Targets the numbers are reported against (BENCHMARKS.md).
TARGET_COMPRESS_MBPS = 100.0
TARGET_DECOMPRESS_MBPS = 300.0
TARGET_ENTROPY_RATIO = 1.10
BUDGET_FRACTION_OF_FP16 = 1 / 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq bench codec``."""
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="synthetic SmolLM2-shaped delta and a 5M-coordinate update, fewer repeats",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print a Markdown table; returns the exit code."""
    results = run_codec_bench(args.json, args.quick)
    print(markdown_table(results.inputs))
    return 0


# --------------------------------------------------------------------------------------------
# inputs


def _smollm2_shapes() -> list[tuple[str, tuple[int, int]]]:
    hidden, kv, r = 576, 192, 16
    modules = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    return [
        (f"base_model.model.model.layers.{layer}.self_attn.{m}.lora_{p}.weight", shape)
        for layer in range(30)
        for m, d_out in modules.items()
        for p, shape in (("A", (r, hidden)), ("B", (d_out, r)))
    ]


def _llama7b_shapes(layers: int) -> list[tuple[str, tuple[int, int]]]:
    h, ff, r = 4096, 11008, 16
    modules = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (ff, h),
        "mlp.up_proj": (ff, h),
        "mlp.down_proj": (h, ff),
    }
    return [
        (f"base_model.model.model.layers.{layer}.{m}.lora_{p}.weight", shape)
        for layer in range(layers)
        for m, (d_out, d_in) in modules.items()
        for p, shape in (("A", (r, d_in)), ("B", (d_out, r)))
    ]


def synthetic_update(
    shapes: list[tuple[str, tuple[int, int]]], seed: int = 0
) -> tuple[Update, Update]:
    """Heavy-tailed LoRA-like delta (per-row scaled Student-t) and log-normal Fisher."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    delta: Update = {}
    fisher: Update = {}
    for name, (rows, cols) in shapes:
        row_scale = np.exp(rng.normal(0, 0.7, size=(rows, 1))).astype(np.float32)
        values = rng.standard_t(3, size=(rows, cols)).astype(np.float32) * row_scale * 1e-4
        col_scale = np.exp(rng.normal(0, 1, size=(1, cols))).astype(np.float32)
        f = np.exp(rng.normal(0, 2, size=(rows, cols))).astype(np.float32) * col_scale
        delta[name] = torch.from_numpy(values)
        fisher[name] = torch.from_numpy(f)
    return delta, fisher


def real_smollm2_update(steps: int = 3) -> tuple[Update, Update]:
    """A real LoRA delta and coordinate Fisher: SmolLM2-135M, r=16 q/k/v/o, AdamW lr 2e-4."""
    import numpy as np
    import torch

    from fstq.adapter_state import adapter_parameters
    from fstq.coordinate_fisher import CoordinateFisher
    from workload.batches import batches, encode_pair
    from workload.data import load_chatterbot
    from workload.models import LoraSpec, load_base_model, make_peft_model

    base, tokenizer = load_base_model("smollm2")
    model = make_peft_model(base, LoraSpec(r=16, alpha=32))
    params = adapter_parameters(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    fisher = CoordinateFisher(params, rho=0.9)
    examples = [encode_pair(tokenizer, pair, 64) for pair in load_chatterbot(["english"])[:256]]
    optimizer = torch.optim.AdamW(params.values(), lr=2e-4)
    model.train()
    rng = np.random.default_rng(0)
    for batch in batches(examples, 8, tokenizer.pad_token_id, rng, steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        fisher.accumulate()
        optimizer.step()
    delta = {k: (p.detach() - start[k]).contiguous() for k, p in params.items()}
    return delta, fisher.values()


# --------------------------------------------------------------------------------------------
# measurement


@dataclass(frozen=True)
class _Method:
    label: str
    make: Callable[[], Compressor]
    kwargs: Callable[[Update, Update, int], dict[str, Any]]


def _methods() -> list[_Method]:
    from fstq.compressors import DenseCompressor, FstqCompressor, QsgdCompressor, TopkCompressor
    from fstq.config import FstqConfig

    return [
        _Method(
            "fstq (budget 1/8 fp16)",
            FstqCompressor,
            lambda d, f, b: {"fisher": f, "budget_bytes": b},
        ),
        _Method(
            "fstq percentile (70/90/98)",
            lambda: FstqCompressor(FstqConfig(allocation="percentile")),
            lambda d, f, b: {"fisher": f},
        ),
        _Method("qsgd 4-bit (bucket 512)", QsgdCompressor, lambda d, f, b: {}),
        _Method(
            "topk fp16 (budget 1/8 fp16)",
            lambda: TopkCompressor(error_feedback=False),
            lambda d, f, b: {"budget_bytes": b},
        ),
        _Method("dense fp16", lambda: DenseCompressor("fp16"), lambda d, f, b: {}),
        _Method("dense fp32", lambda: DenseCompressor("fp32"), lambda d, f, b: {}),
    ]


def _timings(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(median, min)`` seconds of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up: first-touch page faults, lazy imports, allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _relative_distortion(
    delta: Mapping[str, torch.Tensor],
    decoded: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None,
) -> float:
    num = den = 0.0
    for name, x in delta.items():
        w = 1.0 if weights is None else weights[name].double()
        num += float((w * (decoded[name].double() - x.double()) ** 2).sum())
        den += float((w * x.double() ** 2).sum())
    return num / den if den else 0.0


def _bench_input(label: str, delta: Update, fisher: Update, repeats: int) -> CodecInput:
    from fedfstq.bench_results import CodecInput, CodecParts, CodecRow
    from fstq.compressors import decompress
    from fstq.stream_stats import payload_entropy

    n = sum(t.numel() for t in delta.values())
    mbytes = 4 * n / 1e6  # fp32 input
    budget = int(2 * n * BUDGET_FRACTION_OF_FP16)
    rows = []
    for method in _methods():
        compressor = method.make()
        kwargs = method.kwargs(delta, fisher, budget)
        result = compressor.compress(delta, **kwargs)
        payload = result.payload
        t_comp, best_comp = _timings(partial(compressor.compress, delta, **kwargs), repeats)
        t_dec, best_dec = _timings(partial(decompress, payload), repeats)
        decoded = decompress(payload)
        report = result.report
        entropy = payload_entropy(payload)
        row = CodecRow(
            method=method.label,
            bytes=report.total,
            ratio_vs_fp16=report.ratio_vs_fp16(),
            ratio_vs_fp32=report.ratio_vs_fp32(),
            bits_per_coord=report.bits_per_coord(),
            compress_mb_s=mbytes / t_comp,
            decompress_mb_s=mbytes / t_dec,
            compress_mb_s_best=mbytes / best_comp,
            decompress_mb_s_best=mbytes / best_dec,
            entropy_ratio=report.total / (report.header + entropy.total),
            parts=CodecParts(
                header=report.header,
                indices=(report.indices, entropy.indices),
                tags=(report.tags, entropy.tags),
                values=(report.values, entropy.values),
                scales=(report.scales, entropy.scales),
            ),
            fisher_distortion=_relative_distortion(delta, decoded, fisher),
            mse_distortion=_relative_distortion(delta, decoded, None),
            bits_histogram=report.bits_histogram,
        )
        rows.append(row)
        log.info(
            "%s / %s: %.0f MB/s compress, %.0f MB/s decompress",
            label,
            method.label,
            row.compress_mb_s,
            row.decompress_mb_s,
        )
    return CodecInput(
        input=label, coords=n, tensors=len(delta), budget_bytes=budget, rows=tuple(rows)
    )


def run_codec_bench(json_path: str | None, quick: bool) -> CodecResults:
    """Benchmark every method on the two inputs; optionally write JSON; returns the results."""
    import numpy as np
    import torch

    from common.record import to_json
    from fedfstq.bench_results import CodecResults, CodecTargets, this_machine

    torch.set_num_threads(1)
    inputs: list[tuple[str, Update, Update, int]] = []  # label, delta, fisher, repeats
    source = "synthetic, SmolLM2-135M r=16 q/k/v/o shapes (--quick)"
    if not quick:
        try:
            delta, fisher = real_smollm2_update()
            source = "real: SmolLM2-135M r=16 q/k/v/o, 3 AdamW steps (lr 2e-4, batch 8x64)"
        except Exception as exc:  # no model package, no converted cache, ...: say so
            log.warning("real SmolLM2 delta unavailable (%s): using synthetic shapes", exc)
            source = f"synthetic, SmolLM2-135M shapes (real model unavailable: {exc})"
            delta, fisher = synthetic_update(_smollm2_shapes(), seed=1)
    else:
        delta, fisher = synthetic_update(_smollm2_shapes(), seed=1)
    inputs.append((f"SmolLM2-135M LoRA delta [{source}]", delta, fisher, 5 if quick else 15))
    layers = 4 if quick else 32
    big, big_fisher = synthetic_update(_llama7b_shapes(layers), seed=2)
    label = f"synthetic Llama-2-7B r=16 all-linear LoRA shapes, {layers} layers"
    inputs.append((label, big, big_fisher, 3 if quick else 5))
    machine = replace(this_machine(os.getloadavg()[0]), numpy=np.__version__)
    results = CodecResults(
        machine=machine,
        quick=quick,
        budget=f"{BUDGET_FRACTION_OF_FP16:g} of dense fp16 bytes",
        targets=CodecTargets(
            compress_mb_s=TARGET_COMPRESS_MBPS,
            decompress_mb_s=TARGET_DECOMPRESS_MBPS,
            entropy_ratio=TARGET_ENTROPY_RATIO,
        ),
        inputs=tuple(_bench_input(*item) for item in inputs),
    )
    if json_path:
        text = to_json(results, indent=2, sort_keys=True, allow_nan=True)
        Path(json_path).write_text(text, encoding="utf-8")
    return results


def markdown_table(inputs: Sequence[CodecInput]) -> str:
    """The results as Markdown tables, one per input."""
    lines = []
    for item in inputs:
        lines.append(
            f"\n**{item.input}** - {item.coords:,} coordinates in {item.tensors} "
            f"tensors, budget {item.budget_bytes:,} B\n"
        )
        lines.append(
            "| method | bytes | x vs fp16 | x vs fp32 | bits/coord | compress MB/s "
            "| decompress MB/s | size / entropy | Fisher dist. | MSE dist. |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in item.rows:
            lines.append(
                f"| {r.method} | {r.bytes:,} | {r.ratio_vs_fp16:.2f} "
                f"| {r.ratio_vs_fp32:.2f} | {r.bits_per_coord:.2f} "
                f"| {r.compress_mb_s:.0f} | {r.decompress_mb_s:.0f} "
                f"| {r.entropy_ratio:.3f} | {r.fisher_distortion:.4f} "
                f"| {r.mse_distortion:.4f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    # Pin native thread pools before numpy/torch are first imported (lazily, below).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog="python -m fedfstq.bench_codec", description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
