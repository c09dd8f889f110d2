"""A read-only MQTT observer of a fleet: where to connect, and the connection itself.

``fedfstq status`` and the demo's live view connect as observers: their own client id, a clean
session that expires at disconnect, subscribed to :func:`broker.topics.observer_filters` only
(they never publish). The connection comes from ``--broker mqtt[s]://host:port`` or from the
TOML file of a service (its ``fleet``, ``[mqtt]`` host/port/TLS/user and
``mqtt_password_file``), with ``--username`` / ``--password-file`` on top.

A service's own account is refused: Mosquitto's prod.conf sets ``use_username_as_clientid``, so
an observer logged in as a device or as the aggregator would take over that service's session
(and, being a clean session, wipe what the broker queued for it). Observers get their own
account (``user observer`` in ``broker/mosquitto/fstq.acl``).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import SecretStr, ValidationError

from broker.errors import ConnectError, ConnectRefusedError, SubscribeError
from broker.settings import MqttSettings
from broker.topics import observer_filters, validate_id
from broker.transport import Message, Transport
from common.exit_codes import ExitCode, for_connect_refusal
from common.settings import ConfigError, read_toml

__all__ = [
    "ObserverError",
    "ObserverTarget",
    "connect",
    "drain",
    "observer_client_id",
    "target",
]

#: Keys of a service's ``[mqtt]`` table an observer takes over (the rest is session policy).
_CONNECTION_KEYS = (
    "host",
    "port",
    "username",
    "password",
    "tls",
    "keepalive_s",
    "connect_timeout_s",
    "protocol",
    "failover",
)


class ObserverError(Exception):
    """Cannot observe: a one-line reason and the exit code (common.exit_codes numbers)."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ObserverTarget:
    fleet: str
    mqtt: MqttSettings


def observer_client_id(prefix: str = "observer") -> str:
    """``<prefix>-<host>-<pid>``: unique per process, valid as an MQTT/fleet id."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
    return f"{prefix}-{host}-{os.getpid()}"[:64]


def _read_password(path: Path) -> SecretStr:
    try:
        return SecretStr(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from None


def target(
    *,
    broker: str | None,
    config: Path | None,
    fleet: str | None,
    username: str | None = None,
    password_file: Path | None = None,
    client_id: str | None = None,
    protocol: str | None = None,
) -> ObserverTarget:
    """Where to connect; raises :class:`ConfigError` with a one-line reason."""
    data = read_toml(config)
    table = data.get("mqtt", {})
    if not isinstance(table, dict):
        raise ConfigError(f"[mqtt] in {config} must be a table")
    conn: dict[str, Any] = {k: table[k] for k in _CONNECTION_KEYS if k in table}
    if broker is not None:
        url = urlparse(broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ConfigError(f"--broker {broker!r}: expected mqtt://host:port or mqtts://...")
        tls = url.scheme == "mqtts"
        try:
            port = url.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"--broker {broker!r}: bad port") from None
        conn.update(host=url.hostname, port=port)
        if tls:
            conn.setdefault("tls", {})
        else:
            conn.pop("tls", None)
    if protocol is not None:
        conn["protocol"] = protocol
    if username is not None:
        conn["username"] = username
        conn.pop("password", None)
    elif conn.get("username") and ("client_id" in data or "state_dir" in data):
        raise ConfigError(
            f"{config} logs in as the service account {conn['username']!r}; an observer would "
            "take over that service's MQTT session: pass --username/--password-file of an "
            "observer account (broker/mosquitto/fstq.acl)"
        )
    elif password_file is None and isinstance(data.get("mqtt_password_file"), str):
        password_file = Path(data["mqtt_password_file"])
    if password_file is not None:
        conn["password"] = _read_password(password_file)
    the_fleet = fleet or data.get("fleet") or "default"
    try:
        validate_id(str(the_fleet), "fleet")
        mqtt = MqttSettings(
            **conn,
            client_id=client_id or observer_client_id(),
            clean_start=True,
            session_expiry_s=0,
            backoff_base_s=0.2,
            backoff_max_s=2.0,
        )
    except ValidationError as exc:
        raise ConfigError.from_validation("connection settings", exc, root="mqtt") from None
    except ValueError as exc:  # TopicError: a bad fleet id
        raise ConfigError(str(exc)) from None
    return ObserverTarget(str(the_fleet), mqtt)


def connect(where: ObserverTarget, timeout: float) -> Transport:
    """A connected client subscribed to the fleet's observer topics; :class:`ObserverError`."""
    from broker.mqtt import MqttClient  # paho only when connecting

    client = MqttClient(where.mqtt)
    s = where.mqtt
    try:
        client.connect(timeout=timeout)
        for topic_filter in observer_filters(where.fleet):
            client.subscribe(topic_filter, qos=1, timeout=timeout)
    except ConnectRefusedError as exc:
        client.close()
        code = for_connect_refusal(exc.reason_code)
        why = "bad user name or password, or not authorised" if code is ExitCode.CONFIG else ""
        raise ObserverError(
            f"broker {s.host}:{s.port} refused the connection: {why or exc}", code
        ) from None
    except SubscribeError as exc:
        client.close()
        code = ExitCode.CONFIG if exc.reason_code is not None else ExitCode.BROKER_UNREACHABLE
        raise ObserverError(
            f"broker {s.host}:{s.port} refused a subscription: {exc}", code
        ) from None
    except ConnectError as exc:
        client.close()
        raise ObserverError(
            f"broker {s.host}:{s.port} unreachable: {exc}", ExitCode.BROKER_UNREACHABLE
        ) from None
    return client


def drain(client: Transport, idle_s: float, limit_s: float) -> Iterator[Message]:
    """Messages until none came for ``idle_s`` (retained ones arrive right after SUBACK), at
    most for about ``limit_s``."""
    end = time.monotonic() + limit_s
    while (left := end - time.monotonic()) > 0:
        msg = client.receive(timeout=min(idle_s, left))
        if msg is None:
            return
        yield msg
