"""The catch-up downlink's planner (aggregator/downlink.py) on a real SQLite store.

Global versions are synthetic adapters (random fp32 tensors, the shapes of a small LoRA); each
test plays what devices would: ask with what they hold, apply what they get with the shared
``workload.catchup.apply_update``, and check the state they end with against the plan's result
id. No MQTT: the service's use of the planner is in tests/integration.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from aggregator.downlink import NEW, UNKNOWN, Downlink
from aggregator.global_adapter import GlobalAdapter
from aggregator.settings import DownlinkSettings
from aggregator.store import AggregatorStore, GlobalRecord
from broker.chunking import Download
from broker.messages import DownlinkPlan, DownlinkRoute
from fstq.compressors import decompress
from workload.catchup import apply_update, canonical_bytes, state_from_bytes, state_id
from workload.models import LoraSpec

SPEC = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight": shape
    for i in range(2)
    for m, out in (("q", 64), ("v", 32))
    for ab, shape in (("A", (4, 64)), ("B", (out, 4)))
}


class Fleet:
    """A store, the global versions so far, and the planner over them."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.root = root
        self.store = AggregatorStore(root / "agg.db")
        self.masters: dict[int, dict[str, torch.Tensor]] = {}
        self.settings = DownlinkSettings.model_validate({"budget_bytes": 700, **settings})
        self.downlink = self.planner()
        gen = torch.Generator().manual_seed(0)
        self.publish({k: torch.randn(s, generator=gen) * 0.05 for k, s in SHAPES.items()})

    def planner(self) -> Downlink:
        """A planner on this store (a new one: what a restarted aggregator has)."""
        return Downlink(self.settings, self.store, chunk_size=512, load_master=self.masters.get)

    def publish(self, master: dict[str, torch.Tensor]) -> GlobalAdapter:
        version = len(self.masters)
        g = GlobalAdapter.build(
            version, version, master, spec=SPEC, base_model="tiny", chunk_size=512
        )
        self.masters[version] = g.master
        self.store.add_global(GlobalRecord(version, version, g.sha256_hex, "-", time.time()))
        self.downlink.publish(g)
        return g

    def step(self, seed: int, scale: float = 0.01) -> GlobalAdapter:
        """The next version: the current one plus a random (dense) FedAvg step."""
        gen = torch.Generator().manual_seed(seed)
        cur = self.downlink.current.master
        return self.publish({k: t + torch.randn(t.shape, generator=gen) * scale
                             for k, t in cur.items()})  # fmt: skip

    @property
    def full(self) -> bytes:
        return self.downlink.current.payload


def fetch(downlink: Downlink, plan: DownlinkPlan) -> bytes:
    """What a device downloads: the plan's payload, reassembled and SHA-256 checked."""
    if plan.route is DownlinkRoute.NONE:
        return b""
    served = downlink.served(plan.plan)
    assert served is not None and served.message == plan
    download = Download(plan, held=plan.base)
    for chunk in served.chunks:
        download.add(chunk)
    return download.payload()


def apply(held: bytes, plan: DownlinkPlan, payload: bytes) -> bytes:
    """A device applying a plan: the canonical bytes it then holds."""
    if plan.route is DownlinkRoute.FULL:
        return payload
    if plan.route is DownlinkRoute.NONE:
        return held
    return canonical_bytes(apply_update(state_from_bytes(held), decompress(payload)))


