"""Downlink accounting (evaluation.downlink): records written before it read as what they did
(every device that saw a round fetched the full adapter), recorded rows taken as they are, and
the committed evaluation's "before" numbers reproduced: bytes both ways to the target."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from run_records import device, fleet_eval, fleet_round

from evaluation.downlink import (
    FIRST_CONTACT,
    DeviceDownlink,
    DownlinkCount,
    client_timings,
    device_downlinks,
    round_downlinks,
    sort_staleness,
    tally,
    time_with_downlink,
)
from evaluation.links import DOWNLINK_ASYMMETRY
from evaluation.round_time import ClientTiming, round_time
from evaluation.run_record import DeviceRound, FleetRound, read_run
from evaluation.summary import summarize
from evaluation.tables import markdown_tables

# The merged record of the runs before issue 12 (every device downloaded the full adapter).
DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation"
MERGED = DOCS / "fleet-merged-before-issue-12.json"


def _legacy_round(
    r: int, clients: list[DeviceRound], downlink: int, status: str = "closed"
) -> FleetRound:
    rnd = fleet_round(r, fleet_eval(3.5), clients=clients, downlink=downlink, legacy=True)
    return replace(rnd, status="failed") if status == "failed" else rnd


def test_the_committed_evaluation_counted_both_ways_reproduces_the_before_table() -> None:
    # The numbers issue 12 started from: uplink + downlink up to the round reaching the target.
    s = summarize(read_run(MERGED))
    dense, fstq, qsgd = (s.methods[m].to_target for m in ("dense_fp16", "fstq", "qsgd"))
    assert dense is not None and fstq is not None and qsgd is not None
    assert (dense.round, dense.uplink_wire_bytes, dense.downlink_wire_bytes) == (
        7, 62_097_427, 64_769_541,
    )  # fmt: skip
    assert (fstq.round, fstq.uplink_wire_bytes, fstq.downlink_wire_bytes) == (
        10, 10_788_334, 90_105_504,
    )  # fmt: skip
    assert (qsgd.round, qsgd.uplink_wire_bytes, qsgd.downlink_wire_bytes) == (
        8, 18_124_192, 73_210_722,
    )  # fmt: skip
    assert s.methods["fstq"].to_target_ratios.total == pytest.approx(126_866_968 / 100_893_838)
    assert s.methods["fstq"].to_target_ratios.uplink == pytest.approx(62_097_427 / 10_788_334)
    md = markdown_tables(s)
    assert "| fstq | 10 | 10.79 MB | 5.76x | 90.11 MB | 0.72x | 100.89 MB | 1.26x |" in md
    # Every fetch of those runs was a full one; the uplink-only times are the recorded ones.
    for name, m in s.methods.items():
        assert set(m.downlink_by_route) == {"full"}, name
        assert m.downlink_by_route["full"].wire_bytes == m.total_downlink_wire_bytes
        assert sum(c.wire_bytes for c in m.downlink_by_staleness.values()) == (
            m.total_downlink_wire_bytes
        )
    assert dense.time_s == pytest.approx(84.3576, abs=1e-3)
    # The download made every round longer: the rebuilt time is larger, never smaller.
    assert dense.time_with_downlink_s > dense.time_s and fstq.time_with_downlink_s > fstq.time_s


def test_a_legacy_round_splits_its_downlink_over_the_devices_that_saw_it() -> None:
    clients = [
        device("a"), device("b", arrived=False),  # silent: never saw the round
        replace(device("c", arrived=False), dropped="halfway"),  # fetched, then its link died
        replace(device("d", arrived=False), dropped="offline"),
    ]  # fmt: skip
    got = device_downlinks([_legacy_round(1, clients, downlink=2000)])[0]
    assert got == {
        "a": DeviceDownlink("full", 1000, FIRST_CONTACT, first_contact=True),
        "c": DeviceDownlink("full", 1000, FIRST_CONTACT, first_contact=True),
    }


def test_legacy_staleness_counts_versions_and_a_failed_round_does_not_advance_them() -> None:
    rounds = [
        fleet_round(0, fleet_eval(4.0), legacy=True),
        _legacy_round(1, [device("a"), device("b")], 200),  # trains on v0 -> v1
        _legacy_round(2, [device("c")], 100, status="failed"),  # trains on v1, stays v1
        _legacy_round(3, [device("a"), device("c")], 200),  # trains on v1 -> v2
        _legacy_round(4, [device("b"), device("a")], 200),  # trains on v2
    ]
    got = device_downlinks(rounds)
    assert {c: d.staleness for c, d in got[3].items()} == {"a": 1, "c": 0}
    assert {c: d.staleness for c, d in got[4].items()} == {"b": 2, "a": 1}
    down = round_downlinks(rounds)
    assert down[4].by_staleness == {
        "1": DownlinkCount(fetches=1, wire_bytes=100), "2": DownlinkCount(fetches=1, wire_bytes=100)
    }  # fmt: skip
    assert down[0].by_route == {}


def test_recorded_rows_are_taken_as_they_are() -> None:
    # A first contact that derived v0 and caught up to v3: 3 behind, and still a first contact.
    row = replace(
        device("a"), downlink_bytes=70, downlink_route="catchup", staleness=3, first_contact=True
    )
    unseen = replace(device("b", arrived=False), downlink_bytes=0)  # silent: no route
    rnd = fleet_round(1, fleet_eval(3.5), clients=[row, unseen], downlink=70)
    assert device_downlinks([rnd])[0] == {"a": DeviceDownlink("catchup", 70, 3, True)}
    recorded = tally([DeviceDownlink("full", 900, 1)])
    assert round_downlinks([replace(rnd, downlink=recorded)])[0] == recorded


@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["none", "catchup", "full", "derived"]),
            st.integers(0, 10**6),
            st.one_of(st.just(FIRST_CONTACT), st.integers(0, 40)),
        ),
        max_size=20,
    )
)
def test_tally_adds_up_every_way(rows: list[tuple[str, int, int | str]]) -> None:
    devices = [DeviceDownlink(r, b, s) for r, b, s in rows]  # type: ignore[arg-type]
    t = tally(devices)
    total = sum(d.wire_bytes for d in devices)
    for counts in (t.by_route, t.by_staleness):
        assert sum(c.wire_bytes for c in counts.values()) == total
        assert sum(c.fetches for c in counts.values()) == len(devices)
    keys = list(t.by_staleness)
    assert keys == list(sort_staleness(t.by_staleness))
    if FIRST_CONTACT in keys:
        assert keys[0] == FIRST_CONTACT
    numbers = [int(k) for k in keys if k != FIRST_CONTACT]
    assert numbers == sorted(numbers)


def test_time_with_downlink_charges_each_download_at_the_downlink_rate() -> None:
    fast = replace(device("a", wire_bytes=1_000_000), rate_bps=8e6)  # 1 s up, 1 s compute
    slow = replace(device("b", wire_bytes=250_000), rate_bps=2e6)  # 1 s up, 1 s compute
    legacy = _legacy_round(1, [fast, slow], downlink=2 * 1_300_000)
    (t,) = time_with_downlink([legacy])
    # The slow link downloads 1.3 MB at 2 Mbit/s x 13/6: the slowest whole round.
    assert t == pytest.approx(0.1 + 1_300_000 * 8 / (2e6 * DOWNLINK_ASYMMETRY) + 1.0 + 1.0)
    # A recorded time is taken as it is; round 0 costs nothing.
    assert time_with_downlink([replace(legacy, round_time_with_downlink_s=7.5)]) == [7.5]
    assert time_with_downlink([fleet_round(0, fleet_eval(4.0), legacy=True)]) == [0.0]
    # A recorded downlink rate wins over the model.
    timed = client_timings(
        [replace(fast, downlink_rate_bps=1e6)], {"a": DeviceDownlink("full", 125_000, 1)}
    )
    assert timed == [ClientTiming(1.0, 1_000_000, 8e6, 125_000, 1e6)]
    assert round_time(timed, 0.0) == pytest.approx(1.0 + 1.0 + 1.0)
