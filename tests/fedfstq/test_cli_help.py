"""`fedfstq --help` and every command's help: fast (nothing heavy imported) and complete."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from collections.abc import Iterator

import pytest
from cli_support import ROOT, run_fedfstq

from common.exit_codes import ExitCode
from fedfstq import cli
from fedfstq.errors import INTERRUPTED, MEANING

COMMANDS = [
    [],
    ["agent"],
    ["aggregator"],
    ["enrol"],
    ["status"],
    ["demo"],
    ["bench"],
    ["bench", "codec"],
    ["bench", "inference"],
    ["bench", "fleet"],
    ["bench", "brokers"],
]
#: What makes a help slow (seconds of imports) or a service start: none of it may load.
HEAVY = {"torch", "transformers", "peft", "paho", "numpy", "pydantic", "aggregator.service"}
HEAVY_PREFIXES = ("edge_agent.agent", "evaluation.fleet_wire")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedfstq")
def test_help_imports_nothing_heavy(command: list[str]) -> None:
    # Act: the way a user runs it, in a fresh interpreter
    done = run_fedfstq(*command, "--help")

    # Assert
    assert done.code == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: fedfstq {' '.join(command)}".rstrip())
    assert {"fedfstq.errors", "edge_agent.arguments", "aggregator.arguments"} <= done.modules
    assert sorted((done.top_level | done.modules) & HEAVY) == []
    assert [m for m in done.modules if m.startswith(HEAVY_PREFIXES)] == []


def _subparsers(
    parser: argparse.ArgumentParser, prog: str = "fedfstq"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prog} {name}")


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = cli._build_parser()
    missing_help, missing_default = [], []
    for prog, sub in _subparsers(parser):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            name = f"{prog} {action.option_strings[-1]}"
            if not action.help:
                missing_help.append(name)
            shown = formatter._get_help_string(action)  # what --help prints for it
            unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))
            if not unset and "default" not in shown:
                missing_default.append(name)
    assert missing_help == []
    assert missing_default == []


def test_every_command_has_a_description() -> None:
    parser = cli._build_parser()
    assert [prog for prog, sub in _subparsers(parser) if not sub.description] == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"fedfstq {importlib.metadata.version('fedfstq')}\n"


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for code in ExitCode:
        assert f"{int(code)} {MEANING[code]}" in out
    assert f"{INTERRUPTED} interrupted" in out


def test_readme_documents_the_same_exit_codes() -> None:
    readme = (ROOT / "fedfstq" / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, flags=re.M))
    expected = {str(int(code)): MEANING[code] for code in ExitCode}
    expected[str(INTERRUPTED)] = "interrupted (Ctrl-C)"
    assert rows == expected
