"""The agent's side of the catch-up downlink, against a real Mosquitto and a fake aggregator.

The device starts out holding v0 (its state directory says so, as after an earlier round); the
fake aggregator announces v1 and answers the device's plan request with a scripted plan: a
correct catch-up (applied, verified, trained from), one whose result does not verify or whose
payload does not decode (the device falls back to the full adapter, never training from an
unverified state), and foreign messages around a good one (ignored). Deriving v0 on the device
is checked against the manifest's ``v0_sha256``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from agent_support import (
    GLOBAL_CHUNK,
    FakeAggregator,
    Faults,
    Served,
    agent_settings,
    full_plan,
    global_adapter_bytes,
    run_agent,
    unique,
)

from broker.chunking import plan_messages
from broker.local import LocalBroker
from broker.messages import DownlinkPlan, DownlinkRoute, GlobalChunk
from common.exit_codes import ExitCode
from edge_agent.agent import EdgeAgent
from edge_agent.device_state import DeviceState
from edge_agent.downloader import HeldAdapter
from fstq.compressors import decompress, make_compressor
from workload.catchup import apply_update, canonical_bytes, state_from_bytes, state_id

pytestmark = pytest.mark.broker

V0 = global_adapter_bytes()
META = {"lora_r": 4, "lora_alpha": 8, "lora_targets": "q_proj,v_proj", "base_model": "tiny"}


def v1_bytes() -> bytes:
    """Global v1: v0 plus a seeded step, as the full fp16 adapter."""
    gen = torch.Generator().manual_seed(1)
    master = {k: t.float() + torch.randn(t.shape, generator=gen) * 0.02
              for k, t in sorted(state_from_bytes(V0).items())}  # fmt: skip
    return canonical_bytes(master)


def catchup(held: bytes, target: bytes, *, result: bytes | None = None,
            payload: bytes | None = None) -> Served:  # fmt: skip
    """A catch-up plan of ``target - held`` at 600 bytes (``result``/``payload`` to lie)."""
    base = state_from_bytes(held)
    delta = {k: t.float() - base[k].float() for k, t in state_from_bytes(target).items()}
    if payload is None:
        payload = make_compressor("fstq").compress(delta, budget_bytes=600).payload
    if result is None:
        result = state_id(canonical_bytes(apply_update(base, decompress(payload))))
    return plan_messages(
        payload, version=1, route=DownlinkRoute.CATCHUP, plan=hashlib.sha256(payload).digest(),
        base=state_id(held), result=result, chunk_size=GLOBAL_CHUNK,
    )  # fmt: skip


def holding_v0(tmp_path: Path) -> None:
    """The device's state directory holds v0, as after a round trained on it."""
    v0 = state_id(V0)
    held = HeldAdapter(0, 0, v0, v0, "safetensors-fp16", V0, dict(META), "full")
    DeviceState(tmp_path / "state").save_global(held.cache_meta(), V0)


def one_round(
    mosquitto: LocalBroker, tmp_path: Path, faults: Faults
) -> tuple[EdgeAgent, FakeAggregator]:
    """The device (holding v0) takes round 1 on v1; returns the agent and the fake."""
    fleet, me = unique("f"), unique("dev")
    holding_v0(tmp_path)
    with FakeAggregator(mosquitto, fleet, faults) as fake:
        fake.publish_global(v1_bytes(), version=1)
        fake.republish()
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK
        fake.wait_for(lambda: len(fake.completed) == 1)
    return agent, fake


def cached(tmp_path: Path) -> tuple[bytes, int, str]:
    """What the device holds now: its id, the version it stands for, how it came."""
    found = DeviceState(tmp_path / "state").load_global()
    assert found is not None
    meta, payload = found
    return hashlib.sha256(payload).digest(), int(meta["version"]), str(meta["route"])


