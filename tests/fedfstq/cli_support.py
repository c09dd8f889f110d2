"""Helpers of the fedfstq CLI tests: run ``fedfstq`` in a fresh interpreter, see what it loaded."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    #: stderr without the ``-X importtime`` lines
    stderr: str
    #: every module the process imported, by full name
    modules: frozenset[str]

    @property
    def top_level(self) -> frozenset[str]:
        return frozenset(m.split(".")[0] for m in self.modules)


def run_fedfstq(*argv: str) -> Finished:
    """``python -X importtime -m fedfstq.cli argv`` from the repository root."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedfstq.cli", *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    own, modules = [], set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:"):
            own.append(line)
        elif "|" in line and not line.endswith("imported package"):
            modules.add(line.rsplit("|", 1)[1].strip())
    return Finished(done.returncode, done.stdout, "\n".join(own), frozenset(modules))
