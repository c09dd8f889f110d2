"""The reliability table: one row per fault scenario, printed at the end of a pytest run.

A scenario test takes the ``fault_report`` fixture and calls it once with what it measured;
``conftest.pytest_terminal_summary`` prints every row as a table and ``--fault-report PATH``
also writes them as JSON (RELIABILITY.md shows how to run it). The two "must be 0" columns are
asserted by the tests themselves; the table only reports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["FaultRow", "format_table"]


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    rounds_completed: int
    uploads_acknowledged: int
    uploads_aggregated: int
    bytes_resent: int
    corrupted_aggregated: int  # must be 0
    acknowledged_lost: int  # must be 0
    notes: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_HEADERS = (
    "scenario",
    "rounds",
    "acked",
    "aggregated",
    "bytes re-sent",
    "corrupted aggregated",
    "acked lost",
    "notes",
)


def format_table(rows: list[FaultRow]) -> str:
    """A Markdown table (pasted as is into RELIABILITY.md)."""
    cells = [[str(getattr(r, f.name)) for f in fields(FaultRow)] for r in rows]
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)
