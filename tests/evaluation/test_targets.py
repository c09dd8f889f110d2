from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from run_records import fleet_eval, fleet_round, fleet_run, method_run

from common.record import from_json, to_json
from evaluation.run_record import FleetRound, FleetRun, RunRecordError
from evaluation.targets import (
    Target,
    ToTarget,
    first_reaching,
    progress,
    target_from_reference,
    to_target,
)

LOSS = Target("loss", 3.41, higher_is_better=False, rule="fixed")


def _round(
    r: int, loss: float | None, wire: int = 1000, time_s: float = 2.0, down: int = 0
) -> FleetRound:
    # The download takes a second more than the rest of the round whenever there is one.
    with_down = time_s + (1.0 if down else 0.0)
    return fleet_round(
        r, fleet_eval(loss), wire=wire, time_s=time_s, downlink=down, time_with_downlink_s=with_down
    )


def test_target_is_95_percent_of_the_reference_improvement() -> None:
    t = target_from_reference([3.63, 3.5, 3.4], metric="loss", higher_is_better=False)
    assert t.value == pytest.approx(3.63 - 0.95 * 0.23)
    assert (t.metric, t.higher_is_better) == ("loss", False)
    assert "95% of the reference's loss improvement" in t.rule and "round 2" in t.rule
    up = target_from_reference([0.2, 0.6], metric="accuracy", higher_is_better=True, fraction=0.5)
    assert up.value == pytest.approx(0.4) and up.reached(0.4) and not up.reached(0.39)


metric_values = st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=20)


@given(values=metric_values, higher=st.booleans(), fraction=st.floats(0.01, 1.0))
def test_the_reference_reaches_its_own_target(
    values: list[float], higher: bool, fraction: float
) -> None:
    first, last = values[0], values[-1]
    if first == last or (last > first) != higher:
        with pytest.raises(ValueError, match="did not improve"):
            target_from_reference(values, metric="m", higher_is_better=higher, fraction=fraction)
        return
    t = target_from_reference(values, metric="m", higher_is_better=higher, fraction=fraction)
    assert min(first, last) <= t.value <= max(first, last)
    reached = first_reaching(values, t)
    assert reached is not None and reached <= len(values) - 1
    if fraction == 1.0:
        assert t.value == last
    # Asking for more of the improvement never gives an easier target.
    harder = target_from_reference(values, metric="m", higher_is_better=higher, fraction=1.0)
    assert harder.reached(t.value) == (t.value == harder.value)


