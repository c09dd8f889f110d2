"""What callers see: a light ``import fstq``, lazy re-exports, and one round's inputs per method."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from codec_cases import METHODS, dense_fp16_bytes, heavy_fisher, lora_update

import fstq
from fstq.compressors import (
    DenseCompressor,
    FstqCompressor,
    QsgdCompressor,
    TopkCompressor,
    compress_round,
)
from fstq.config import FstqConfig
from fstq.errors import ConfigError


def test_the_package_and_codec_import_neither_transformers_nor_peft() -> None:
    # A fresh interpreter: the aggregator's decode path imports exactly these.
    code = (
        "import sys\n"
        "import fstq, fstq.compressors, fstq.decoding\n"
        "from fstq import FstqCompressor, decompress, make_compressor\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_every_re_export_resolves_to_its_home_module() -> None:
    for name in fstq.__all__:
        value = getattr(fstq, name)
        home = sys.modules[value.__module__]
        assert getattr(home, name) is value, name
    assert set(fstq.__all__) <= set(dir(fstq))
    with pytest.raises(AttributeError):
        fstq.NoSuchThing  # noqa: B018


@pytest.mark.parametrize(("label", "factory", "kwargs"), METHODS, ids=[m[0] for m in METHODS])
def test_error_feedback_flag_says_whether_a_residual_comes_back(
    label: str, factory: object, kwargs: object
) -> None:
    update = lora_update(np.random.default_rng(30), layers=1)
    compressor = factory()  # type: ignore[operator]
    result = compressor.compress(update, **kwargs(dense_fp16_bytes(update)))  # type: ignore[operator]
    assert compressor.error_feedback == (result.residual is not None), label


def test_compress_round_gives_fstq_the_fisher_and_the_residual() -> None:
    # Arrange
    rng = np.random.default_rng(31)
    update = lora_update(rng, layers=1)
    fisher = heavy_fisher(rng, update)
    residual = {k: 0.3 * v for k, v in lora_update(rng, layers=1).items()}
    budget = dense_fp16_bytes(update) // 6
    compressor = FstqCompressor(FstqConfig(error_feedback=True))
    # Act
    routed = compress_round(
        compressor,
        update,
        fisher=fisher,
        residual=residual,
        budget_bytes=budget,
        rng=np.random.default_rng(1),
    )
    direct = compressor.compress(
        update, fisher=fisher, residual=residual, budget_bytes=budget, rng=np.random.default_rng(1)
    )
    unweighted = compressor.compress(
        update, residual=residual, budget_bytes=budget, rng=np.random.default_rng(1)
    )
    # Assert: exactly the direct call, and the Fisher changed the allocation
    assert routed.payload == direct.payload and routed.payload != unweighted.payload
    assert routed.residual is not None and direct.residual is not None
    assert all(torch.equal(routed.residual[k], direct.residual[k]) for k in update)


def test_compress_round_gives_topk_the_residual() -> None:
    rng = np.random.default_rng(32)
    update = lora_update(rng, layers=1)
    residual = {k: 0.3 * v for k, v in lora_update(rng, layers=1).items()}
    fisher = heavy_fisher(rng, update)
    compressor = TopkCompressor(fraction=0.1)
    routed = compress_round(compressor, update, fisher=fisher, residual=residual)
    assert routed.payload == compressor.compress(update, residual=residual).payload
    assert routed.payload != compressor.compress(update).payload


@pytest.mark.parametrize(
    "compressor",
    [DenseCompressor("fp16"), QsgdCompressor(bits=4, bucket_size=64)],
    ids=["dense", "qsgd"],
)
def test_compress_round_baselines_do_without_fisher_and_refuse_a_residual(
    compressor: DenseCompressor | QsgdCompressor,
) -> None:
    rng = np.random.default_rng(33)
    update = lora_update(rng, layers=1)
    fisher = heavy_fisher(rng, update)
    routed = compress_round(compressor, update, fisher=fisher, rng=np.random.default_rng(2))
    assert routed.payload == compressor.compress(update, rng=np.random.default_rng(2)).payload
    with pytest.raises(ConfigError, match="without error feedback"):
        compress_round(compressor, update, residual={k: 0 * v for k, v in update.items()})
