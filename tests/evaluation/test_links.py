from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluation.links import (
    DOWNLINK_ASYMMETRY,
    EXAMPLE_TRACE,
    LinkProfile,
    TraceError,
    assign_links,
    fraction_below,
    links_from_spec,
    load_trace,
    lognormal_links,
    with_downlinks,
)

CLIENTS = [f"c{i:03d}" for i in range(100)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uplink_bps": 0.0},
        {"uplink_bps": -1.0},
        {"uplink_bps": math.inf},
        {"uplink_bps": 1e6, "downlink_bps": 0.0},
        {"uplink_bps": 1e6, "windows": ((5.0, 5.0),)},
        {"uplink_bps": 1e6, "windows": ((-1.0, 5.0),)},
        {"uplink_bps": 1e6, "windows": ((0.0, 20.0),), "period_s": 10.0},
        {"uplink_bps": 1e6, "period_s": 0.0},
    ],
)
def test_profile_rejects_impossible_links(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        LinkProfile(**kwargs)


def test_availability_windows_are_half_open() -> None:
    p = LinkProfile(1e6, windows=((10.0, 20.0), (30.0, 40.0)))
    assert [p.available(t) for t in (0, 10, 19.9, 20, 35, 40, 1e9)] == [
        False, True, True, False, True, False, False,
    ]  # fmt: skip
    assert LinkProfile(1e6).available(-5.0) and LinkProfile(1e6).available(1e12)


@given(
    t=st.floats(0, 1e6, allow_nan=False),
    k=st.integers(0, 1000),
    start=st.floats(0, 50),
    length=st.floats(0.5, 50),
)
def test_periodic_windows_repeat(t: float, k: int, start: float, length: float) -> None:
    p = LinkProfile(1e6, windows=((start, start + length),), period_s=128.0)
    # Period and shifts are exact binary fractions here, so t mod period is exact.
    t = math.floor(t)
    assert p.available(t) == p.available(t + k * 128.0)
    assert p.available(t) == (start <= t % 128 < start + length)


def test_lognormal_defaults_give_the_documented_straggler_share() -> None:
    links = lognormal_links([f"c{i}" for i in range(40_000)], np.random.default_rng(0))
    mbps = np.array([p.uplink_bps for p in links.values()]) / 1e6
    assert mbps.min() >= 0.5 and mbps.max() <= 20.0
    assert fraction_below(2.0) == pytest.approx(0.244, abs=1e-3)
    assert np.mean(mbps < 2.0) == pytest.approx(fraction_below(2.0), abs=0.01)
    assert np.median(mbps) == pytest.approx(4.0, rel=0.05)
    assert np.mean(mbps == 0.5) == pytest.approx(0.0188, abs=0.005)  # the clipped floor
    assert all(p.available(0.0) and p.downlink_bps is None for p in links.values())


@given(
    seed=st.integers(0, 2**32 - 1),
    lo=st.floats(0.1, 2.0),
    spread=st.floats(1.0, 50.0),
    sigma=st.floats(0.0, 3.0),
    n=st.integers(0, 50),
)
def test_lognormal_rates_stay_in_range_and_follow_the_seed(
    seed: int, lo: float, spread: float, sigma: float, n: int
) -> None:
    hi = lo * spread
    median = math.sqrt(lo * hi)
    kw = {"median_mbps": median, "sigma": sigma, "lo_mbps": lo, "hi_mbps": hi}
    clients = CLIENTS[:n]
    links = lognormal_links(clients, np.random.default_rng(seed), **kw)
    assert list(links) == clients
    assert all(lo * 1e6 <= p.uplink_bps <= hi * 1e6 for p in links.values())
    assert links == lognormal_links(clients, np.random.default_rng(seed), **kw)


@pytest.mark.parametrize(
    "kw",
    [{"lo_mbps": 5.0}, {"hi_mbps": 3.0}, {"lo_mbps": 0.0}, {"sigma": -1.0}, {"hi_mbps": math.inf}],
)
def test_lognormal_rejects_bad_parameters(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        lognormal_links(CLIENTS, np.random.default_rng(0), **kw)


def test_fraction_below_is_zero_at_the_floor_and_a_step_without_spread() -> None:
    assert fraction_below(0.5) == 0.0
    assert fraction_below(4.5, sigma=0.0) == 1.0 and fraction_below(3.5, sigma=0.0) == 0.0


def test_example_trace_loads_both_field_styles() -> None:
    profiles = load_trace(EXAMPLE_TRACE)
    assert len(profiles) == 12
    assert sum(p.uplink_bps < 2e6 for p in profiles.values()) == 3
    assert profiles["lte-01"] == LinkProfile(4.2e6, 18e6)
    fs = profiles["fedscale-like-01"]  # FedScale's communication / active+inactive / finish_time
    assert fs == LinkProfile(3.8e6, None, ((0.0, 21600.0), (43200.0, 86400.0)), 86400.0)
    assert fs.available(1000.0) and not fs.available(30000.0) and fs.available(86400.0 + 5)


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


_window = st.tuples(st.floats(0, 1e4), st.floats(1e-3, 1e4)).map(lambda w: [w[0], w[0] + w[1]])
_entry = st.fixed_dictionaries(
    {"uplink_kbps": st.floats(1.0, 1e5)},
    optional={"downlink_kbps": st.floats(1.0, 1e5), "active": st.lists(_window, max_size=4)},
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(clients=st.dictionaries(st.text(min_size=1, max_size=8), _entry, min_size=1, max_size=8))
def test_trace_round_trips_through_json(tmp_path: Path, clients: dict[str, Any]) -> None:
    profiles = load_trace(_write(tmp_path, {"clients": clients}))
    assert list(profiles) == list(clients)
    for cid, entry in clients.items():
        p = profiles[cid]
        assert p.uplink_bps == entry["uplink_kbps"] * 1e3
        down = entry.get("downlink_kbps")
        assert p.downlink_bps == (None if down is None else down * 1e3)
        assert p.windows == tuple(sorted((a, b) for a, b in entry.get("active", [])))


_OK = {"uplink_kbps": 1000.0}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], '"clients" object'),
        ({"client": {}}, '"clients" object'),
        ({"clients": {}}, "no clients"),
        ({"format": "fedscale-pickle", "clients": {"a": _OK}}, "unsupported format"),
        ({"clients": {"a": 5}}, "'a': entry must be an object"),
        ({"clients": {"a": {**_OK, "uplink_kpbs": 1.0}}}, r"unknown fields \['uplink_kpbs'\]"),
        ({"clients": {"a": {"downlink_kbps": 1.0}}}, 'needs "uplink_kbps"'),
        ({"clients": {"a": {**_OK, "communication": 1.0}}}, "not both"),
        ({"clients": {"a": {"uplink_kbps": -1.0}}}, "uplink_bps must be positive"),
        ({"clients": {"a": {"uplink_kbps": True}}}, "must be a number"),
        ({"clients": {"a": {"uplink_kbps": "fast"}}}, "must be a number"),
        ('{"clients": {"a": {"uplink_kbps": NaN}}}', "must be finite"),
        ({"clients": {"a": {**_OK, "active": [[5, 1]]}}}, r"window \(5.0, 1.0\)"),
        ({"clients": {"a": {**_OK, "active": [[0, 1, 2]]}}}, r"\[start_s, end_s\]"),
        ({"clients": {"a": {**_OK, "active": {"0": 1}}}}, "active must be a list"),
        ({"clients": {"a": {**_OK, "active": [0, 5], "inactive": [3]}}}, "as long as active"),
        ({"clients": {"a": {**_OK, "active": [[0, 100]], "period_s": 50}}}, "end <= 50"),
    ],
)
def test_malformed_traces_raise_trace_error(tmp_path: Path, doc: Any, match: str) -> None:
    with pytest.raises(TraceError, match=match):
        load_trace(_write(tmp_path, doc))


