"""`fedfstq status` against a real round: the real aggregator and three real agents (tiny model)
on a real Mosquitto, the command run as an operator runs it (a separate process).

One device's upload link is held, so the round stays open with two of three uploads in: what
the command prints is then checked against what the services know (the aggregator's round, its
byte counters and global adapter), during the round, after it, and as ``--watch --json`` saw it
go by.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    AgentWire,
    Services,
    agent_settings,
    aggregator_settings,
    client_data,
    tiny_loader,
    unique,
)

from aggregator.service import Aggregator
from broker.local import LocalBroker
from broker.settings import MqttSettings
from broker.transport import Transport, Will
from edge_agent.agent import EdgeAgent

pytestmark = pytest.mark.broker


def fedfstq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfstq.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(broker: LocalBroker, fleet: str) -> dict[str, Any]:
    done = fedfstq(
        "status", "--broker", f"mqtt://{broker.host}:{broker.port}", "--fleet", fleet, "--json",
        "--settle", "0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


class Watcher:
    """``fedfstq status --watch --json`` in a child process; its JSON lines, as they come."""

    def __init__(self, broker: LocalBroker, fleet: str, stderr: Path) -> None:
        self.stderr = stderr
        with open(stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedfstq.cli", "status", "--watch", "--json", "--broker",
                 f"mqtt://{broker.host}:{broker.port}", "--fleet", fleet, "--settle", "0.5"],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.docs: list[dict[str, Any]] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.docs.append(json.loads(line))
            self.started.set()

    def stop(self) -> list[dict[str, Any]]:
        self.proc.terminate()  # our own child, by its handle
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.docs


@pytest.fixture
def watcher_factory() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:
        if w.proc.poll() is None:
            w.stop()


def by_client(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["client"]: d for d in doc["devices"]}


def test_status_shows_the_round_as_it_goes_and_after_it(
    mosquitto: LocalBroker, tmp_path: Path, watcher_factory: list[Watcher]
) -> None:
    # Arrange: three agents, the last one's uploads held on its link
    fleet = unique("status")
    names = [unique("dev") for _ in range(3)]
    hold = threading.Event()
    wires: dict[str, AgentWire] = {}

    def link(name: str, held: bool) -> Any:
        def make(mqtt: MqttSettings, will: Will) -> Transport:
            wires[name] = AgentWire(mqtt, will, hold=hold if held else None)
            return wires[name]

        return make

    agents = [
        EdgeAgent(
            agent_settings(
                mosquitto, fleet, name, tmp_path / name, pairs, max_rounds=1, progress_s=0.01
            ),
            transport_factory=link(name, held=i == 2),
            seed=i,
        )
        for i, (name, pairs) in enumerate(zip(names, client_data((8, 12, 16)), strict=True))
    ]
    settings = aggregator_settings(mosquitto, fleet, tmp_path / "agg", rounds={"max_rounds": 1})
    agg = Aggregator(settings, model_loader=tiny_loader)
    agg.start()
    v0 = agg.rounds.current.manifest.sha256.hex()
    watcher = Watcher(mosquitto, fleet, tmp_path / "watch.err")
    watcher_factory.append(watcher)
    assert watcher.started.wait(60), f"no output; stderr: {watcher.stderr.read_text()}"

    with Services() as services:
        services.on_exit(hold.set)
        agg_run = services.aggregator(agg)
        runs = [services.agent(a) for a in agents]

        def two_in_one_held() -> bool:
            rnd = agg.rounds.round if agg.open_round is not None else None
            return rnd is not None and len(rnd.state.arrived) == 2 and wires[names[2]].held.is_set()

        services.wait(two_in_one_held, "two uploads in and the third held", timeout=60)
        # Act: the operator asks while the round is open (progress goes out within a second)
        services.wait(
            lambda: (
                len((doc := status(mosquitto, fleet))["round"]["arrived"]) == 2
                and doc["round"]["uplink_wire_bytes"] == agg.rounds.metrics.uplink_wire_bytes
            ),
            "status to show both arrivals",
            timeout=60,
        )
        during = status(mosquitto, fleet)
        metrics = agg.rounds.metrics
        # Assert: what the aggregator knows, as the broker shows it
        assert during["global"]["version"] == 0 and during["global"]["sha256"] == v0
        rnd = during["round"]
        assert (rnd["round"], rnd["phase"], rnd["quorum"]) == (1, "open", 1)
        assert rnd["selected"] == sorted(names) and rnd["arrived"] == sorted(names[:2])
        assert rnd["uplink_wire_bytes"] == metrics.uplink_wire_bytes > 0
        # Round 1: every device derives v0 from the LoRA seed, so nothing crossed the downlink.
        assert rnd["downlink_wire_bytes"] == metrics.downlink_wire_bytes == 0
        assert 0 < rnd["seconds_left"] <= 120
        devices = by_client(during)
        assert set(devices) == set(names)
        held = devices[names[2]]
        assert (held["connection"], held["state"], held["round"]) == ("online", "uploading", 1)
        assert held["progress"]["stage"] == "uploading" and held["progress"]["done"] == 0
        for name in names[:2]:  # max_rounds=1: their round is done, they said goodbye
            assert (devices[name]["connection"], devices[name]["cause"]) == ("offline", "stopped")

        hold.set()
        services.join(agg_run, *runs, timeout=60)

    after = status(mosquitto, fleet)
    assert after["round"]["phase"] == "closed" and after["round"]["arrived"] == sorted(names)
    assert after["round"]["seconds_left"] is None
    record = json.loads(settings.rounds_path.read_text().splitlines()[-1])
    assert after["round"]["uplink_wire_bytes"] == record["uplink_wire_bytes"]
    assert after["round"]["downlink_wire_bytes"] == record["downlink_wire_bytes"]
    assert after["global"]["version"] == 1 and after["global"]["sha256"] != v0
    assert {d["connection"] for d in after["devices"]} == {"offline"}
    assert {d["cause"] for d in after["devices"]} == {"stopped"}

    # What --watch --json printed along the way: each device trained step by step, the held
    # one was seen uploading while two had arrived, and the round closing.
    docs = watcher.stop()
    stages = {
        (d["client"], d["progress"]["stage"], d["progress"]["done"])
        for doc in docs
        for d in doc["devices"]
        if d["progress"] is not None
    }
    for name in names:
        assert {(name, "training", 1), (name, "training", 2)} <= stages
    assert any(
        len(doc["round"]["arrived"]) == 2
        and by_client(doc)[names[2]]["progress"]["stage"] == "uploading"
        for doc in docs
        if doc["round"] is not None and names[2] in by_client(doc)
        and by_client(doc)[names[2]]["progress"] is not None
    )  # fmt: skip
    assert docs[-1]["round"]["phase"] == "closed"
