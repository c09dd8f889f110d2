"""End to end on every broker set-up: two rounds of the real aggregator and three real agents.

The set-ups (``broker.local_setups.SETUPS``): Mosquitto over MQTT 5 and over 3.1.1, a 2-node
ejabberd cluster (the aggregator on node 1, every device on node 2, so everything crosses nodes)
and a 3-node NATS JetStream cluster (3.1.1; the aggregator on node 1, the devices spread over the
three). The catch-up downlink is on (the default). The checks do not trust the aggregator's
bookkeeping: the final global is recomputed from the devices' outbox payloads, and its hash is
compared with the manifest an observer on the devices' node received.

On ejabberd a retained message reaches only subscribers of the node it was published through;
the last test shows that the clients' re-publishing (``mqtt.republish_retained_s``) is what lets
a device on the other node see the aggregator's manifest at all.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from e2e_support import (
    FAST_MQTT,
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    expected_global,
    global_state,
    outbox_upload,
    read_rounds,
    tiny_loader,
    unique,
)

from aggregator.service import Aggregator
from broker.codec import decode
from broker.local_setups import SETUPS, BrokerSetup
from broker.messages import GlobalManifest
from broker.mqtt import MqttClient
from broker.topics import global_manifest_topic
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent
from workload.catchup import canonical_bytes

pytestmark = pytest.mark.broker

SIZES = (8, 12, 16)
ATOL = 1e-6
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class At:
    """A node's address (the full ``[mqtt]`` table, failover included, goes in as ``mqtt=``)."""

    host: str
    port: int


def device_node(setup: BrokerSetup, i: int) -> int:
    """Device ``i``'s first node: ejabberd's other node; NATS's nodes 2, 3, 1 (the aggregator
    is on node 1); Mosquitto's one node."""
    if setup.name.startswith("ejabberd"):
        return 1
    return setup.node_of(i + 1)


