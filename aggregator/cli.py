"""`fedfstq aggregator`: run the service, or `--check` the health of a running one.

The console entry point (`fedfstq.cli`) builds the parser with :func:`add_arguments` (defined
in the light :mod:`aggregator.arguments`, so `fedfstq --help` stays fast), sets up logging and
calls :func:`main`. Configuration precedence: command-line flags, then
`FEDFSTQ_AGG_*` environment variables, then the TOML file.

Exit codes: 0 ok (stopped by SIGTERM/SIGINT, or `max_rounds` done; `--check`: healthy),
1 unexpected error (`--check`: unhealthy), 2 configuration error, 3 model or data error,
4 broker unreachable at start.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from aggregator.arguments import add_arguments
from aggregator.global_adapter import LoraMismatchError
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.errors import TransportError
from broker.log_context import LogContext, log_context
from broker.settings import ConfigError, MqttSettings, read_toml
from workload.adapters import AdapterFormatError
from workload.data import DataError
from workload.models import ModelLoadError

__all__ = [
    "EXIT_BROKER",
    "EXIT_CONFIG",
    "EXIT_MODEL",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "add_arguments",
    "check_health",
    "load_settings",
    "main",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_BROKER = 4


def load_settings(args: argparse.Namespace) -> AggregatorSettings:
    """TOML tables as keyword arguments (the environment beats them), then the flags on top."""
    tables: dict[str, Any] = read_toml(args.config)
    mqtt_flags = {
        k: v for k, v in (("host", args.broker_host), ("port", args.broker_port)) if v is not None
    }
    if args.state_dir is not None:
        tables["state_dir"] = args.state_dir  # may be the only source of a required field
    try:
        settings = AggregatorSettings(**tables)
        # Flags beat the environment too: validate the overridden part on its own and copy it
        # in (re-validating the whole settings object would read the environment again).
        update: dict[str, Any] = {}
        if args.state_dir is not None:
            update["state_dir"] = args.state_dir
        if mqtt_flags:
            update["mqtt"] = MqttSettings.model_validate(settings.mqtt.model_dump() | mqtt_flags)
        settings = settings.model_copy(update=update)
    except ValidationError as exc:
        raise ConfigError.from_validation("aggregator settings", exc) from None
    return settings


def check_health(settings: AggregatorSettings) -> tuple[bool, str]:
    """(healthy, message): the store opens read-only and the heartbeat file is fresh."""
    db = settings.db_path
    if not db.is_file():
        return False, f"unhealthy: no store at {db}"
    try:
        uri = f"{db.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            con.execute("SELECT COUNT(*) FROM rounds").fetchone()
    except sqlite3.Error as exc:
        return False, f"unhealthy: store {db} does not open: {exc}"
    try:
        stamp = float(settings.health_path.read_text().strip())
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: no readable heartbeat at {settings.health_path}: {exc}"
    age, limit = time.time() - stamp, 3 * settings.health_interval_s
    if age > limit:
        return False, f"unhealthy: heartbeat is {age:.0f}s old (limit {limit:.0f}s)"
    return True, f"healthy: store opens, heartbeat {age:.1f}s old"


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"fedfstq aggregator: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        healthy, message = check_health(settings)
        print(message, file=sys.stdout if healthy else sys.stderr)
        return EXIT_OK if healthy else EXIT_UNEXPECTED
    return serve(settings)


def serve(settings: AggregatorSettings, stop: threading.Event | None = None) -> int:
    """Run the service until a signal (or ``stop``) or ``max_rounds``; return the exit code."""
    stop = stop or threading.Event()
    service = Aggregator(settings)

    def context() -> dict[str, object]:
        try:
            return {"fleet": settings.fleet, "round": service.open_round}
        except AssertionError:  # not started yet: no round state
            return {"fleet": settings.fleet}

    with _stop_on_signals(stop), log_context(LogContext(context)):
        try:
            service.start()
        except (LoraMismatchError, OSError, sqlite3.Error) as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG
        except (ModelLoadError, DataError, AdapterFormatError) as exc:
            log.error("cannot load the model or data: %s", exc)
            return EXIT_MODEL
        except TransportError as exc:
            log.error("broker %s:%d unreachable: %s", settings.mqtt.host, settings.mqtt.port, exc)
            return EXIT_BROKER
        except Exception:
            log.exception("unexpected error at start")
            return EXIT_UNEXPECTED
        try:
            service.run(stop)
        except Exception:
            log.exception("aggregator failed")
            return EXIT_UNEXPECTED
    return EXIT_OK
