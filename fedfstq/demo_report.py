"""What the demo prints about finished rounds: a line as each closes, the table at the end, and
a few held-out answers of the initial adapter next to the final one's.

Every number comes from the aggregator's ``rounds.jsonl`` record of the round (its evaluation
of the new global adapter on the held-out set, and the MQTT bytes it counted both ways), read
with :func:`aggregator.round_result.read_rounds`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from aggregator.round_result import RoundResult

__all__ = [
    "COLUMNS",
    "Answer",
    "compare_answers",
    "result_line",
    "rounds_table",
    "row",
    "table_text",
]

#: Column titles of the per-round table (plain and rich).
COLUMNS = (
    "round",
    "status",
    "eval_loss",
    "perplexity",
    "uplink_B",
    "downlink_B",
    "payload_B",
    "vs_fp16",
    "arrived",
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row(rec: RoundResult) -> list[str]:
    """The cells of one round, in :data:`COLUMNS` order."""
    loss = None if rec.eval is None else rec.eval.loss
    ratio = rec.ratio_vs_fp16
    return [
        str(rec.round),
        rec.status,
        _num(loss, ".4f"),
        _num(None if loss is None else math.exp(loss), ".2f"),
        f"{rec.uplink_wire_bytes:,}",
        f"{rec.downlink_wire_bytes:,}",
        f"{rec.accepted_payload_bytes:,}",
        f"{ratio:.1f}x" if ratio else "-",
        f"{len(rec.arrived)}/{len(rec.selected)}",
    ]


def table_text(records: Sequence[RoundResult]) -> str:
    """The per-round table as plain text (right-aligned columns)."""
    cells = [list(COLUMNS), *(row(r) for r in records)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def rounds_table(records: Sequence[RoundResult]) -> Table:
    """The per-round table for the live view."""
    from rich.table import Table

    table = Table(title="finished rounds", title_justify="left", box=None, header_style="bold")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "status" else "right")
    for rec in records:
        table.add_row(*row(rec))
    return table


def result_line(rec: RoundResult) -> str:
    """One line when a round's record appears."""
    cells = dict(zip(COLUMNS, row(rec), strict=True))
    return (
        f"round {cells['round']} {cells['status']}: {cells['arrived']} arrived; "
        f"held-out loss {cells['eval_loss']}, perplexity {cells['perplexity']}; "
        f"uplink {cells['uplink_B']} B, downlink {cells['downlink_B']} B"
    )


@dataclass(frozen=True)
class Answer:
    """One held-out question: the reference answer and each adapter's own.

    ``*_ppl`` is the perplexity of the reference answer's tokens under each adapter (what the
    quality column measures, for this one question).
    """

    question: str
    reference: str
    before: str
    after: str
    before_ppl: float
    after_ppl: float


def compare_answers(
    model_source: str,
    heldout: Path,
    before_dir: Path,
    after_dir: Path,
    *,
    count: int = 3,
    max_new_tokens: int = 40,
    max_len: int = 96,
) -> list[Answer]:
    """Greedy answers of two global adapters (stock peft directories) to ``count`` held-out
    questions spread over the file (it is ordered by language), and how likely each adapter
    finds the reference answer."""
    from fstq.training import set_adapter_state
    from workload.adapters import ADAPTER_CONFIG, load_peft_dir
    from workload.batches import encode_pair
    from workload.data import read_jsonl
    from workload.evaluation import answer_metrics, generate_answers
    from workload.models import LoraSpec, load_base_model, make_peft_model

    pairs = read_jsonl(heldout)
    picks = [pairs[i * len(pairs) // count] for i in range(min(count, len(pairs)))]
    cfg = json.loads((after_dir / ADAPTER_CONFIG).read_text())
    spec = LoraSpec(
        r=int(cfg["r"]), alpha=int(cfg["lora_alpha"]), target_modules=tuple(cfg["target_modules"])
    )
    base, tokenizer = load_base_model(model_source)
    model = make_peft_model(base, spec)
    examples = [encode_pair(tokenizer, p, max_len) for p in picks]
    answers: list[list[str]] = []
    ppl: list[list[float]] = []
    for directory in (before_dir, after_dir):
        set_adapter_state(model, load_peft_dir(directory))
        prompts = [p.prompt for p in picks]
        answers.append(generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens))
        pad = int(tokenizer.pad_token_id)
        ppl.append([math.exp(answer_metrics(model, [e], pad).loss) for e in examples])
    return [
        Answer(_short(p.prompt), _short(p.response), _short(b), _short(a), pb, pa)
        for p, b, a, pb, pa in zip(picks, *answers, *ppl, strict=True)
    ]


def _short(text: str, width: int = 160) -> str:
    """One line (answers may hold code blocks), cut at ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
