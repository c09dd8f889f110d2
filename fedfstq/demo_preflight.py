"""What ``fedfstq demo`` checks before it deletes, loads or starts anything.

Each check raises :class:`fedfstq.errors.CliError` (or the broker's typed error) with one line
that names the option, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import logging
import socket

from common.exit_codes import ExitCode
from fedfstq.errors import CliError

__all__ = ["check_languages", "remote_broker"]


def check_languages(text: str) -> list[str]:
    """The ``--languages`` list; every name must be a language of the installed corpus."""
    from workload.data import chatterbot_dir

    wanted = [name.strip() for name in text.split(",") if name.strip()]
    if not wanted:
        raise CliError("--languages is empty", ExitCode.CONFIG)
    known = sorted(p.name for p in chatterbot_dir().iterdir() if p.is_dir())
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise CliError(
            f"--languages: unknown {', '.join(unknown)}; the corpus has {', '.join(known)}",
            ExitCode.DATA,
        )
    return wanted


def remote_broker(url: str, protocol: str, timeout: float = 10.0) -> tuple[str, int]:
    """Host and port of ``--broker mqtt://host:port``, once a client has connected to it.

    The demo's services connect without TLS or a password, so the check connects the same way
    (as a read-only observer, :mod:`fedfstq.observer`) and disconnects. A closed port fails at
    once instead of after ``timeout`` seconds of MQTT reconnects.
    """
    from fedfstq.observer import connect, target

    where = target(broker=url, config=None, fleet="demo", protocol=protocol)
    host, port = where.mqtt.host, where.mqtt.port
    if where.mqtt.tls is not None:
        raise CliError(
            f"--broker {url}: the demo's services connect without TLS; use mqtt://host:port",
            ExitCode.CONFIG,
        )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise CliError(
            f"--broker {url}: {host}:{port} unreachable: {exc.strerror or exc}",
            ExitCode.BROKER_UNREACHABLE,
        ) from None
    mqtt_log = logging.getLogger("broker.mqtt")
    level = mqtt_log.level
    mqtt_log.setLevel(logging.CRITICAL)  # a failure is one error line; the retries would repeat it
    try:
        connect(where, timeout).close()
    finally:
        mqtt_log.setLevel(level)
    return host, port
