"""Question/answer data: the offline `chatterbot-corpus`, JSONL files on devices, non-IID splits.

A device's local data is a JSONL file of `{"prompt": ..., "response": ...}` lines (extra keys
such as `language`/`category` are kept as labels). Partitions are Dirichlet over a label, the
usual way to build "clients dominated by one or two languages".
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from workload.languages import DEFAULT_LANGUAGES

__all__ = [
    "DEFAULT_LANGUAGES",
    "DataError",
    "FederatedSplit",
    "QAPair",
    "chatterbot_dir",
    "dirichlet_partition",
    "federated_split",
    "load_chatterbot",
    "read_jsonl",
    "train_test_split",
    "write_jsonl",
]

log = logging.getLogger(__name__)

_MAX_FIELD_CHARS = 4000  # longer turns are corpus noise for a 135M model; they are skipped


class DataError(ValueError):
    """A data file is missing, unreadable or has malformed records."""


@dataclass(frozen=True)
class QAPair:
    """One prompt/response example with the labels used for non-IID splits."""

    prompt: str
    response: str
    language: str = "unknown"
    category: str = "unknown"

    def label(self, by: str) -> str:
        """The split label: "language", "category" or "language/category"."""
        if by == "language":
            return self.language
        if by == "category":
            return f"{self.language}/{self.category}"
        raise DataError(f"unknown label kind {by!r} (use 'language' or 'category')")


def chatterbot_dir() -> Path:
    """The installed corpus data folder (found without importing the package)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package chatterbot-corpus is not installed (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _text(value: object) -> str | None:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = str(value).strip()
        return text if 0 < len(text) <= _MAX_FIELD_CHARS else None
    return None


def load_chatterbot(languages: Iterable[str] | None = None) -> list[QAPair]:
    """Every consecutive (turn, next turn) pair of every conversation, in a stable order."""
    root = chatterbot_dir()
    wanted = set(languages) if languages is not None else None
    pairs: list[QAPair] = []
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and lang_dir.name not in wanted:
            continue
        for path in sorted(lang_dir.glob("*.yml")):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                log.warning("skipping unreadable corpus file %s: %s", path, exc)
                continue
            for conv in (doc or {}).get("conversations") or []:
                turns = [_text(t) for t in conv] if isinstance(conv, list) else []
                for q, a in itertools.pairwise(turns):
                    if q is not None and a is not None:
                        pairs.append(QAPair(q, a, lang_dir.name, path.stem))
    if wanted is not None and not pairs:
        raise DataError(f"no conversations found for languages {sorted(wanted)}")
    return pairs


def write_jsonl(path: Path, pairs: Iterable[QAPair]) -> None:
    """Write pairs as JSONL (UTF-8, one object per line)."""
    with open(path, "w", encoding="utf-8") as fh:
        for p in pairs:
            record = {
                "prompt": p.prompt,
                "response": p.response,
                "language": p.language,
                "category": p.category,
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[QAPair]:
    """Read a device's local data; a malformed line is a DataError naming the line."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    pairs: list[QAPair] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected an object")
            prompt, response = _text(rec.get("prompt")), _text(rec.get("response"))
            if prompt is None or response is None:
                raise DataError(f"{path}:{lineno}: needs non-empty 'prompt' and 'response' strings")
            pairs.append(
                QAPair(
                    prompt,
                    response,
                    str(rec.get("language", "unknown")),
                    str(rec.get("category", "unknown")),
                )
            )
    if not pairs:
        raise DataError(f"data file {path} has no examples")
    return pairs


def train_test_split(
    pairs: Sequence[QAPair], test_fraction: float, rng: np.random.Generator, by: str = "language"
) -> tuple[list[QAPair], list[QAPair]]:
    """Stratified split: each label contributes `test_fraction` of its examples to the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_label: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_label.setdefault(p.label(by), []).append(i)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_label):
        idx = rng.permutation(by_label[label])
        n_test = round(len(idx) * test_fraction)
        test.extend(int(i) for i in idx[:n_test])
        train.extend(int(i) for i in idx[n_test:])
    return [pairs[i] for i in sorted(train)], [pairs[i] for i in sorted(test)]


def dirichlet_partition(
    labels: Sequence[str],
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 20,
) -> list[list[int]]:
    """Split example indices over clients with per-label Dirichlet(alpha) proportions.

    Small alpha gives clients dominated by one or two labels. Redraws until every client has at
    least `min_size` examples (as is customary); after `max_tries` draws the last one is topped up
    by moving random examples from the largest clients, so the call always succeeds.
    """
    if n_clients < 1 or alpha <= 0:
        raise DataError(f"need n_clients >= 1 and alpha > 0, got {n_clients}, {alpha}")
    if len(labels) < n_clients * min_size:
        raise DataError(f"{len(labels)} examples cannot give {n_clients} clients {min_size} each")
    names = sorted(set(labels))
    label_arr = np.array([names.index(x) for x in labels])
    parts: list[list[int]] = []
    for _ in range(max(1, max_tries)):
        parts = [[] for _ in range(n_clients)]
        for k in range(len(names)):
            idx = rng.permutation(np.flatnonzero(label_arr == k))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    for small in range(n_clients):
        while len(parts[small]) < min_size:
            donor = max(range(n_clients), key=lambda c: len(parts[c]))
            moved = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[small].append(moved)
    return [sorted(p) for p in parts]


@dataclass(frozen=True)
class FederatedSplit:
    """Per-client training data (non-IID) and a shared held-out set."""

    clients: list[list[QAPair]]
    test: list[QAPair]


def federated_split(
    pairs: Sequence[QAPair],
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    by: str = "language",
    test_fraction: float = 0.1,
    max_per_client: int | None = None,
    max_test: int | None = None,
) -> FederatedSplit:
    """Stratified held-out split, then a Dirichlet(alpha) split of the rest over clients.

    `max_per_client` / `max_test` subsample (seeded) to keep demos and tests small; the label mix
    of each client is preserved in expectation.
    """
    train, test = train_test_split(pairs, test_fraction, rng, by=by)
    parts = dirichlet_partition([p.label(by) for p in train], n_clients, alpha, rng)
    clients = []
    for idx in parts:
        if max_per_client is not None and len(idx) > max_per_client:
            idx = sorted(int(i) for i in rng.choice(idx, size=max_per_client, replace=False))
        clients.append([train[i] for i in idx])
    if max_test is not None and len(test) > max_test:
        test = [test[int(i)] for i in sorted(rng.choice(len(test), size=max_test, replace=False))]
    return FederatedSplit(clients, test)
