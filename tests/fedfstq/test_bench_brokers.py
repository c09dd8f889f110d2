"""``fedfstq bench brokers``: the same round of chunk uploads through each broker set-up."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.local_setups import SETUPS, BrokerSetup
from fedfstq import bench_brokers
from fedfstq.bench_brokers import BrokerBenchSpec, markdown_table, measure

pytestmark = pytest.mark.broker

SMALL = BrokerBenchSpec(devices=3, chunks=4, chunk_size=4096, repeats=2, round_timeout_s=60)


def test_the_setup_names_are_the_setups() -> None:
    # Repeated in bench_brokers so that its --help imports nothing heavy.
    assert bench_brokers.SETUP_NAMES == SETUPS


@pytest.mark.parametrize("name", SETUPS)
def test_every_chunk_of_every_round_arrives_and_is_timed(
    name: str, broker_setups: Callable[[str], BrokerSetup]
) -> None:
    # Act
    result = measure(broker_setups(name), SMALL)

    # Assert: every round fully arrived (a lost chunk would leave it incomplete).
    assert result.incomplete == []
    assert len(result.seconds) == SMALL.repeats and all(s > 0 for s in result.seconds)
    assert (result.messages, result.chunk_bytes) == (12, 12 * 4096)
    assert result.nodes == len(broker_setups(name).endpoints)
    row = markdown_table([result], SMALL).splitlines()[-1]
    assert row.startswith(f"| {name} | {result.protocol} |") and f"{result.mb_per_s:.1f}" in row