def assert_close(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=ATOL, rtol=0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", SETUPS)
def test_two_rounds_with_catch_up_on_every_broker_setup(
    name: str, broker_setups: Callable[[str], BrokerSetup], tmp_path: Path
) -> None:
    # Arrange
    setup: BrokerSetup = broker_setups(name)
    fleet = unique("mx")
    agg_node = At(*setup.endpoints[0])
    settings = aggregator_settings(
        agg_node, fleet, tmp_path / "agg", mqtt=setup.mqtt(0, **FAST_MQTT),
        rounds={"max_rounds": 2},
    )  # fmt: skip
    agents = []
    for i, pairs in enumerate(client_data(SIZES)):
        node = device_node(setup, i)
        dev = unique("dev")
        agents.append(
            EdgeAgent(
                agent_settings(
                    At(*setup.endpoints[node]), fleet, dev, tmp_path / dev, pairs,
                    mqtt=setup.mqtt(node, **FAST_MQTT), max_rounds=2,
                ),
                seed=i,
            )
        )  # fmt: skip
    names = sorted(a.settings.client_id for a in agents)
    # An observer on the devices' node records every global manifest that reaches it.
    watch_node = device_node(setup, 0)
    watcher = MqttClient(setup.settings(f"watch-{fleet}", node=watch_node, **FAST_MQTT))
    watcher.connect(timeout=20)
    watcher.subscribe(str(global_manifest_topic(fleet)))

    # Act
    started = time.monotonic()
    agg = Aggregator(settings, model_loader=tiny_loader)
    agg.start()  # v0 and round 1 announced before any device connects: they need retained copies
    with Services() as services:
        agg_run = services.aggregator(agg)
        runs = [services.agent(a) for a in agents]
        services.join(agg_run, *runs, timeout=120)
        assert not agg_run.stop.is_set() and agg_run.outcome() is None
    elapsed = time.monotonic() - started
    manifests = [
        decode(m.payload, expect=GlobalManifest)
        for m in watcher.messages(idle_timeout=0.5)
        if m.payload
    ]
    watcher.close()

    # Assert: both rounds closed with every device, each device acknowledged in both.
    assert [r.outcome() for r in runs] == [ExitCode.OK] * len(agents)
    records = read_rounds(settings)
    assert [(r["round"], r["status"]) for r in records] == [(1, "closed"), (2, "closed")]
    for r in records:
        assert r["selected"] == names and r["arrived"] == names
    for a in agents:
        done = [(x.entry.round_id, x.state) for x in a.reports]
        assert done == [(1, "complete"), (2, "complete")]
        # Round 1: v0 derived on the device; round 2: a catch-up payload on top of it.
        assert a.downlinks[1].route == "derived"
        d2 = a.downlinks[2]
        assert (d2.route, d2.staleness, d2.fallbacks) == ("catchup", 1, 0)
        assert d2.payload_bytes > 0
    assert records[1]["downlink"]["routes"]["catchup"]["fetches"] == len(agents)

    # The final global = v1 + FedAvg of the round-2 payloads the devices hold in their outboxes.
    v1, v2 = global_state(settings, 1), global_state(settings, 2)
    uploads = []
    for a in agents:
        entry, payload = outbox_upload(a.settings.state_dir, 2)
        assert entry.state == "complete" and entry.base_version == 1
        uploads.append((payload, entry.sample_count))
    assert_close(v2, expected_global(v1, uploads))
    # ... and the manifest that reached the devices' node names exactly those bytes.
    assert manifests and manifests[-1].version == 2
    assert manifests[-1].sha256 == hashlib.sha256(canonical_bytes(v2)).digest()
    log.info("%s: two rounds of 3 devices in %.1f s", name, elapsed)


def test_ejabberd_retained_manifest_crosses_nodes_only_when_republished(
    broker_setups: Callable[[str], BrokerSetup], tmp_path: Path
) -> None:
    setup: BrokerSetup = broker_setups("ejabberd-2")
    seen: dict[float, bool] = {}
    for period in (0.0, 0.5):
        fleet = unique("ret")
        topic = str(global_manifest_topic(fleet))
        settings = aggregator_settings(
            At(*setup.endpoints[0]), fleet, tmp_path / f"agg{period}",
            mqtt=setup.mqtt(0, **FAST_MQTT, republish_retained_s=period),
        )  # fmt: skip
        agg = Aggregator(settings, model_loader=tiny_loader)
        agg.start()
        clients: list[MqttClient] = []
        try:
            # The manifest is stored on node 1: a subscriber there gets it retained.
            local = MqttClient(setup.settings(f"local-{fleet}", node=0, **FAST_MQTT))
            clients.append(local)
            local.connect(timeout=20)
            local.subscribe(topic)
            got = local.receive(timeout=20)
            assert got is not None and got.retain
            want = decode(got.payload, expect=GlobalManifest)
            # A device on node 2 subscribes after that.
            device = MqttClient(setup.settings(f"device-{fleet}", node=1, **FAST_MQTT))
            clients.append(device)
            device.connect(timeout=20)
            device.subscribe(topic)
            if period == 0:
                # A retained message it publishes itself, on its own node, then subscribed to:
                # ejabberd answers one SUBSCRIBE (SUBACK, then its retained messages) before
                # the next, so anything retained for the manifest would have come first.
                sentinel = f"fstq/v1/{fleet}/sentinel"
                device.publish_wait(sentinel, b"s", retain=True, timeout=10)
                device.subscribe(sentinel)
                first = device.receive(timeout=20)
                assert first is not None
                seen[period] = first.topic == topic
                device.publish_wait(sentinel, b"", retain=True, timeout=10)
            else:
                first = device.receive(timeout=20)
                seen[period] = first is not None and first.topic == topic
                assert first is not None
                assert decode(first.payload, expect=GlobalManifest) == want
        finally:
            for c in clients:
                c.close()
            agg.close()
    # Without re-publishing the device never sees the manifest; with it, it does.
    assert seen == {0.0: False, 0.5: True}
