"""One contract, two transports: MqttClient on a real Mosquitto and the in-memory fake."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker.errors import ClientClosedError, PacketTooLargeError
from broker.local import LocalBroker
from broker.memory import MemoryBroker, MemoryClient
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.transport import DelegatingTransport, Message, PublishHandle, Transport, Will

Factory = Callable[..., Transport]


@pytest.fixture(params=["memory", pytest.param("mqtt", marks=pytest.mark.broker)])
def make(request: pytest.FixtureRequest, fleet: str) -> Iterator[Factory]:
    """``make(name, connect=True, will=None, **settings)``; client ids are unique per test."""
    made: list[Transport] = []
    memory = MemoryBroker()

    def factory(
        name: str, *, connect: bool = True, will: Will | None = None, **changes: Any
    ) -> Transport:
        base: dict[str, Any] = {"client_id": f"{name}-{fleet}"[:64], "backoff_base_s": 0.05}
        client: Transport
        if request.param == "memory":
            client = MemoryClient(memory, MqttSettings(**(base | changes)), will=will)
        else:
            broker: LocalBroker = request.getfixturevalue("mosquitto")
            settings = MqttSettings(**(base | {"host": broker.host, "port": broker.port} | changes))
            client = MqttClient(settings, will=will)
        made.append(client)
        if connect:
            client.connect(timeout=10)
        return client

    yield factory
    for client in made:
        client.close()


def _one(client: Transport) -> tuple[str, bytes, bool]:
    msg = client.receive(10)
    assert msg is not None
    return msg.topic, msg.payload, msg.retain


def test_round_trip_keeps_payload_properties_and_order(make: Factory, fleet: str) -> None:
    sub, pub = make("sub"), make("pub")
    sub.subscribe(f"c/{fleet}/#")
    for i in range(100):
        pub.publish(f"c/{fleet}/x", bytes([i]), expiry_s=60, user_properties=[("i", str(i))])
    got = [sub.receive(10) for _ in range(100)]
    assert [m.payload for m in got if m] == [bytes([i]) for i in range(100)]
    first = got[0]
    assert first is not None and first.user_properties == (("i", "0"),)
    assert first.expiry_s is not None and 0 < first.expiry_s <= 60 and first.qos == 1


def test_wildcards_select_topics(make: Factory, fleet: str) -> None:
    sub, pub = make("sub"), make("pub")
    sub.subscribe(f"fstq/v1/{fleet}/up/+/+")
    pub.publish_wait(f"fstq/v1/{fleet}/ack/d1", b"no")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d1/3", b"yes-1")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d2/3", b"yes-2")
    pub.publish_wait(f"fstq/v1/{fleet}/up/d2/3/extra", b"no")
    assert [_one(sub)[1], _one(sub)[1]] == [b"yes-1", b"yes-2"]
    assert sub.receive(0.3) is None


def test_retained_for_late_subscribers_and_deletion(make: Factory, fleet: str) -> None:
    pub = make("pub")
    pub.publish_wait(f"r/{fleet}/round", b"round 1", retain=True)
    pub.publish_wait(f"r/{fleet}/gone", b"x", retain=True)
    pub.publish_wait(f"r/{fleet}/gone", b"", retain=True)  # empty retained payload deletes
    late = make("late")
    late.subscribe(f"r/{fleet}/+")
    assert _one(late) == (f"r/{fleet}/round", b"round 1", True)
    assert late.receive(0.3) is None
    pub.publish_wait(f"r/{fleet}/round", b"round 2", retain=True)
    assert _one(late) == (f"r/{fleet}/round", b"round 2", False)  # live: retain flag off


def test_persistent_session_queues_while_offline(make: Factory, fleet: str) -> None:
    agg = make("agg", session_expiry_s=300)
    agg.subscribe(f"s/{fleet}/#")
    agg.close()
    pub = make("pub")
    pub.publish_wait(f"s/{fleet}/a", b"1")
    pub.publish_wait(f"s/{fleet}/a", b"2")
    back = make("agg", session_expiry_s=300)
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


def test_publish_and_publish_wait_go_through_send(make: Factory, fleet: str) -> None:
    sub = make("sub")
    sub.subscribe(f"p/{fleet}/+")
    pub = _Watch(make("pub"))
    pub.publish(f"p/{fleet}/a", b"one", expiry_s=60, user_properties=[("k", "v")]).wait(10)
    pub.publish_wait(f"p/{fleet}/b", bytearray(b"two"), timeout=10, qos=0)
    assert [m for m, _ in pub.sent] == [
        Message(f"p/{fleet}/a", b"one", 1, False, (("k", "v"),), 60),
        Message(f"p/{fleet}/b", b"two", 0, False, (), None),
    ]
    # The packet size a transport reports is the one Message.wire_size computes (paho's own
    # property packing for MqttClient).
    assert all(h.size == m.wire_size for m, h in pub.sent)
    got = [(m.topic, m.payload, m.user_properties) for m in sub.messages(idle_timeout=1)]
    assert got == [(f"p/{fleet}/a", b"one", (("k", "v"),)), (f"p/{fleet}/b", b"two", ())]


def test_closed_client_refuses_and_ends_iteration(make: Factory, fleet: str) -> None:
    client = make("c")
    client.close()
    with pytest.raises(ClientClosedError):
        client.publish(f"x/{fleet}", b"late")
    assert client.receive(None) is None
    assert list(client.messages(idle_timeout=0.1)) == []
    assert not client.is_connected
