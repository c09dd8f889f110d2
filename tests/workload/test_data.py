from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workload.data import (
    DataError,
    QAPair,
    dirichlet_partition,
    load_chatterbot,
    read_jsonl,
    train_test_split,
    write_jsonl,
)


def test_chatterbot_corpus_loads_real_multilingual_pairs() -> None:
    pairs = load_chatterbot(["english", "spanish"])
    langs = Counter(p.language for p in pairs)
    assert set(langs) == {"english", "spanish"}
    assert langs["english"] > 1000
    assert all(p.prompt and p.response for p in pairs)
    assert any(p.prompt == "Who was the 37th President of the United States?" for p in pairs)


def test_unknown_language_is_a_data_error() -> None:
    with pytest.raises(DataError):
        load_chatterbot(["klingon"])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    pairs = [QAPair("q1", "a1", "english", "trivia"), QAPair("¿q2?", "ä2", "spanish", "food")]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, pairs)
    assert read_jsonl(path) == pairs


@pytest.mark.parametrize(
    ("line", "needle"),
    [("{not json", "not JSON"), ("[1, 2]", "expected an object"), ('{"prompt": "x"}', "response")],
)
def test_bad_jsonl_lines_name_the_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=needle) as info:
        read_jsonl(path)
    assert ":2:" in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(tmp_path / "e.jsonl")


@settings(max_examples=50, deadline=None)
@given(
    n_labels=st.integers(1, 6),
    per_label=st.integers(5, 40),
    n_clients=st.integers(1, 8),
    alpha=st.sampled_from([0.1, 0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_partition_is_a_partition(
    n_labels: int, per_label: int, n_clients: int, alpha: float, seed: int
) -> None:
    labels = [f"l{i % n_labels}" for i in range(max(n_labels * per_label, n_clients))]
    parts = dirichlet_partition(labels, n_clients, alpha, np.random.default_rng(seed))
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(labels)))
    assert all(len(p) >= 1 for p in parts)


def test_small_alpha_gives_clients_dominated_by_few_labels() -> None:
    labels = [f"l{i % 8}" for i in range(8 * 200)]
    rng = np.random.default_rng(0)
    skewed = dirichlet_partition(labels, 20, 0.1, rng)
    mixed = dirichlet_partition(labels, 20, 100.0, rng)

    def top2_share(parts: list[list[int]]) -> float:
        shares = []
        for p in parts:
            counts = sorted(Counter(labels[i] for i in p).values(), reverse=True)
            shares.append(sum(counts[:2]) / len(p))
        return float(np.mean(shares))

    assert top2_share(skewed) > 0.85
    assert top2_share(mixed) < 0.5


def test_stratified_split_keeps_every_label_on_both_sides() -> None:
    pairs = [QAPair(f"q{i}", "a", f"lang{i % 3}") for i in range(60)]
    train, test = train_test_split(pairs, 0.2, np.random.default_rng(1))
    assert len(test) == 12 and len(train) == 48
    assert {p.language for p in test} == {"lang0", "lang1", "lang2"}
    assert not set(p.prompt for p in train) & set(p.prompt for p in test)


def test_federated_split_is_disjoint_and_capped() -> None:
    from workload.data import federated_split

    pairs = [QAPair(f"q{i}", "a", f"lang{i % 4}") for i in range(400)]
    split = federated_split(pairs, 5, 0.1, np.random.default_rng(3), max_per_client=30, max_test=20)
    seen = [p.prompt for c in split.clients for p in c]
    assert len(seen) == len(set(seen))
    assert all(1 <= len(c) <= 30 for c in split.clients)
    assert len(split.test) == 20
    assert not set(seen) & {p.prompt for p in split.test}
