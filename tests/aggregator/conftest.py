"""Fixtures of the aggregator service tests (helpers live in ``service_support``)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import LORA, Device, merge

from aggregator.adapter_model import ModelLoader
from aggregator.settings import AggregatorSettings
from broker.local import LocalBroker

_counter = itertools.count()


@pytest.fixture(scope="session")
def tiny_loader() -> ModelLoader:
    """The tiny Llama loaded once; each aggregator gets its own copy (peft wraps in place)."""
    from workload.models import load_base_model

    base, tokenizer = load_base_model("tiny")
    return lambda: (copy.deepcopy(base), tokenizer)


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> str:
    """A fleet unique to the test, so retained messages and sessions never collide."""
    return f"a{next(_counter)}-{request.node.name[:40].replace('[', '.').replace(']', '')}"[:64]


@pytest.fixture
def make_settings(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str
) -> Callable[..., AggregatorSettings]:
    """``make_settings(**changes)``: tiny model, small LoRA, 1 KiB chunks, fast polling."""

    def make(**changes: Any) -> AggregatorSettings:
        base: dict[str, Any] = {
            "fleet": fleet,
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "backoff_base_s": 0.05,
                "backoff_max_s": 0.5,
            },
            "state_dir": tmp_path / "agg",
            "model": "tiny",
            "lora": LORA,
            "chunk_size": 1024,  # several chunks even for the tiny adapter
            "rounds": {"clients_per_round": 3, "min_clients": 3, "heartbeat_ttl_s": 1e6},
            "health_interval_s": 0.5,
            "poll_s": 0.05,
        }
        return AggregatorSettings(**merge(base, changes))

    return make


@pytest.fixture
def devices(mosquitto: LocalBroker, fleet: str) -> Iterator[Callable[..., list[Device]]]:
    """``devices(*names)``: connected fake devices, closed at teardown."""
    made: list[Device] = []

    def make(*names: str) -> list[Device]:
        new = [Device(mosquitto, fleet, n) for n in names]
        made.extend(new)
        return new

    yield make
    for d in made:
        d.close()
