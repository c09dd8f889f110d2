"""Shared fixtures. Heavy objects (tokenizer, models) are session-scoped and built offline."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def broker_setups(mosquitto: Any) -> Iterator[Callable[[str], Any]]:
    """``get(name)``: the session's broker set-up ``name`` (``broker.local_setups.SETUPS``).

    A ``broker.local_setups.BrokerSetup``: the Mosquitto ones wrap the ``mosquitto`` fixture,
    a cluster is started on first use (private nodes on free loopback ports, from the configs in
    ``broker/``) and stopped by PID when the session ends. Where its broker is not installed the
    test is skipped with the reason; nothing is installed at test time. Tests that kill nodes
    start their own with ``broker.local_setups.start_setup``.
    """
    from broker.local_setups import missing, mosquitto_setup, start_setup

    started: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        def get(name: str) -> Any:
            if name not in started:
                reason = missing(name)
                if reason is not None:
                    pytest.skip(f"{name}: {reason}")
                if name.startswith("mosquitto"):
                    started[name] = mosquitto_setup(name, mosquitto)
                else:
                    started[name] = stack.enter_context(start_setup(name))
            return started[name]

        yield get
