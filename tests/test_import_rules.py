"""Dependencies point one way (docs/architecture.md); these rules are checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "fstq",
    "common",
    "broker",
    "workload",
    "edge_agent",
    "aggregator",
    "evaluation",
    "fedfstq",
)

HEAVY = {"torch", "transformers", "peft"}
MQTT = {"paho", "msgpack"}
PROJECT = set(PACKAGES)

# package -> top-level modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    # The algorithm stays free of service concerns (settings, signals, exit codes, files).
    "fstq": MQTT | PROJECT - {"fstq"},
    # What both services share that is not MQTT: light, and it knows no project package.
    "common": HEAVY | MQTT | PROJECT - {"common"},
    "broker": HEAVY | PROJECT - {"broker", "common"},
    "workload": {"paho", "msgpack", "broker", "edge_agent", "aggregator", "evaluation", "fedfstq"},
    "edge_agent": {"aggregator", "evaluation", "fedfstq"},
    "aggregator": {"edge_agent", "evaluation", "fedfstq"},
    # The harness drives both services (like the CLI) but only the CLI imports it.
    "evaluation": {"fedfstq"},
    "fedfstq": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_point_one_way(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in _sources(package)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_only_one_module_imports_paho() -> None:
    users = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _sources(package)
        if "paho" in _imports(path)
    ]
    assert users == ["broker/mqtt.py"], users


def test_nothing_imports_pickle() -> None:
    users = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _sources(package)
        if _imports(path) & {"pickle", "cPickle", "dill", "cloudpickle"}
    ]
    assert users == []


def test_common_imports_with_heavy_and_project_packages_blocked() -> None:
    # Runtime check on top of the static one: transitive imports count too.
    blocked = sorted(HEAVY | MQTT | {"numpy"} | PROJECT - {"common"})
    modules = sorted(f"common.{p.stem}" for p in (ROOT / "common").glob("*.py"))
    code = (
        "import sys\n"
        f"for m in {blocked!r}:\n"
        "    sys.modules[m] = None\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_fstq_imports_with_mqtt_and_msgpack_blocked() -> None:
    # Runtime check on top of the static one: transitive imports count too.
    code = (
        "import sys\n"
        "for m in ('paho', 'paho.mqtt', 'msgpack', 'broker', 'edge_agent', 'aggregator'):\n"
        "    sys.modules[m] = None\n"
        "import fstq, fstq.compressors, fstq.training, fstq.inference\n"
        "import workload.models, workload.data, workload.adapters\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
