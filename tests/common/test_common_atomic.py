"""Atomic, durable writes on a real file system: what a reader finds, what is left behind, and
that the file, its folder's files and the parent directory are fsync'd (the durability a crash
test cannot show on a machine that does not lose power: the fsync calls are recorded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import atomic


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths fsync'd during the test (os.fsync still runs)."""
    seen: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_bytes_replaces_the_file_and_syncs_it_and_its_directory(
    tmp_path: Path, synced: list[Path]
) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    atomic.write_bytes(target, b"new")

    assert target.read_bytes() == b"new"
    assert _entries(tmp_path) == ["state.json"]  # no temporary file left
    # The data before the rename, the directory entry after it.
    assert synced[-1] == tmp_path and synced[-2].parent == tmp_path
    assert synced.index(tmp_path) > 0


def test_write_text_makes_a_normal_new_file(tmp_path: Path) -> None:
    target = tmp_path / "health"
    atomic.write_text(target, "1.5\n")
    reference = tmp_path / "reference"
    reference.write_text("x")
    assert target.read_text() == "1.5\n"
    assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    with pytest.raises(TypeError):
        atomic.write_bytes(target, "not bytes")  # type: ignore[arg-type]

    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["state.json"]


def test_replace_dir_creates_a_directory_with_everything_synced(
    tmp_path: Path, synced: list[Path]
) -> None:
    target = tmp_path / "global" / "v00001"

    with atomic.replace_dir(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "adapter_model.safetensors").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")

    assert _entries(target) == ["adapter_model.safetensors", "sub"]
    assert (target / "sub" / "config.json").read_text() == "{}"
    assert _entries(target.parent) == ["v00001"]
    names = [p.name for p in synced]
    assert {"adapter_model.safetensors", "config.json"} <= set(names)  # the files' data
    assert synced[-1] == target.parent  # the rename, after everything in it


def test_replace_dir_replaces_an_existing_directory_whole(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")

    with atomic.replace_dir(target) as tmp:
        (tmp / "payload.bin").write_bytes(b"new")

    assert _entries(target) == ["payload.bin"]
    assert _entries(tmp_path) == ["entry"]  # the old one and the temporary one are gone


def test_an_error_inside_replace_dir_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "payload.bin").write_bytes(b"old")

    def build_half(tmp: Path) -> None:
        (tmp / "payload.bin").write_bytes(b"new, half")
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"), atomic.replace_dir(target) as tmp:
        build_half(tmp)

    assert (target / "payload.bin").read_bytes() == b"old"
    assert _entries(tmp_path) == ["entry"]
