"""RoundController.accept: each upload is validated once; bad and huge updates as before.

A real controller (tiny model, SQLite store in a temp dir), no broker: ``accept`` is what the
service calls with a reassembled, SHA-256-checked payload.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from service_support import LORA, compressed, random_delta

import aggregator.round_controller as round_controller
from aggregator.adapter_model import AdapterModel, ModelLoader
from aggregator.fedavg import CheckedUpdate, RejectedUpdate, StreamingFedAvg
from aggregator.round_controller import Event, RoundController
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.chunking import upload_messages
from broker.messages import UploadManifest

T0 = 1_767_225_600.0
CLIP = 1.0


@pytest.fixture
def controller(tmp_path: Path, tiny_loader: ModelLoader) -> Iterator[RoundController]:
    """A controller with round 1 open for clients a and b, on global v0, clip_norm set."""
    s = AggregatorSettings(
        state_dir=tmp_path,
        model="tiny",
        lora=LORA,
        chunk_size=1024,
        clip_norm=CLIP,
        rounds={"clients_per_round": 2, "min_clients": 2, "quorum": 2},
    )
    store = AggregatorStore(s.db_path)
    rounds = RoundController(s, store, AdapterModel(tiny_loader, s.lora.spec(), s.init_seed))
    rounds.load(T0)
    assert rounds.tick(T0, ["a", "b"]) is Event.OPENED
    yield rounds
    store.close()


def _manifest(payload: bytes, client: str = "a") -> UploadManifest:
    manifest, _ = upload_messages(
        payload, upload_id=f"u-{client}", round_id=1, client=client, base_version=0,
        sample_count=3, method="dense_fp32",
    )  # fmt: skip
    return manifest


def _accept(rounds: RoundController, delta: Mapping[str, torch.Tensor]) -> None:
    payload = compressed(delta)
    rounds.accept("a", _manifest(payload), payload, len(payload), T0 + 1)


def _counting_check(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    check = StreamingFedAvg.check

    def counted(self: StreamingFedAvg, delta: Mapping[str, torch.Tensor]) -> CheckedUpdate:
        calls.append(1)
        return check(self, delta)

    monkeypatch.setattr(StreamingFedAvg, "check", counted)
    return calls


def test_an_accepted_upload_is_validated_once(
    controller: RoundController, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting_check(monkeypatch)
    _accept(controller, random_delta(controller.current.master, 1))
    rnd = controller.round
    assert rnd is not None and rnd.fedavg.count == 1 and rnd.state.arrived == {"a"}
    assert len(calls) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_update_is_rejected_and_changes_nothing(
    controller: RoundController, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    # The payload decoder already refuses non-finite values; this is the check behind it.
    delta = random_delta(controller.current.master, 2)
    name = sorted(delta)[0]
    delta[name].view(-1)[3] = bad

    def decoded(*_: object) -> dict[str, torch.Tensor]:
        return delta

    monkeypatch.setattr(round_controller, "decompress", decoded)
    with pytest.raises(RejectedUpdate) as info:
        _accept(controller, random_delta(controller.current.master, 2))
    assert info.value.reason == "non_finite"
    assert str(info.value) == f"non_finite: {name} has NaN or Inf"
    rnd = controller.round
    assert rnd is not None and rnd.fedavg.count == 0 and not rnd.state.arrived
    assert controller.store.accepted_upload(1, "a") is None


def test_a_huge_update_is_clipped_to_clip_norm_and_its_norm_recorded(
    controller: RoundController,
) -> None:
    delta = {k: 1e4 * t for k, t in random_delta(controller.current.master, 3).items()}
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
    assert norm > 1000 * CLIP
    _accept(controller, delta)
    rnd = controller.round
    assert rnd is not None and rnd.fedavg.clipped == 1 and rnd.fedavg.count == 1
    assert rnd.metrics.clients["a"].norm == pytest.approx(norm, rel=1e-12)
    mean = rnd.fedavg.mean()  # one client: its update scaled to norm CLIP
    for k, t in delta.items():
        torch.testing.assert_close(mean[k], (t.double() * (CLIP / norm)).float())
