"""Fixtures for the broker tests: MQTT clients against the session broker, unique ids."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker.local import LocalBroker
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.transport import Will

_counter = itertools.count()


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> str:
    """A fleet id unique to the test, so topics and retained messages never collide.

    Letters, digits, ``-`` and ``_`` only: NATS's MQTT gateway refuses ``.`` in topic levels.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name[:40])
    return f"t{next(_counter)}-{name}"[:64]


def _make_settings(broker: LocalBroker, client_id: str, **changes: Any) -> MqttSettings:
    base: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": client_id,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.5,
        "keepalive_s": 10,
    }
    return MqttSettings(**(base | changes))


@pytest.fixture
def settings_for() -> Callable[..., MqttSettings]:
    """``settings_for(broker, client_id, **changes)``: fast-backoff settings for a broker."""
    return _make_settings


@pytest.fixture
def clients(mosquitto: LocalBroker) -> Iterator[Callable[..., MqttClient]]:
    """``clients(name, connect=True, will=None, **settings)``: MqttClients closed at teardown."""
    made: list[MqttClient] = []

    def factory(
        name: str,
        *,
        connect: bool = True,
        will: Will | None = None,
        broker: LocalBroker | None = None,
        **changes: Any,
    ) -> MqttClient:
        settings = _make_settings(broker or mosquitto, name, **changes)
        client = MqttClient(settings, will=will, rng=random.Random(len(made)))
        made.append(client)
        if connect:
            client.connect(timeout=10)
        return client

    yield factory
    for client in made:
        client.close()
