"""In-process fake broker and client implementing :class:`broker.transport.Transport`.

For unit tests and single-process simulations of the edge agent and the aggregator, without
Mosquitto. It keeps the semantics round logic relies on:

* QoS 1 delivery in publish order to every matching subscription (one copy per client),
  ``+``/``#`` filters, ``$share/<group>/`` stripped (every member receives: no load balancing);
* retained messages (an empty retained payload deletes), sent on subscribe;
* persistent sessions: a client with ``clean_start=False`` that closes keeps its subscriptions
  and queued messages until it connects again with the same client id;
* the will is published on :meth:`MemoryClient.abort` (immediately: there is no clock);
* the broker's ``max_packet_size`` check (:class:`~broker.errors.PacketTooLargeError`);
* an unbounded per-client queue: nothing is dropped.

Not modelled: ACLs, Message Expiry (the value is passed through), will delay, network faults.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from broker.errors import ClientClosedError, PublishError
from broker.framing import check_packet_size
from broker.settings import MqttSettings
from broker.topics import topic_matches
from broker.transport import ClientStats, Completion, Message, PublishHandle, Transport, Will

__all__ = ["MemoryBroker", "MemoryClient"]


@dataclass
class _Session:
    subs: dict[str, int] = field(default_factory=dict)
    inbox: queue.Queue[Message | None] = field(default_factory=queue.Queue)
    online: bool = False
    persistent: bool = False


class MemoryBroker:
    """Thread-safe in-memory broker shared by :class:`MemoryClient` instances."""

    def __init__(self, *, max_packet_size: int | None = 1 << 20) -> None:
        self.max_packet_size = max_packet_size
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}

    def _attach(self, client_id: str, clean_start: bool, persistent: bool) -> _Session:
        with self._lock:
            session = self._sessions.get(client_id)
            if session is None or clean_start:
                session = _Session()
                self._sessions[client_id] = session
            else:  # resume: drop the close marker the previous client left in the queue
                kept = []
                while not session.inbox.empty():
                    item = session.inbox.get_nowait()
                    if item is not None:
                        kept.append(item)
                for item in kept:
                    session.inbox.put(item)
            session.online, session.persistent = True, persistent
            return session

    def _detach(self, client_id: str, session: _Session) -> None:
        with self._lock:
            session.online = False
            if not session.persistent and self._sessions.get(client_id) is session:
                del self._sessions[client_id]

    def _subscribe(self, session: _Session, topic_filter: str, qos: int) -> None:
        with self._lock:
            session.subs[topic_filter] = qos
            for msg in self._retained.values():
                if topic_matches(topic_filter, msg.topic):
                    session.inbox.put(msg)

    def _route(self, msg: Message) -> None:
        with self._lock:
            if msg.retain:
                if msg.payload:
                    self._retained[msg.topic] = msg
                else:
                    self._retained.pop(msg.topic, None)
            live = Message(
                msg.topic, msg.payload, msg.qos, False, msg.user_properties, msg.expiry_s
            )
            for session in self._sessions.values():
                if any(topic_matches(f, msg.topic) for f in session.subs):
                    session.inbox.put(live)


class MemoryClient(Transport):
    """A :class:`~broker.transport.Transport` talking to a :class:`MemoryBroker`."""

    def __init__(
        self, broker: MemoryBroker, settings: MqttSettings, *, will: Will | None = None
    ) -> None:
        self.broker, self.settings, self.will = broker, settings, will
        self.stats = ClientStats()
        self._session: _Session | None = None
        self._closed = False

    @property
    def is_connected(self) -> bool:
        return self._session is not None and not self._closed

    @property
    def broker_max_packet_size(self) -> int | None:
        return self.broker.max_packet_size

    def connect(self, timeout: float | None = 10.0) -> None:
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._session is None:
            s = self.settings
            persistent = s.session_expiry_s > 0  # MQTT 5: the session outlives the connection
            self._session = self.broker._attach(s.client_id, s.clean_start, persistent)
            self.stats.connects += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._session is not None:
            self.broker._detach(self.settings.client_id, self._session)
            self._session.inbox.put(None)

    def abort(self) -> None:
        """Vanish without DISCONNECT: the broker publishes the will (no delay here)."""
        if not self._closed and self.will is not None and self._session is not None:
            w = self.will
            self.broker._route(Message(w.topic, w.payload, w.qos, w.retain, (), w.expiry_s))
        self.close()

    def send(self, message: Message) -> PublishHandle:
        if self._closed:
            raise ClientClosedError("client is closed")
        topic = message.topic
        if not topic or "+" in topic or "#" in topic:
            raise PublishError(f"invalid publish to {topic!r}", reason="invalid")
        size = message.wire_size
        check_packet_size(topic, size, self.broker.max_packet_size, self.settings.max_packet_size)
        self.broker._route(message)
        self.stats.published += 1
        self.stats.published_bytes += size
        done = Completion()
        done.resolve((0,), "Success")
        return PublishHandle(0, topic, size, done)

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0) -> None:
        if self._closed or self._session is None:
            raise ClientClosedError("client is not connected")
        self.broker._subscribe(self._session, topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        if self._session is not None:
            with self.broker._lock:
                self._session.subs.pop(topic_filter, None)

    def receive(self, timeout: float | None = None) -> Message | None:
        if self._session is None:
            return None
        try:
            msg = self._session.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is None:
            self._session.inbox.put(None)
            return None
        self.stats.received += 1
        self.stats.received_bytes += len(msg.payload)
        return msg
