from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.round_time import (
    ClientTiming,
    client_time,
    download_time,
    round_time,
    upload_time,
)

timings = st.builds(
    ClientTiming,
    compute_s=st.floats(0, 1e4),
    wire_bytes=st.integers(0, 10**9),
    rate_bps=st.floats(1e4, 1e9),
)
server = st.floats(0, 100)


def test_upload_time_is_bits_over_rate() -> None:
    assert upload_time(ClientTiming(0.0, 1_000_000, 8e6)) == 1.0  # 1 MB at 8 Mbit/s
    assert client_time(ClientTiming(4.0, 250_000, 0.5e6)) == 8.0  # a 0.5 Mbit/s straggler


def test_round_time_is_the_slowest_client_plus_server() -> None:
    fast, slow = ClientTiming(4.1, 240_000, 3.2e6), ClientTiming(1.0, 240_000, 0.5e6)
    assert round_time([fast, slow], 0.3) == pytest.approx(0.3 + 1.0 + 3.84)
    assert round_time([], 0.3) == 0.3


@given(arrived=st.lists(timings, max_size=12), server_s=server)
def test_round_time_equals_the_slowest_arrived_client(
    arrived: list[ClientTiming], server_s: float
) -> None:
    t = round_time(arrived, server_s)
    assert t >= server_s
    assert all(t >= server_s + client_time(c) for c in arrived)
    # Attained by some client: the round ends when its slowest upload is in.
    assert t == server_s + max((client_time(c) for c in arrived), default=0.0)
    assert t == round_time(list(reversed(arrived)), server_s)


@given(
    arrived=st.lists(timings, min_size=1, max_size=12),
    server_s=server,
    which=st.integers(0, 11),
    extra_bytes=st.integers(0, 10**8),
    extra_s=st.floats(0, 1e3),
)
def test_round_time_is_monotone_in_bytes_and_compute(
    arrived: list[ClientTiming], server_s: float, which: int, extra_bytes: int, extra_s: float
) -> None:
    i = which % len(arrived)
    c = arrived[i]
    heavier = ClientTiming(c.compute_s + extra_s, c.wire_bytes + extra_bytes, c.rate_bps)
    assert round_time([*arrived[:i], heavier, *arrived[i + 1 :]], server_s) >= round_time(
        arrived, server_s
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compute_s": -1.0, "wire_bytes": 1, "rate_bps": 1e6},
        {"compute_s": math.nan, "wire_bytes": 1, "rate_bps": 1e6},
        {"compute_s": 1.0, "wire_bytes": -1, "rate_bps": 1e6},
        {"compute_s": 1.0, "wire_bytes": 1, "rate_bps": 0.0},
        {"compute_s": 1.0, "wire_bytes": 1, "rate_bps": math.inf},
    ],
)
def test_timing_rejects_impossible_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        ClientTiming(**kwargs)


@pytest.mark.parametrize("server_s", [-0.1, math.nan, math.inf])
def test_round_time_rejects_bad_server_time(server_s: float) -> None:
    with pytest.raises(ValueError, match="server_s"):
        round_time([], server_s)


def test_the_download_comes_first_at_the_downlink_rate() -> None:
    # 1 MB down at 16 Mbit/s (0.5 s), 2 s compute, 0.25 MB up at 2 Mbit/s (1 s).
    t = ClientTiming(2.0, 250_000, 2e6, downlink_bytes=1_000_000, downlink_bps=16e6)
    assert download_time(t) == 0.5 and upload_time(t) == 1.0
    assert client_time(t) == 3.5 and client_time(t, downlink=False) == 3.0
    assert round_time([t], 0.1) == pytest.approx(3.6)
    assert round_time([t], 0.1, downlink=False) == pytest.approx(3.1)
    # Nothing fetched (a device holding the version, or one that derived v0): no download.
    assert download_time(ClientTiming(1.0, 0, 1e6)) == 0.0


@given(arrived=st.lists(timings, max_size=12), server_s=server, down=st.integers(0, 10**8))
def test_counting_the_download_never_shortens_a_round(
    arrived: list[ClientTiming], server_s: float, down: int
) -> None:
    fetched = [
        ClientTiming(c.compute_s, c.wire_bytes, c.rate_bps, down, c.rate_bps * 2) for c in arrived
    ]
    assert round_time(fetched, server_s) >= round_time(fetched, server_s, downlink=False)
    assert round_time(fetched, server_s, downlink=False) == round_time(arrived, server_s)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downlink_bytes": -1, "downlink_bps": 1e6},
        {"downlink_bytes": 10, "downlink_bps": None},  # bytes with no rate to charge them at
        {"downlink_bytes": 10, "downlink_bps": 0.0},
        {"downlink_bytes": 10, "downlink_bps": math.nan},
    ],
)
def test_timing_rejects_an_impossible_download(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        ClientTiming(1.0, 1, 1e6, **kwargs)
