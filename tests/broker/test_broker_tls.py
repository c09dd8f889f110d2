"""prod.conf with its TLS lines rendered to test certificates (made with the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from tls_support import make_certs

from broker.errors import ConnectError
from broker.local import LocalBroker
from broker.mosquitto import ACL_FILE
from broker.mqtt import MqttClient
from broker.settings import MqttSettings, TlsSettings

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    d = tmp_path_factory.mktemp("tls-broker")
    certs = make_certs(d)
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(d / "passwd"), "dev-a", "pw"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    broker = LocalBroker(
        "prod", workdir=d, tls=certs, password_file=d / "passwd", acl_file=ACL_FILE
    )
    with broker:
        yield broker


def _settings(broker: LocalBroker, host: str = "127.0.0.1", **tls: object) -> MqttSettings:
    return MqttSettings(
        host=host,
        port=broker.port,
        client_id="dev-a",
        username="dev-a",
        password=SecretStr("pw"),
        clean_start=True,
        tls=TlsSettings.model_validate(tls) if tls else None,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
    )


def test_tls_round_trip_with_the_project_ca(tls_broker: LocalBroker) -> None:
    assert tls_broker.tls is not None
    settings = _settings(tls_broker, ca_file=tls_broker.tls.ca_file)
    with MqttClient(settings) as client:
        client.subscribe("fstq/v1/f/ack/dev-a")  # allowed by the ACL, nobody publishes
        client.publish_wait("fstq/v1/f/status/dev-a", b"hello over TLS")
        assert client.is_connected


@pytest.mark.parametrize(
    ("host", "tls"),
    [
        ("127.0.0.1", None),  # plaintext to a TLS listener
        ("127.0.0.1", {}),  # TLS, but the system trust store does not know our CA
        ("localhost", "ca"),  # right CA, but the certificate is for IP 127.0.0.1 only
    ],
)
def test_tls_failures_are_connect_errors(
    tls_broker: LocalBroker, host: str, tls: dict[str, object] | str | None
) -> None:
    assert tls_broker.tls is not None
    if tls == "ca":
        settings = _settings(tls_broker, host, ca_file=tls_broker.tls.ca_file)
    elif tls is None:
        settings = _settings(tls_broker, host)
    else:
        settings = _settings(tls_broker, host, insecure=False)
    with pytest.raises(ConnectError):
        MqttClient(settings).connect(timeout=1.5)


def test_insecure_skips_only_the_host_name_check(tls_broker: LocalBroker) -> None:
    assert tls_broker.tls is not None
    settings = _settings(tls_broker, "localhost", ca_file=tls_broker.tls.ca_file, insecure=True)
    with MqttClient(settings) as client:
        client.publish_wait("fstq/v1/f/status/dev-a", b"ok")


def test_missing_tls_files_fail_at_construction(tmp_path: Path) -> None:
    settings = MqttSettings(client_id="x", tls=TlsSettings(ca_file=tmp_path / "nope.crt"))
    with pytest.raises(ConnectError) as info:
        MqttClient(settings)
    assert info.value.reason == "tls"
