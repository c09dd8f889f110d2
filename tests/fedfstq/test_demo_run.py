"""`fedfstq demo --model tiny` end to end, as a newcomer runs it (output to a pipe: one line per
change), checked against the aggregator's own records."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.round_result import read_rounds
from common.record import jsonable
from fedfstq.demo_report import COLUMNS, row, table_text

pytestmark = pytest.mark.broker

STAGES = (
    "fetching the global adapter",
    "training step 0/2",
    "compressing the update",
    "upload sent, waiting for the aggregator's acknowledgement",
)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_demo_shows_each_device_at_work_and_ends_with_bytes_both_ways(
    tmp_path: Path, protocol: str
) -> None:
    # Act: every service and the live view speak ``protocol`` to the private Mosquitto
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "fedfstq.cli", "demo", "--model", "tiny", "--clients", "2",
         "--rounds", "2", "--steps", "2", "--examples-per-client", "12", "--eval-examples", "6",
         "--workdir", str(workdir), "--json", str(tmp_path / "rounds.json"),
         "--mqtt-protocol", protocol],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    records = read_rounds(workdir / "aggregator" / "rounds.jsonl")
    assert [r.status for r in records] == ["closed", "closed"]
    # Live: who was selected, each device's stages, the arrivals. (Steps within a second of the
    # last status are held back: the tiny model's steps are that fast.)
    assert "round 1 opened on v0: selected device-0, device-1" in out
    # Round 1 trains from v0 derived on each device (nothing to fetch); round 2 fetches v1 as a
    # catch-up on top of v0 (the demo's default downlink).
    for device in ("device-0", "device-1"):
        for r in (1, 2):
            for doing in STAGES[r == 1 :]:
                assert f"{device} round {r}: {doing}" in out
        assert f"{device} round 1: fetching" not in out
    for r in (1, 2):
        assert f"round {r} closed (on v{r - 1}); 2/2 arrived (device-0, device-1)" in out
    assert "global adapter v2 published" in out
    # The end: the table of the records, with uplink and downlink bytes and the perplexity.
    assert table_text(records) in out
    assert [rec.downlink_wire_bytes > 0 for rec in records] == [False, True]
    routes = [sorted(rec.downlink.routes) if rec.downlink else None for rec in records]
    assert routes == [["derived"], ["catchup"]]
    for rec in records:
        cells = dict(zip(COLUMNS, row(rec), strict=True))
        assert rec.uplink_wire_bytes > 0
        assert cells["downlink_B"] == f"{rec.downlink_wire_bytes:,}"
        assert rec.eval is not None and rec.eval.loss is not None
        assert float(cells["perplexity"]) == pytest.approx(math.exp(rec.eval.loss), 1e-3)
    # --json: the rounds.jsonl records, key for key.
    lines = (workdir / "aggregator" / "rounds.jsonl").read_text().splitlines()
    assert json.loads((tmp_path / "rounds.json").read_text()) == [json.loads(x) for x in lines]
    assert [jsonable(r) for r in records] == [json.loads(x) for x in lines]
    # Held-out questions, answered by v0 and by the final adapter.
    assert "the initial adapter (v00000) and the final one (v00002)" in out
    assert len(re.findall(r"its perplexity: \d+\.\d under v00000, \d+\.\d under v00002", out)) == 3
