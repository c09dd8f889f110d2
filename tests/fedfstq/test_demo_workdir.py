"""The demo's --workdir: only what the demo made, or what --overwrite names, is ever deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.exit_codes import ExitCode
from fedfstq.errors import CliError
from fedfstq.workdir import MARKER, claim_workdir


def test_a_missing_folder_is_created_with_the_marker(tmp_path: Path) -> None:
    workdir = claim_workdir(tmp_path / "runs" / "demo")

    assert workdir == (tmp_path / "runs" / "demo").resolve()
    assert [p.name for p in workdir.iterdir()] == [MARKER]


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    workdir = claim_workdir(tmp_path / "empty")

    assert [p.name for p in workdir.iterdir()] == [MARKER]


def test_an_earlier_run_is_replaced(tmp_path: Path) -> None:
    earlier = claim_workdir(tmp_path / "demo")
    (earlier / "logs").mkdir()
    (earlier / "logs" / "aggregator.log").write_text("round 1 closed")

    workdir = claim_workdir(tmp_path / "demo")

    assert [p.name for p in workdir.iterdir()] == [MARKER]


def test_a_foreign_folder_is_refused_and_untouched(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")

    with pytest.raises(CliError, match="--overwrite") as refused:
        claim_workdir(tmp_path / "photos")

    assert refused.value.code is ExitCode.CONFIG
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_overwrite_replaces_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("scratch")

    workdir = claim_workdir(tmp_path / "old", overwrite=True)

    assert [p.name for p in workdir.iterdir()] == [MARKER]


def test_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "demo").write_text("not a folder")

    with pytest.raises(CliError, match="not a directory"):
        claim_workdir(tmp_path / "demo", overwrite=True)

    assert (tmp_path / "demo").read_text() == "not a folder"


def test_the_current_folder_is_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "project" / "src").mkdir(parents=True)
    (tmp_path / "project" / "src" / "main.py").write_text("print('hi')")
    monkeypatch.chdir(tmp_path / "project" / "src")

    for target in (Path("."), Path("..")):
        with pytest.raises(CliError, match="never deleted"):
            claim_workdir(target, overwrite=True)

    assert (tmp_path / "project" / "src" / "main.py").is_file()
