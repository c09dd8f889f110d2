"""The transport seam (no paho here): the ``Transport`` protocol and its plain data.

``Transport`` is what round logic should depend on; :class:`broker.mqtt.MqttClient` (real
broker) and :class:`broker.memory.MemoryClient` (in-process fake) both implement it and pass
the same contract suite (``tests/broker/test_broker_transport_contract.py``).

Implementations subclass ``Transport`` and write :meth:`Transport.send` (one outgoing
:class:`Message`); ``publish``/``publish_wait``, ``messages`` and the context manager are
written once here. Wrappers that watch or shape traffic subclass :class:`DelegatingTransport`
and override ``send``/``receive``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, TypedDict, Unpack

from broker.errors import ClientClosedError, PublishRejectedError, PublishTimeoutError
from broker.framing import publish_size

__all__ = [
    "ClientStats",
    "Completion",
    "DelegatingTransport",
    "Message",
    "PublishHandle",
    "PublishOptions",
    "Transport",
    "Will",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH, received or to send (built by :meth:`Transport.publish`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: MQTT 5 user properties, in order (keys may repeat).
    user_properties: tuple[tuple[str, str], ...] = ()
    #: Remaining Message Expiry Interval in seconds, if the publisher set one.
    expiry_s: int | None = None

    @property
    def wire_size(self) -> int:
        """Bytes of the MQTT 5 PUBLISH packet carrying this message (as its publisher sent it)."""
        return publish_size(
            self.topic, self.payload, self.qos,
            expiry_s=self.expiry_s, user_properties=self.user_properties,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Will:
    """Last will, published by the broker ``delay_s`` after an unclean disconnect.

    MQTT 5 sends the will at the earlier of the Will Delay Interval and the end of the session,
    so ``delay_s`` should not exceed the session expiry. A reconnect within ``delay_s`` cancels
    it, which is what lets a link flap pass without an "offline" status.
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    delay_s: int = 30
    expiry_s: int | None = None


class Completion:
    """Completion of one MQTT packet id (PUBACK or SUBACK), set from the network thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.codes: tuple[int, ...] = ()
        self.text = ""
        self.closed = False

    def resolve(self, codes: tuple[int, ...], text: str, *, closed: bool = False) -> None:
        self.codes, self.text, self.closed = codes, text, closed
        self.event.set()


class PublishHandle:
    """Returned by :meth:`MqttClient.publish`; :meth:`wait` blocks for the PUBACK."""

    def __init__(self, mid: int, topic: str, size: int, waiter: Completion) -> None:
        self.mid, self.topic, self.size = mid, topic, size
        self._waiter = waiter

    def done(self) -> bool:
        return self._waiter.event.is_set()

    @property
    def reason_code(self) -> int | None:
        """PUBACK reason code (0x00 success, 0x10 no subscribers, >= 0x80 failure)."""
        return self._waiter.codes[0] if self._waiter.codes else None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the PUBACK; raise PublishTimeoutError / PublishRejectedError / closed."""
        if not self._waiter.event.wait(timeout):
            raise PublishTimeoutError(
                f"no PUBACK for {self.topic!r} (mid {self.mid}) in {timeout}s"
            )
        if self._waiter.closed:
            raise ClientClosedError(f"client closed before PUBACK for {self.topic!r}")
        code = self.reason_code
        if code is not None and code >= 0x80:
            raise PublishRejectedError(
                f"broker rejected publish to {self.topic!r}: {self._waiter.text} (0x{code:02x})",
                reason_code=code,
            )


@dataclass(slots=True)
class ClientStats:
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    #: MQTT PUBLISH packet bytes of first transmissions (paho's resends are not visible).
    published_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    last_disconnect: str = ""


class PublishOptions(TypedDict, total=False):
    """The keyword options of :meth:`Transport.publish`, for wrappers that pass them on."""

    qos: int
    retain: bool
    expiry_s: int | None
    user_properties: Sequence[tuple[str, str]]


class Transport(Protocol):
    """A connected MQTT-like client: QoS 1 publish/subscribe, retained messages, a queue."""

    @property
    def is_connected(self) -> bool: ...

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float | None = 10.0) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the will fires)."""
        ...

    def send(self, message: Message) -> PublishHandle:
        """Queue one PUBLISH (what every implementation writes; callers use :meth:`publish`)."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> PublishHandle:
        """Queue a PUBLISH (``expiry_s``: MQTT 5 Message Expiry Interval)."""
        msg = Message(topic, bytes(payload), qos, retain, tuple(user_properties), expiry_s)
        return self.send(msg)

    def publish_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        timeout: float = 30.0,
        **options: Unpack[PublishOptions],
    ) -> PublishHandle:
        """Publish and wait for the PUBACK (typed error on failure code or timeout)."""
        handle = self.publish(topic, payload, **options)
        handle.wait(timeout)
        return handle

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0
    ) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def receive(self, timeout: float | None = None) -> Message | None: ...

    def messages(self, idle_timeout: float | None = None) -> Iterator[Message]:
        """Received messages until ``idle_timeout`` s pass without one, or close."""
        while (msg := self.receive(idle_timeout)) is not None:
            yield msg


class DelegatingTransport(Transport):
    """A ``Transport`` forwarding everything to another; subclasses intercept what they watch.

    Used to observe or shape what a service sends and receives without touching the service
    (the evaluation's per-device byte counts and dropouts, the tests' fault injection).
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    def connect(self, timeout: float | None = 10.0) -> None:
        self.inner.connect(timeout)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def send(self, message: Message) -> PublishHandle:
        return self.inner.send(message)

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0) -> None:
        self.inner.subscribe(topic_filter, qos, timeout=timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        self.inner.unsubscribe(topic_filter)

    def receive(self, timeout: float | None = None) -> Message | None:
        return self.inner.receive(timeout)
