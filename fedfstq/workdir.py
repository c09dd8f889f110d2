"""A work directory a command may wipe: only one it made itself, recognised by a marker file.

``fedfstq demo --workdir DIR`` starts from an empty DIR. It deletes DIR only if DIR is missing,
empty, or holds the marker an earlier run wrote; anything else is the user's and is refused
unless they pass ``--overwrite``. Even then the root, the home directory and any directory that
holds the current one are never deleted. ``fedfstq bench fleet`` claims its DIR the same way but
keeps what an earlier run left (``fresh=False``): it replaces only its own per-method folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.exit_codes import ExitCode
from fedfstq.errors import CliError

__all__ = ["MARKER", "claim_workdir"]

#: Written into every work directory the demo creates.
MARKER = ".fedfstq-demo"


def claim_workdir(
    path: Path, *, overwrite: bool = False, command: str = "fedfstq demo", fresh: bool = True
) -> Path:
    """Make ``path`` a directory holding the marker (emptied first if ``fresh``); returns it.

    Raises :class:`CliError` (exit code CONFIG) and leaves ``path`` untouched when it is a
    file, or a non-empty directory without the marker and ``overwrite`` is false.
    """
    workdir = path.expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise CliError(f"--workdir {path} is not a directory", ExitCode.CONFIG)
    if workdir.is_dir() and any(workdir.iterdir()):
        ours = (workdir / MARKER).is_file()
        if not ours and not overwrite:
            raise CliError(
                f"--workdir {path} is not empty and was not made by {command}; pick another "
                "folder, or pass --overwrite to delete its contents",
                ExitCode.CONFIG,
            )
        cwd = Path.cwd().resolve()
        if workdir == Path.home().resolve() or cwd == workdir or workdir in cwd.parents:
            raise CliError(
                f"--workdir {path} holds the current or the home directory; it is never deleted",
                ExitCode.CONFIG,
            )
        if fresh:
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(
        f"Made by `{command}`: a later run with this --workdir deletes and recreates it.\n"
    )
    return workdir
