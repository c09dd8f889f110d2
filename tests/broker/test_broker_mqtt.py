"""MqttClient against a real Mosquitto (broker/mosquitto/dev.conf on a free port)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import topics
from broker.codec import decode, encode
from broker.errors import (
    ClientClosedError,
    ConnectError,
    PacketTooLargeError,
    TransportError,
)
from broker.local import LocalBroker, free_port
from broker.messages import ClientState, ClientStatus, RoundAnnouncement, UploadChunk
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.transport import Message, Will

pytestmark = pytest.mark.broker

ClientFactory = Callable[..., MqttClient]
SettingsFor = Callable[..., MqttSettings]


def _drain(client: MqttClient, n: int, timeout: float = 10.0) -> list[Message]:
    got: list[Message] = []
    while len(got) < n:
        msg = client.receive(timeout)
        assert msg is not None, f"got {len(got)} of {n} messages"
        got.append(msg)
    return got


def test_publish_subscribe_round_trip_qos1(clients: ClientFactory, fleet: str) -> None:
    # Arrange
    agg = clients("agg-" + fleet)
    dev = clients("dev-" + fleet)
    agg.subscribe(topics.upload_filter(fleet))
    chunk = UploadChunk(upload_id="u1", round=3, client="d1", index=0, crc32=1, data=b"\x00\x01")
    # Act
    handle = dev.publish_wait(
        topics.upload_topic(fleet, "d1", 3),
        encode(chunk),
        expiry_s=60,
        user_properties=[("round", "3"), ("index", "0")],
    )
    (msg,) = _drain(agg, 1)
    # Assert
    assert handle.done() and handle.reason_code == 0
    assert msg.topic == topics.upload_topic(fleet, "d1", 3)
    assert decode(msg.payload, expect=UploadChunk) == chunk
    assert msg.qos == 1 and not msg.retain
    assert msg.user_properties == (("round", "3"), ("index", "0"))
    assert msg.expiry_s is not None and 0 < msg.expiry_s <= 60
    assert agg.broker_max_packet_size == 1048576  # announced in CONNACK (dev.conf)


def test_retained_announcement_reaches_a_late_subscriber(
    clients: ClientFactory, fleet: str
) -> None:
    # Arrange
    agg = clients("agg-" + fleet)
    ann = RoundAnnouncement(
        fleet=fleet, round=1, global_version=0, global_sha256=hashlib.sha256(b"").digest(),
        selected=("d1",), deadline=1e9, quorum=1, upload_window_s=30.0, chunk_size=262144,
        budget_bytes={},
    )  # fmt: skip
    agg.publish_wait(topics.round_topic(fleet), encode(ann), retain=True)
    # Act: a device that connects afterwards
    dev = clients("dev-" + fleet)
    dev.subscribe(topics.round_topic(fleet))
    (msg,) = _drain(dev, 1)
    # Assert
    assert msg.retain
    assert decode(msg.payload, expect=RoundAnnouncement) == ann


def test_persistent_session_delivers_what_was_published_while_offline(
    clients: ClientFactory, fleet: str
) -> None:
    # Arrange: the aggregator subscribes with a persistent session, then goes away
    agg_id = "agg-" + fleet
    agg = clients(agg_id, session_expiry_s=300)
    agg.subscribe(topics.upload_filter(fleet))
    agg.close()
    dev = clients("dev-" + fleet)
    # Act: chunks published while the aggregator is offline
    for i in range(5):
        dev.publish_wait(topics.upload_topic(fleet, "d1", 1), f"chunk-{i}".encode())
    back = clients(agg_id, session_expiry_s=300)  # same client id, clean_start=False
    got = _drain(back, 5)
    # Assert: queued by the broker, delivered in order, without subscribing again
    assert [m.payload for m in got] == [f"chunk-{i}".encode() for i in range(5)]


def test_will_fires_after_its_delay_on_a_crash_but_not_on_a_clean_close(
    clients: ClientFactory, fleet: str, mosquitto: LocalBroker
) -> None:
    # Arrange
    watcher = clients("watch-" + fleet)
    watcher.subscribe(topics.status_filter(fleet))

    def will_for(client: str) -> Will:
        status = ClientStatus(client=client, state=ClientState.OFFLINE, timestamp=0.0)
        return Will(topics.status_topic(fleet, client), encode(status), delay_s=1)

    polite = clients("polite", will=will_for("polite"), clean_start=True)
    crashy = clients("crashy", will=will_for("crashy"), clean_start=True)
    # Act
    polite.close()  # DISCONNECT 0x00: the broker discards the will
    crashy.abort()  # TCP connection dropped without DISCONNECT
    msg = watcher.receive(10)
    assert msg is not None, mosquitto.log_tail(30)
    # Assert: only the crashed client's will, published after the Will Delay Interval
    assert msg.topic == topics.status_topic(fleet, "crashy")
    assert decode(msg.payload, expect=ClientStatus).state is ClientState.OFFLINE
    assert watcher.receive(0.5) is None


def test_oversize_publish_is_refused_client_side_and_the_connection_survives(
    clients: ClientFactory, fleet: str
) -> None:
    # Arrange
    dev = clients("dev-" + fleet)
    limit = dev.broker_max_packet_size
    assert limit == 1 << 20
    topic = topics.upload_topic(fleet, "d1", 1)
    # Act / Assert
    with pytest.raises(PacketTooLargeError) as info:
        dev.publish(topic, b"x" * limit)
    assert info.value.limit == limit and info.value.size > limit
    assert info.value.reason == "packet_too_large"
    # the largest payload that fits goes through, and nothing was disconnected
    fits = limit - (info.value.size - limit)
    dev.publish_wait(topic, b"x" * fits)
    assert dev.is_connected and dev.stats.disconnects == 0


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")
def test_raw_oversize_publish_disconnects_only_the_sender(
    clients: ClientFactory, fleet: str, mosquitto: LocalBroker, tmp_path: Path
) -> None:
    # Without our client-side guard (here: mosquitto_pub over MQTT 3.1.1, which cannot know
    # the limit) the broker drops the connection; other clients are unaffected.
    watcher = clients("watch-" + fleet)
    watcher.subscribe(f"raw/{fleet}/#")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (2 << 20))
    result = subprocess.run(
        ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-V", "mqttv311",
         "-q", "1", "-t", f"raw/{fleet}/big", "-f", str(big)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "disconnected due to oversize packet" in mosquitto.log_tail(200)
    assert watcher.is_connected and watcher.receive(0.3) is None


def test_over_message_size_limit_is_never_reported_as_delivered(
    tmp_path: Path, settings_for: SettingsFor
) -> None:
    # Mosquitto 2.0.11 answers with PUBACK 0x95, which is not a valid PUBACK code: paho 2.2
    # treats it as a malformed packet and reconnects (then resends). Either way the publisher
    # gets a TransportError and the subscriber nothing -- which is why dev/prod.conf use
    # max_packet_size (announced, enforced client-side) and leave message_size_limit at 0.
    overrides = {"message_size_limit": "1000"}
    with (
        LocalBroker("dev", workdir=tmp_path, overrides=overrides) as b,
        MqttClient(settings_for(b, "pub", clean_start=True)) as pub,
        MqttClient(settings_for(b, "sub")) as sub,
    ):
        sub.subscribe("t/#")
        pub.publish_wait("t/ok", b"x" * 100)
        with pytest.raises(TransportError):
            pub.publish_wait("t/big", b"x" * 2000, timeout=2)
        assert [m.topic for m in sub.messages(idle_timeout=0.5)] == ["t/ok"]


def test_burst_is_queued_not_dropped(clients: ClientFactory, fleet: str) -> None:
    # Arrange: the reader does not read while 2000 QoS 1 messages arrive
    agg = clients("agg-" + fleet)
    agg.subscribe(topics.upload_filter(fleet))
    dev = clients("dev-" + fleet)
    topic = topics.upload_topic(fleet, "d1", 1)
    # Act
    handles = [dev.publish(topic, i.to_bytes(4, "big")) for i in range(2000)]
    for h in handles:
        h.wait(30)
    got = _drain(agg, 2000)
    # Assert
    assert [int.from_bytes(m.payload, "big") for m in got] == list(range(2000))
    assert agg.stats.received == 2000 and agg.pending == 0


def test_reconnect_after_broker_restart_resubscribes_and_flushes(
    tmp_path: Path, settings_for: SettingsFor
) -> None:
    with LocalBroker("dev", workdir=tmp_path) as b:
        agg = MqttClient(settings_for(b, "agg"))
        dev = MqttClient(settings_for(b, "dev"))
        with agg, dev:
            agg.subscribe("fstq/v1/f/up/+/+")
            dev.publish_wait("fstq/v1/f/round", b"announcement", retain=True)
            dev.publish_wait("fstq/v1/f/up/dev/1", b"before")
            assert _drain(agg, 1)[0].payload == b"before"
            # Act: broker goes down; the device keeps publishing (paho queues QoS 1 locally)
            b.stop()
            handle = dev.publish("fstq/v1/f/up/dev/1", b"during")
            b.start()  # same port, same persistence directory
            assert agg.wait_connected(15) and dev.wait_connected(15)
            handle.wait(15)
            dev.publish_wait("fstq/v1/f/up/dev/1", b"after")
            # Assert: everything arrives; QoS 1 is at-least-once, so "before" may come again
            # (its PUBACK can miss the database the broker saved on SIGTERM)
            got = []
            while b"after" not in got:
                got += [m.payload for m in _drain(agg, 1)]
            assert [p for p in got if p != b"before"] == [b"during", b"after"]
            assert agg.stats.connects >= 2 and agg.stats.disconnects >= 1
            late = MqttClient(settings_for(b, "late"))
            with late:
                late.subscribe("fstq/v1/f/round")
                msg = late.receive(10)
                assert msg is not None and msg.payload == b"announcement" and msg.retain


def test_subscriptions_made_before_connect_are_sent_on_connect(
    clients: ClientFactory, fleet: str
) -> None:
    sub = clients("sub-" + fleet, connect=False)
    sub.subscribe(topics.status_filter(fleet))
    sub.connect(timeout=10)
    clients("pub-" + fleet).publish_wait(topics.status_topic(fleet, "d"), b"hi")
    assert _drain(sub, 1)[0].payload == b"hi"


def test_unreachable_broker_is_a_connect_error() -> None:
    client = MqttClient(_unreachable())
    with pytest.raises(ConnectError) as info:
        client.connect(timeout=1.0)
    assert info.value.reason == "connect"
    with pytest.raises(ClientClosedError):
        client.publish("a", b"b")


def test_close_fails_pending_publishes_and_ends_iteration() -> None:
    client = MqttClient(_unreachable())
    client.connect(timeout=None)  # keeps retrying in the background
    handle = client.publish("fstq/v1/f/status/d", b"queued while offline")
    client.close()
    with pytest.raises(ClientClosedError):
        handle.wait(5)
    assert list(client.messages()) == []
    assert client.receive(None) is None


def _unreachable() -> MqttSettings:
    return MqttSettings(
        port=free_port(), client_id="nobody", backoff_base_s=0.05, backoff_max_s=0.2
    )
