"""Error feedback: decompress(payload) + new_residual == delta + old_residual, round after round."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from codec_cases import dense_fp16_bytes, heavy_fisher, lora_update, mixed_update

from fstq.compressors import (
    ErrorFeedbackCompressor,
    FstqCompressor,
    TopkCompressor,
    compress_round,
    decompress,
)
from fstq.config import FstqConfig
from fstq.errors import ConfigError

EF_COMPRESSORS: dict[str, Callable[[], ErrorFeedbackCompressor]] = {
    "fstq_nearest": lambda: FstqCompressor(FstqConfig(error_feedback=True)),
    "fstq_stochastic": lambda: FstqCompressor(
        FstqConfig(error_feedback=True, rounding="stochastic")
    ),
    "fstq_absmax": lambda: FstqCompressor(FstqConfig(error_feedback=True), scale_rule="absmax"),
    "fstq_percentile": lambda: FstqCompressor(
        FstqConfig(error_feedback=True, allocation="percentile")
    ),
    "topk": lambda: TopkCompressor(),
}


@pytest.mark.parametrize("name", list(EF_COMPRESSORS))
def test_error_feedback_identity_over_rounds(name: str) -> None:
    # Arrange
    rng = np.random.default_rng(20)
    compressor = EF_COMPRESSORS[name]()
    residual: dict[str, torch.Tensor] | None = None
    for _ in range(3):
        delta = lora_update(rng)
        fisher = heavy_fisher(rng, delta) if name.startswith("fstq") else None
        budget = None if name == "fstq_percentile" else dense_fp16_bytes(delta) // 6
        old = residual
        # Act
        result = compress_round(
            compressor, delta, fisher=fisher, budget_bytes=budget, residual=old, rng=rng
        )
        decoded = decompress(result.payload)
        # Assert
        assert result.residual is not None
        for k, d in delta.items():
            prev = torch.zeros_like(d, dtype=torch.float64) if old is None else old[k].double()
            target = d.double() + prev
            got = decoded[k].double() + result.residual[k].double()
            # float32 arithmetic: a few ulps of the magnitudes involved
            ulps = 4 * 2**-24 * (d.double().abs() + prev.abs() + decoded[k].double().abs())
            assert torch.all((got - target).abs() <= ulps), k
            assert result.residual[k].dtype == torch.float32
        residual = result.residual


def test_error_feedback_identity_for_low_precision_dtypes() -> None:
    # The residual is taken against what the decoder returns in the tensor's own dtype.
    update = mixed_update(np.random.default_rng(21))
    result = TopkCompressor(fraction=0.5).compress(update)
    decoded = decompress(result.payload)
    assert result.residual is not None
    for k, t in update.items():
        got = decoded[k].double() + result.residual[k].double()
        assert torch.allclose(got, t.float().double(), rtol=0, atol=1e-7), k


def test_residual_is_none_without_error_feedback() -> None:
    update = lora_update(np.random.default_rng(22), layers=1)
    assert FstqCompressor().compress(update, budget_bytes=2000).residual is None
    assert TopkCompressor(fraction=0.1, error_feedback=False).compress(update).residual is None


def test_residual_without_error_feedback_is_refused() -> None:
    update = lora_update(np.random.default_rng(23), layers=1)
    residual = {k: torch.zeros_like(v) for k, v in update.items()}
    with pytest.raises(ConfigError):
        FstqCompressor().compress(update, budget_bytes=2000, residual=residual)


def test_residual_must_match_the_update() -> None:
    update = lora_update(np.random.default_rng(24), layers=1)
    compressor = FstqCompressor(FstqConfig(error_feedback=True))
    wrong_names = {k + "x": torch.zeros_like(v) for k, v in update.items()}
    wrong_shape = {k: torch.zeros(v.numel() + 1) for k, v in update.items()}
    for residual in (wrong_names, wrong_shape):
        with pytest.raises(ConfigError):
            compressor.compress(update, budget_bytes=2000, residual=residual)


def test_error_feedback_recovers_pruned_mass() -> None:
    # A coordinate too small to be sent accumulates in the residual until it is sent.
    delta = {"w": torch.tensor([1.0, 0.01] + [0.0] * 62)}
    compressor = TopkCompressor(fraction=1 / 64)
    residual = None
    sent_second = []
    for _ in range(3):
        result = compressor.compress(delta, residual=residual)
        sent_second.append(float(decompress(result.payload)["w"][1]))
        residual = result.residual
    assert residual is not None
    assert sent_second == [0.0, 0.0, 0.0]  # the large coordinate always wins...
    assert float(residual["w"][1]) == pytest.approx(0.03)  # ...the small one accumulates
