"""`fedfstq aggregator`: run the service, or `--check` the health of a running one.

The console entry point (`fedfstq.cli`) builds the parser with :func:`add_arguments` (defined
in the light :mod:`aggregator.arguments`, so `fedfstq --help` stays fast), sets up logging and
calls :func:`main`. Configuration precedence is the services' one rule (:mod:`common.settings`):
`FEDFSTQ_AGG_*` variables beat the TOML file, a flag beats the file, and a flag *and* the
variable for the same setting are refused.

Exit codes are every `fedfstq` command's (:class:`common.exit_codes.ExitCode`): 0 ok (stopped by
SIGTERM/SIGINT, or `max_rounds` done), 1 unexpected error, 2 configuration, 3 data (the
evaluation file), 4 model (base model, tokenizer or a stored adapter), 5 broker unreachable at
start. `--check`: 0 healthy, 1 unhealthy, 2 configuration error.

The service (torch, peft, paho) loads only in :func:`serve`: a configuration error and the
container's `--check` probe answer without it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping

from aggregator.arguments import add_arguments
from aggregator.settings import AggregatorSettings
from common.exit_codes import ExitCode, for_connect_refusal
from common.log_context import LogContext, log_context
from common.settings import ConfigError, overrides
from common.signals import stop_signals

__all__ = ["add_arguments", "check_health", "load_settings", "main", "serve"]

log = logging.getLogger(__name__)

#: flag dest -> settings path; the environment variable follows from it.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "state_dir": ("state_dir",),
    "broker_host": ("mqtt", "host"),
    "broker_port": ("mqtt", "port"),
}


def load_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AggregatorSettings:
    """Build the settings once (:meth:`common.settings.ServiceSettings.load`); ``environ``
    (default ``os.environ``) is what the flags are checked against."""
    given = overrides(_OVERRIDES, {dest: getattr(args, dest, None) for dest in _OVERRIDES})
    env = os.environ if environ is None else environ
    return AggregatorSettings.load(args.config, given, env, what="aggregator settings")


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


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    try:
        settings = load_settings(args, environ)
    except ConfigError as exc:
        print(f"fedfstq aggregator: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.check:
        healthy, message = check_health(settings)
        print(message, file=sys.stdout if healthy else sys.stderr)
        return ExitCode.OK if healthy else ExitCode.UNEXPECTED
    return serve(settings)


def serve(settings: AggregatorSettings, stop: threading.Event | None = None) -> int:
    """Run the service until a signal (or ``stop``) or ``max_rounds``; return the exit code."""
    from aggregator.global_adapter import LoraMismatchError
    from aggregator.service import Aggregator
    from broker.errors import ConnectRefusedError, SubscribeError, TransportError
    from workload.adapters import AdapterFormatError
    from workload.data import DataError
    from workload.models import ModelLoadError

    stop = stop or threading.Event()
    service = Aggregator(settings)

    def context() -> dict[str, object]:
        try:
            return {"fleet": settings.fleet, "round": service.open_round}
        except AssertionError:  # not started yet: no round state
            return {"fleet": settings.fleet}

    with stop_signals(stop), log_context(LogContext(context)):
        try:
            service.start()
        except (LoraMismatchError, OSError, sqlite3.Error) as exc:
            log.error("cannot start: %s", exc)
            return ExitCode.CONFIG
        except DataError as exc:
            log.error("cannot read the evaluation data: %s", exc)
            return ExitCode.DATA
        except (ModelLoadError, AdapterFormatError) as exc:
            log.error("cannot load the model or a stored adapter: %s", exc)
            return ExitCode.MODEL
        except ConnectRefusedError as exc:
            log.error("broker %s:%d refused the connection: %s", *_broker(settings), exc)
            return for_connect_refusal(exc.reason_code)
        except SubscribeError as exc:
            log.error("broker %s:%d refused a subscription: %s", *_broker(settings), exc)
            # A refusal with a reason code is the ACL (configuration); none: the link dropped.
            return ExitCode.CONFIG if exc.reason_code is not None else ExitCode.BROKER_UNREACHABLE
        except TransportError as exc:
            log.error("broker %s:%d unreachable: %s", *_broker(settings), exc)
            return ExitCode.BROKER_UNREACHABLE
        except Exception:
            log.exception("unexpected error at start")
            return ExitCode.UNEXPECTED
        try:
            service.run(stop)
        except Exception:
            log.exception("aggregator failed")
            return ExitCode.UNEXPECTED
    return ExitCode.OK


def _broker(settings: AggregatorSettings) -> tuple[str, int]:
    return settings.mqtt.host, settings.mqtt.port
