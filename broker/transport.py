"""The transport seam (no paho here): the ``Transport`` protocol and its plain data.

``Transport`` is what round logic should depend on; :class:`broker.mqtt.MqttClient` (real
broker) and :class:`broker.memory.MemoryClient` (in-process fake) both implement it and pass
the same contract suite (``tests/broker/test_broker_transport_contract.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from broker.errors import ClientClosedError, PublishRejectedError, PublishTimeoutError

__all__ = [
    "ClientStats",
    "Completion",
    "DelegatingTransport",
    "Message",
    "PublishHandle",
    "PublishWaitMixin",
    "Transport",
    "Will",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One received PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: MQTT 5 user properties, in order (keys may repeat).
    user_properties: tuple[tuple[str, str], ...] = ()
    #: Remaining Message Expiry Interval in seconds, if the publisher set one.
    expiry_s: int | None = None


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


class PublishWaitMixin:
    """``publish_wait`` in terms of ``publish``: one implementation for every Transport."""

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
        raise NotImplementedError

    def publish_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        timeout: float = 30.0,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> PublishHandle:
        """Publish and wait for the PUBACK (typed error on failure code or timeout)."""
        handle = self.publish(
            topic, payload, qos=qos, retain=retain, expiry_s=expiry_s,
            user_properties=user_properties,
        )  # fmt: skip
        handle.wait(timeout)
        return handle


class Transport(Protocol):
    """A connected MQTT-like client: QoS 1 publish/subscribe, retained messages, a queue."""

    @property
    def is_connected(self) -> bool: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def connect(self, timeout: float | None = 10.0) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the will fires)."""
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
    ) -> PublishHandle: ...

    def publish_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        timeout: float = 30.0,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> PublishHandle: ...

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0
    ) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def receive(self, timeout: float | None = None) -> Message | None: ...

    def messages(self, idle_timeout: float | None = None) -> Iterator[Message]: ...


class DelegatingTransport(PublishWaitMixin):
    """A ``Transport`` forwarding everything to another; subclasses intercept what they watch.

    Used to observe or shape what a service sends and receives without touching the service
    (the evaluation's per-device byte counts and dropouts, the tests' fault injection).
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float | None = 10.0) -> None:
        self.inner.connect(timeout)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

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
        return self.inner.publish(
            topic, payload, qos=qos, retain=retain, expiry_s=expiry_s,
            user_properties=user_properties,
        )  # fmt: skip

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0) -> None:
        self.inner.subscribe(topic_filter, qos, timeout=timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        self.inner.unsubscribe(topic_filter)

    def receive(self, timeout: float | None = None) -> Message | None:
        return self.inner.receive(timeout)

    def messages(self, idle_timeout: float | None = None) -> Iterator[Message]:
        while (msg := self.receive(idle_timeout)) is not None:
            yield msg
