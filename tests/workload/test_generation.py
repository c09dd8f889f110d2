"""Batched greedy generation (workload.evaluation.generate_*) on the tiny Llama."""

from __future__ import annotations

from typing import Any

import pytest
from factories import chatterbot_pairs, tiny_llama

from workload.batches import encode_prompt
from workload.evaluation import generate_answers, generate_tokens


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama()


def _questions(n: int) -> list[str]:
    # Trivia questions differ in length, so batches really are left-padded.
    return [q for q, _ in chatterbot_pairs("trivia")[:n]]


def test_greedy_is_deterministic_and_batch_size_invariant(model: Any, tokenizer: Any) -> None:
    # Arrange
    questions = _questions(5)
    assert len({len(encode_prompt(tokenizer, q)) for q in questions}) > 1

    # Act
    first = generate_tokens(model, tokenizer, questions, max_new_tokens=6, batch_size=3)
    again = generate_tokens(model, tokenizer, questions, max_new_tokens=6, batch_size=3)
    one_by_one = generate_tokens(model, tokenizer, questions, max_new_tokens=6, batch_size=1)

    # Assert: padding and batching must not change a row's continuation.
    assert first == again
    assert first == one_by_one


def test_respects_max_new_tokens(model: Any, tokenizer: Any) -> None:
    out = generate_tokens(model, tokenizer, _questions(4), max_new_tokens=3, batch_size=4)
    assert len(out) == 4
    assert all(len(row) <= 3 for row in out)
    # A random model almost never emits EOS, so rows run to the limit.
    assert max(len(row) for row in out) == 3


def test_token_ids_and_questions_give_the_same_answers(model: Any, tokenizer: Any) -> None:
    # Arrange
    questions = _questions(3)
    ids = [encode_prompt(tokenizer, q) for q in questions]

    # Act
    from_text = generate_answers(model, tokenizer, questions, max_new_tokens=4, batch_size=2)
    from_ids = generate_answers(model, tokenizer, ids, max_new_tokens=4, batch_size=2)

    # Assert
    assert from_text == from_ids
    assert len(from_text) == 3 and all(isinstance(a, str) for a in from_text)


def test_empty_list_bad_arguments_and_training_mode(model: Any, tokenizer: Any) -> None:
    model.train()
    try:
        assert generate_answers(model, tokenizer, [], max_new_tokens=4) == []
        generate_tokens(model, tokenizer, _questions(1), max_new_tokens=1)
        assert model.training  # restored after generating in eval mode
    finally:
        model.train(False)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_tokens(model, tokenizer, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, tokenizer, ["hi"], max_new_tokens=0)


class _Counter:
    """A logits processor counting the tokens chosen (one call per generated token)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.calls += 1
        return scores


class _EosIs:
    """The tokenizer, with another EOS id (to make the random model "finish" at once)."""

    def __init__(self, tokenizer: Any, eos: int) -> None:
        self._tok, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_stop_at_eos_false_decodes_to_the_limit_with_the_same_answer(
    model: Any, tokenizer: Any
) -> None:
    # Arrange: whatever the tiny model says first becomes its EOS
    question = [encode_prompt(tokenizer, q) for q in _questions(1)]
    first = generate_tokens(model, tokenizer, question, max_new_tokens=1)[0][0]
    tok = _EosIs(tokenizer, first)
    stopping, running = _Counter(), _Counter()

    # Act
    stopped = generate_tokens(model, tok, question, max_new_tokens=5, logits_processor=[stopping])
    kept_on = generate_tokens(
        model, tok, question, max_new_tokens=5, stop_at_eos=False, logits_processor=[running]
    )

    # Assert
    assert stopped == kept_on == [[]]  # both cut before the EOS
    assert (stopping.calls, running.calls) == (1, 5)