def test_trace_entries_keep_their_own_ids_when_the_trace_names_every_client() -> None:
    profiles = {c: LinkProfile(1e6 + i) for i, c in enumerate(["x", *CLIENTS[:5]])}
    assigned = assign_links(CLIENTS[:5], profiles, np.random.default_rng(0))
    assert assigned == {c: profiles[c] for c in CLIENTS[:5]}


@given(n=st.integers(1, 120), m=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_assignment_uses_every_entry_evenly(n: int, m: int, seed: int) -> None:
    profiles = {f"t{j}": LinkProfile(1e6 * (j + 1)) for j in range(m)}
    assigned = assign_links(CLIENTS[:n] + [f"x{i}" for i in range(n - 100)], profiles,
                            np.random.default_rng(seed))  # fmt: skip
    assert len(assigned) == n
    uses = Counter(p.uplink_bps for p in assigned.values())
    assert set(uses) <= {p.uplink_bps for p in profiles.values()}
    assert all(n // m <= uses[p.uplink_bps] <= -(-n // m) for p in profiles.values())
    assert assigned == assign_links(list(assigned), profiles, np.random.default_rng(seed))


def test_assignment_rejects_duplicates_and_empty_traces() -> None:
    with pytest.raises(ValueError, match="unique"):
        assign_links(["a", "a"], {"t": LinkProfile(1e6)}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no link profiles"):
        assign_links(["a"], {}, np.random.default_rng(0))


def test_links_from_spec_covers_every_kind() -> None:
    rng = np.random.default_rng(0)
    spec = {"kind": "lognormal", "median_mbps": 4.0, "sigma": 1.0, "lo_mbps": 0.5, "hi_mbps": 20}
    assert links_from_spec(spec, CLIENTS, rng) == lognormal_links(CLIENTS, np.random.default_rng(0))
    fixed = links_from_spec({"kind": "fixed", "mbps": 20}, CLIENTS[:3], rng)
    assert set(fixed.values()) == {LinkProfile(20e6)}
    traced = links_from_spec({"kind": "trace", "path": str(EXAMPLE_TRACE)}, CLIENTS[:24], rng)
    assert Counter(traced.values()) == Counter(2 * list(load_trace(EXAMPLE_TRACE).values()))


@pytest.mark.parametrize(
    "spec",
    [{"kind": "lte"}, {"kind": "fixed"}, {"kind": "lognormal", "median": 4}, {"mbps": 20}],
)
def test_links_from_spec_rejects_unknown_models(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown link model"):
        links_from_spec(spec, CLIENTS, np.random.default_rng(0))


def test_downlinks_are_the_trace_s_own_or_the_anchored_model() -> None:
    # Huang et al. (MobiSys 2012): LTE medians 13 Mbit/s down, 6 Mbit/s up.
    assert DOWNLINK_ASYMMETRY == 13 / 6
    traced = load_trace(EXAMPLE_TRACE)
    filled = with_downlinks(traced)
    assert filled["lte-01"].downlink_bps == 18_000_000.0  # given by the trace
    assert filled["fedscale-like-02"].downlink_bps == pytest.approx(9_700_000.0 * 13 / 6)
    assert all(p.downlink_bps is not None for p in filled.values())
    # Only the downlink changes: uplink and windows stay as they were.
    assert all(
        (p.uplink_bps, p.windows, p.period_s) == (traced[c].uplink_bps, traced[c].windows,
                                                   traced[c].period_s)
        for c, p in filled.items()
    )  # fmt: skip
    drawn = lognormal_links(CLIENTS, np.random.default_rng(0))
    doubled = with_downlinks(drawn, 2.0)
    assert all(doubled[c].downlink_bps == 2 * drawn[c].uplink_bps for c in CLIENTS)


@pytest.mark.parametrize("asymmetry", [0.0, -1.0, math.inf, math.nan])
def test_downlinks_refuse_a_bad_asymmetry(asymmetry: float) -> None:
    with pytest.raises(ValueError, match="asymmetry"):
        with_downlinks({"a": LinkProfile(1e6)}, asymmetry)
