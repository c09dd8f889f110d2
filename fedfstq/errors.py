"""What a failed ``fedfstq`` command prints and the exit code it returns.

The commands raise typed errors; :func:`fedfstq.cli.main` turns each into one line on stderr
(``fedfstq <command>: error: ...``) and an exit code from the one table of every ``fedfstq``
command (:class:`common.exit_codes.ExitCode`, the services' too), so a script or a systemd unit
reads them all the same way. This module imports nothing heavy: ``fedfstq --help`` loads it.
"""

from __future__ import annotations

import sys
import textwrap
import traceback
from typing import TextIO

from common.exit_codes import ExitCode, for_connect_refusal

__all__ = [
    "INTERRUPTED",
    "MEANING",
    "CliError",
    "exit_code_for",
    "exit_codes_text",
    "one_line",
    "report",
]

#: What each code means for ``demo``, ``bench``, ``enrol`` and ``status``.
MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.UNEXPECTED: "unexpected error (a bug); run with -v for the traceback",
    ExitCode.CONFIG: (
        "bad usage or configuration: an option value, a config file, a path that cannot be used "
        "(e.g. a --workdir the demo did not create), broker credentials"
    ),
    ExitCode.DATA: (
        "data missing or unusable: a data file, an unknown language, the Q/A corpus not installed"
    ),
    ExitCode.MODEL: "the model or its tokenizer could not be loaded",
    ExitCode.BROKER_UNREACHABLE: (
        "the MQTT broker could not be reached, or the demo's private one did not start"
    ),
}
#: Ctrl-C, as shells report a SIGINT.
INTERRUPTED = 130


class CliError(Exception):
    """A command refuses its input; the message is one line and says what to do."""

    def __init__(self, message: str, code: ExitCode = ExitCode.CONFIG) -> None:
        super().__init__(message)
        self.code = code


#: (module, class, exit code) of the typed errors the commands let through. Looked up in
#: ``sys.modules`` only: an error whose module was never imported cannot have been raised, and
#: importing those modules here would load pydantic, numpy or torch for ``fedfstq --help``.
#: The first match wins, so subclasses come before their bases.
_TYPED: tuple[tuple[str, str, ExitCode], ...] = (
    ("common.settings", "ConfigError", ExitCode.CONFIG),
    ("fstq.errors", "ConfigError", ExitCode.CONFIG),
    ("workload.data", "DataError", ExitCode.DATA),
    ("workload.models", "ModelLoadError", ExitCode.MODEL),
    ("workload.adapters", "AdapterFormatError", ExitCode.MODEL),
    ("broker.errors", "TransportError", ExitCode.BROKER_UNREACHABLE),
    ("broker.local", "BrokerError", ExitCode.BROKER_UNREACHABLE),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of an error that ended a command (UNEXPECTED for an untyped one)."""
    if isinstance(exc, CliError):
        return exc.code
    code = getattr(exc, "code", None)  # fedfstq.observer.ObserverError carries its own
    if isinstance(code, ExitCode):
        return code
    refused = _loaded("broker.errors", "ConnectRefusedError")
    if refused is not None and isinstance(exc, refused):
        return for_connect_refusal(getattr(exc, "reason_code", None))
    for module, name, typed_code in _TYPED:
        cls = _loaded(module, name)
        if cls is not None and isinstance(exc, cls):
            return typed_code
    if isinstance(exc, OSError):  # a path that cannot be read or written
        return ExitCode.CONFIG
    return ExitCode.UNEXPECTED


def _loaded(module: str, name: str) -> type[BaseException] | None:
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def one_line(text: str) -> str:
    """``text`` on one line (pydantic and a few others write several)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def report(exc: BaseException, prog: str, *, verbose: bool, stream: TextIO | None = None) -> int:
    """Print ``exc`` as one line (after its traceback when ``verbose``); return its exit code."""
    out = stream if stream is not None else sys.stderr
    code = exit_code_for(exc)
    message = one_line(str(exc)) or type(exc).__name__
    if code is ExitCode.UNEXPECTED:
        message = f"unexpected {type(exc).__name__}: {message}"
        if not verbose:
            message += " (run with -v for the traceback)"
    if verbose:
        traceback.print_exception(exc, file=out)
    print(f"{prog}: error: {message}", file=out)
    return int(code)


def exit_codes_text(width: int = 78) -> str:
    """The exit-code table of ``fedfstq --help``, rows wrapped at ``width``."""
    rows = [(int(code), MEANING[code]) for code in ExitCode]
    rows.append((INTERRUPTED, "interrupted (Ctrl-C)"))
    return "\n".join(
        textwrap.fill(text, width, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
        for code, text in rows
    )
