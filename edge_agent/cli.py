"""``fedfstq agent``: settings assembly, ``--check-config``, and the daemon's main.

The flags are defined in :mod:`edge_agent.arguments` (light, so ``fedfstq --help`` stays fast).

The only place that reads the TOML file and the process environment (``FEDFSTQ_AGENT_*`` via
:class:`AgentSettings`, ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` for systemd). Logging is
configured by the caller (``fedfstq.cli``); the only global state touched here is the SIGTERM/SIGINT
handlers, for the duration of :func:`main`.

Precedence is the services' one rule (:mod:`common.settings`): ``FEDFSTQ_AGENT_*`` variables
beat the TOML file, a flag beats the file, and a flag *and* the variable for the same setting is
refused as ambiguous rather than one silently winning.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.errors import ConnectError, ConnectRefusedError
from common.exit_codes import ExitCode, for_connect_refusal
from common.log_context import LogContext, log_context
from common.settings import ConfigError, overrides
from common.signals import stop_signals
from edge_agent.arguments import add_arguments
from edge_agent.lifecycle import Notifier, watchdog_interval
from edge_agent.settings import AgentSettings
from workload.data import DataError, read_jsonl
from workload.models import SMOLLM2, TINY, ModelLoadError, smollm2_package_dir

__all__ = ["ConfigError", "add_arguments", "check_config", "load_settings", "main"]

log = logging.getLogger(__name__)

#: flag dest -> settings path (nested tables as tuples); the env variable follows from it.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "client_id": ("client_id",),
    "fleet": ("fleet",),
    "state_dir": ("state_dir",),
    "data": ("data_path",),
    "model": ("model",),
    "broker_host": ("mqtt", "host"),
    "broker_port": ("mqtt", "port"),
    "max_rounds": ("max_rounds",),
}


def load_settings(
    config: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str]
) -> AgentSettings:
    """Build the settings once (:meth:`common.settings.ServiceSettings.load`).

    ``flags`` maps flag dests (see ``_OVERRIDES``) to values; None means "not given".
    Raises :class:`ConfigError` with every problem in one message.
    """
    given = overrides(_OVERRIDES, flags)
    return AgentSettings.load(config, given, environ, what="agent configuration")


def _check_model(source: str) -> None:
    # Cheap on purpose: the named sources only need their package (loading converts on first
    # use, ~15 s); a directory needs a config.json.
    if source in (SMOLLM2, TINY):
        smollm2_package_dir()
    elif not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{source} is not a model directory (no config.json)")


def check_config(settings: AgentSettings, *, timeout: float = 10.0) -> ExitCode:
    """What ``--check-config`` verifies beyond parsing: data, model source, broker.

    The broker check connects as ``<client_id>-check`` with a clean, non-persistent session so
    it never takes over the daemon's session (on a broker with ``use_username_as_clientid`` it
    still would: run the check before the service, e.g. as ``ExecStartPre=``).
    """
    from broker.mqtt import MqttClient  # paho only when the check really runs

    try:
        examples = len(read_jsonl(settings.data_path))
    except DataError as exc:
        log.error("data check failed: %s", exc)
        return ExitCode.DATA
    try:
        _check_model(settings.model)
    except ModelLoadError as exc:
        log.error("model check failed: %s", exc)
        return ExitCode.MODEL
    probe = settings.mqtt.model_copy(
        update={
            "client_id": settings.client_id[:58] + "-check",
            "clean_start": True,
            "session_expiry_s": 0,
        }
    )
    client = MqttClient(probe)
    try:
        client.connect(timeout=timeout)  # not `with`: __enter__ would use its own timeout
    except ConnectRefusedError as exc:
        log.error("broker refused the connection: %s", exc)
        return for_connect_refusal(exc.reason_code)
    except ConnectError as exc:
        log.error("broker check failed: %s", exc)
        return ExitCode.BROKER_UNREACHABLE
    finally:
        client.close()
    print(
        f"configuration OK: client {settings.client_id}, fleet {settings.fleet}, "
        f"{examples} examples, broker {settings.mqtt.host}:{settings.mqtt.port}"
    )
    return ExitCode.OK


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run the agent (or the check) as configured by ``args``; returns an :class:`ExitCode`.

    ``environ`` (default ``os.environ``) supplies the systemd variables and the flag/variable
    conflict check; the ``FEDFSTQ_AGENT_*`` values themselves are read by AgentSettings.
    """
    env = os.environ if environ is None else environ
    try:
        settings = load_settings(
            args.config, {dest: getattr(args, dest, None) for dest in _OVERRIDES}, env
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    if args.check_config:
        return check_config(settings, timeout=args.check_timeout)
    notifier = Notifier(
        env.get("NOTIFY_SOCKET"),
        watchdog_s=watchdog_interval(
            env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"), os.getpid()
        ),
    )
    try:
        from edge_agent.agent import EdgeAgent  # heavy (torch, peft): only to run

        agent = EdgeAgent(settings, notifier=notifier)
    except OSError as exc:  # the state directory cannot be created (StateDirectory=, mounts)
        log.error("state directory %s: %s", settings.state_dir, exc)
        return ExitCode.CONFIG
    stop = threading.Event()
    with (
        stop_signals(stop),
        log_context(
            LogContext(lambda: {"client": settings.client_id, "round": agent.current_round})
        ),
    ):
        return agent.run(stop)
