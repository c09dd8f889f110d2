"""`fedfstq status` as a command: against the production broker configuration (TLS, passwords,
the ACL), and its one-line errors. Run as a separate process, as an operator runs it."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from tls_support import make_certs

from broker import topics
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import (
    ClientState,
    ClientStatus,
    GlobalManifest,
    RoundAnnouncement,
    RoundPhase,
    RoundProgress,
)
from broker.mosquitto import ACL_FILE
from broker.mqtt import MqttClient
from broker.progress import DeviceProgress, Stage
from broker.settings import MqttSettings, TlsSettings

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

USERS = {"aggregator": "agg-pw", "dev-a": "a-pw", "observer": "obs-pw"}
FLEET = "prod"
SHA = hashlib.sha256(b"v3").digest()


def fedfstq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfstq.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """prod.conf: TLS with a test CA, passwords, the project's ACL."""
    d = tmp_path_factory.mktemp("prod-status")
    passwd = d / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
    with LocalBroker(
        "prod", workdir=d, tls=make_certs(d), password_file=passwd, acl_file=ACL_FILE
    ) as broker:
        yield broker


def connect_as(broker: LocalBroker, user: str) -> MqttClient:
    assert broker.tls is not None
    client = MqttClient(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=user,
            username=user,
            password=SecretStr(USERS[user]),
            tls=TlsSettings(ca_file=broker.tls.ca_file),
            clean_start=True,
        )
    )
    client.connect(timeout=10)
    return client


def config_file(
    broker: LocalBroker, d: Path, user: str, password: str, **top: str
) -> Path:  # fmt: skip
    """A TOML like the services' (fleet, [mqtt] with TLS, mqtt_password_file)."""
    assert broker.tls is not None
    (d / f"{user}.pw").write_text(password + "\n")
    extra = "".join(f'{k} = "{v}"\n' for k, v in top.items())
    path = d / f"{user}.toml"
    path.write_text(
        f'fleet = "{FLEET}"\n{extra}mqtt_password_file = "{d / f"{user}.pw"}"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nusername = "{user}"\n\n'
        f'[mqtt.tls]\nca_file = "{broker.tls.ca_file}"\n'
    )
    return path


@pytest.fixture(scope="module")
def fleet_state(prod: LocalBroker) -> dict[str, Any]:
    """What the services of a fleet leave on the broker, each with its own account."""
    now = time.time()
    agg, dev = connect_as(prod, "aggregator"), connect_as(prod, "dev-a")
    try:
        agg.publish_wait(
            topics.global_manifest_topic(FLEET),
            encode(GlobalManifest(version=3, round=3, total_size=2048, chunk_count=2,
                                  chunk_size=1024, sha256=SHA, format="safetensors-fp16")),
            retain=True,
        )  # fmt: skip
        agg.publish_wait(
            topics.round_topic(FLEET),
            encode(RoundAnnouncement(fleet=FLEET, round=4, global_version=3, global_sha256=SHA,
                                     selected=("dev-a", "dev-b"), deadline=now + 600, quorum=1,
                                     upload_window_s=600.0, chunk_size=1024, budget_bytes={})),
            retain=True,
        )  # fmt: skip
        # The aggregator account may publish the round progress (ACL), retained.
        agg.publish_wait(
            topics.progress_topic(FLEET),
            encode(RoundProgress(fleet=FLEET, round=4, phase=RoundPhase.OPEN, base_version=3,
                                 selected=("dev-a", "dev-b"), arrived=("dev-b",), rejected=0,
                                 late=0, opened_at=now - 10, deadline=now + 600,
                                 uplink_wire_bytes=5000, downlink_wire_bytes=4200,
                                 timestamp=now)),
            retain=True,
        )  # fmt: skip
        # A device may publish its own status retained (ACL), with its progress.
        info = {"global_version": 3, **DeviceProgress(Stage.TRAINING, 4, 10, 1.5).to_info()}
        dev.publish_wait(
            topics.status_topic(FLEET, "dev-a"),
            encode(ClientStatus(client="dev-a", state=ClientState.TRAINING, timestamp=now,
                                round=4, info=info)),
            retain=True,
        )  # fmt: skip
    finally:
        agg.close()
        dev.close()
    return {"at": now}


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fedfstq status: error: ")
    return lines[0]


def test_an_observer_account_reads_the_fleet_over_tls(
    prod: LocalBroker, fleet_state: dict[str, Any], tmp_path: Path
) -> None:
    # Act
    cfg = config_file(prod, tmp_path, "observer", USERS["observer"])
    done = fedfstq("status", "--config", str(cfg), "--json")
    # Assert
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["fleet"] == FLEET
    assert (doc["global"]["version"], doc["global"]["sha256"]) == (3, SHA.hex())
    rnd = doc["round"]
    assert (rnd["round"], rnd["phase"], rnd["quorum"], rnd["arrived"]) == (4, "open", 1, ["dev-b"])
    assert (rnd["uplink_wire_bytes"], rnd["downlink_wire_bytes"]) == (5000, 4200)
    (dev,) = doc["devices"]
    assert (dev["client"], dev["connection"], dev["state"]) == ("dev-a", "online", "training")
    assert dev["progress"] == {"stage": "training", "done": 4, "total": 10, "loss": 1.5}
    assert dev["last_seen"] == pytest.approx(fleet_state["at"])


def test_the_table_names_the_round_and_each_device(
    prod: LocalBroker, fleet_state: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_file(prod, tmp_path, "observer", USERS["observer"])
    done = fedfstq("status", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "global v3" in out and "round 4 open (on v3); 1/2 arrived (dev-b)" in out
    assert "dev-a * online 4 training step 4/10, loss 1.500 v3" in out


def test_a_bad_password_is_one_line_and_exit_2(prod: LocalBroker, tmp_path: Path) -> None:
    cfg = config_file(prod, tmp_path, "observer", "not-the-password")
    done = fedfstq("status", "--config", str(cfg))
    assert done.returncode == 2
    assert "refused the connection: bad user name or password" in one_error_line(done)
    assert done.stdout == ""


def test_a_service_account_is_refused_before_connecting(prod: LocalBroker, tmp_path: Path) -> None:
    # An agent's config: logging in as dev-a would take over the device's session.
    cfg = config_file(prod, tmp_path, "dev-a", USERS["dev-a"], client_id="dev-a")
    done = fedfstq("status", "--config", str(cfg))
    assert done.returncode == 2
    assert "take over that service's MQTT session" in one_error_line(done)
    # The same file with an observer account on top is fine.
    (tmp_path / "obs.pw").write_text(USERS["observer"])
    done = fedfstq("status", "--config", str(cfg), "--username", "observer",
                   "--password-file", str(tmp_path / "obs.pw"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_plaintext_to_the_tls_listener_is_unreachable(prod: LocalBroker) -> None:
    done = fedfstq("status", "--broker", f"mqtt://{prod.host}:{prod.port}", "--timeout", "1")
    assert done.returncode == 5
    assert "unreachable" in one_error_line(done)


def test_no_broker_is_one_line_and_exit_5() -> None:
    with socket.socket() as s:  # a free port: nothing listens on it once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = fedfstq("status", "--broker", f"mqtt://127.0.0.1:{port}", "--timeout", "1")
    assert done.returncode == 5
    assert f"broker 127.0.0.1:{port} unreachable" in one_error_line(done)


@pytest.mark.parametrize(
    "args",
    [("--broker", "http://x:1"), ("--broker", "mqtt://x:99999"), ("--fleet", "a/b")],
)
def test_bad_options_are_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    done = fedfstq("status", *args)
    assert done.returncode == 2
    one_error_line(done)
