"""fedfstq.logs.JsonFormatter: one JSON object per line with the context ids of the record."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

from fedfstq.logs import CONTEXT_FIELDS, JsonFormatter


def _logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("test.jsonlogs")
    logger.handlers.clear()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_each_line_is_json_with_round_and_client_ids() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    ids = {"round": 3, "client": "dev-1", "reason": "origin", "upload": "u\n1"}
    log.warning("rejected %s from %s", "origin", "dev-1", extra=ids)
    log.info("no context here")
    log.info("path %s", Path("/x"), extra={"round": None, "client": Path("/y")})
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "rejected origin from dev-1" and first["level"] == "WARNING"
    assert first["round"] == 3 and first["client"] == "dev-1" and first["reason"] == "origin"
    assert first["upload"] == "u\n1" and first["logger"] == "test.jsonlogs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first["time"])
    assert isinstance(first["ts"], float)
    assert not set(CONTEXT_FIELDS) & set(second)  # absent ids are left out, not null
    assert "round" not in third and third["client"] == "/y"  # non-JSON values as strings


def test_exceptions_stay_on_one_line() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"round": 1})
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["round"] == 1 and "ValueError: boom" in record["exc"]
    assert sys.exc_info() == (None, None, None)


def test_agent_log_context_stamps_client_and_round_on_every_line() -> None:
    from common.log_context import LogContext, log_context

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    current: list[int | None] = [None]
    try:
        with log_context(LogContext(lambda: {"client": "dev-07", "round": current[0]})):
            logging.getLogger("thirdparty.lib").warning("third-party line")
            current[0] = 4
            logging.getLogger("edge_agent.x").warning("own line", extra={"round": 3})
        logging.getLogger("edge_agent.x").warning("after the block")
    finally:
        root.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["client"] == "dev-07" and "round" not in first
    assert second["client"] == "dev-07" and second["round"] == 3  # explicit ids win
    assert "client" not in third and not handler.filters
