"""The shared container: front-coded tensor table, input validation, encode-side limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import lora_update

from fstq.compressors import DenseCompressor, FstqCompressor, decompress
from fstq.container import ByteWriter, Method, TensorSpec, table_size, write_table
from fstq.errors import ConfigError


def test_table_size_matches_what_is_written() -> None:
    update = lora_update(np.random.default_rng(80), layers=3)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in update.items()]
    out = ByteWriter()
    assert write_table(out, Method.FSTQ, specs) == table_size(specs) == out.size


def test_front_coding_keeps_peft_names_cheap() -> None:
    update = lora_update(np.random.default_rng(81), layers=8)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in update.items()]
    raw_names = sum(len(k.encode()) for k in update)
    assert table_size(specs) < 0.45 * raw_names


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": torch.tensor([1.0, float("nan")])}, "NaN"),
        ({"w": torch.tensor([float("inf")])}, "NaN"),
        ({"w": torch.tensor([1e300], dtype=torch.float64)}, "NaN"),  # overflows float32
        ({"w": torch.tensor([1, 2])}, "dtype"),
        ({"x" * 2000: torch.ones(1)}, "limits"),
        ({"w": torch.ones((1,) * 9)}, "limits"),
        ({"\udcff": torch.ones(1)}, "unicode"),
    ],
    ids=["nan", "inf", "overflow", "int", "long_name", "deep", "surrogate"],
)
def test_bad_inputs_are_config_errors(update: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DenseCompressor("fp32").compress(update)


def test_bad_fisher_is_a_config_error() -> None:
    update = {"w": torch.ones(4)}
    for fisher in ({"w": -torch.ones(4)}, {"w": torch.ones(5)}, {"v": torch.ones(4)}):
        with pytest.raises(ConfigError):
            FstqCompressor().compress(update, fisher=fisher, budget_bytes=100)


def test_inputs_may_require_grad_or_be_non_contiguous() -> None:
    base = torch.randn(6, 4, requires_grad=True)
    update = {"t": base.t(), "g": base * 2}
    decoded = decompress(DenseCompressor("fp32").compress(update).payload)
    assert torch.equal(decoded["t"], base.t().detach())
    assert not decoded["g"].requires_grad


def test_empty_update() -> None:
    for compressor in (DenseCompressor("fp16"), FstqCompressor()):
        result = (
            compressor.compress({}, budget_bytes=100)
            if compressor.method == "fstq"
            else compressor.compress({})
        )
        assert decompress(result.payload) == {}
        assert result.report.n_coords == 0 and result.report.total == len(result.payload)
