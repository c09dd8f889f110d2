"""Baselines behind the same interface: QSGD (unbiased, bits-monotone) and Top-k."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from codec_cases import lora_update

from fstq.compressors import QsgdCompressor, TopkCompressor, decompress
from fstq.errors import ConfigError
from fstq.qsgd import qsgd_levels


def _qsgd_decode(v: torch.Tensor, bits: int, bucket: int, seed: int) -> torch.Tensor:
    payload = QsgdCompressor(bits, bucket).compress({"v": v}, rng=np.random.default_rng(seed))
    return decompress(payload.payload)["v"].double()


@pytest.mark.parametrize("bits", [2, 4])
def test_qsgd_is_unbiased(bits: int) -> None:
    # Arrange
    rng = np.random.default_rng(30)
    bucket, repeats = 64, 400
    v = torch.from_numpy(rng.standard_t(3, size=256).astype(np.float32))
    # Act
    mean = sum(_qsgd_decode(v, bits, bucket, seed) for seed in range(repeats)) / repeats
    # Assert: per coordinate, Var[Q(v_i)] = (||b||/s)^2 f (1 - f) with f = frac(|v_i| s/||b||),
    # at most (||b||/s)^2 / 4; the mean of `repeats` decodes has that variance / repeats.
    s = qsgd_levels(bits)
    x = v.double().reshape(-1, bucket)
    norms = x.norm(dim=1, keepdim=True)
    level = x.abs() * s / norms
    var = ((norms / s) ** 2 * (level - level.floor()) * (1 - (level - level.floor()))).reshape(-1)
    assert torch.all(var <= (norms / s).pow(2).expand_as(x).reshape(-1) / 4 + 1e-12)
    err = mean - v.double()
    exact = var < 1e-20
    assert torch.all(err[exact].abs() < 1e-6)
    z2 = err[~exact] ** 2 / (var[~exact] / repeats)
    assert float(z2.mean()) < 1.5  # chi-square / dof: ~1 for an unbiased quantiser
    assert float(z2.max()) < 36.0  # no coordinate beyond 6 sigma


def test_qsgd_error_shrinks_as_bits_grow() -> None:
    rng = np.random.default_rng(31)
    v = torch.from_numpy(rng.standard_normal(1024).astype(np.float32))
    errors = [
        np.mean(
            [float(((_qsgd_decode(v, bits, 128, s) - v.double()) ** 2).sum()) for s in range(10)]
        )
        for bits in range(2, 9)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize(("bits", "bucket"), [(2, 512), (3, 7), (4, 512), (8, 1)])
def test_qsgd_packs_exactly(bits: int, bucket: int) -> None:
    update = lora_update(np.random.default_rng(32), layers=1)
    report = QsgdCompressor(bits, bucket).compress(update).report
    assert report.values == sum((t.numel() * bits + 7) // 8 for t in update.values())
    assert report.scales == sum(
        4 * -(-t.numel() // min(bucket, t.numel())) for t in update.values()
    )
    assert report.bits_histogram == {bits: report.n_coords}


def test_qsgd_rejects_bad_settings() -> None:
    for kwargs in ({"bits": 1}, {"bits": 9}, {"bucket_size": 0}):
        with pytest.raises(ConfigError):
            QsgdCompressor(**kwargs)


def test_topk_fraction_sends_the_largest_magnitudes() -> None:
    # Arrange: distinct magnitudes across two tensors (global, not per-tensor, top-k)
    rng = np.random.default_rng(33)
    values = rng.permutation(np.arange(1, 201, dtype=np.float32)) * rng.choice([-1, 1], 200)
    update = {
        "a": torch.from_numpy(values[:120].copy()),
        "b": torch.from_numpy(values[120:].copy()),
    }
    # Act
    decoded = decompress(
        TopkCompressor(fraction=0.1, error_feedback=False).compress(update).payload
    )
    # Assert
    sent = torch.cat([decoded["a"], decoded["b"]])
    assert int(torch.count_nonzero(sent)) == 20
    assert sorted(sent[sent != 0].abs().tolist()) == [float(v) for v in range(181, 201)]


def test_topk_needs_a_budget_or_a_fraction() -> None:
    with pytest.raises(ConfigError):
        TopkCompressor().compress({"w": torch.ones(4)})
    with pytest.raises(ConfigError):
        TopkCompressor(fraction=1.5)
