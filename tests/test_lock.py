"""The lock files are the one record of tested versions, and this virtualenv holds exactly them.

``scripts/lock.sh`` (``make lock``) writes ``requirements/lock.txt`` (runtime + dev + eval, with
hashes), the container's runtime part and ``requirements/no-deps.txt``; ``scripts/setup.sh``
installs them. These tests fail when the venv drifts from the lock (a hand install, a stale
venv), when the container's file is not the runtime part of the same lock, or when pyproject.toml
asks for something the lock does not satisfy (edited without ``make lock``).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
NO_DEPS_IN = ROOT / "requirements" / "no-deps.in"
NO_DEPS = ROOT / "requirements" / "no-deps.txt"
CONTAINER = ROOT / "deploy" / "container" / "requirements.txt"


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: frozenset[str]


def _pins(path: Path) -> dict[NormalizedName, Pin]:
    """``name==version --hash=...`` entries of a pip-compile style file (continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[NormalizedName, Pin] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        req = Requirement(spec)
        (specifier,) = req.specifier
        assert specifier.operator == "==", line
        hashes = frozenset(o.removeprefix("--hash=") for o in options if o.startswith("--hash="))
        assert hashes and len(hashes) == len(options), f"{path.name}: every pin has hashes: {line}"
        pins[canonicalize_name(req.name)] = Pin(Version(specifier.version), hashes)
    return pins


def _installed() -> dict[NormalizedName, Version]:
    return {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in md.distributions()}


def test_the_virtualenv_holds_exactly_the_locked_versions() -> None:
    locked = _pins(LOCK) | _pins(NO_DEPS)
    installed = _installed()
    wrong = {
        name: (str(installed.get(name)), str(pin.version))
        for name, pin in locked.items()
        if installed.get(name) != pin.version
    }
    assert wrong == {}, f"installed vs locked (run `make setup`): {wrong}"
    extra = set(installed) - set(locked) - {canonicalize_name("fedfstq")}
    assert extra == set(), (
        f"installed but not locked (remove them, or add and `make lock`): {extra}"
    )


def test_the_lock_satisfies_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    locked = _pins(LOCK)
    for raw in wanted:
        req = Requirement(raw)
        pin = locked.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pin.version, prereleases=True), (raw, str(pin.version))
    assert locked[canonicalize_name("torch")].version == Version("2.13.0+cpu")


def test_the_container_installs_the_runtime_part_of_the_same_lock() -> None:
    container, locked = _pins(CONTAINER), _pins(LOCK)
    assert set(container) <= set(locked)
    assert {n: p for n, p in container.items() if locked[n] != p} == {}
    # Runtime only: no test or lint tooling in the image.
    assert not {"pytest", "mypy", "ruff", "hypothesis", "pip-tools"} & set(container)
    # Every runtime dependency, and what it needs as installed here, is in the image's file.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stack = [Requirement(r).name for r in project["dependencies"]]
    seen: set[NormalizedName] = set()
    while stack:
        name = canonicalize_name(stack.pop())
        if name not in seen:
            seen.add(name)
            for raw in md.requires(name) or []:
                req = Requirement(raw)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    stack.append(req.name)
    assert seen <= set(container), sorted(seen - set(container))


def test_the_no_deps_lock_matches_its_input() -> None:
    wanted = {
        canonicalize_name(Requirement(line).name): Version(str(Requirement(line).specifier)[2:])
        for line in NO_DEPS_IN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {n: p.version for n, p in _pins(NO_DEPS).items()} == wanted
