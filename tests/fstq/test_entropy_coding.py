"""Entropy-coded FSTQ payloads: never larger than packing, more coordinates per byte, exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import (
    Update,
    dense_fp16_bytes,
    distortion,
    heavy_fisher,
    lora_update,
    streams_coded,
    updates,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fstq.compressors import FstqCompressor, decompress, make_compressor
from fstq.config import FstqConfig
from fstq.errors import BudgetError
from fstq.stream_stats import payload_entropy

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(update=updates(max_tensors=5), bands=st.sampled_from([(0, 30, 90), (50, 80, 95)]))
def test_coded_payload_is_never_larger_than_the_packed_one(
    update: Update, bands: tuple[float, float, float]
) -> None:
    # Percentile bands assign the same levels whatever the coding: only the packing differs.
    config = FstqConfig(allocation="percentile", percentiles=bands)
    coded = FstqCompressor(config).compress(update)
    packed = FstqCompressor(config, entropy_coding=False).compress(update)
    assert len(coded.payload) <= len(packed.payload)
    assert coded.report.n_sent == packed.report.n_sent
    for name, t in decompress(coded.payload).items():
        assert torch.equal(t, decompress(packed.payload)[name])


@PROPS
@given(
    seed=st.integers(0, 2**32 - 1),
    frac=st.floats(0.01, 0.6),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    scale_rule=st.sampled_from(["search", "absmax", "group"]),
)
def test_coded_streams_decode_to_what_the_encoder_planned(
    seed: int, frac: float, rounding: str, scale_rule: str
) -> None:
    # Arrange: error feedback exposes the encoder's own view of the decoded update
    rng = np.random.default_rng(seed)
    update = lora_update(rng, layers=1, hidden=int(rng.integers(8, 80)), kv=16, r=4)
    budget = 300 + int(frac * dense_fp16_bytes(update))
    compressor = FstqCompressor(
        FstqConfig(error_feedback=True, rounding=rounding),  # type: ignore[arg-type]
        scale_rule=scale_rule,  # type: ignore[arg-type]
    )
    # Act
    result = compressor.compress(
        update, fisher=heavy_fisher(rng, update), budget_bytes=budget, rng=rng
    )
    decoded = decompress(result.payload)
    # Assert: within budget, and decoded + residual == delta exactly (float32)
    assert len(result.payload) <= budget
    assert result.residual is not None
    for name, x in update.items():  # a wrong code would be off by a whole quantisation step
        assert torch.allclose(decoded[name] + result.residual[name], x, rtol=1e-6, atol=1e-12)


def test_coded_streams_are_used_on_lora_deltas() -> None:
    update = lora_update(np.random.default_rng(40), layers=2, hidden=96, kv=32, r=8)
    result = FstqCompressor().compress(update, budget_bytes=dense_fp16_bytes(update) // 8)
    assert streams_coded(result.report) == (True, True)


def test_equal_budget_sends_more_coordinates_at_lower_distortion() -> None:
    # Arrange
    rng = np.random.default_rng(41)
    update = lora_update(rng, layers=3, hidden=128, kv=32, r=8)
    fisher = heavy_fisher(rng, update)
    budget = dense_fp16_bytes(update) // 8
    # Act
    coded = FstqCompressor().compress(update, fisher=fisher, budget_bytes=budget)
    packed = FstqCompressor(entropy_coding=False).compress(
        update, fisher=fisher, budget_bytes=budget
    )
    # Assert: both fill the budget; the saved bytes buy coordinates and precision
    assert len(coded.payload) <= budget and len(packed.payload) <= budget
    assert coded.report.n_sent > 1.1 * packed.report.n_sent
    coded_err = distortion(update, decompress(coded.payload), fisher)
    packed_err = distortion(update, decompress(packed.payload), fisher)
    assert coded_err < 0.9 * packed_err


def test_packing_is_within_ten_percent_of_the_entropy() -> None:
    rng = np.random.default_rng(42)
    update = lora_update(rng, layers=3, hidden=128, kv=32, r=8)
    result = FstqCompressor().compress(
        update, fisher=heavy_fisher(rng, update), budget_bytes=dense_fp16_bytes(update) // 8
    )
    entropy = payload_entropy(result.payload)
    assert result.report.total <= 1.10 * (result.report.header + entropy.total)


def test_downlink_usage_without_fisher() -> None:
    # The catch-up downlink: make_compressor("fstq") with fisher=None, then decompress.
    rng = np.random.default_rng(43)
    delta = lora_update(rng, layers=2)
    budget = dense_fp16_bytes(delta) // 6
    result = make_compressor("fstq").compress(delta, fisher=None, budget_bytes=budget)
    decoded = decompress(result.payload)
    assert len(result.payload) <= budget
    assert list(decoded) == list(delta)
    for name, x in delta.items():
        assert decoded[name].shape == x.shape and decoded[name].dtype == x.dtype
    assert distortion(delta, decoded) < 0.2 * distortion(
        delta, {k: 0 * v for k, v in delta.items()}
    )
    # Deterministic: a plan is a pure function of its inputs (the downlink caches by key).
    again = make_compressor("fstq").compress(delta, fisher=None, budget_bytes=budget)
    assert again.payload == result.payload


def test_entropy_coding_is_a_compressor_option() -> None:
    assert make_compressor("fstq", entropy_coding=False).entropy_coding is False
    with pytest.raises(BudgetError):
        FstqCompressor(entropy_coding=False).compress({"w": torch.ones(8)}, budget_bytes=5)
