"""broker.local: config rendering, start/stop by PID, restart with persistence, clear errors."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from broker import local
from broker.local import BrokerError, LocalBroker, render_config
from broker.mosquitto import DEV_CONF, PROD_CONF
from broker.mqtt import MqttClient
from broker.settings import MqttSettings

TEMPLATE = """# comment mentioning listener 1883
per_listener_settings false
listener 1883
cafile /etc/ca.crt
allow_anonymous false
log_dest stdout
log_dest syslog
"""


def test_render_replaces_in_place_drops_and_appends() -> None:
    # Act
    out = render_config(
        TEMPLATE,
        {"listener": "4242 127.0.0.1", "cafile": None, "log_dest": "file /x", "user": "root"},
        append=["log_type all"],
    )
    # Assert
    assert out.splitlines() == [
        "# comment mentioning listener 1883",
        "per_listener_settings false",
        "listener 4242 127.0.0.1",
        "allow_anonymous false",
        "log_dest file /x",  # first occurrence replaced, the second dropped
        "user root",
        "log_type all",
    ]


def test_project_configs_keep_their_limits() -> None:
    for conf in (DEV_CONF, PROD_CONF):
        directives = [ln for ln in conf.read_text().splitlines() if ln and not ln.startswith("#")]
        assert "max_packet_size 1048576" in directives
        assert "max_queued_messages 10000" in directives
        assert "max_packet_size 0" not in directives
    assert "allow_anonymous false" in PROD_CONF.read_text().splitlines()
    assert "listener 8883" in PROD_CONF.read_text().splitlines()


@pytest.mark.broker
def test_start_stop_by_pid_and_workdir_cleanup() -> None:
    # Act
    with LocalBroker("dev") as broker:
        pid = broker.pid
        assert pid is not None and broker.running
        with socket.create_connection((broker.host, broker.port), timeout=5):
            pass
        workdir = broker.workdir
        assert "mosquitto version" in broker.log_tail()
    # Assert: stopped, reaped, temp dir removed
    assert not broker.running and broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


@pytest.mark.broker
def test_restart_keeps_port_and_persistence(tmp_path: Path) -> None:
    # Arrange
    broker = LocalBroker("dev", workdir=tmp_path)
    with broker:
        port = broker.port
        settings = MqttSettings(host=broker.host, port=port, client_id="keeper")
        with MqttClient(settings) as client:
            client.publish_wait("fstq/v1/f/global/manifest", b"v1", retain=True)
        # Act: SIGTERM (database saved), start again
        assert broker.stop() == 0
        broker.restart()
        assert broker.port == port
        with MqttClient(settings.model_copy(update={"client_id": "reader"})) as client:
            client.subscribe("fstq/v1/f/global/manifest")
            msg = client.receive(10)
        # Assert
        assert msg is not None and msg.payload == b"v1" and msg.retain
        broker.restart(kill=True)  # crash: comes back on the same port
        assert broker.running and broker.port == port
    assert (tmp_path / "data" / "mosquitto.db").exists()


@pytest.mark.broker
def test_invalid_config_fails_with_the_log_tail(tmp_path: Path) -> None:
    # Mosquitto 2.0.11 rejects max_packet_size 0 at start-up
    broker = LocalBroker("dev", workdir=tmp_path, overrides={"max_packet_size": "0"})
    with pytest.raises(BrokerError, match="max_packet_size") as info:
        broker.start()
    assert "log tail" in str(info.value)
    assert not broker.running


@pytest.mark.broker
def test_busy_fixed_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        broker = LocalBroker("dev", workdir=tmp_path, port=busy.getsockname()[1])
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.setattr(os, "access", lambda *_: False)
    with pytest.raises(BrokerError, match="apt-get install"):
        local.find_mosquitto()
    with pytest.raises(BrokerError, match="not executable"):
        LocalBroker("dev", binary="/nonexistent/mosquitto")
