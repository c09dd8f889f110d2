"""Context ids on every log line of a service process (both services use it): a logging filter
that stamps fields such as ``client``, ``fleet`` and ``round`` on records that do not carry them,
so `--log-json` lines can be filtered by device or round.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping

__all__ = ["LogContext", "log_context"]


class LogContext(logging.Filter):
    """Stamps the fields returned by ``fields()`` on records that lack them.

    Installed on the root handlers by the entry point, so every line that reaches them (the
    service's modules and libraries logging through the root logger) carries them; records
    passing their own ``extra={"round": ..., "client": ...}`` keep theirs. ``fields`` is called
    per record and must not raise; a field whose value is None is left unset.
    """

    def __init__(self, fields: Callable[[], Mapping[str, object]]) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self._fields().items():
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


@contextlib.contextmanager
def log_context(context: LogContext) -> Iterator[None]:
    """Add ``context`` to every handler of the root logger for the duration of the block."""
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(context)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(context)
