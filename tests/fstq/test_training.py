"""Training-side Fed-FSTQ (fstq.training, fstq.coordinate_fisher, fstq.adapter_state) on a tiny
Llama with LoRA and real chat-formatted Q/A batches."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import real_batches, tiny_peft

from fstq.adapter_state import get_adapter_state, set_adapter_state
from fstq.config import FstqConfig
from fstq.errors import ConfigError, FstqError
from fstq.token_scores import TokenScores, rank_table, scored_positions, valid_targets
from fstq.trainer_callback import FstqTrainerCallback
from fstq.training import FstqTrainingHook, RoundUpdate

VOCAB = 49152


@pytest.fixture
def model() -> Any:
    return tiny_peft()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return real_batches(6, batch_size=4, max_len=48)


def _optimizer(model: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def _kept_ce(model: Any, batch: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over exactly the label positions in ``keep``, computed by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, cols = keep.nonzero(as_tuple=True)
    return F.cross_entropy(logits[rows, cols - 1].float(), batch["labels"][rows, cols])


# -- token Fisher proxy ---------------------------------------------------------------------------


def test_g_matches_autograd_wrt_inputs_embeds(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    batch = batches[0]
    scores = TokenScores(VOCAB)
    hook = FstqTrainingHook(model, FstqConfig(), scores)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    ref_loss = model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    (ref_grad,) = torch.autograd.grad(ref_loss, embeds)
    expected = ref_grad.pow(2).sum(-1)

    # Act: step 0 is a refresh step.
    hook.begin_round()
    hook.loss(batch).backward()
    hook.after_backward()

    # Assert: the captured g equals the independent autograd computation...
    (g,) = hook.last_token_grad_sq
    assert torch.allclose(g, expected, rtol=1e-4, atol=1e-12)
    assert expected.max() > 0
    # ...and the table holds the per-id mean of g / mean(g) over scored positions.
    scored = scored_positions(batch["labels"], batch["attention_mask"])
    ids, obs = batch["input_ids"][scored], expected[scored] / expected[scored].mean()
    for token in torch.unique(ids)[:20]:
        assert scores.table[token].item() == pytest.approx(
            obs[ids == token].mean().item(), rel=1e-4
        )
    assert int(scores.seen.sum()) == torch.unique(ids).numel()


def test_no_extra_forward_or_backward(model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    # Arrange: count top-level forwards, embedding calls and backward passes (a LoRA weight's
    # gradient hook fires once per backward).
    counts = {"forward": 0, "embed": 0, "backward": 0}
    model.register_forward_pre_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    model.get_input_embeddings().register_forward_pre_hook(
        lambda *_: counts.__setitem__("embed", counts["embed"] + 1)
    )
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
    hook = FstqTrainingHook(model, FstqConfig(refresh_every=2), TokenScores(VOCAB))
    opt = _optimizer(model)

    # Act: 4 steps, two of them refresh steps.
    hook.begin_round()
    for batch in batches[:4]:
        hook.loss(batch).backward()
        hook.after_backward()
        opt.step()
        opt.zero_grad()

    # Assert
    assert counts == {"forward": 4, "embed": 4, "backward": 4}
    assert hook.stats.refresh_steps == 2


# -- mask and masked loss -------------------------------------------------------------------------


def _warm_scores(
    model: Any, batch: Mapping[str, torch.Tensor]
) -> tuple[FstqTrainingHook, TokenScores]:
    """A hook past its refresh step 0 (scores taken from ``batch``), now on masked step 1."""
    scores = TokenScores(VOCAB)
    hook = FstqTrainingHook(model, FstqConfig(token_keep_ratio=0.4), scores)
    hook.begin_round()
    hook.loss(batch).backward()
    hook.after_backward()
    model.zero_grad()
    assert not hook.is_refresh_step
    return hook, scores


def test_mask_keeps_top_scored_targets_and_loss_is_their_mean(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    hook, scores = _warm_scores(model, batches[0])
    batch = batches[1]
    labels = batch["labels"]
    original = labels.clone()
    valid = valid_targets(labels)

    # Act: the labels this masked step uses, and the loss it returns (same deterministic mask).
    used = hook.prepare_labels(batch["input_ids"], labels, batch["attention_mask"])
    masked = hook.loss(batch)
    keep = used != -100

    # Assert: exactly ceil(r*T) targets kept, all scoring at least as high as any dropped one,
    # each kept label unchanged, the caller's labels untouched.
    assert int(keep.sum()) == math.ceil(0.4 * int(valid.sum()))
    assert not (keep & ~valid).any()
    table = rank_table(scores.table)
    assert table[labels[keep]].min() >= table[labels[valid & ~keep]].max()
    assert torch.equal(used[keep], labels[keep])
    assert torch.equal(labels, original)
    # The loss is the mean CE over exactly the kept positions (causal shift: label j <- logits j-1).
    assert masked.item() == pytest.approx(_kept_ce(model, batch, keep).item(), rel=1e-5)


def test_dropped_targets_contribute_no_gradient(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    batch = batches[1]
    hook, _ = _warm_scores(model, batches[0])
    keep = hook.prepare_labels(batch["input_ids"], batch["labels"], batch["attention_mask"]) != -100
    params = [p for p in model.parameters() if p.requires_grad]

    # Act
    masked_grads = torch.autograd.grad(hook.loss(batch), params)
    ref_grads = torch.autograd.grad(_kept_ce(model, batch, keep), params)

    # Assert: gradients equal those of the kept-only loss, so dropped terms add nothing.
    assert int(keep.sum()) < int(valid_targets(batch["labels"]).sum())
    for got, want in zip(masked_grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_refresh_schedule(model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    # Arrange
    scores = TokenScores(VOCAB)
    hook = FstqTrainingHook(model, FstqConfig(refresh_every=3, token_keep_ratio=0.5), scores)
    opt = _optimizer(model)
    refresh, full_labels, score_updates = [], [], []

    # Act
    hook.begin_round()
    for s in range(8):
        batch = batches[s % len(batches)]
        refresh.append(hook.is_refresh_step)
        used = hook.prepare_labels(batch["input_ids"], batch["labels"], batch["attention_mask"])
        full_labels.append(bool(torch.equal(used, batch["labels"])))
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=used
        )
        out.loss.backward()
        hook.after_backward()
        score_updates.append(scores.updates)
        opt.step()
        opt.zero_grad()

    # Assert: steps 0, 3, 6 refresh (full loss, score update); the others are masked.
    assert refresh == [True, False, False, True, False, False, True, False]
    assert full_labels == refresh
    assert score_updates == [1, 1, 1, 2, 2, 2, 3, 3]
    assert hook.stats.steps == 8 and hook.stats.refresh_steps == 3
    assert hook.stats.targets_kept < hook.stats.targets_total


def test_gradient_accumulation_shares_the_step(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    hook = FstqTrainingHook(model, FstqConfig(), TokenScores(VOCAB, normalize=False))

    # Act: two micro-batches in refresh step 0, one after_backward.
    hook.begin_round()
    for batch in batches[:2]:
        (hook.loss(batch) / 2).backward()
    hook.after_backward()

    # Assert: both micro-batches were captured; one Fisher step, one score update.
    assert len(hook.last_token_grad_sq) == 2
    assert hook.token_scores.updates == 1
    assert hook.step == 1


# -- delta and adapter state ----------------------------------------------------------------------


def test_delta_is_adapter_after_minus_before(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    hook = FstqTrainingHook(model, FstqConfig(refresh_every=2), TokenScores(VOCAB))
    before = get_adapter_state(model)
    opt = _optimizer(model)

    # Act
    hook.begin_round()
    for batch in batches[:3]:
        hook.loss(batch).backward()
        hook.after_backward()
        opt.step()
        opt.zero_grad()
    update = hook.end_round()
    after = get_adapter_state(model)

    # Assert
    assert isinstance(update, RoundUpdate)
    assert set(update.delta) == set(before)
    for key in before:
        assert torch.allclose(update.delta[key], after[key] - before[key], atol=1e-7)
    assert any(float(d.abs().max()) > 0 for d in update.delta.values())


def test_set_adapter_state_round_trip(model: Any) -> None:
    # Arrange
    state = get_adapter_state(model)
    new = {k: v + 0.25 for k, v in state.items()}
    copy = {k: v.clone() for k, v in new.items()}

    # Act
    set_adapter_state(model, new)

    # Assert
    got = get_adapter_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)
    assert all(torch.equal(new[k], copy[k]) for k in new)  # input not modified
    got[next(iter(got))].add_(1.0)  # returned state is a copy, not a view of the parameters
    assert torch.equal(get_adapter_state(model)[next(iter(got))], new[next(iter(got))])


def test_set_adapter_state_rejects_mismatched_keys(model: Any) -> None:
    state = get_adapter_state(model)
    partial = dict(list(state.items())[1:])
    with pytest.raises(FstqError, match="missing"):
        set_adapter_state(model, partial)
    with pytest.raises(FstqError, match="unexpected"):
        set_adapter_state(model, {**state, "extra.lora_A.weight": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(FstqError):
        set_adapter_state(model, {**state, key: torch.zeros(3, 3)})


# -- lifecycle and codec hand-off ---------------------------------------------------------------


def test_lifecycle_errors(model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    hook = FstqTrainingHook(model, FstqConfig(), TokenScores(VOCAB))
    with pytest.raises(FstqError):
        hook.loss(batches[0])
    with pytest.raises(FstqError):
        hook.end_round()  # no round, no update to compress
    hook.begin_round()
    with pytest.raises(FstqError):
        hook.begin_round()
    no_targets = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    with pytest.raises(FstqError):
        hook.loss(no_targets)
    hook.close()
    with pytest.raises(ConfigError):
        FstqTrainingHook(model, FstqConfig(rho=0.8), TokenScores(VOCAB, rho=0.9))


def test_hook_is_removed_after_the_round(
    model: Any, batches: list[dict[str, torch.Tensor]]
) -> None:
    # Arrange
    embedding = model.get_input_embeddings()
    hook = FstqTrainingHook(model, FstqConfig(), TokenScores(VOCAB))

    # Act
    hook.begin_round()
    installed = len(embedding._forward_hooks)
    hook.end_round()

    # Assert: nothing left on the model; its forward no longer asks for embedding gradients.
    assert installed == 1 and len(embedding._forward_hooks) == 0
    assert not embedding(batches[0]["input_ids"]).requires_grad


def test_compress_with_the_fstq_codec(model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    # Arrange
    from fstq.compressors import FstqCompressor, decompress

    hook = FstqTrainingHook(model, FstqConfig(), TokenScores(VOCAB))
    opt = _optimizer(model)
    hook.begin_round()
    for batch in batches[:2]:
        hook.loss(batch).backward()
        hook.after_backward()
        opt.step()
        opt.zero_grad()
    delta, fisher = hook.end_round()
    dense_bytes = 4 * sum(v.numel() for v in delta.values())

    # Act: the documented hand-off, the round's delta weighted by its Fisher.
    packed = FstqCompressor(hook.config).compress(
        delta, fisher=fisher, budget_bytes=dense_bytes // 4, rng=np.random.default_rng(0)
    )
    unweighted = FstqCompressor(hook.config).compress(
        delta, budget_bytes=dense_bytes // 4, rng=np.random.default_rng(0)
    )
    decoded = decompress(packed.payload)

    # Assert: the codec took our keys and shapes, within the budget, and used the Fisher.
    assert packed.method == "fstq" and len(packed.payload) <= dense_bytes // 4
    assert {k: v.shape for k, v in decoded.items()} == {k: v.shape for k, v in delta.items()}
    assert fisher.keys() == delta.keys() and packed.payload != unweighted.payload


# -- transformers.Trainer -------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        width = max(b["input_ids"].shape[1] for b in batches)
        self.rows = []
        for b in batches:
            pad = width - b["input_ids"].shape[1]
            padded = {
                "input_ids": F.pad(b["input_ids"], (0, pad), value=2),
                "attention_mask": F.pad(b["attention_mask"], (0, pad), value=0),
                "labels": F.pad(b["labels"], (0, pad), value=-100),
            }
            self.rows += [{k: v[i] for k, v in padded.items()} for i in range(len(b["labels"]))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def test_trainer_callback_maintains_scores_fisher_and_mask(
    model: Any, batches: list[dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    from transformers import Trainer, TrainingArguments

    # Arrange
    scores = TokenScores(VOCAB)
    callback = FstqTrainerCallback(model, FstqConfig(refresh_every=2, token_keep_ratio=0.5), scores)
    seen: list[dict[str, Any]] = []

    def spy(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        # The inner Llama sees the labels after the callback's rewrite.
        seen.append(
            {
                "labels": kwargs["labels"],
                "num_items": kwargs.get("num_items_in_batch"),
                "out": output,
            }
        )

    model.base_model.model.register_forward_hook(spy, with_kwargs=True)
    before = get_adapter_state(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(batches), callbacks=[callback])

    # Act
    trainer.train()

    # Assert: 4 steps, refresh at 0 and 2 -> two score updates; masked steps 1 and 3 rewrote labels.
    assert len(seen) == 4
    assert scores.updates == 2 and callback.hook.stats.refresh_steps == 2
    for step, rec in enumerate(seen):
        n_valid = int(valid_targets(rec["labels"]).sum())
        if step % 2 == 1:
            assert rec["num_items"] is not None  # the Trainer normalises by token count...
            assert (
                float(rec["num_items"]) == n_valid
            )  # ...so the callback scaled it to the kept count
            logits, labels = rec["out"].logits, rec["labels"]
            keep = valid_targets(labels)
            rows, cols = keep.nonzero(as_tuple=True)
            ce = F.cross_entropy(logits[rows, cols - 1].float(), labels[rows, cols])
            assert rec["out"].loss.item() == pytest.approx(ce.item(), rel=1e-5)  # mean over kept
    kept, total = callback.hook.stats.targets_kept, callback.hook.stats.targets_total
    assert 0 < kept < total
    # The round's outputs: Fisher and delta keyed like peft, delta = after - before, hooks gone.
    after = get_adapter_state(model)
    assert set(callback.fisher) == set(before) == set(callback.delta)
    assert all(float(v.sum()) > 0 for v in callback.fisher.values())
    for key in before:
        assert torch.allclose(callback.delta[key], after[key] - before[key], atol=1e-7)
    assert not model._forward_pre_hooks and not model.get_input_embeddings()._forward_hooks
