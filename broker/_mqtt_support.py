"""Paho-free helpers of :mod:`broker.mqtt` (kept apart so mqtt.py stays small)."""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Callable
from typing import ParamSpec

from broker.errors import ConnectError
from broker.settings import TlsSettings

__all__ = ["guarded", "paho_logger", "tls_context"]

_log = logging.getLogger("broker.mqtt")
P = ParamSpec("P")


def guarded(callback: Callable[P, None]) -> Callable[P, None]:
    """A bug in a callback is logged; it must not kill paho's network thread."""

    @functools.wraps(callback)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            _log.exception("error in MQTT callback %s", callback.__name__)

    return wrapper


class _DemoteReconnectNoise(logging.Filter):
    """paho logs every reconnect attempt without a socket (and our own abort) at ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Client is not connected") or msg.endswith("client closing"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # The logger checked the level before this filter ran: check it again.
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def paho_logger() -> logging.Logger:
    """The logger handed to paho (``broker.mqtt.paho``), with reconnect noise demoted."""
    logger = logging.getLogger("broker.mqtt.paho")
    if not any(isinstance(f, _DemoteReconnectNoise) for f in logger.filters):
        logger.addFilter(_DemoteReconnectNoise())
    return logger


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho 2.2 leaks the socket when the TLS handshake fails; close it ourselves."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Client TLS context: verify the chain (our CA or the system's), the host unless insecure."""
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None and tls.key_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ValueError) as exc:  # missing file, bad PEM (ssl.SSLError is an OSError)
        raise ConnectError(f"TLS setup failed: {exc}", reason="tls") from None
    ctx.check_hostname = not tls.insecure
    ctx.sslsocket_class = _ClosingSSLSocket
    return ctx
