"""Rate-distortion behaviour of FSTQ on synthetic heavy-tailed updates and Fisher.

The allocation policies (``FstqCompressor(policy=...)``) are the paper's Table VII ablations:
``"fisher"`` (the method), ``"uniform"`` (ignores the Fisher) and ``"random"`` (random support).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from codec_cases import dense_fp16_bytes, distortion, heavy_fisher, lora_update, total_sq

from fstq.compressors import FstqCompressor, TopkCompressor, decompress


def _case(seed: int) -> tuple[dict, dict]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    update = lora_update(rng, layers=4, hidden=96, kv=32, r=8)
    return update, heavy_fisher(rng, update)


@pytest.mark.parametrize("scale_rule", ["search", "absmax", "group"])
def test_more_budget_never_increases_fisher_distortion(scale_rule: str) -> None:
    # Arrange
    update, fisher = _case(60)
    compressor = FstqCompressor(scale_rule=scale_rule)  # type: ignore[arg-type]
    budgets = [int(dense_fp16_bytes(update) / 32 * 1.1**i) for i in range(0, 40, 3)]
    # Act
    d = [
        distortion(
            update,
            decompress(compressor.compress(update, fisher=fisher, budget_bytes=b).payload),
            fisher,
        )
        for b in budgets
    ]
    # Assert (slack: float rounding only)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(d)), d


@pytest.mark.parametrize("denominator", [16, 8, 4])
@pytest.mark.parametrize("seed", [61, 62])
def test_fisher_allocation_beats_uniform_and_random_support(denominator: int, seed: int) -> None:
    # Arrange
    update, fisher = _case(seed)
    budget = dense_fp16_bytes(update) // denominator

    def fisher_distortion(policy: str) -> float:
        result = FstqCompressor(policy=policy).compress(  # type: ignore[arg-type]
            update, fisher=fisher, budget_bytes=budget, rng=np.random.default_rng(seed)
        )
        return distortion(update, decompress(result.payload), fisher)

    # Act
    guided, uniform, random = (fisher_distortion(p) for p in ("fisher", "uniform", "random"))
    # Assert
    assert guided < uniform < random
    assert random > 0.5 * total_sq(update, fisher) / denominator  # random support is poor


def test_fisher_guided_fstq_beats_topk_at_equal_bytes() -> None:
    update, fisher = _case(63)
    budget = dense_fp16_bytes(update) // 8
    fstq = FstqCompressor().compress(update, fisher=fisher, budget_bytes=budget)
    topk = TopkCompressor(error_feedback=False).compress(update, budget_bytes=budget)
    assert len(fstq.payload) <= budget and len(topk.payload) <= budget
    assert distortion(update, decompress(fstq.payload), fisher) < distortion(
        update, decompress(topk.payload), fisher
    )


def test_scale_search_is_not_worse_than_group_max_scales() -> None:
    # The default search picks, per tensor, the INT scales minimising the Lagrangian; the
    # paper's group-max scales are one of its candidates, so it should not lose clearly.
    update, fisher = _case(64)
    budget = dense_fp16_bytes(update) // 6
    d = {
        rule: distortion(
            update,
            decompress(
                FstqCompressor(scale_rule=rule)
                .compress(update, fisher=fisher, budget_bytes=budget)
                .payload
            ),
            fisher,
        )
        for rule in ("search", "group")
    }
    assert d["search"] < d["group"]


@pytest.mark.parametrize("scale", [2.0**-100, 1.0, 2.0**100])
def test_fisher_scale_does_not_change_the_allocation(scale: float) -> None:
    # Only ratios of Fisher values matter; extreme magnitudes must not underflow the prices.
    # (Powers of two keep the ratios exact in float32, so the payload must be identical.)
    update, fisher = _case(65)
    budget = dense_fp16_bytes(update) // 8
    reference = FstqCompressor().compress(update, fisher=fisher, budget_bytes=budget).payload
    scaled = {k: v * scale for k, v in fisher.items()}
    assert (
        FstqCompressor().compress(update, fisher=scaled, budget_bytes=budget).payload == reference
    )
