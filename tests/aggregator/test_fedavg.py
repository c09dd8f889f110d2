from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fedavg import RejectedUpdate, StreamingFedAvg, apply_delta, fedavg


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_fedavg_matches_hand_worked_average() -> None:
    # Arrange: weights 1 and 3 -> mean = (1*a + 3*b) / 4
    a = {"x": _t([1.0, 2.0]), "y": _t([0.0])}
    b = {"x": _t([5.0, -2.0]), "y": _t([4.0])}
    # Act
    agg = StreamingFedAvg(a)
    agg.add(a, 1.0)
    agg.add(b, 3.0)
    # Assert
    assert torch.equal(agg.mean()["x"], _t([4.0, -1.0]))
    assert torch.equal(agg.mean()["y"], _t([3.0]))
    assert agg.count == 2 and agg.total_weight == 4.0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    weights=st.lists(st.integers(1, 500), min_size=6, max_size=6),
)
def test_streaming_equals_batch_in_any_order(n: int, seed: int, weights: list[int]) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = [
        {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g)} for _ in range(n)
    ]
    w = [float(x) for x in weights[:n]]
    batch = fedavg(deltas, w)
    order = torch.randperm(n, generator=g).tolist()
    agg = StreamingFedAvg(deltas[0])
    for i in order:
        agg.add(deltas[i], w[i])
    for name in batch:
        torch.testing.assert_close(agg.mean()[name], batch[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"x": _t([1.0, 2.0])}, "tensor_names"),
        ({"x": _t([1.0, 2.0]), "y": _t([1.0]), "z": _t([1.0])}, "tensor_names"),
        ({"x": _t([1.0, 2.0, 3.0]), "y": _t([1.0])}, "shape_mismatch"),
        ({"x": _t([math.nan, 2.0]), "y": _t([1.0])}, "non_finite"),
        ({"x": _t([math.inf, 2.0]), "y": _t([1.0])}, "non_finite"),
        ({"x": _t([3e38, 3e38]), "y": _t([1.0])}, None),  # finite but huge: accepted (no clip set)
    ],
)
def test_bad_updates_are_rejected_without_touching_the_sum(
    update: dict[str, torch.Tensor], reason: str | None
) -> None:
    good = {"x": _t([1.0, 1.0]), "y": _t([1.0])}
    agg = StreamingFedAvg(good)
    agg.add(good, 2.0)
    if reason is None:
        agg.add(update, 1.0)
        assert agg.count == 2
        return
    with pytest.raises(RejectedUpdate) as info:
        agg.add(update, 1.0)
    assert info.value.reason == reason
    assert agg.count == 1 and torch.equal(agg.mean()["x"], good["x"])


@pytest.mark.parametrize(
    ("update", "detail"),
    [
        ({"x": _t([1.0, math.nan]), "y": _t([1.0])}, "x has NaN or Inf"),
        ({"x": _t([1.0, 1.0]), "y": _t([math.inf])}, "y has NaN or Inf"),
        ({"x": _t([-math.inf, 1.0]), "y": _t([math.nan])}, "x has NaN or Inf"),
        (  # finite values whose squares overflow float64 (only a float64 update can)
            {"x": torch.tensor([[1e200, 1.0]], dtype=torch.float64), "y": _t([1.0])},
            "update norm overflows",
        ),
    ],
)
def test_non_finite_updates_are_rejected_with_their_reason_and_detail(
    update: dict[str, torch.Tensor], detail: str
) -> None:
    agg = StreamingFedAvg({"x": _t([0.0, 0.0]), "y": _t([0.0])}, clip_norm=1.0)
    for act in (agg.check, lambda u: agg.add(u, 1.0)):
        with pytest.raises(RejectedUpdate) as info:
            act(update)
        assert info.value.reason == "non_finite" and str(info.value) == f"non_finite: {detail}"
    assert agg.count == 0 and agg.clipped == 0


def test_a_checked_update_is_added_without_a_second_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    huge = {"x": _t([3e3, 4e3]), "y": _t([0.0])}  # norm 5000
    agg = StreamingFedAvg(huge, clip_norm=1.0)
    checked = agg.check(huge)
    assert checked.norm == 5000.0 and checked.delta is huge
    calls: list[object] = []
    monkeypatch.setattr(agg, "check", calls.append)  # any further check would be recorded
    agg.add(checked, 2.0)
    assert not calls
    assert agg.clipped == 1 and agg.count == 1
    assert torch.equal(agg.mean()["x"], _t([0.6, 0.8]))


def test_norm_bounding_limits_a_malicious_client() -> None:
    honest = [{"w": torch.full((10,), 0.01)} for _ in range(9)]
    evil = {"w": torch.full((10,), 1e6)}
    agg = StreamingFedAvg(honest[0], clip_norm=1.0)
    for d in [*honest, evil]:
        agg.add(d, 1.0)
    # The attacker's contribution to the mean is at most clip_norm / total_weight in norm.
    honest_mean = fedavg(honest, [1.0] * 9)["w"] * 9 / 10
    shift = float(torch.linalg.vector_norm(agg.mean()["w"] - honest_mean))
    assert shift <= 1.0 / 10 + 1e-6
    assert agg.clipped == 1


def test_bad_weight_and_empty_mean() -> None:
    agg = StreamingFedAvg({"x": _t([1.0])})
    assert torch.equal(agg.mean()["x"], _t([0.0]))
    for w in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(RejectedUpdate, match="bad_weight"):
            agg.add({"x": _t([1.0])}, w)


def test_apply_delta_keeps_dtype() -> None:
    g = {"x": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    out = apply_delta(g, {"x": torch.tensor([0.5, -1.0])})
    assert out["x"].dtype == torch.float16 and out["x"].tolist() == [1.5, 1.0]
