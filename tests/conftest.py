"""Shared fixtures. Heavy objects (tokenizer, models) are session-scoped and built offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from workload.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Any]:
    """A private Mosquitto (broker/mosquitto/dev.conf) on a free loopback port, stopped by PID.

    Yields a ``broker.local.LocalBroker``: use ``.host`` / ``.port``; mark tests ``broker``.
    """
    from broker.local import LocalBroker

    with LocalBroker("dev") as broker:
        yield broker
