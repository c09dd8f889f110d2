"""What the agent tells observers: phases and progress in its retained status, and its will."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from agent_support import FakeAggregator, agent_settings, unique

from broker.codec import decode
from broker.local import LocalBroker
from broker.messages import ClientState, ClientStatus
from broker.mqtt import MqttClient
from broker.progress import CAUSE_KEY, DeviceProgress
from broker.settings import MqttSettings
from broker.topics import status_topic
from broker.transport import Transport, Will
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent

pytestmark = pytest.mark.broker

Step = tuple[str, str | None, int | None, bool]  # state, stage, done, has a loss
#: The stages of a round in order. ``awaiting_ack`` may not show: when the aggregator's verdict
#: comes before the agent has seen the broker's last PUBACK, the upload is simply done.
ORDER = ["fetching", "training", "compressing", "uploading", "awaiting_ack"]


def first_seen(stages: list[str | None]) -> list[str]:
    """Each stage once, in the order it first appeared."""
    return list(dict.fromkeys(s for s in stages if s is not None))


def steps_seen(fake: FakeAggregator, me: str) -> list[Step]:
    out: list[Step] = []
    for s in fake.statuses:
        if s.client != me:
            continue
        p = DeviceProgress.from_info(s.info)
        out.append(
            (s.state.value, p and p.stage.value, p and p.done, p is not None and p.loss is not None)
        )
    return out


def run_one_round(agent: EdgeAgent) -> None:
    stop = threading.Event()
    timer = threading.Timer(60, stop.set)
    timer.start()
    try:
        assert agent.run(stop) == ExitCode.OK
    finally:
        timer.cancel()
    assert not stop.is_set(), "the agent did not finish its round within 60 s"


def test_every_step_and_stage_reaches_observers_and_the_last_status_stays(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    # Arrange
    fleet, me = unique("f"), unique("dev")
    wills: list[Will] = []

    def client(settings: MqttSettings, will: Will) -> Transport:
        wills.append(will)
        return MqttClient(settings, will=will)

    settings = agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1, progress_s=1e-6)
    with FakeAggregator(mosquitto, fleet) as fake:
        fake.announce(1, (me,))
        # Act
        run_one_round(EdgeAgent(settings, transport_factory=client, seed=3))
        fake.wait_for(lambda: "offline" in fake.states(me))
        seen = steps_seen(fake, me)
        # Assert: the training loop reported each of its 3 steps, with the loss
        training = [s for s in seen if s[0] == "training"]
        assert training[0] == ("training", "training", 0, False)
        assert [s[1:] for s in training if s[1] == "training" and s[2]] == [
            ("training", 1, True), ("training", 2, True), ("training", 3, True)
        ]  # fmt: skip
        assert ("training", "compressing", 0, False) in training
        stages = [s[1] for s in seen]
        assert first_seen(stages) in (ORDER, ORDER[:-1])
        assert seen[-1] == ("offline", None, None, False)

        # A late observer gets the last status from the broker: the goodbye, and why.
        observer = MqttClient(
            MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=unique("obs"),
                         clean_start=True, session_expiry_s=0)
        )  # fmt: skip
        observer.connect(timeout=10)
        try:
            observer.subscribe(status_topic(fleet, me))
            msg = observer.receive(timeout=10)
        finally:
            observer.close()
        assert msg is not None and msg.retain
        last = decode(msg.payload, expect=ClientStatus)
        assert (last.state, last.info[CAUSE_KEY]) == (ClientState.OFFLINE, "stopped")
        # The will is retained too, and says the link was lost (not when: it was written at
        # connect time).
        (will,) = wills
        assert will.retain
        assert decode(will.payload, expect=ClientStatus).info[CAUSE_KEY] == "link_lost"


class FrozenClock:
    """Wall time that stands still: no interval ever passes during the round."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_steps_within_the_interval_are_held_back_but_stages_are_not(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    settings = agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1, progress_s=5.0)
    with FakeAggregator(mosquitto, fleet) as fake:
        fake.announce(1, (me,))
        run_one_round(EdgeAgent(settings, clock=FrozenClock(), seed=3))
        fake.wait_for(lambda: "offline" in fake.states(me))
        seen = steps_seen(fake, me)
    stages = [s[1] for s in seen if s[1] is not None]
    assert [s for s in seen if s[1] == "training"] == [("training", "training", 0, False)]
    assert stages in (ORDER, ORDER[:-1])
