"""Fault-injection tests: hostile payloads, a userspace TCP relay, flaky links, process faults.

They reuse the support modules of the aggregator and end-to-end tests (``service_support``:
fake devices; ``e2e_support``: real services in threads), which live in sibling directories.
Each scenario records one row of the reliability table through the ``fault_report`` fixture.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent.parent
for _sub in ("aggregator", "integration", "faults"):
    _path = str(_TESTS / _sub)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from report import FaultRow, format_table  # noqa: E402

_ROWS: list[FaultRow] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fault-report",
        metavar="PATH",
        default=None,
        help="write the fault scenarios' reliability table as JSON to PATH",
    )


@pytest.fixture
def fault_report() -> Callable[[FaultRow], None]:
    """Record one row of the reliability table (call once per scenario test)."""
    return _ROWS.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    terminalreporter.write_sep("=", "reliability (fault scenarios)")
    terminalreporter.write_line(format_table(_ROWS))
    path = terminalreporter.config.getoption("--fault-report")
    if path:
        Path(path).write_text(json.dumps([r.as_dict() for r in _ROWS], indent=2) + "\n")
