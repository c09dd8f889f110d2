"""Atomic, durable writes: after a crash or a power cut a reader finds the old content or the new
one, never a mix, and once a call returns the new content survives a power cut.

Atomic: the data goes to a temporary name in the same directory and is renamed over the target
(``rename(2)`` is atomic within a file system). Durable: the file's data is fsync'd before the
rename and its directory after it; without the first a power cut can leave the new name on an
empty file, without the second the rename itself may be lost. Callers that record "written" in
a database (the aggregator's SQLite store commits with ``synchronous=FULL``) may do so once the
call has returned.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fsync_dir", "replace_dir", "write_bytes", "write_text"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (names created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically and durably.

    The file gets the usual mode for a new file (0666 less the umask), like ``open(path, "wb")``.
    On any error the target is untouched and no temporary file is left behind.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """:func:`write_bytes` of ``text`` encoded."""
    write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def replace_dir(directory: Path) -> Iterator[Path]:
    """Build a new ``directory`` in the yielded temporary folder; on a clean exit it replaces
    ``directory`` (which may or may not exist) durably.

    ``with replace_dir(target) as tmp: (tmp / "a").write_bytes(...)`` writes into a fresh folder
    (mode 0700) beside ``target``; at the end of the block every file and folder under it is
    fsync'd, it is renamed to ``target`` and the parent directory is fsync'd. An exception in the
    block removes the temporary folder and leaves ``target`` as it was.

    A new ``target`` appears atomically. An existing one is first renamed aside and deleted
    after the new one is in place (POSIX cannot rename a folder over a non-empty one), so a
    reader in that instant, or a crash in it, finds no ``target`` while the old one is still
    whole under ``.<name>.old-*``.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old: Path | None = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{secrets.token_hex(4)}")
            os.rename(directory, old)
        os.rename(tmp, directory)
        fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the new one is in place: only litter
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder (deepest first)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(folder))
