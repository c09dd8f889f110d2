"""`fedfstq bench fleet --report`: merging run records of one fleet (the runs themselves are
exercised by tests/evaluation/test_fleet.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from run_records import fleet_eval, fleet_round, fleet_run, method_run, run_config

from evaluation.run_record import FleetRun, read_run, write_run
from fedfstq.bench_fleet import merge_by_seed, merge_records
from fedfstq.cli import main


def _record(
    method: str,
    alpha: float = 0.1,
    losses: tuple[float, ...] = (4.0, 3.5),
    budget_fraction: float = 0.125,
    budget_bytes: int | None = None,
    seed: int = 0,
) -> FleetRun:
    rounds = [
        fleet_round(i, fleet_eval(loss), wire=1000 * i, time_s=float(i))
        for i, loss in enumerate(losses)
    ]
    config = replace(run_config(alpha=alpha, budget_fraction=budget_fraction), seed=seed)
    return fleet_run({method: method_run(method, rounds, budget_bytes=budget_bytes)}, None, config)


def test_merge_keeps_every_method_of_one_fleet() -> None:
    merged = merge_records([_record("dense_fp16"), _record("fstq")])
    assert list(merged.methods) == ["dense_fp16", "fstq"]


def test_merge_keeps_a_budgeted_method_at_another_budget_apart() -> None:
    low = _record("fstq", budget_fraction=0.03125, budget_bytes=3)
    first = _record("fstq", budget_fraction=0.125, budget_bytes=10)
    assert list(merge_records([first, low]).methods) == ["fstq", "fstq@0.03125"]
    # What a run measured or how long it ran does not make it another fleet.
    longer = replace(low, config=replace(low.config, rounds=12, links={}, dense_fp16_bytes=1))
    assert list(merge_records([first, longer]).methods) == ["fstq", "fstq@0.03125"]


def test_merge_refuses_runs_of_different_fleets() -> None:
    with pytest.raises(ValueError, match="alpha"):
        merge_records([_record("dense_fp16"), _record("fstq", alpha=1.0)])


def test_report_prints_tables_and_fixes_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_run(a, _record("dense_fp16"))
    write_run(b, _record("fstq", losses=(4.0, 3.9)))
    out = tmp_path / "merged.json"
    argv = ["bench", "fleet", "--report", str(a), str(b), "--json", str(out)]
    assert main(argv) == 0
    merged = read_run(out)
    assert merged.target is not None
    assert merged.target.value == pytest.approx(3.5 + 0.05 * 0.5)
    text = capsys.readouterr().out
    assert "| fstq |" in text and "not reached" in text


def test_report_of_a_malformed_record_names_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    write_run(bad, _record("fstq"))
    bad.write_text(bad.read_text().replace('"uplink_wire_bytes": 1000', '"uplink_wire_bytes": 1e3'))
    assert main(["bench", "fleet", "--report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: methods.fstq.rounds.1.uplink_wire_bytes:" in err
    assert len(err.splitlines()) == 1


def test_report_of_a_missing_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "fleet", "--report", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_a_longer_run_is_compared_where_dense_stopped() -> None:
    from evaluation.summary import summarize

    # fstq runs one round longer (to reach the target): its loss change vs dense is taken at
    # dense's last round (3.6 vs 3.5), not at its own (3.4).
    merged = merge_records([_record("dense_fp16"), _record("fstq", losses=(4.0, 3.6, 3.4))])
    fstq = summarize(merged).methods["fstq"]
    assert fstq.final_round == 2
    assert fstq.vs_dense_pct["loss"] == pytest.approx((3.6 - 3.5) / 3.5 * 100)


def test_bad_options_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "fleet", "--methods", "dense_fp16,zip"]) == 2
    assert "unknown method 'zip'" in capsys.readouterr().err
    trace = tmp_path / "trace.json"
    trace.write_text('{"clients": {"d": {"uplink_kbps": -1}}}')
    assert main(["bench", "fleet", "--trace", str(trace)]) == 2
    assert "trace.json" in capsys.readouterr().err


def test_seeds_are_merged_apart_never_into_one_fleet() -> None:
    records = [_record("dense_fp16"), _record("fstq", seed=1), _record("dense_fp16", seed=1),
               _record("fstq")]  # fmt: skip
    by_seed = merge_by_seed(records)
    assert list(by_seed) == [0, 1]
    assert all(set(r.methods) == {"dense_fp16", "fstq"} for r in by_seed.values())
    assert [r.config.seed for r in by_seed.values()] == [0, 1]
    with pytest.raises(ValueError, match="seed"):
        merge_records([_record("dense_fp16"), _record("fstq", seed=1)])


def test_report_of_two_seeds_prints_each_and_both_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    # Dense's target is 3.43 in both; seed 0's fstq reaches it at round 2, seed 1's at 1.
    for seed, fstq_losses in ((0, (4.0, 3.45, 3.42)), (1, (4.0, 3.42, 3.3))):
        for method, losses in (("dense_fp16", (4.0, 3.5, 3.4)), ("fstq", fstq_losses)):
            path = tmp_path / f"{method}-{seed}.json"
            write_run(path, _record(method, losses=losses, seed=seed))
            paths.append(str(path))
    out = tmp_path / "merged.json"
    argv = ["bench", "fleet", "--report", *paths, "--json", str(out), "--plots",
            str(tmp_path / "plots")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "## Seed 0" in text and "## Seed 1" in text and "## Across seeds 0, 1" in text
    merged = {seed: read_run(tmp_path / f"merged-s{seed}.json") for seed in (0, 1)}
    assert {s: r.config.seed for s, r in merged.items()} == {0: 0, 1: 1}
    row = next(ln for ln in text.splitlines() if ln.startswith("| fstq | 0, 1 |"))
    assert "1.5 (s0: 2, s1: 1)" in row
    for seed in (0, 1):
        assert (tmp_path / "plots" / f"s{seed}" / "loss_vs_total.png").is_file()


@pytest.mark.parametrize("bad", ["", "0,0", "a", "-1"])
def test_bad_seed_lists_are_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "fleet", "--seeds", bad]) == 2
    assert "--seeds" in capsys.readouterr().err
