"""One contract, every transport: the in-memory fake and MqttClient on each broker set-up.

The set-ups (``broker.local_setups.SETUPS``): Mosquitto over MQTT 5 and over 3.1.1, a 2-node
ejabberd cluster (MQTT 5) and a 3-node NATS JetStream cluster (3.1.1). On a cluster the clients
of a test are spread over the nodes (client k on node k, or the ``node=`` given), so every
publish below crosses nodes. Where a broker cannot do what MQTT 5 can (3.1.1: no properties;
ejabberd: a retained store per node) the test says what the contract is there instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker.errors import ClientClosedError, PacketTooLargeError, PublishError
from broker.framing import packet_size
from broker.local_setups import SETUPS, BrokerSetup
from broker.memory import MemoryBroker, MemoryClient
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.transport import DelegatingTransport, Message, PublishHandle, Transport, Will

Factory = Callable[..., Transport]


@dataclass
class Rig:
    """``make(name, connect=True, will=None, node=None, **settings)`` and what it runs on."""

    make: Factory
    #: None for the in-memory fake.
    setup: BrokerSetup | None

    @property
    def v5(self) -> bool:
        return self.setup is None or self.setup.protocol == "5"

    @property
    def node_local_retained(self) -> bool:
        """Retained messages reach only subscribers of the node they were published through
        (ejabberd); clients re-publish theirs (``mqtt.republish_retained_s``) and the broker
        delivers those copies live, retain flag off."""
        return self.setup is not None and self.setup.name.startswith("ejabberd")


@pytest.fixture(params=["memory", *(pytest.param(s, marks=pytest.mark.broker) for s in SETUPS)])
def rig(request: pytest.FixtureRequest, fleet: str) -> Iterator[Rig]:
    made: list[Transport] = []
    memory = MemoryBroker()
    setup: BrokerSetup | None = None
    if request.param != "memory":
        setup = request.getfixturevalue("broker_setups")(request.param)

    def factory(
        name: str,
        *,
        connect: bool = True,
        will: Will | None = None,
        node: int | None = None,
        **changes: Any,
    ) -> Transport:
        base: dict[str, Any] = {"client_id": f"{name}-{fleet}"[:64], "backoff_base_s": 0.05}
        client: Transport
        if setup is None:
            client = MemoryClient(memory, MqttSettings(**(base | changes)), will=will)
        else:
            where = setup.node_of(len(made)) if node is None else node
            client = MqttClient(setup.settings(node=where, **(base | changes)), will=will)
        made.append(client)
        if connect:
            client.connect(timeout=20)
        return client

    yield Rig(factory, setup)
    for client in made:
        client.close()


@pytest.fixture
def make(rig: Rig) -> Factory:
    return rig.make


def _within(client: Transport, seconds: float) -> list[tuple[str, bytes]]:
    """(topic, payload) of everything received in the next ``seconds``."""
    deadline = time.monotonic() + seconds
    got = []
    while (left := deadline - time.monotonic()) > 0:
        if (msg := client.receive(left)) is not None:
            got.append((msg.topic, msg.payload))
    return got


def _one(client: Transport) -> tuple[str, bytes, bool]:
    msg = client.receive(10)
    assert msg is not None
    return msg.topic, msg.payload, msg.retain


def test_round_trip_keeps_payload_properties_and_order(rig: Rig, fleet: str) -> None:
    sub, pub = rig.make("sub"), rig.make("pub")
    sub.subscribe(f"c/{fleet}/#")
    for i in range(100):
        props = [("i", str(i))] if rig.v5 else []
        pub.publish(f"c/{fleet}/x", bytes([i]), expiry_s=60, user_properties=props)
    got = [sub.receive(10) for _ in range(100)]
    assert [m.payload for m in got if m] == [bytes([i]) for i in range(100)]
    first = got[0]
    assert first is not None and first.qos == 1
    if rig.v5:
        assert first.user_properties == (("i", "0"),)
        assert first.expiry_s is not None and 0 < first.expiry_s <= 60
    else:  # 3.1.1 carries neither: the application checks freshness from the message itself
        assert first.user_properties == () and first.expiry_s is None


def test_user_properties_need_mqtt5(rig: Rig, fleet: str) -> None:
    # 3.1.1 cannot carry them: a typed error before sending, never a silent drop.
    pub = rig.make("pub")
    if rig.v5:
        pub.publish_wait(f"u/{fleet}", b"x", user_properties=[("k", "v")])
        return
    with pytest.raises(PublishError) as info:
        pub.publish(f"u/{fleet}", b"x", user_properties=[("k", "v")])
    assert info.value.reason == "unsupported"
    pub.publish_wait(f"u/{fleet}", b"x")  # the client is fine


def test_wildcards_select_topics(make: Factory, fleet: str) -> None:
    sub, pub = make("sub"), make("pub")
    sub.subscribe(f"fstq/v1/{fleet}/up/+/+")
    pub.publish_wait(f"fstq/v1/{fleet}/ack/d1", b"no")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d1/3", b"yes-1")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d2/3", b"yes-2")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d2/3/extra", b"no")
    assert [_one(sub)[1], _one(sub)[1]] == [b"yes-1", b"yes-2"]
    assert sub.receive(0.3) is None


def test_retained_for_late_subscribers_and_deletion(rig: Rig, fleet: str) -> None:
    pub = rig.make("pub")
    pub.publish_wait(f"r/{fleet}/round", b"round 1", retain=True)
    pub.publish_wait(f"r/{fleet}/gone", b"x", retain=True)
    pub.publish_wait(f"r/{fleet}/gone", b"", retain=True)  # empty retained payload deletes
    late = rig.make("late")  # on another node of a cluster
    late.subscribe(f"r/{fleet}/+")
    if rig.node_local_retained:
        # From the publisher's periodic re-publish (every 2 s here), live; the deleted one never.
        got = _within(late, 4.5)
        assert got and set(got) == {(f"r/{fleet}/round", b"round 1")}
    else:
        assert _one(late) == (f"r/{fleet}/round", b"round 1", True)
        assert late.receive(0.3) is None
    pub.publish_wait(f"r/{fleet}/round", b"round 2", retain=True)
    got = _one(late)
    while rig.node_local_retained and got[1] == b"round 1":  # a copy sent before round 2
        got = _one(late)
    assert got == (f"r/{fleet}/round", b"round 2", False)  # live: retain flag off


def test_persistent_session_queues_while_offline(make: Factory, fleet: str) -> None:
    agg = make("agg", session_expiry_s=300, node=0)
    agg.subscribe(f"s/{fleet}/#")
    agg.close()
    pub = make("pub", node=0)
    pub.publish_wait(f"s/{fleet}/a", b"1")
    pub.publish_wait(f"s/{fleet}/a", b"2")
    back = make("agg", session_expiry_s=300, node=1)  # a cluster resumes it on another node
    assert [_one(back)[1], _one(back)[1]] == [b"1", b"2"]


def test_session_without_expiry_forgets(make: Factory, fleet: str) -> None:
    dev = make("dev", session_expiry_s=0)
    dev.subscribe(f"n/{fleet}/#")
    dev.close()
    make("pub").publish_wait(f"n/{fleet}/a", b"lost on purpose")
    again = make("dev", session_expiry_s=0)
    assert again.receive(0.3) is None


def test_oversize_publish_is_a_typed_error(make: Factory, fleet: str) -> None:
    pub = make("pub")
    with pytest.raises(PacketTooLargeError):
        pub.publish(f"o/{fleet}", b"x" * (1 << 20))
    pub.publish_wait(f"o/{fleet}", b"x" * (1 << 19))


def test_will_on_abort_not_on_close(make: Factory, fleet: str) -> None:
    watcher = make("watch")
    watcher.subscribe(f"w/{fleet}/+")
    polite = make("polite", will=Will(f"w/{fleet}/polite", b"bye", delay_s=1))
    crashy = make("crashy", will=Will(f"w/{fleet}/crashy", b"bye", delay_s=1))
    polite.close()
    crashy.abort()
    assert _one(watcher)[0] == f"w/{fleet}/crashy"
    assert watcher.receive(0.5) is None


class _Watch(DelegatingTransport):
    """Overrides only ``send``: every publish, waited for or not, must pass through it."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.sent: list[tuple[Message, PublishHandle]] = []

    def send(self, message: Message) -> PublishHandle:
        handle = super().send(message)
        self.sent.append((message, handle))
        return handle