def test_a_catch_up_is_applied_verified_and_trained_from(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    good = catchup(V0, v1_bytes())
    plan = good[0]
    agent, fake = one_round(mosquitto, tmp_path, Faults(plans=[(good, ())]))
    asked = fake.fetches[0]
    assert (asked.version, asked.held, asked.plan) == (1, state_id(V0), None)
    record = agent.downlinks[1]
    assert (record.route, record.staleness, record.fallbacks) == ("catchup", 1, 0)
    assert record.payload_bytes == plan.total_size < len(v1_bytes())
    # It holds exactly the plan's result (not v1's full bytes) and trained from v1.
    assert cached(tmp_path) == (plan.result, 1, "catchup")
    assert plan.result != state_id(v1_bytes())
    ((manifest, _),) = fake.completed
    assert manifest.base_version == 1 and manifest.metadata["downlink_route"] == "catchup"


@pytest.mark.parametrize("lie", ["result", "payload"])
def test_a_catch_up_that_does_not_verify_falls_back_to_the_full_adapter(
    mosquitto: LocalBroker, tmp_path: Path, lie: str
) -> None:
    # A wrong result id (a corrupted or stale plan), or bytes that are no fstq payload.
    bad = (
        catchup(V0, v1_bytes(), result=hashlib.sha256(b"elsewhere").digest())
        if lie == "result"
        else catchup(V0, v1_bytes(), payload=b"not an fstq payload" * 8, result=b"\0" * 32)
    )
    agent, fake = one_round(mosquitto, tmp_path, Faults(plans=[(bad, ())]))
    plan_requests = [(f.held, f.plan) for f in fake.fetches if f.plan is None]
    assert plan_requests == [(state_id(V0), None), (None, None)]  # then: the full adapter
    record = agent.downlinks[1]
    assert (record.route, record.fallbacks) == ("full", 1)
    assert cached(tmp_path) == (state_id(v1_bytes()), 1, "full")
    ((manifest, _),) = fake.completed
    assert manifest.metadata["downlink_route"] == "full"


def test_foreign_plans_and_chunks_are_ignored(mosquitto: LocalBroker, tmp_path: Path) -> None:
    good = catchup(V0, v1_bytes())
    other_state = catchup(v1_bytes(), V0)[0].model_copy(update={"version": 1})  # base: v1
    replayed_old = full_plan(V0, version=0)[0]  # a plan of v0, e.g. redelivered after a restart
    foreign_chunk = catchup(V0, v1_bytes(), payload=b"x" * 700, result=b"\0" * 32)[1][0]
    before: tuple[DownlinkPlan | GlobalChunk, ...] = (other_state, replayed_old)
    faults = Faults(plans=[(good, before)], before_chunks=[foreign_chunk])
    agent, _ = one_round(mosquitto, tmp_path, faults)
    assert agent.downlinks[1].route == "catchup"
    assert cached(tmp_path) == (good[0].result, 1, "catchup")
    assert agent._fetcher is not None and agent._fetcher.ignored == 3


def test_the_initial_adapter_is_derived_on_the_device(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet) as fake:
        v0 = hashlib.sha256(V0).hexdigest()
        fake.publish_global(V0, version=0, metadata={"init_seed": 0, "v0_sha256": v0})
        fake.republish()
        fake.announce(1, (me,))
        # The device's own seed (3) is not the aggregator's init seed (0): the manifest's counts.
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK
        fake.wait_for(lambda: len(fake.completed) == 1)
    assert fake.fetches == []
    assert agent.downlinks[1].route == "derived" and agent.downlinks[1].wire_bytes == 0
    assert cached(tmp_path) == (state_id(V0), 0, "derived")
    ((manifest, _),) = fake.completed
    assert manifest.metadata["downlink_route"] == "derived"


def test_a_derived_adapter_that_does_not_match_is_fetched_instead(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    fleet, me = unique("f"), unique("dev")
    with FakeAggregator(mosquitto, fleet) as fake:
        # Announced with another seed than the one v0 was made with (another platform, say).
        fake.publish_global(
            V0, version=0, metadata={"init_seed": 1, "v0_sha256": hashlib.sha256(V0).hexdigest()}
        )
        fake.republish()
        fake.announce(1, (me,))
        agent = EdgeAgent(agent_settings(mosquitto, fleet, me, tmp_path, max_rounds=1), seed=3)
        assert run_agent(agent) == ExitCode.OK
    first = fake.fetches[0]
    assert (first.held, first.plan) == (None, None)
    assert agent.downlinks[1].route == "full"
    assert cached(tmp_path) == (state_id(V0), 0, "full")
