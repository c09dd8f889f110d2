"""Paho-free helpers of :mod:`broker.mqtt` (kept apart so mqtt.py stays small)."""

from __future__ import annotations

import functools
import logging
import ssl
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from broker.errors import ConnectError, TransportError
from broker.settings import MqttSettings, TlsSettings
from broker.transport import Message

__all__ = ["RetainedRefresh", "clean_session", "guarded", "paho_logger", "tls_context"]

_log = logging.getLogger("broker.mqtt")
P = ParamSpec("P")
T = TypeVar("T")


def clean_session(settings: MqttSettings) -> bool:
    """The MQTT 3.1.1 CleanSession flag standing in for MQTT 5's clean start + session expiry.

    3.1.1 has no Session Expiry Interval: a persistent session (False) lasts until the broker's
    own expiry setting ends it, so ``session_expiry_s`` only decides *whether* to keep one.
    """
    return settings.clean_start or settings.session_expiry_s == 0


class RetainedRefresh:
    """The last retained message this client sent per topic, re-sent now and then.

    A broker whose retained store is per node (ejabberd 23.01) gives a retained message only to
    subscribers of the node it was published through, and a node that died takes its copies
    with it. Re-sending them every ``period_s`` and after each reconnect (:meth:`wake`) puts
    them on the node this client is connected to; subscribers elsewhere get them live.
    """

    def __init__(self, period_s: float, resend: Callable[[Message], None], name: str) -> None:
        self._period_s, self._resend = period_s, resend
        self._lock = threading.Lock()
        self._latest: dict[str, Message] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retained-{name}", daemon=True)

    def send(self, message: Message, publish: Callable[[], T]) -> T:
        """Record ``message`` and ``publish()`` it under one lock, so a refresh never re-sends an
        older copy after a newer one went out. An empty payload deletes: nothing to re-send."""
        with self._lock:
            result = publish()
            if message.payload:
                self._latest[message.topic] = message
            else:
                self._latest.pop(message.topic, None)
            return result

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._period_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                for message in self._latest.values():
                    try:
                        self._resend(message)
                    except TransportError as exc:  # e.g. closed meanwhile: the next turn retries
                        _log.debug("retained %s not re-sent: %s", message.topic, exc)


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
