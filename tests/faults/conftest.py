"""Fault-injection tests: hostile payloads, a userspace TCP relay, flaky links.

They reuse the support modules of the aggregator and end-to-end tests (``service_support``:
fake devices; ``e2e_support``: real services in threads), which live in sibling directories.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _sub in ("aggregator", "integration"):
    _path = str(_TESTS / _sub)
    if _path not in sys.path:
        sys.path.insert(0, _path)