@pytest.mark.parametrize(
    ("values", "fraction", "match"),
    [
        ([3.6], 0.95, "at least one trained round"),
        ([3.6, math.nan], 0.95, "finite"),
        ([3.6, 3.7], 0.95, "did not improve"),
        ([3.6, 3.6], 0.95, "did not improve"),
        ([3.6, 3.5], 0.0, "fraction"),
        ([3.6, 3.5], 1.5, "fraction"),
    ],
)
def test_target_from_reference_rejects(values: list[float], fraction: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        target_from_reference(values, metric="loss", higher_is_better=False, fraction=fraction)


def test_first_reaching_skips_unevaluated_and_nan_rounds() -> None:
    assert first_reaching([3.6, None, math.nan, 3.5, 3.4, 3.3], LOSS) == 4
    assert first_reaching([3.6, 3.5], LOSS) is None
    assert first_reaching([], LOSS) is None
    acc = Target("accuracy", 0.5, higher_is_better=True, rule="fixed")
    assert first_reaching([0.4, 0.5, 0.6], acc) == 1


def test_to_target_counts_up_to_and_including_the_reaching_round() -> None:
    rounds = [_round(0, 3.63), _round(1, 3.5, 100, 1.0, 50), _round(2, None, 200, 2.0, 50),
              _round(3, 3.40, 400, 4.0), _round(4, 3.30, 800, 8.0, 50)]  # fmt: skip
    # Round 0 never costs anything.
    rounds[0] = replace(rounds[0], uplink_wire_bytes=999, downlink_wire_bytes=999)
    reached = to_target(rounds, LOSS)
    assert reached == ToTarget(
        round=3, uplink_wire_bytes=700, time_s=7.0, downlink_wire_bytes=100,
        time_with_downlink_s=9.0,
    )  # fmt: skip
    assert reached is not None and reached.total_wire_bytes == 800
    assert to_target(rounds[:3], LOSS) is None
    assert [p.value for p in progress(rounds, "loss")] == [3.63, 3.5, None, 3.40, 3.30]


rounds_st = st.lists(
    st.tuples(
        st.one_of(st.none(), st.floats(0, 10)), st.integers(0, 10**7), st.floats(0, 1e3),
        st.integers(0, 10**7),
    ),
    min_size=1,
    max_size=15,
)  # fmt: skip


@given(spec=rounds_st, target=st.floats(0, 10))
def test_to_target_agrees_with_first_reaching_and_cumulative_sums(
    spec: list[tuple[float | None, int, float, int]], target: float
) -> None:
    rounds = [_round(r, loss, wire, t, down) for r, (loss, wire, t, down) in enumerate(spec)]
    goal = Target("loss", target, higher_is_better=False, rule="x")
    k = first_reaching([loss for loss, *_ in spec], goal)
    got = to_target(rounds, goal)
    if k is None:
        assert got is None
        return
    assert got is not None and got.round == k
    assert got.uplink_wire_bytes == sum(w for _, w, _, _ in spec[1 : k + 1])
    assert got.downlink_wire_bytes == sum(d for _, _, _, d in spec[1 : k + 1])
    assert got.time_s == pytest.approx(sum(t for _, _, t, _ in spec[1 : k + 1]))
    downloads = sum(1 for _, _, _, d in spec[1 : k + 1] if d)
    assert got.time_with_downlink_s == pytest.approx(got.time_s + downloads)
    # An easier target is reached no later and for no more bytes.
    easier = to_target(rounds, Target("loss", target + 1, higher_is_better=False, rule="x"))
    assert easier is not None and easier.round <= got.round
    assert easier.uplink_wire_bytes <= got.uplink_wire_bytes


def _record_text(target: Target) -> str:
    run = fleet_run({"dense_fp16": method_run("dense_fp16", [_round(0, 3.6)])}, target)
    return to_json(run)


ROUND_0 = r"methods\.dense_fp16\.rounds\.0\."


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ('"uplink_wire_bytes": 0', '"uplink_wire_bytes": 10.5', "uplink_wire_bytes: .*integer"),
        ('"uplink_wire_bytes": 0', '"uplink_wire_bytes": true', "uplink_wire_bytes: .*integer"),
        ('"uplink_wire_bytes": 0, ', "", "uplink_wire_bytes: Field required"),
        ('"round_time_s": 0.0', '"round_time_s": "1"', "round_time_s: .*number"),
        ('"round": 0', '"round": "0"', "round: .*integer"),
    ],
)
def test_malformed_rounds_are_refused_when_read(field: str, bad: str, match: str) -> None:
    text = _record_text(LOSS)
    assert field in text
    with pytest.raises(RunRecordError, match=f"^run.json: {ROUND_0}{match}"):
        from_json(FleetRun, text.replace(field, bad, 1), "run.json", RunRecordError)


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ('"value": 3.41', '"value": "low"', r"target\.value: .*number"),
        ('"rule": "fixed"', '"rule": "fixed", "by": "me"', r"target\.by: Unexpected"),
        ('"metric": "loss", ', "", r"target\.metric: Field required"),
    ],
)
def test_malformed_targets_are_refused_when_read(field: str, bad: str, match: str) -> None:
    text = _record_text(LOSS)
    assert field in text
    with pytest.raises(RunRecordError, match=f"^run.json: {match}"):
        from_json(FleetRun, text.replace(field, bad, 1), "run.json", RunRecordError)


def test_target_round_trips_through_the_run_record() -> None:
    back = from_json(FleetRun, _record_text(LOSS), "run.json", RunRecordError)
    assert back.target == LOSS
