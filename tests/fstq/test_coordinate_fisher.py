"""Coordinate Fisher (fstq.coordinate_fisher) and its parameter mapping, alone and driven by the
training hook on a tiny Llama with LoRA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from factories import real_batches, tiny_peft
from peft import get_peft_model_state_dict

from fstq.adapter_state import adapter_parameters
from fstq.config import FstqConfig
from fstq.coordinate_fisher import CoordinateFisher
from fstq.errors import ConfigError, FstqError
from fstq.token_scores import TokenScores
from fstq.training import FstqTrainingHook

VOCAB = 49152


@pytest.fixture
def model() -> Any:
    return tiny_peft(targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return real_batches(3, batch_size=4, max_len=48)


def _optimizer(model: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def test_fisher_is_ema_of_squared_grads_and_resets(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    rho = 0.9
    hook = FstqTrainingHook(
        model, FstqConfig(rho=rho, refresh_every=10), TokenScores(VOCAB, rho=rho)
    )
    params = adapter_parameters(model)
    opt = _optimizer(model)
    grads: list[dict[str, torch.Tensor]] = []

    # Act: two steps (a refresh and a masked one), recording the gradients the hook saw.
    hook.begin_round()
    for batch in batches[:2]:
        hook.loss(batch).backward()
        grads.append({k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None})
        hook.after_backward()
        opt.step()
        opt.zero_grad()
    masked_step_kept_fewer = hook.stats.targets_kept < hook.stats.targets_total
    delta, fisher = hook.end_round()

    # Assert: F = rho * ((1 - rho) * g1^2) + (1 - rho) * g2^2, keyed like peft's state dict.
    assert set(fisher) == set(get_peft_model_state_dict(model)) == set(delta)
    assert set(grads[0]) == set(fisher)
    assert masked_step_kept_fewer  # step 1's gradient came from the token-masked loss
    for key, value in fisher.items():
        expected = rho * (1 - rho) * grads[0][key] ** 2 + (1 - rho) * grads[1][key] ** 2
        assert torch.allclose(value, expected, rtol=1e-5, atol=1e-12), key
        assert value.dtype == torch.float32

    # Act: a new round starts from zero.
    hook.begin_round()
    hook.loss(batches[2]).backward()
    g3 = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    hook.after_backward()
    _, fisher2 = hook.end_round()

    # Assert
    for key, value in fisher2.items():
        assert torch.allclose(value, (1 - rho) * g3[key] ** 2, rtol=1e-5, atol=1e-12)


def test_coordinate_fisher_unit() -> None:
    # Arrange
    p = torch.nn.Parameter(torch.zeros(2))
    fisher = CoordinateFisher({"w": p}, rho=0.5)

    # Act
    fisher.accumulate_grads({"w": torch.tensor([2.0, -4.0])})
    p.grad = None
    fisher.accumulate()  # missing gradient = zero gradient

    # Assert
    assert fisher.values()["w"].tolist() == [0.5 * 0.5 * 4.0, 0.5 * 0.5 * 16.0]
    assert fisher.steps == 2
    fisher.reset()
    assert fisher.values()["w"].tolist() == [0.0, 0.0] and fisher.steps == 0
    with pytest.raises(FstqError):
        fisher.accumulate_grads({"other": torch.zeros(2)})
    with pytest.raises(ConfigError):
        CoordinateFisher({"w": p}, rho=1.0)


def test_adapter_parameters_map_by_identity(model: Any) -> None:
    mapping = adapter_parameters(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert set(mapping) == set(get_peft_model_state_dict(model))
    for key, param in mapping.items():
        assert named[id(param)].replace(".default", "") == key  # peft's naming, checked not used
