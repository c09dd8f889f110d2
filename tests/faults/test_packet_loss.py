"""Packet loss: a real round through a lossy, rate-limited link in a network namespace.

Mosquitto runs in a namespace of the test's own (``netns_support``), behind a veth pair whose
namespace end drops ~10% of the packets in each direction (nftables ``numgen random``) and whose
both ends are rate-limited (``tc tbf``). The aggregator and three real agents run on the host
side, so every MQTT byte between them crosses the link; the kernel's TCP has to recover every
loss. Checks (``netns_fleet.audit``): both rounds close; every upload the aggregator
acknowledged is stored bit-exactly as the device produced it; each global is old + FedAvg of
exactly those payloads. Skipped where namespaces cannot be made (not root, no nft/ip/tc).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from netns_fleet import SIZES, audit, run_fleet
from netns_support import NetnsBroker, lossy_link, unavailable
from report import FaultRow

pytestmark = [pytest.mark.broker, pytest.mark.slow]

LOSS_PERCENT = 10
RATE = "1mbit"
ROUNDS = 2
CHUNK = 256  # dense fp32 of the tiny adapter (~7.3 KB) is ~29 chunks: many packets to lose


@pytest.mark.timeout(300)
def test_rounds_complete_bit_exactly_through_ten_percent_packet_loss(
    tmp_path: Path, fault_report: Callable[[FaultRow], None]
) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"packet-loss run not possible here: {reason}")
    with lossy_link(LOSS_PERCENT, rate=RATE) as link, NetnsBroker(link) as broker:
        run = run_fleet(broker, tmp_path, rounds=ROUNDS, chunk_size=CHUNK, timeout_s=240)
        dropped, retransmitted, shaped = link.dropped(), link.retransmitted(), link.tbf_stats()

    # The faults really happened: packets were dropped both ways and the rate limiter engaged.
    assert dropped["ingress"] > 0, dropped
    assert dropped.get("egress", 1) > 0, dropped
    assert retransmitted > 0  # ... and TCP repaired them (the broker's side alone)
    overlimits = [int(n) for n in re.findall(r"overlimits (\d+)", " ".join(shaped.values()))]
    assert sum(overlimits) > 0, shaped

    ledger = audit(run)
    names = sorted(a.settings.client_id for a in run.agents)
    assert [(r["round"], r["status"], r["arrived"]) for r in ledger.records] == [
        (k, "closed", names) for k in range(1, ROUNDS + 1)
    ]
    assert ledger.acknowledged == len(ledger.stored) == ROUNDS * len(SIZES)
    print(f"\npacket loss: dropped {dropped}, broker retransmitted {retransmitted} segments, "
          f"tbf overlimits {overlimits}", file=sys.stderr)  # fmt: skip
    both_ways = "both ways" if link.egress_loss else "host->broker only"
    fault_report(
        ledger.row(
            "packet loss (netns)",
            f"{LOSS_PERCENT}% random loss {both_ways} ({sum(dropped.values())} packets dropped, "
            f"{retransmitted} TCP segments re-sent by the broker), tbf {RATE}",
        )
    )
