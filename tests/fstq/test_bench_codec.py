"""The codec benchmark's plumbing on a tiny input (the benchmark itself is not a test)."""

from __future__ import annotations

import argparse

from common.record import from_json, to_json
from fedfstq import bench_codec
from fedfstq.bench_results import CodecInput


def test_bench_rows_and_table() -> None:
    # Arrange
    shapes = [(f"layers.{i}.q_proj.lora_A.weight", (4, 64)) for i in range(3)]
    delta, fisher = bench_codec.synthetic_update(shapes, seed=3)
    # Act
    item = bench_codec._bench_input("tiny", delta, fisher, repeats=1)
    table = bench_codec.markdown_table([item])
    # Assert
    assert [r.method.split()[0] for r in item.rows] == [
        "fstq",
        "fstq",
        "qsgd",
        "topk",
        "dense",
        "dense",
    ]
    for row in item.rows:
        assert row.compress_mb_s > 0 and row.decompress_mb_s > 0
        assert row.entropy_ratio >= 0.9
        assert sum(row.bits_histogram.values()) == item.coords
    assert item.rows[0].bytes <= item.budget_bytes
    assert table.count("\n| ") == 1 + len(item.rows)
    # The JSON record reads back as the same record.
    assert from_json(CodecInput, to_json(item), "item") == item


def test_cli_hooks() -> None:
    parser = argparse.ArgumentParser()
    bench_codec.add_arguments(parser)
    args = parser.parse_args(["--quick", "--json", "out.json"])
    assert args.quick and args.json == "out.json"
