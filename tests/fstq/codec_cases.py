"""Builders shared by the codec tests: LoRA-like updates, heavy-tailed Fisher, payload surgery."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from fstq.accounting import ByteReport
from fstq.compressors import (
    Compressor,
    DenseCompressor,
    FstqCompressor,
    QsgdCompressor,
    TopkCompressor,
)
from fstq.config import FstqConfig

Update = dict[str, torch.Tensor]

PREFIX = "base_model.model.model.layers"


def lora_update(
    rng: np.random.Generator,
    *,
    layers: int = 2,
    hidden: int = 48,
    kv: int = 16,
    r: int = 4,
    scale: float = 1e-3,
) -> Update:
    """A small peft-named LoRA delta: per-row scaled Student-t values (heavy-tailed)."""
    out: Update = {}
    for layer in range(layers):
        for module, d_out in (
            ("q_proj", hidden),
            ("k_proj", kv),
            ("v_proj", kv),
            ("o_proj", hidden),
        ):
            name = f"{PREFIX}.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", (r, hidden)), ("lora_B", (d_out, r))):
                rows = np.exp(rng.normal(0, 0.7, size=(shape[0], 1)))
                values = rng.standard_t(3, size=shape) * rows * scale
                out[f"{name}.{part}.weight"] = torch.from_numpy(values.astype(np.float32))
    return out


def heavy_fisher(rng: np.random.Generator, update: Mapping[str, torch.Tensor]) -> Update:
    """Log-normal (sigma 2) coordinate Fisher with a per-column factor: heavy-tailed."""
    out: Update = {}
    for name, t in update.items():
        shape = tuple(t.shape)
        cols = np.exp(rng.normal(0, 1, size=(1, shape[-1]))) if shape else 1.0
        f = np.exp(rng.normal(0, 2, size=shape)) * cols
        out[name] = torch.from_numpy(np.asarray(f, dtype=np.float32))
    return out


def mixed_update(rng: np.random.Generator) -> Update:
    """Odd shapes and every supported dtype, including empty and 0-d tensors."""
    spec: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("a.lora_A.weight", (3, 7), torch.float32),
        ("a.lora_B.weight", (7, 3), torch.float32),
        ("half", (5, 3), torch.float16),
        ("brain", (2, 9), torch.bfloat16),
        ("double", (11,), torch.float64),
        ("scalar", (), torch.float32),
        ("empty", (0, 4), torch.float32),
        ("one", (1,), torch.float32),
        ("unicodé", (9,), torch.float32),
    ]
    return {
        name: torch.from_numpy(np.asarray(rng.standard_normal(shape) * 1e-2)).to(dtype)
        for name, shape, dtype in spec
    }


def total_sq(
    update: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None
) -> float:
    """``sum w * x**2`` in float64."""
    return sum(
        float(((1.0 if weights is None else weights[k].double()) * v.double() ** 2).sum())
        for k, v in update.items()
    )


def distortion(
    reference: Mapping[str, torch.Tensor],
    decoded: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Fisher-weighted squared error ``sum F * (x - x_hat)**2`` in float64."""
    return total_sq({k: reference[k].double() - decoded[k].double() for k in reference}, weights)


def streams_coded(report: ByteReport) -> tuple[bool, bool]:
    """Whether some tags, and some INT codes, of an FSTQ payload were ANS-coded: fewer bytes
    than packing at 2 bits a tag (INT2 codes 2 bits, INT4 4 bits, fp16 16 bits) would take."""
    bits = report.bits_histogram
    packed_values = bits.get(2, 0) / 4 + bits.get(4, 0) / 2 + 2 * bits.get(16, 0)
    return report.tags < report.n_sent / 4, report.values < packed_values


def fix_crc(payload: bytes) -> bytes:
    """Recompute the CRC32 trailer so that the structural checks behind it get exercised."""
    body = payload[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


# (label, factory, compress kwargs given the dense fp16 size of the update)
Method = tuple[str, Callable[[], Compressor], Callable[[int], dict[str, Any]]]

METHODS: list[Method] = [
    ("dense_fp32", lambda: DenseCompressor("fp32"), lambda _: {}),
    ("dense_fp16", lambda: DenseCompressor("fp16"), lambda _: {}),
    ("qsgd", lambda: QsgdCompressor(bits=4, bucket_size=8), lambda _: {}),
    ("qsgd3", lambda: QsgdCompressor(bits=3, bucket_size=5), lambda _: {}),
    ("topk_fraction", lambda: TopkCompressor(fraction=0.3), lambda _: {}),
    ("topk_budget", lambda: TopkCompressor(), lambda n: {"budget_bytes": 400 + n // 4}),
    ("fstq_budget", lambda: FstqCompressor(), lambda n: {"budget_bytes": 400 + n // 4}),
    (
        "fstq_stochastic",
        lambda: FstqCompressor(FstqConfig(rounding="stochastic")),
        lambda n: {"budget_bytes": 400 + n // 4},
    ),
    (
        "fstq_absmax",
        lambda: FstqCompressor(scale_rule="absmax"),
        lambda n: {"budget_bytes": 400 + n // 3},
    ),
    (
        "fstq_group",
        lambda: FstqCompressor(scale_rule="group"),
        lambda n: {"budget_bytes": 400 + n // 3},
    ),
    ("fstq_percentile", lambda: FstqCompressor(FstqConfig(allocation="percentile")), lambda _: {}),
]

METHOD_IDS = [m[0] for m in METHODS]


def dense_fp16_bytes(update: Mapping[str, torch.Tensor]) -> int:
    return 2 * sum(t.numel() for t in update.values())


@st.composite
def updates(draw: st.DrawFn, max_tensors: int = 4) -> Update:
    """Random small updates: odd sizes, empty and 0-d tensors, mixed dtypes, heavy tails."""
    count = draw(st.integers(0, max_tensors))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out: Update = {}
    for i in range(count):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 13), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
        kind = draw(st.sampled_from(["normal", "t", "sparse", "const"]))
        if kind == "normal":
            values = rng.standard_normal(shape)
        elif kind == "t":
            values = rng.standard_t(2, size=shape)
        elif kind == "sparse":
            values = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
        else:
            values = np.full(shape, 0.5)
        out[f"t{i}.{draw(st.sampled_from(['lora_A', 'lora_B']))}"] = torch.from_numpy(
            np.asarray(values * 1e-2)
        ).to(dtype)
    return out