def test_a_returning_device_gets_one_catch_up_payload_and_ends_where_the_plan_says(
    tmp_path: Path,
) -> None:
    # Arrange: a device holds v0 (derived); the fleet moves on three versions without it.
    fleet = Fleet(tmp_path)
    v0 = fleet.full
    first = fleet.downlink.plan("dev", state_id(v0), time.time())
    for seed in (1, 2, 3):
        fleet.step(seed)
    # Act
    outcome = fleet.downlink.plan("dev", state_id(v0), time.time())
    plan = outcome.served.message
    held = apply(v0, plan, fetch(fleet.downlink, plan))
    # Assert: nothing to fetch for v0 itself, then one small catch-up, verified by its id.
    assert first.served.route is DownlinkRoute.NONE and first.staleness == NEW
    assert plan.route is DownlinkRoute.CATCHUP and outcome.computed
    assert outcome.staleness == "3"
    assert plan.base == state_id(v0) and plan.total_size <= 700 < len(fleet.full)
    assert state_id(held) == plan.result != fleet.downlink.current.manifest.sha256
    # It closes most of the gap to the master (the error it leaves is what the next carries).
    assert outcome.error is not None and outcome.error < 0.9
    master = fleet.downlink.current.master
    after = state_from_bytes(held)
    gap = sum(float((master[k] - t.float()).norm() ** 2) for k, t in after.items()) ** 0.5
    assert gap == pytest.approx(outcome.error_vs_master * sum(  # type: ignore[operator]
        float(m.norm() ** 2) for m in master.values()) ** 0.5, rel=1e-5)  # fmt: skip


