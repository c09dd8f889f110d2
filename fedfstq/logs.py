"""JSON log lines for services: one object per line with the context ids a record carries."""

from __future__ import annotations

import json
import logging
import time

__all__ = ["CONTEXT_FIELDS", "JsonFormatter"]

# Attributes passed with `extra=` that are copied into every JSON line when present.
CONTEXT_FIELDS = ("round", "client", "upload", "fleet", "phase", "reason")


class JsonFormatter(logging.Formatter):
    """Format records as compact JSON: time, level, logger, message and context fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)
