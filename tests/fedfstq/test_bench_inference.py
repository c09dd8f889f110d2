"""`fedfstq bench inference` end to end on the tiny model (the benchmark itself is not a test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fedfstq import bench_inference, cli
from fstq.token_scores import TokenScores
from workload.batches import encode_prompt
from workload.data import QAPair

_SMALL = [
    "--model", "tiny", "--train-steps", "2", "--train-batch-size", "2", "--examples", "4",
    "--max-new-tokens", "3", "--keep", "0.5", "0.8", "--repeats", "1", "--batch-size", "2",
]  # fmt: skip


def _run(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    args = cli._build_parser().parse_args(["bench", "inference", *argv, "--json", str(out)])
    assert args.func(args) == 0
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_bench_runs_end_to_end_on_the_tiny_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Act: scores learned on the spot by the devices' trainer
    results = _run([*_SMALL, "--shots", "0", "2"], tmp_path)

    # Assert
    assert "learned" in results["scores"]["source"] and results["scores"]["ids_with_score"] > 0
    assert [s["shots"] for s in results["settings"]] == [0, 2]
    zero, two = results["settings"]
    assert two["mean_prompt_tokens"] > zero["mean_prompt_tokens"]  # shots make prompts longer
    for setting in results["settings"]:
        rows = setting["rows"]
        assert [r["keep"] for r in rows] == [1.0, 0.8, 0.5]  # the baseline is always added
        full, *reduced = rows
        assert full["speedup"] == full["cpu_speedup"] == 1.0 and full["kept_share"] == 1.0
        assert full["same_answer_as_full"] == 1.0
        assert all(r["prompt_tokens"] < full["prompt_tokens"] for r in reduced)
        assert reduced[1]["prompt_tokens"] <= reduced[0]["prompt_tokens"]
        for r in rows:
            assert 0 < r["decode_s"] < r["e2e_s"] and 0 < r["ttft_cpu_s"] < r["e2e_cpu_s"]
            assert len(r["e2e_s_runs"]) == 1 and 0 <= r["rouge_l"] <= 1
            assert 0 <= r["accuracy"] <= 1 and np.isfinite(r["loss"])
            assert 0 < r["answer_tokens"] <= 3
        assert set(setting["best_within_tolerance"]) == {"rouge_l", "accuracy", "loss", "all"}
    table = capsys.readouterr().out
    assert table.count("| 1.00 |") == 2 and "largest speedup with quality within 1%" in table


def test_bench_reads_a_device_score_file(tmp_path: Path, tokenizer: Any) -> None:
    # Arrange: a device state directory whose table scores only ids below 1000 (frequent
    # tokens); unseen ids rank above seen ones, so the reducer drops among those
    table = np.full(len(tokenizer), np.nan, dtype=np.float32)
    table[:1000] = np.linspace(0, 1, 1000, dtype=np.float32)
    save_file({"score": table}, str(tmp_path / "token_scores.safetensors"))

    # Act
    results = _run([*_SMALL, "--shots", "1", "--scores", str(tmp_path), "--ignore-eos"], tmp_path)

    # Assert
    assert results["scores"]["source"].startswith("file:") and results["spec"]["ignore_eos"]
    assert results["scores"]["ids_with_score"] == 1000
    rows = results["settings"][0]["rows"]
    assert rows[-1]["prompt_tokens"] < rows[0]["prompt_tokens"]


def test_prompt_helpers(tokenizer: Any) -> None:
    # Arrange
    shots = [QAPair("What is 2+2?", "4"), QAPair("Capital of France?", "Paris")]
    template = bench_inference.template_token_ids(tokenizer)

    # Act
    plain = bench_inference.encode_chat_prompt(tokenizer, "Who are you?")
    with_shots = bench_inference.encode_chat_prompt(tokenizer, "Who are you?", shots)
    scores = TokenScores.from_numpy(
        torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(0)).numpy()
    )
    reduced = bench_inference.reduce_prompts(
        [with_shots], scores, 0.5, protected_ids=template, keep_last=2
    )[0]

    # Assert
    assert plain == encode_prompt(tokenizer, "Who are you?")  # what devices train on
    text = tokenizer.decode(with_shots)
    assert text.index("2+2") < text.index("Paris") < text.index("Who are you?")
    assert text.endswith("<|im_start|>assistant\n")
    names = {tokenizer.decode([i]) for i in template}
    assert {"<|im_start|>", "<|im_end|>", "\n", "user", "system"} <= names
    assert [t for t in with_shots if t in template] == [t for t in reduced if t in template]
    assert len(reduced) < len(with_shots) and reduced[-2:] == with_shots[-2:]


def test_bad_options_exit_2() -> None:
    # Refused while parsing (fedfstq.option_types); spec_from_args still checks programmatic use
    assert cli.main(["bench", "inference", "--keep", "1.5"]) == 2
    args = cli._build_parser().parse_args(["bench", "inference"])
    args.keep_last = -1
    with pytest.raises(ValueError, match="keep-last"):
        bench_inference.spec_from_args(args)
