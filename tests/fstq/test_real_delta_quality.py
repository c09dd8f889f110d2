"""Fisher-guided allocation on a REAL LoRA delta: a tiny Llama trained a few steps on real
chatterbot-corpus text with the fstq hook, so both the delta and the coordinate Fisher come
from actual training (the synthetic counterpart is test_fstq_quality.py)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from codec_cases import dense_fp16_bytes, distortion
from factories import real_batches, tiny_peft

from fstq.compressors import FstqCompressor, decompress
from fstq.config import FstqConfig
from fstq.token_scores import TokenScores
from fstq.training import FstqTrainingHook


@functools.cache
def _trained_round() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model: Any = tiny_peft(targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, random_init=False)
    config = FstqConfig(refresh_every=3)
    hook = FstqTrainingHook(model, config, TokenScores(len(model.get_input_embeddings().weight)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    hook.begin_round()
    for batch in real_batches(8, batch_size=4, max_len=48):
        loss = hook.loss(batch)
        torch.autograd.backward(loss)
        hook.after_backward()
        opt.step()
        opt.zero_grad()
    delta, fisher = hook.end_round()
    return delta, fisher


def test_real_delta_and_fisher_are_nontrivial() -> None:
    delta, fisher = _trained_round()
    assert sum(float(d.abs().sum()) for d in delta.values()) > 0
    # A real Fisher is far from uniform: that is what the allocation exploits.
    f = torch.cat([v.flatten() for v in fisher.values()])
    assert float(f.max()) > 100 * float(f.median())


@pytest.mark.parametrize("denominator", [16, 8, 4])
def test_fisher_guided_beats_uniform_and_random_support_on_real_delta(denominator: int) -> None:
    # Arrange: the same byte budget for every policy
    delta, fisher = _trained_round()
    budget = dense_fp16_bytes(delta) // denominator

    def fisher_distortion(policy: str) -> tuple[float, int]:
        out = FstqCompressor(policy=policy).compress(  # type: ignore[arg-type]
            delta, fisher=fisher, budget_bytes=budget, rng=np.random.default_rng(0)
        )
        return distortion(delta, decompress(out.payload), fisher), len(out.payload)

    # Act
    (guided, n_g), (uniform, n_u), (random, n_r) = (
        fisher_distortion(p) for p in ("fisher", "uniform", "random")
    )
    # Assert
    assert max(n_g, n_u, n_r) <= budget
    assert guided < uniform
    assert guided < random
