"""The fleet run record as JSON: the committed records load and write back unchanged, missing or
mistyped fields are refused with their place named, and optional keys stay out until set."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from run_records import device, fleet_eval, fleet_round, fleet_run, method_run, run_config

from common.record import jsonable
from evaluation.fleet_config import FleetConfig
from evaluation.run_record import RunRecordError, read_run, write_run
from evaluation.summary import summarize
from evaluation.tables import markdown_tables
from evaluation.targets import Target

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation"
COMMITTED = sorted(DOCS.glob("*.json"))


def test_there_are_committed_records_to_check() -> None:
    assert len(COMMITTED) >= 8, COMMITTED  # otherwise the next test checks nothing


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_records_load_and_write_back_byte_for_byte(path: Path, tmp_path: Path) -> None:
    # Act
    run = read_run(path)
    write_run(tmp_path / path.name, run)

    # Assert (one committed file was saved without the final newline the runner writes)
    assert (tmp_path / path.name).read_bytes().rstrip(b"\n") == path.read_bytes().rstrip(b"\n")
    assert "### Traffic and memory (all rounds)" in markdown_tables(summarize(run))


def _record() -> dict[str, Any]:
    clients = [device("c000", payload_bytes=40, wire_bytes=60), device("c001", arrived=False)]
    rounds = [fleet_round(0, fleet_eval(4.0)), fleet_round(1, fleet_eval(3.5), clients=clients)]
    target = Target("loss", 3.6, higher_is_better=False, rule="fixed")
    return jsonable(
        fleet_run({"fstq": method_run("fstq", rounds, agent_peak_rss_mb=900.0)}, target)
    )


def _read(tmp_path: Path, record: dict[str, Any]) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    read_run(path)


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        (["methods", "fstq", "rounds"], None, r"methods\.fstq\.rounds: .*array"),
        (["methods", "fstq", "rounds", 1, "uplink_wire_bytes"], "many", r"1\.uplink_wire_bytes"),
        (["methods", "fstq", "rounds", 1, "clients", 0, "payload_bytes"], None, "payload_bytes"),
        (["methods", "fstq", "rounds", 1, "clients", 1, "dropped"], "gone", r"1\.dropped"),
        (["methods", "fstq", "agent_peak_rss_mb"], "big", "agent_peak_rss_mb"),
        (["methods", "fstq", "options"], {"bits": [4]}, r"options\.bits"),
        (["config", "alpha"], "0.1", r"config\.alpha"),
        (["target", "value"], "low", r"target\.value"),
    ],
)
def test_malformed_records_are_refused_naming_the_field(
    tmp_path: Path, where: list[Any], value: Any, match: str
) -> None:
    # Arrange
    record = _record()
    _read(tmp_path, record)  # the record as written reads back
    node: Any = record
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value

    # Act, Assert
    with pytest.raises(RunRecordError, match=f"run.json: .*{match}"):
        _read(tmp_path, record)


def test_a_missing_field_and_an_unknown_one_are_refused(tmp_path: Path) -> None:
    record = _record()
    del record["methods"]["fstq"]["rounds"][1]["eval"]
    with pytest.raises(RunRecordError, match=r"rounds\.1\.eval: Field required"):
        _read(tmp_path, record)
    record = _record()
    record["methods"]["fstq"]["rounds"][1]["duplicate_bytes"] = 0
    with pytest.raises(RunRecordError, match=r"rounds\.1\.duplicate_bytes: Unexpected"):
        _read(tmp_path, record)


def test_optional_keys_stay_out_of_the_json_until_set() -> None:
    record = _record()
    initial, trained = record["methods"]["fstq"]["rounds"]
    # Round 0 (the initial adapter) has no device bytes, late or rejected uploads.
    assert set(trained) - set(initial) == {"device_upload_bytes", "late", "rejected"}
    assert list(trained)[7:11] == ["uplink_resent_bytes", "device_upload_bytes",
                                   "downlink_wire_bytes", "late"]  # fmt: skip
    running = jsonable(replace(method_run("fstq", []), skipped_wait_s=None))
    assert "skipped_wait_s" not in running and "agent_peak_rss_mb" not in running
    assert record["methods"]["fstq"]["agent_peak_rss_mb"] == 900.0


def test_run_config_keeps_every_fleet_setting() -> None:
    config = run_config(alpha=0.5)
    names = [f.name for f in fields(config)]
    assert names[: len(fields(FleetConfig))] == [f.name for f in fields(FleetConfig)]
    assert names[-5:] == [
        "budget_bytes", "dense_fp16_bytes", "links", "downlink_asymmetry", "downlinks"
    ]  # fmt: skip
    assert config.alpha == 0.5 and config.links == {"c000": 1e6}
