"""Token Fisher proxy table and target mask (fstq.token_scores): pure logic, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import real_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from fstq.errors import ConfigError, FstqError
from fstq.token_scores import (
    IGNORE_INDEX,
    TokenScores,
    apply_target_mask,
    rank_table,
    scored_positions,
    select_targets,
    token_grad_sq,
    valid_targets,
)

# -- TokenScores ----------------------------------------------------------------------------------


def test_first_observation_initialises_then_ema() -> None:
    # Arrange
    scores = TokenScores(10, rho=0.9, normalize=False)

    # Act
    scores.update(torch.tensor([3]), torch.tensor([2.0]))
    first = scores.table[3].item()
    scores.update(torch.tensor([3]), torch.tensor([4.0]))

    # Assert: first value taken as is (no bias towards 0), then rho * old + (1 - rho) * new.
    assert first == pytest.approx(2.0)
    assert scores.table[3].item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert scores.updates == 2


def test_repeated_ids_in_one_refresh_are_averaged() -> None:
    # Arrange
    scores = TokenScores(10, rho=0.5, normalize=False)
    scores.update(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]))

    # Act: id 1 seen three times in one refresh, id 2 once.
    scores.update(torch.tensor([1, 1, 2, 1]), torch.tensor([2.0, 4.0, 3.0, 6.0]))

    # Assert: one EMA step per id with the mean observation.
    assert scores.table[1].item() == pytest.approx(0.5 * 1.0 + 0.5 * 4.0)
    assert scores.table[2].item() == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)


def test_normalize_divides_by_the_refresh_mean() -> None:
    # Arrange
    raw = TokenScores(10, rho=0.9, normalize=False)
    norm = TokenScores(10, rho=0.9, normalize=True)
    ids, g = torch.tensor([0, 1, 2, 2]), torch.tensor([1.0, 3.0, 2.0, 6.0])  # mean 3

    # Act
    raw.update(ids, g)
    norm.update(ids, g * 1000.0)  # loss scale must not matter after normalisation

    # Assert
    assert torch.allclose(norm.table[:3], raw.table[:3] / 3.0)


def test_unseen_ids_rank_above_seen_and_store_nan() -> None:
    # Arrange
    scores = TokenScores(5, normalize=False)
    scores.update(torch.tensor([0, 1]), torch.tensor([5.0, 1e9]))

    # Act
    ranks = scores.rank_values(torch.tensor([[0, 1, 4]]))

    # Assert
    assert torch.isnan(scores.table[2:]).all()
    assert scores.seen.tolist() == [True, True, False, False, False]
    assert ranks[0, 2].item() == math.inf
    assert ranks[0, 1].item() == pytest.approx(1e9)


def test_non_finite_observations_are_ignored() -> None:
    # Arrange
    scores = TokenScores(4, normalize=True)

    # Act
    scores.update(torch.tensor([0, 1, 2]), torch.tensor([float("nan"), 2.0, float("inf")]))

    # Assert: only id 1 is scored (normalised by the finite mean, so 1.0).
    assert scores.seen.tolist() == [False, True, False, False]
    assert scores.table[1].item() == pytest.approx(1.0)


def test_state_dict_and_numpy_round_trip() -> None:
    # Arrange
    scores = TokenScores(6, rho=0.8)
    scores.update(torch.tensor([0, 3, 3]), torch.tensor([1.0, 2.0, 4.0]))

    # Act
    again = TokenScores(6, rho=0.8)
    again.load_state_dict(scores.state_dict())
    from_np = TokenScores.from_numpy(scores.to_numpy(), rho=0.8)

    # Assert
    for other in (again, from_np):
        assert torch.equal(
            torch.nan_to_num(other.table, nan=-1), torch.nan_to_num(scores.table, nan=-1)
        )
    assert scores.to_numpy().dtype == np.float32
    assert scores.state_dict()["score"].dtype == torch.float32


def test_state_is_copied_not_shared() -> None:
    # Arrange
    scores = TokenScores(3, normalize=False)
    state = scores.state_dict()

    # Act
    state["score"][0] = 7.0
    scores.update(torch.tensor([1]), torch.tensor([1.0]))

    # Assert
    assert torch.isnan(scores.table[0])
    assert torch.isnan(state["score"][1])


def test_bad_shapes_and_ids_are_errors() -> None:
    scores = TokenScores(4)
    with pytest.raises(FstqError):
        scores.update(torch.tensor([4]), torch.tensor([1.0]))
    with pytest.raises(FstqError):
        scores.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(FstqError):
        scores.load_state_dict({"score": torch.zeros(5)})
    with pytest.raises(FstqError):
        scores.rank_values(torch.tensor([-1]))
    with pytest.raises(ConfigError):
        TokenScores(4, rho=1.0)


# -- positions ------------------------------------------------------------------------------------


def test_token_grad_sq_is_squared_norm_per_position() -> None:
    grad = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    assert token_grad_sq(grad).tolist() == [[25.0, 1.0]]


def test_valid_targets_skip_column_zero_and_ignore() -> None:
    labels = torch.tensor([[5, -100, 6, 7], [-100, 8, -100, -100]])
    assert valid_targets(labels).tolist() == [
        [False, False, True, True],
        [False, True, False, False],
    ]
    assert labels[0, 0].item() == 5  # not modified in place


def test_scored_positions_stop_before_the_last_target() -> None:
    # Arrange: row 0 targets at 2, 3 (position 4 is after its last target); row 1 target at 1;
    # row 2 has none.
    labels = torch.tensor([[-100, -100, 6, 7, -100], [-100, 8, -100, -100, -100], [-100] * 5])
    attention = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])

    # Act
    scored = scored_positions(labels, attention)

    # Assert: position i counts iff it is real and some target j > i follows it.
    assert scored.tolist() == [
        [True, True, True, False, False],
        [False, False, False, False, False],  # position 0 precedes target 1 but is padding
        [False] * 5,
    ]


# -- the target mask ------------------------------------------------------------------------------


def test_select_targets_keeps_top_ceil_ratio_of_the_batch() -> None:
    # Arrange: 5 valid targets (column 0 never counts), ranks given per position.
    labels = torch.tensor([[9, 1, 2, -100], [-100, 3, 4, 5]])
    ranks = torch.tensor([[100.0, 0.5, 3.0, 9.0], [0.0, 2.0, 1.0, 4.0]])

    # Act
    keep = select_targets(labels, ranks, keep_ratio=0.5)

    # Assert: ceil(0.5 * 5) = 3 highest valid ranks: 4.0, 3.0, 2.0.
    assert keep.tolist() == [[False, False, True, False], [False, True, False, True]]


def test_select_targets_ties_by_position_or_generator() -> None:
    labels = torch.tensor([[0, 1, 1, 1, 1]])
    ranks = torch.ones(1, 5)
    by_position = select_targets(labels, ranks, keep_ratio=0.5)
    assert by_position.tolist() == [[False, True, True, False, False]]
    draws = {
        tuple(select_targets(labels, ranks, 0.5, torch.Generator().manual_seed(s))[0].tolist())
        for s in range(20)
    }
    assert len(draws) > 1  # random tie-breaking actually varies
    assert all(sum(d) == 2 for d in draws)


def test_select_targets_edge_cases() -> None:
    labels = torch.full((2, 3), IGNORE_INDEX)
    assert not select_targets(labels, torch.zeros(2, 3), 0.3).any()
    full = torch.tensor([[0, 1, 2]])
    assert select_targets(full, torch.zeros(1, 3), 1.0).tolist() == [[False, True, True]]
    with pytest.raises(ConfigError):
        select_targets(full, torch.zeros(1, 3), 0.0)
    with pytest.raises(FstqError):
        select_targets(full, torch.zeros(1, 2), 0.5)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    cols=st.integers(1, 12),
    ratio=st.floats(0.01, 1.0),
)
def test_select_targets_properties(data: st.DataObject, rows: int, cols: int, ratio: float) -> None:
    # Arrange
    flat = data.draw(st.lists(st.integers(-1, 20), min_size=rows * cols, max_size=rows * cols))
    labels = (
        torch.tensor(flat)
        .view(rows, cols)
        .masked_fill(torch.tensor(flat).view(rows, cols) < 0, -100)
    )
    ranks = torch.tensor(
        data.draw(
            st.lists(st.floats(0, 10, allow_nan=False), min_size=rows * cols, max_size=rows * cols)
        ),
        dtype=torch.float32,
    ).view(rows, cols)

    # Act
    keep = select_targets(labels, ranks, ratio)

    # Assert
    valid = valid_targets(labels)
    total = int(valid.sum())
    assert int(keep.sum()) == (math.ceil(ratio * total) if total else 0)
    assert not (keep & ~valid).any()
    if keep.any() and (valid & ~keep).any():
        assert ranks[keep].min() >= ranks[valid & ~keep].max()


def test_apply_target_mask_is_not_in_place() -> None:
    labels = torch.tensor([[0, 1, 2, -100]])
    keep = torch.tensor([[False, False, True, False]])
    out = apply_target_mask(labels, keep)
    assert out.tolist() == [[-100, -100, 2, -100]]
    assert labels.tolist() == [[0, 1, 2, -100]]


def test_mask_on_a_real_batch_keeps_the_highest_scored_target_ids() -> None:
    # Arrange: score every id by a fixed pseudo-random value; leave some ids unseen.
    batch = real_batches(1, batch_size=6)[0]
    labels = batch["labels"]
    gen = torch.Generator().manual_seed(0)
    scores = TokenScores(49152, normalize=False)
    ids = torch.unique(labels[labels >= 0])
    seen = ids[1:]  # ids[0] stays unseen
    scores.update(seen, torch.rand(seen.numel(), generator=gen))

    # Act
    keep = select_targets(labels, scores.rank_values(labels.clamp_min(0)), 0.3)

    # Assert
    valid = valid_targets(labels)
    table = rank_table(scores.table)
    kept_scores = table[labels[keep]]
    dropped_scores = table[labels[valid & ~keep]]
    assert int(keep.sum()) == math.ceil(0.3 * int(valid.sum()))
    assert kept_scores.min() >= dropped_scores.max()
    assert (labels[keep] == ids[0]).sum() == (labels[valid] == ids[0]).sum()  # unseen id all kept
