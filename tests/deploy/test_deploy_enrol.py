"""``fedfstq enrol``: new device credentials work on a prod-style broker with the shipped ACL."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker import topics
from broker.errors import ConnectRefusedError, PublishRejectedError
from broker.local import LocalBroker
from broker.mosquitto import ACL_FILE
from broker.mqtt import MqttClient
from edge_agent.settings import AgentSettings
from fedfstq.enrol import EnrolError, enrol

pytestmark = pytest.mark.broker

FEDFSTQ = Path(sys.prefix) / "bin" / "fedfstq"


def _agent_settings(device_dir: Path, broker: LocalBroker) -> AgentSettings:
    """The enrolled config as the board would load it, pointed at the test broker (no TLS)."""
    data = tomllib.loads((device_dir / "agent.toml").read_text())
    data["mqtt"] |= {
        "host": broker.host,
        "port": broker.port,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
    }
    data["mqtt"].pop("tls")
    data["mqtt_password_file"] = device_dir / "mqtt_password"
    return AgentSettings(**data)


def test_enrolled_device_connects_and_is_confined_by_the_pattern_acl(tmp_path: Path) -> None:
    passwd, out = tmp_path / "passwd", tmp_path / "enrolled"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "aggregator", "agg-pw"],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    done = subprocess.run(
        [str(FEDFSTQ), "enrol", "--client-id", "dev-07", "--password-file", str(passwd),
         "--out-dir", str(out), "--fleet", "lab", "--broker-host", "mqtt.lab.example",
         "--acl", str(ACL_FILE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    device = out / "dev-07"
    secret = device / "mqtt_password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    config = tomllib.loads((device / "agent.toml").read_text())
    assert config["client_id"] == "dev-07" and config["fleet"] == "lab"
    assert config["mqtt"]["username"] == "dev-07"
    assert config["mqtt"]["host"] == "mqtt.lab.example" and config["mqtt"]["port"] == 8883
    assert "aggregator:" in passwd.read_text() and "dev-07:" in passwd.read_text()
    enrol("dev-08", passwd, out, fleet="lab")  # a second device, through the function

    with LocalBroker("prod", workdir=tmp_path / "broker", password_file=passwd,
                     acl_file=ACL_FILE) as broker:  # fmt: skip
        settings = _agent_settings(device, broker)
        assert settings.mqtt.password is not None
        assert settings.mqtt.password.get_secret_value() == secret.read_text().strip()
        client = MqttClient(settings.mqtt.model_copy(update={"clean_start": True}))
        client.connect(timeout=10)
        try:
            client.publish_wait(topics.status_topic("lab", "dev-07"), b"x", timeout=10)
            client.publish_wait(topics.upload_topic("lab", "dev-07", 1), b"x", timeout=10)
            with pytest.raises(PublishRejectedError):  # no per-device ACL line, yet confined
                client.publish_wait(topics.upload_topic("lab", "dev-08", 1), b"x", timeout=10)
        finally:
            client.close()
        # Another device's password does not open this identity.
        other = (out / "dev-08" / "mqtt_password").read_text().strip()
        wrong = {"password": SecretStr(other), "clean_start": True}
        intruder = MqttClient(settings.mqtt.model_copy(update=wrong))
        with pytest.raises(ConnectRefusedError):
            intruder.connect(timeout=10)
        intruder.close()


def test_enrol_refuses_reserved_duplicate_and_bad_ids(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    with pytest.raises(EnrolError, match="reserved"):
        enrol("aggregator", passwd, tmp_path)
    with pytest.raises(EnrolError, match="must match"):
        enrol("bad id", passwd, tmp_path)
    first = enrol("dev-1", passwd, tmp_path)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    old_secret, old_line = (first / "mqtt_password").read_text(), passwd.read_text()
    with pytest.raises(EnrolError, match="already"):
        enrol("dev-1", passwd, tmp_path)
    enrol("dev-1", passwd, tmp_path, rotate=True)
    assert (first / "mqtt_password").read_text() != old_secret
    assert passwd.read_text() != old_line and passwd.read_text().count("dev-1:") == 1
    acl = tmp_path / "narrow.acl"
    acl.write_text("user dev-1\ntopic write fstq/v1/+/up/dev-1/+\n")
    with pytest.raises(EnrolError, match="patterns"):
        enrol("dev-2", passwd, tmp_path, acl=acl)
    assert not os.path.exists(tmp_path / "dev-2")