def test_devices_holding_the_same_state_share_one_plan_computed_once(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    v0 = state_id(fleet.full)
    fleet.step(1)
    outcomes = [fleet.downlink.plan(f"dev{i}", v0, time.time()) for i in range(5)]
    assert [o.computed for o in outcomes] == [True, False, False, False, False]
    assert len({o.served.message.plan for o in outcomes}) == 1
    assert fleet.store.downlink.counts() == {"states": 1, "plans": 1, "device_states": 5}


def test_the_next_catch_up_carries_what_the_last_one_left_out(tmp_path: Path) -> None:
    # A device that catches up every version ends closer to the master than one catch-up from
    # v0 would leave it: each plan starts from what the device really holds.
    fleet = Fleet(tmp_path)
    held = fleet.full
    for seed in (1, 2, 3, 4):
        fleet.step(seed)
        plan = fleet.downlink.plan("dev", state_id(held), time.time()).served.message
        held = apply(held, plan, fetch(fleet.downlink, plan))
        assert state_id(held) == plan.result
    master = fleet.downlink.current.master
    state = state_from_bytes(held)
    err = sum(float((master[k] - t.float()).norm() ** 2) for k, t in state.items()) ** 0.5
    step_size = 0.01 * sum(t.numel() for t in master.values()) ** 0.5
    assert err < step_size  # less than one version's worth of change is missing
    assert fleet.store.downlink.node(state_id(held)).depth == 4  # type: ignore[union-attr]


def test_a_restarted_aggregator_rebuilds_held_states_from_the_store(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    held = fleet.full
    for seed in (1, 2):
        fleet.step(seed)
        plan = fleet.downlink.plan("dev", state_id(held), time.time()).served.message
        held = apply(held, plan, fetch(fleet.downlink, plan))
    fleet.step(3)
    # Act: a new process (empty caches) on the same store.
    restarted = fleet.planner()
    restarted.publish(fleet.downlink.current)
    rebuilt = restarted.state(state_id(held))
    plan = restarted.plan("dev", state_id(held), time.time()).served.message
    # Assert
    assert rebuilt is not None and canonical_bytes(rebuilt) == held
    assert plan.route is DownlinkRoute.CATCHUP and plan.base == state_id(held)
    assert state_id(apply(held, plan, fetch(restarted, plan))) == plan.result


def test_unknown_or_no_held_state_gets_the_full_adapter(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.step(1)
    stranger = fleet.downlink.plan("dev", hashlib.sha256(b"no such state").digest(), time.time())
    nothing = fleet.downlink.plan("dev2", None, time.time())
    for outcome in (stranger, nothing):
        plan = outcome.served.message
        assert plan.route is DownlinkRoute.FULL and plan.base is None
        assert plan.result == plan.sha256 == fleet.downlink.current.manifest.sha256
        assert fetch(fleet.downlink, plan) == fleet.full
    assert stranger.staleness == NEW
    assert fleet.downlink.plan("dev", b"\x01" * 32, time.time()).staleness == UNKNOWN


def test_a_chain_at_max_chain_gets_the_full_adapter_and_starts_again(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, max_chain=2)
    held = fleet.full
    routes = []
    for seed in (1, 2, 3, 4):
        fleet.step(seed)
        plan = fleet.downlink.plan("dev", state_id(held), time.time()).served.message
        held = apply(held, plan, fetch(fleet.downlink, plan))
        routes.append(plan.route)
    assert routes == [DownlinkRoute.CATCHUP, DownlinkRoute.CATCHUP, DownlinkRoute.FULL,
                      DownlinkRoute.CATCHUP]  # fmt: skip


def test_a_payload_chain_heavier_than_the_full_adapter_is_not_extended(tmp_path: Path) -> None:
    # Budget ~40% of the full adapter: the third catch-up would bring the chain's bytes past it.
    fleet = Fleet(tmp_path, budget_bytes=None, budget_fraction=0.4)
    held = fleet.full
    routes = []
    for seed in (1, 2, 3):
        fleet.step(seed)
        plan = fleet.downlink.plan("dev", state_id(held), time.time()).served.message
        held = apply(held, plan, fetch(fleet.downlink, plan))
        routes.append(plan.route)
    assert routes[:2] == [DownlinkRoute.CATCHUP] * 2 and routes[2] is DownlinkRoute.FULL


def test_full_mode_serves_the_full_adapter_or_nothing(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, mode="full")
    v0 = state_id(fleet.full)
    assert fleet.downlink.plan("dev", v0, time.time()).served.route is DownlinkRoute.NONE
    fleet.step(1)
    assert fleet.downlink.plan("dev", v0, time.time()).served.route is DownlinkRoute.FULL
    assert fleet.store.downlink.counts()["plans"] == 0


def test_garbage_collection_keeps_exactly_the_chains_devices_need(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    held = {"a": fleet.full}
    for seed in (1, 2):
        fleet.step(seed)
        held.setdefault("b", fleet.full)  # b starts from v1: its chain is its own
        for d in held:
            plan = fleet.downlink.plan(d, state_id(held[d]), time.time()).served.message
            held[d] = apply(held[d], plan, fetch(fleet.downlink, plan))
    assert held["a"] != held["b"]
    before = fleet.store.downlink.counts()
    fleet.downlink.collect_garbage()
    assert fleet.store.downlink.counts() == before  # both chains are in use
    # b goes back to a full adapter: its chain is no longer needed once it says so.
    fleet.step(3)
    fleet.downlink.plan("b", None, time.time())
    fleet.downlink.plan("b", fleet.downlink.current.manifest.sha256, time.time())
    fleet.downlink.collect_garbage()
    after = fleet.store.downlink.counts()
    assert after["states"] < before["states"] and after["plans"] < before["plans"]
    assert fleet.downlink.state(state_id(held["a"])) is not None  # a's chain survives
    plan = fleet.downlink.plan("a", state_id(held["a"]), time.time()).served.message
    assert plan.route is DownlinkRoute.CATCHUP


def test_plans_are_durable_when_returned(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    v0 = state_id(fleet.full)
    fleet.step(1)
    plan = fleet.downlink.plan("dev", v0, time.time()).served.message
    other = AggregatorStore(tmp_path / "agg.db")  # another connection sees the commit
    try:
        stored = other.downlink.plan(plan.plan)
        node = other.downlink.node(plan.result)
        device = other.downlink.device("dev")
    finally:
        other.close()
    assert stored is not None and hashlib.sha256(stored.payload).digest() == plan.sha256
    assert node is not None and (node.parent_id, node.depth, node.target_version) == (v0, 1, 1)
    assert device is not None and (device.held_id, device.served_id) == (v0, plan.result)
