"""Empirical entropy of the emitted symbol streams (the benchmark's packing-efficiency measure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import heavy_fisher, lora_update

from fstq.compressors import DenseCompressor, FstqCompressor, QsgdCompressor, TopkCompressor
from fstq.errors import DecodeError
from fstq.stream_stats import payload_entropy


def test_dense_payloads_are_their_own_entropy() -> None:
    update = lora_update(np.random.default_rng(90), layers=1)
    for compressor in (DenseCompressor("fp32"), DenseCompressor("fp16")):
        result = compressor.compress(update)
        entropy = payload_entropy(result.payload)
        assert entropy.values == result.report.values
        assert entropy.total + result.report.header == result.report.total


def test_random_support_is_coded_near_its_entropy() -> None:
    # Top-k of i.i.d. values has a uniformly random support: Rice gets within a few percent.
    rng = np.random.default_rng(91)
    update = {"w": torch.from_numpy(rng.standard_normal(200_000).astype(np.float32))}
    result = TopkCompressor(fraction=0.05).compress(update)
    entropy = payload_entropy(result.payload)
    assert entropy.values == result.report.values  # fp16 values count raw
    assert entropy.indices <= result.report.indices <= 1.05 * entropy.indices


def test_fstq_and_qsgd_streams() -> None:
    rng = np.random.default_rng(92)
    update = lora_update(rng)
    fisher = heavy_fisher(rng, update)
    fstq = FstqCompressor().compress(update, fisher=fisher, budget_bytes=3000)
    entropy = payload_entropy(fstq.payload)
    assert entropy.scales == fstq.report.scales  # fp32 scales count raw
    assert 0 < entropy.tags <= fstq.report.tags
    qsgd = QsgdCompressor(bits=4, bucket_size=64).compress(update)
    q = payload_entropy(qsgd.payload)
    assert q.scales == qsgd.report.scales and 0 < q.values <= qsgd.report.values


def test_entropy_of_a_bad_payload_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        payload_entropy(b"FSTQ garbage")
