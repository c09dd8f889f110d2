"""Round trips of every uplink method: names, order, shapes, dtypes, accounting, precision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from codec_cases import (
    METHOD_IDS,
    METHODS,
    Update,
    dense_fp16_bytes,
    lora_update,
    mixed_update,
    updates,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fstq.compressors import (
    Compressor,
    DenseCompressor,
    FstqCompressor,
    decompress,
    make_compressor,
)
from fstq.config import FstqConfig


def _check_structure(update: Update, decoded: dict[str, torch.Tensor]) -> None:
    assert list(decoded) == list(update)
    for name, t in update.items():
        assert decoded[name].shape == t.shape, name
        assert decoded[name].dtype == t.dtype, name
        assert torch.isfinite(decoded[name].float()).all(), name


@pytest.mark.parametrize(("label", "factory", "kwargs"), METHODS, ids=METHOD_IDS)
def test_round_trip_preserves_names_order_shapes_dtypes(
    label: str, factory: Callable[[], Compressor], kwargs: Callable[[int], dict[str, Any]]
) -> None:
    # Arrange
    update = mixed_update(np.random.default_rng(1))
    # Act
    result = factory().compress(update, **kwargs(dense_fp16_bytes(update)))
    decoded = decompress(result.payload)
    # Assert
    _check_structure(update, decoded)
    report = result.report
    assert report.total == len(result.payload)
    assert (
        report.header + report.indices + report.tags + report.values + report.scales == report.total
    )
    assert report.n_coords == sum(t.numel() for t in update.values())
    assert report.dense_fp16 == 2 * report.n_coords and report.dense_fp32 == 4 * report.n_coords
    assert sum(report.bits_histogram.values()) == report.n_coords
    assert result.method == factory().method


@pytest.mark.parametrize(("label", "factory", "kwargs"), METHODS, ids=METHOD_IDS)
def test_compress_is_deterministic_and_does_not_mutate(
    label: str, factory: Callable[[], Compressor], kwargs: Callable[[int], dict[str, Any]]
) -> None:
    # Arrange
    update = lora_update(np.random.default_rng(2))
    before = {k: v.clone() for k, v in update.items()}
    # Act
    first = factory().compress(
        update, rng=np.random.default_rng(7), **kwargs(dense_fp16_bytes(update))
    )
    second = factory().compress(
        update, rng=np.random.default_rng(7), **kwargs(dense_fp16_bytes(update))
    )
    # Assert
    assert first.payload == second.payload
    assert all(torch.equal(update[k], before[k]) for k in update)


def test_dense_fp32_is_exact() -> None:
    update = mixed_update(np.random.default_rng(3))
    decoded = decompress(DenseCompressor("fp32").compress(update).payload)
    for name, t in update.items():
        expected = t.float().to(t.dtype) if t.dtype == torch.float64 else t
        assert torch.equal(decoded[name], expected), name


def test_dense_fp16_within_half_precision() -> None:
    update = mixed_update(np.random.default_rng(4))
    decoded = decompress(DenseCompressor("fp16").compress(update).payload)
    for name, t in update.items():
        x, y = t.double(), decoded[name].double()
        # Half rounding: relative 2**-11 for normals, absolute 2**-25 in the subnormal range.
        assert torch.all((x - y).abs() <= x.abs() * 2**-11 + 2**-25), name


def test_dense_fp16_clamps_out_of_range_values() -> None:
    update = {"big": torch.tensor([1e6, -1e6, 3.0])}
    decoded = decompress(DenseCompressor("fp16").compress(update).payload)
    assert decoded["big"].tolist() == [65504.0, -65504.0, 3.0]


@pytest.mark.parametrize("scale_rule", ["search", "absmax", "group"])
def test_fstq_with_huge_budget_is_exact_up_to_fp16(scale_rule: str) -> None:
    # Arrange: fisher None (F = 1); budget above the size of everything at fp16 + tags + bitmap
    update = lora_update(np.random.default_rng(5))
    budget = 10 * dense_fp16_bytes(update)
    # Act
    result = FstqCompressor(scale_rule=scale_rule).compress(update, budget_bytes=budget)  # type: ignore[arg-type]
    decoded = decompress(result.payload)
    # Assert: every non-zero coordinate sent, each within fp16 rounding (INT ones are exact)
    assert result.report.n_sent == sum(int(torch.count_nonzero(t)) for t in update.values())
    for name, t in update.items():
        err = (decoded[name].double() - t.double()).abs()
        assert torch.all(err <= t.double().abs() * 2**-11 + 2**-25), name


def test_fstq_percentile_bands_are_global_and_literal() -> None:
    # Arrange: distinct importance values so the bands hold exact shares of coordinates
    update = lora_update(np.random.default_rng(6))
    n = sum(t.numel() for t in update.values())
    cfg = FstqConfig(allocation="percentile", percentiles=(50.0, 80.0, 95.0))
    # Act
    report = FstqCompressor(cfg).compress(update).report
    # Assert: numpy "lower" percentile ranks decide the band edges
    hist = report.bits_histogram
    assert hist[0] == int(np.floor(0.50 * (n - 1)))
    assert hist[0] + hist[2] == int(np.floor(0.80 * (n - 1)))
    assert hist[0] + hist[2] + hist[4] == int(np.floor(0.95 * (n - 1)))


def test_fstq_percentile_never_sends_zero_importance() -> None:
    update = {"w": torch.zeros(100), "v": torch.ones(4)}
    report = FstqCompressor(FstqConfig(allocation="percentile")).compress(update).report
    assert report.n_sent == 4 and report.bits_histogram[0] == 100


@pytest.mark.parametrize("method", ["fstq", "dense_fp32", "dense_fp16", "qsgd", "topk"])
def test_make_compressor_builds_every_method(method: str) -> None:
    options: dict[str, Any] = {"fraction": 0.5} if method == "topk" else {}
    update = lora_update(np.random.default_rng(8), layers=1)
    if method == "fstq":
        options = {"allocation": "percentile"}
    compressor = make_compressor(method, **options)
    assert compressor.method == method
    _check_structure(update, decompress(compressor.compress(update).payload))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update=updates(), method=st.sampled_from(METHODS), budget_frac=st.floats(0.0, 3.0))
def test_round_trip_property(update: Update, method: Any, budget_frac: float) -> None:
    _, factory, kwargs = method
    options = kwargs(dense_fp16_bytes(update))
    if "budget_bytes" in options:
        options["budget_bytes"] = 400 + int(budget_frac * dense_fp16_bytes(update))
    result = factory().compress(update, **options)
    _check_structure(update, decompress(result.payload))
    assert result.report.total == len(result.payload)
    if "budget_bytes" in options:
        assert len(result.payload) <= options["budget_bytes"]
