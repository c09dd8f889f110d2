"""When the round progress goes out (pure: the reporter takes the round and the time)."""

from __future__ import annotations

from dataclasses import replace

import torch

from aggregator.fedavg import StreamingFedAvg
from aggregator.metrics import RoundMetrics
from aggregator.progress import ProgressReporter
from aggregator.round_controller import Event, OpenRound
from aggregator.rounds import RoundState
from broker.codec import decode, encode
from broker.messages import RoundPhase, RoundProgress

T0 = 1_767_225_600.0
SELECTED = ("a", "b", "c")


def open_round() -> OpenRound:
    state = RoundState(4, frozenset(SELECTED), T0, T0 + 300, quorum=2)
    return OpenRound(
        state,
        3,
        StreamingFedAvg({"w": torch.zeros(2)}),
        RoundMetrics(4, 3, SELECTED, T0),
    )


def arrive(rnd: OpenRound, client: str, up_bytes: int) -> None:
    rnd.state = rnd.state.with_arrival(client)
    rnd.metrics.uplink_wire_bytes += up_bytes


def test_opening_and_arrivals_go_out_at_once_other_changes_at_most_every_interval() -> None:
    reporter = ProgressReporter("f", interval_s=1.0)
    rnd = open_round()
    first = reporter.poll(rnd, Event.OPENED, None, T0)
    assert first is not None
    assert (first.round, first.phase, first.selected, first.arrived) == (4, "open", SELECTED, ())
    assert reporter.poll(rnd, None, None, T0 + 5) is None  # nothing changed
    rnd.metrics.uplink_wire_bytes += 500
    bytes_moved = reporter.poll(rnd, None, None, T0 + 5.5)  # 5.5 s after the last message
    assert bytes_moved is not None and bytes_moved.uplink_wire_bytes == 500
    rnd.metrics.rejected["chunk_crc"] += 1
    rnd.metrics.uplink_wire_bytes += 500
    assert reporter.poll(rnd, None, None, T0 + 6.0) is None  # within the interval: held back
    arrive(rnd, "b", 1000)  # ... but an arrival is news at once, with what was held back
    arrival = reporter.poll(rnd, None, None, T0 + 6.1)
    assert arrival is not None
    assert (arrival.arrived, arrival.rejected, arrival.uplink_wire_bytes) == (("b",), 1, 2000)
    rnd.metrics.rejected["chunk_crc"] += 1
    assert reporter.poll(rnd, None, None, T0 + 6.5) is None
    later = reporter.poll(rnd, None, None, T0 + 7.1)  # sent once the interval has passed
    assert later is not None and later.rejected == 2
    # An extension goes out at once, whatever the interval.
    rnd.state = rnd.state.extended(60)
    extended = reporter.poll(rnd, Event.EXTENDED, None, T0 + 6.6)
    assert extended is not None and extended.deadline == T0 + 360


def test_the_end_goes_out_at_once_from_the_rounds_record() -> None:
    reporter = ProgressReporter("f", interval_s=60.0)
    rnd = open_round()
    reporter.poll(rnd, Event.OPENED, None, T0)
    arrive(rnd, "a", 700)
    record = replace(
        rnd.metrics.record(status="closed", global_version=4, closed_at=T0 + 9), arrived=("a",)
    )
    ended = reporter.poll(None, Event.CLOSED, record, T0 + 9)
    assert ended is not None
    assert (ended.phase, ended.arrived, ended.uplink_wire_bytes) == (RoundPhase.CLOSED, ("a",), 700)
    assert ended.deadline == T0 + 300 and ended.opened_at == T0
    assert decode(encode(ended), expect=RoundProgress) == ended
    assert reporter.poll(None, None, record, T0 + 10) is None  # no round: nothing more
    # The next round is news at once.
    assert reporter.poll(open_round(), Event.OPENED, None, T0 + 10.1) is not None