def test_publish_and_publish_wait_go_through_send(rig: Rig, fleet: str) -> None:
    sub = rig.make("sub")
    sub.subscribe(f"p/{fleet}/+")
    pub = _Watch(rig.make("pub"))
    props = (("k", "v"),) if rig.v5 else ()
    pub.publish(f"p/{fleet}/a", b"one", expiry_s=60, user_properties=props).wait(10)
    pub.publish_wait(f"p/{fleet}/b", bytearray(b"two"), timeout=10, qos=0)
    assert [m for m, _ in pub.sent] == [
        Message(f"p/{fleet}/a", b"one", 1, False, props, 60),
        Message(f"p/{fleet}/b", b"two", 0, False, (), None),
    ]
    # The packet size a transport reports is the one Message.wire_size computes (paho's own
    # property packing for MqttClient); a 3.1.1 PUBLISH has no property section at all.
    for m, h in pub.sent:
        assert h.size == (m.wire_size if rig.v5 else packet_size(m.topic, m.payload, m.qos, 0))
    got = [(m.topic, m.payload, m.user_properties) for m in sub.messages(idle_timeout=1)]
    assert got == [(f"p/{fleet}/a", b"one", props), (f"p/{fleet}/b", b"two", ())]


def test_closed_client_refuses_and_ends_iteration(make: Factory, fleet: str) -> None:
    client = make("c")
    client.close()
    with pytest.raises(ClientClosedError):
        client.publish(f"x/{fleet}", b"late")
    assert client.receive(None) is None
    assert list(client.messages(idle_timeout=0.1)) == []
    assert not client.is_connected
