"""The edge agent against a real Mosquitto and a fake aggregator (tiny model, ~1 s per round)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_support import (
    BUDGET,
    UPLOAD_CHUNK,
    FakeAggregator,
    Faults,
    agent_settings,
    run_agent,
    sha256_hex,
    unique,
)

from broker.chunking import indices_from_bitmap
from broker.codec import decode, peek_kind
from broker.local import LocalBroker
from broker.messages import ClientState, ClientStatus
from broker.mqtt import MqttClient
from broker.settings import MqttSettings
from broker.topics import status_topic
from broker.transport import Completion, PublishHandle, Transport, Will
from common.exit_codes import ExitCode
from common.signals import stop_handler
from edge_agent.agent import EdgeAgent
from edge_agent.device_state import DeviceState
from edge_agent.lifecycle import Notifier
from edge_agent.outbox import Outbox

pytestmark = pytest.mark.broker


def chunks_of(size: int, chunk_size: int = UPLOAD_CHUNK) -> int:
    return max(1, -(-size // chunk_size))


def test_round_fetches_global_trains_uploads_and_completes(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet, Faults(drop_fetch_chunks={1})) as fake:
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        started = time.monotonic()
        assert run_agent(agent) == ExitCode.OK
        elapsed = time.monotonic() - started
        fake.wait_for(lambda: "offline" in fake.states(me))

        # Downlink: how (holding nothing: the full adapter), then everything, then (after
        # fetch_timeout_s) only the chunk that was dropped.
        count = fake.manifest.chunk_count
        (asked, *chunks) = fake.fetches
        assert (asked.version, asked.held, asked.plan) == (0, None, None)
        wanted = [indices_from_bitmap(f.wanted, count) for f in chunks]
        assert wanted == [list(range(count)), [1]]
        assert {f.plan for f in chunks} == {fake.full[0].plan}
        assert agent.downlinks[1].route == "full" and agent.downlinks[1].first_contact

        # Uplink: one manifest, every chunk once, acked complete.
        (report,) = agent.reports
        n = chunks_of(report.entry.size)
        assert report.state == "complete"
        assert (report.stats.manifests, report.stats.chunks_first, report.stats.chunks_resent) == (
            1,
            n,
            0,
        )
        assert report.stats.bytes_first > report.entry.size  # payload plus envelopes
        ((manifest, payload),) = fake.completed
        assert sha256_hex(payload) == report.entry.sha256
        assert len(payload) <= BUDGET
        assert manifest.base_version == 0 and manifest.chunk_size == UPLOAD_CHUNK
        assert manifest.metadata["budget_bytes"] == BUDGET
        # Compute times stay on the device, for the evaluation to read from the agent.
        assert set(manifest.metadata) == {
            "tokens_kept", "train_loss", "budget_bytes", "downlink_route"
        }  # fmt: skip
        assert list(agent.compute_times) == [1] and agent.compute_times[1].cpu_s > 0
        assert manifest.sample_count == 6 and manifest.method == "fstq"

        # State on disk: outbox entry done, progress, cached global, token scores.
        state = DeviceState(tmp_path / "state")
        entries = Outbox(state.outbox_dir).entries()
        assert [(e.upload_id, e.state) for e in entries] == [(report.entry.upload_id, "complete")]
        assert state.load_progress()["last_finished_round"] == 1
        cached = state.load_global()
        assert cached is not None and cached[0]["version"] == 0
        assert state.load_token_scores() is not None

        states = fake.states(me)
        assert states[0] == "online" and states[-1] == "offline"
        assert {"downloading", "training", "uploading"} <= set(states)
        logging.getLogger(__name__).info("one round with the tiny model: %.2f s", elapsed)


def test_partial_ack_bitmap_resends_only_missing_chunks(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet, Faults(drop_upload_chunks={0, 2})) as fake:
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK

    (report,) = agent.reports
    n = chunks_of(report.entry.size)
    assert report.state == "complete"
    # After the ack timeout the manifest is re-sent as a status query; its reply lists 0 and 2.
    assert report.stats.manifests == 2
    assert (report.stats.chunks_first, report.stats.chunks_resent) == (n, 2)
    assert sorted(fake.chunk_log) == sorted([*range(n), 0, 2])
    assert sha256_hex(fake.completed[0][1]) == report.entry.sha256


class PowerCut(MqttClient):
    """Lets ``keep`` upload chunks out, swallows the rest and asks the agent to stop."""

    def __init__(self, settings: MqttSettings, will: Will, keep: int, stop: threading.Event):
        super().__init__(settings, will=will)
        self.keep, self.stop, self.chunks = keep, stop, 0

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> PublishHandle:
        if "/up/" in topic and peek_kind(payload) == "up.chunk":
            self.chunks += 1
            if self.chunks > self.keep:
                self.stop.set()
                return PublishHandle(0, topic, 0, Completion())
        return super().publish(topic, payload, **kwargs)


def test_interrupted_upload_resumes_in_a_new_agent_without_retraining(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet) as fake:
        fake.announce(1, (me,))
        stop = threading.Event()

        def cut(settings: MqttSettings, will: Will) -> Transport:
            return PowerCut(settings, will, keep=2, stop=stop)

        first = EdgeAgent(
            agent_settings(mosquitto, fleet, me, tmp_path), transport_factory=cut, seed=3
        )
        assert run_agent(first, stop) == ExitCode.OK
        assert first.rounds_trained == 1 and first.reports == []
        (pending,) = Outbox(tmp_path / "state" / "outbox").pending()
        n = chunks_of(pending.size)
        assert n > 3
        fake.wait_for(lambda: len(fake.chunk_log) == 2)
        fetches = len(fake.fetches)

        # Round 2 opens when round 1 is in: the new agent must not fetch the cached global.
        def next_round(manifest: Any) -> None:
            if manifest.round == 1:
                fake.announce(2, (me,))

        fake.on_complete = next_round
        second = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=2), seed=3)
        assert run_agent(second) == ExitCode.OK

    resumed, fresh = second.reports
    assert resumed.entry.upload_id == pending.upload_id and resumed.state == "complete"
    # Only what the aggregator lacked went out again, and round 1 was not retrained.
    assert (resumed.stats.chunks_first, resumed.stats.chunks_resent) == (0, n - 2)
    round1 = [i for i in fake.chunk_log[:n]]
    assert sorted(round1) == list(range(n))
    assert second.rounds_trained == 1 and fresh.entry.round_id == 2 and fresh.state == "complete"
    assert sha256_hex(fake.completed[0][1]) == pending.sha256
    assert len(fake.fetches) == fetches


def test_unknown_ack_resends_the_manifest_once(mosquitto: LocalBroker, tmp_path: Path) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet, Faults(unknown_first_manifest=True)) as fake:
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK

    (report,) = agent.reports
    n = chunks_of(report.entry.size)
    assert report.state == "complete"
    # The aggregator answered the manifest and then every chunk with `unknown`: one manifest
    # re-send covers them all, and its reply (nothing received) brings every chunk again.
    assert len(fake.manifests) == 2 and report.stats.manifests == 2
    assert report.stats.chunks_resent == n


def test_rejected_upload_is_marked_and_the_round_finished(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet, Faults(reject_reason="bad_update")) as fake:
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK

    (report,) = agent.reports
    assert (report.state, report.reason) == ("rejected", "bad_update")
    (entry,) = Outbox(tmp_path / "state" / "outbox").entries()
    assert entry.state == "rejected"
    assert DeviceState(tmp_path / "state").load_progress()["last_state"] == "rejected"
    assert fake.completed == []


def test_skips_rounds_it_cannot_join_and_stops_cleanly_on_sigterm(
    mosquitto: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    fleet, me = unique("f"), unique("dev")
    address = f"@fedfstq-test-{unique('n')}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + address[1:])
        listener.settimeout(5)
        with FakeAggregator(mosquitto, fleet) as fake:
            fake.announce(1, ("someone-else",))
            stop = threading.Event()
            wills: list[Will] = []

            def client(settings: MqttSettings, will: Will) -> Transport:
                wills.append(will)
                return MqttClient(settings, will=will)

            agent = EdgeAgent(
                agent_settings(mosquitto, fleet, me, tmp_path),
                transport_factory=client,
                notifier=Notifier(address),
                seed=3,
            )
            codes: list[int] = []
            runner = threading.Thread(target=lambda: codes.append(agent.run(stop)))
            runner.start()
            try:
                wait_logged(caplog, "round 1: not selected")
                fake.announce(2, (me,), deadline_in=-5)
                wait_logged(caplog, "round 2: deadline passed")
                stop_handler(stop)(signal.SIGTERM, None)  # what systemd's SIGTERM triggers
                runner.join(15)
            finally:
                stop.set()
                runner.join(15)
            assert codes == [ExitCode.OK]
            fake.wait_for(lambda: "offline" in fake.states(me))
            assert fake.manifests == [] and fake.fetches == [] and agent.rounds_trained == 0
            # A crash would have been announced by the will, after its delay.
            (will,) = wills
            status = decode(will.payload, expect=ClientStatus)
            assert (will.topic, will.delay_s) == (status_topic(fleet, me), 1)
            assert (status.client, status.state) == (me, ClientState.OFFLINE)

        notes = []
        while not notes or notes[-1] != "STOPPING=1":
            notes.append(listener.recv(4096).decode())
    assert notes[0] == "STATUS=no round: online" and notes[1] == "READY=1"
    assert notes[-1] == "STOPPING=1"


def wait_logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r.getMessage() for r in caplog.records):
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line containing {text!r}")


def test_a_budget_below_the_minimal_payload_gives_the_round_up(
    mosquitto: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    fleet, me = unique("f"), unique("dev")
    compression = {"budget_mode": "fixed", "budget_bytes": 64}  # below fstq's side information
    with FakeAggregator(mosquitto, fleet) as fake:
        fake.announce(1, (me,))
        agent = EdgeAgent(
            agent_settings(mosquitto, fleet, me, tmp_path, compression=compression), seed=3
        )
        stop = threading.Event()
        runner = threading.Thread(target=lambda: run_agent(agent, stop))
        runner.start()
        try:
            wait_logged(caplog, "round 1: cannot train")
            fake.wait_for(lambda: "error" in fake.states(me))
        finally:
            stop.set()
            runner.join(15)
        # Given up, not crashed: nothing uploaded, the round marked so the device moves on.
        assert agent.rounds_given_up == frozenset({1}) and fake.manifests == []
        assert agent.rounds_trained == 0 and not runner.is_alive()
