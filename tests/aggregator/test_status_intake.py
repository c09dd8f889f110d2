"""Device statuses: retained by the devices, taken at QoS 0 by the aggregator.

While the aggregator is away nothing queues up for it (a backlog of heartbeats could crowd upload
chunks out of its session queue); when it comes back it gets each device's retained last status,
which counts as heard from at its own timestamp.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from aggregator.adapter_model import ModelLoader
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import ClientState, ClientStatus
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import StatusTopic, status_topic, topic_as
from broker.transport import DelegatingTransport, Message, Transport

pytestmark = pytest.mark.broker


class Recording(DelegatingTransport):
    """The aggregator's real client, keeping the status messages it hands over."""

    def __init__(self, settings: MqttSettings, into: list[Message]) -> None:
        super().__init__(MqttClient(settings))
        self.into = into

    def receive(self, timeout: float | None = None) -> Message | None:
        msg = super().receive(timeout)
        if msg is not None and topic_as(msg.topic, StatusTopic) is not None:
            self.into.append(msg)
        return msg


def serve(settings: AggregatorSettings, loader: ModelLoader, into: list[Message]) -> Aggregator:
    def client(mqtt: MqttSettings) -> Transport:
        return Recording(mqtt, into)

    agg = Aggregator(settings, client_factory=client, model_loader=loader)
    agg.start()
    return agg


def steps(agg: Aggregator, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agg.step(0.05)


def test_statuses_sent_while_away_do_not_queue_and_the_retained_one_counts_from_its_time(
    make_settings: Callable[..., AggregatorSettings],
    mosquitto: LocalBroker,
    fleet: str,
    tiny_loader: ModelLoader,
) -> None:
    # Arrange: the aggregator has a session, then goes away
    settings = make_settings(
        rounds={"clients_per_round": 1, "min_clients": 1, "heartbeat_ttl_s": 60}
    )
    seen: list[Message] = []
    serve(settings, tiny_loader, seen).close()
    device = MqttClient(
        MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"{fleet}-d"[:64])
    )
    device.connect(timeout=10)
    topic = status_topic(fleet, "d")
    try:
        old = time.time() - 100  # heard from long before the heartbeat TTL
        for i in range(5):
            status = ClientStatus(client="d", state=ClientState.IDLE, timestamp=old + i)
            device.publish_wait(topic, encode(status), retain=True)
        # Act: it comes back
        agg = serve(settings, tiny_loader, seen)
        try:
            steps(agg, 1.5)
            # Assert: only the retained last status, and too old to open a round with
            assert [m.retain for m in seen] == [True]
            assert agg.open_round is None
            # A live status does open one.
            fresh = ClientStatus(client="d", state=ClientState.IDLE, timestamp=time.time())
            device.publish_wait(topic, encode(fresh), retain=True)
            deadline = time.monotonic() + 10
            while agg.open_round is None and time.monotonic() < deadline:
                agg.step(0.05)
            assert agg.open_round == 1 and len(seen) == 2 and not seen[-1].retain
        finally:
            agg.close()
    finally:
        device.publish_wait(topic, b"", retain=True)  # leave no retained state
        device.close()
