"""prod.conf + fstq.acl (without TLS): passwords, per-device topics, the aggregator account."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker import topics
from broker.errors import ConnectRefusedError, PublishRejectedError
from broker.local import LocalBroker
from broker.mosquitto import ACL_FILE
from broker.mqtt import MqttClient
from broker.settings import MqttSettings

pytestmark = pytest.mark.broker

USERS = {"aggregator": "agg-secret", "dev-a": "a-secret", "dev-b": "b-secret"}
FLEET = "acl"
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def prod_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    workdir = tmp_path_factory.mktemp("prod-broker")
    passwd = workdir / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
    broker = LocalBroker("prod", workdir=workdir, password_file=passwd, acl_file=ACL_FILE)
    with broker:
        yield broker


@pytest.fixture
def connect(prod_broker: LocalBroker) -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def factory(
        user: str | None, *, client_id: str | None = None, password: str = ""
    ) -> MqttClient:
        settings = MqttSettings(
            host=prod_broker.host,
            port=prod_broker.port,
            client_id=client_id or user or "anonymous",
            username=user,
            password=SecretStr(password or USERS.get(user or "", "")) if user else None,
            clean_start=True,
            backoff_base_s=0.05,
            backoff_max_s=0.2,
        )
        client = MqttClient(settings)
        made.append(client)
        client.connect(timeout=10)
        return client

    yield factory
    for client in made:
        client.close()


def test_rendered_prod_config_keeps_the_production_limits(prod_broker: LocalBroker) -> None:
    lines = [line for line in prod_broker.conf_path.read_text().splitlines() if line[:1] not in "#"]
    for line in (
        "allow_anonymous false",
        "use_username_as_clientid true",
        "max_packet_size 1048576",
        "max_queued_messages 10000",
        f"acl_file {ACL_FILE}",
        f"listener {prod_broker.port} 127.0.0.1",
    ):
        assert line in lines
    directives = "\n".join(lines)
    assert "cafile" not in directives and " /mosquitto/" not in directives


def test_anonymous_and_wrong_passwords_are_refused(
    connect: Callable[..., MqttClient],
) -> None:
    with pytest.raises(ConnectRefusedError) as anon:
        connect(None)
    assert anon.value.reason_code == NOT_AUTHORIZED
    with pytest.raises(ConnectRefusedError) as wrong:
        connect("dev-a", password="guess")
    assert wrong.value.reason_code in (0x86, NOT_AUTHORIZED)


def test_device_cannot_publish_to_another_devices_upload_topic(
    connect: Callable[..., MqttClient],
) -> None:
    # Arrange
    agg = connect("aggregator")
    agg.subscribe(topics.upload_filter(FLEET))
    dev_a = connect("dev-a")
    # Act / Assert: the broker refuses with PUBACK 0x87 and forwards nothing
    with pytest.raises(PublishRejectedError) as info:
        dev_a.publish_wait(topics.upload_topic(FLEET, "dev-b", 1), b"forged")
    assert info.value.reason_code == NOT_AUTHORIZED
    dev_a.publish_wait(topics.upload_topic(FLEET, "dev-a", 1), b"own")
    got = [(m.topic, m.payload) for m in agg.messages(idle_timeout=0.5)]
    assert got == [(topics.upload_topic(FLEET, "dev-a", 1), b"own")]


def test_client_id_cannot_be_used_to_impersonate(connect: Callable[..., MqttClient]) -> None:
    # use_username_as_clientid: dev-a connecting as client id "dev-b" is still dev-a
    dev_a = connect("dev-a", client_id="dev-b")
    with pytest.raises(PublishRejectedError):
        dev_a.publish_wait(topics.upload_topic(FLEET, "dev-b", 1), b"forged")
    dev_a.publish_wait(topics.status_topic(FLEET, "dev-a"), b"ok")


def test_devices_only_read_their_own_acks_and_cannot_announce_rounds(
    connect: Callable[..., MqttClient],
) -> None:
    # Arrange
    agg = connect("aggregator")
    dev_a = connect("dev-a")
    dev_a.subscribe(f"fstq/v1/{FLEET}/ack/+")  # granted by 2.0, filtered per message
    dev_a.subscribe(topics.round_topic(FLEET))
    # Act
    agg.publish_wait(topics.ack_topic(FLEET, "dev-b"), b"for b")
    agg.publish_wait(topics.ack_topic(FLEET, "dev-a"), b"for a")
    agg.publish_wait(topics.round_topic(FLEET), b"round 1", retain=True)
    # Assert
    got = {m.topic: m.payload for m in dev_a.messages(idle_timeout=0.5)}
    assert got == {
        topics.ack_topic(FLEET, "dev-a"): b"for a",
        topics.round_topic(FLEET): b"round 1",
    }
    for forbidden in (
        topics.round_topic(FLEET),
        topics.global_manifest_topic(FLEET),
        topics.ack_topic(FLEET, "dev-a"),
        topics.down_topic(FLEET, "dev-a"),
    ):
        with pytest.raises(PublishRejectedError):
            dev_a.publish_wait(forbidden, b"x")


def test_aggregator_account_reaches_every_family(connect: Callable[..., MqttClient]) -> None:
    agg = connect("aggregator")
    for filt in topics.aggregator_filters(FLEET):
        agg.subscribe(filt)
    dev_b = connect("dev-b")
    dev_b.publish_wait(topics.fetch_topic(FLEET, "dev-b"), b"fetch")
    dev_b.publish_wait(topics.status_topic(FLEET, "dev-b"), b"status")
    agg.publish_wait(topics.global_manifest_topic(FLEET), b"manifest", retain=True)
    agg.publish_wait(topics.down_topic(FLEET, "dev-b"), b"chunk")
    got = sorted(m.payload for m in agg.messages(idle_timeout=0.5))
    assert got == [b"fetch", b"status"]


def test_password_file_holds_only_hashes(prod_broker: LocalBroker) -> None:
    text = Path(str(prod_broker.password_file)).read_text()
    assert text.count(":$7$") == len(USERS)  # PBKDF2-SHA512, as written by mosquitto_passwd
    assert not any(password in text for password in USERS.values())
