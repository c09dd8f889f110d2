"""The project's only paho-mqtt importer: a small synchronous MQTT 5 (or 3.1.1) client.

paho runs its network loop in its own thread (``loop_start``); this wrapper adds:

* a stable client id, ``clean_start`` (default False) and a Session Expiry Interval, so QoS 1
  messages queued by the broker survive reconnects and restarts;
* reconnects with capped exponential backoff and full jitter (:mod:`broker.backoff`): paho's
  own delay is set to zero and the jittered delay is slept in ``on_pre_connect``;
* resubscription on every (re)connect (retained messages are re-sent unless the broker kept
  the session);
* per-publish Message Expiry, retain and user properties; a will with a Will Delay Interval;
* a client-side check of the broker's Maximum Packet Size (Mosquitto *disconnects* a client
  that sends a larger packet, and paho would resend it forever after each reconnect);
* typed errors (:mod:`broker.errors`) instead of paho return codes, reason codes and OSErrors;
* an unbounded incoming queue: received messages are never dropped;
* failover between the nodes of a broker cluster (``MqttSettings.failover``) and, for brokers
  whose retained store is per node, re-publishing this client's retained messages;
* an MQTT 3.1.1 profile (``MqttSettings.protocol``) for brokers without MQTT 5: the same calls,
  what replaces each MQTT 5 feature is in broker/README.md ("MQTT 3.1.1 profile").
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker._mqtt_support import (
    RetainedRefresh,
    clean_session,
    guarded,
    paho_logger,
    tls_context,
)
from broker.backoff import full_jitter
from broker.errors import (
    ClientClosedError,
    ConnectError,
    ConnectRefusedError,
    PublishError,
    SubscribeError,
)
from broker.framing import check_packet_size, packet_size
from broker.settings import MqttSettings
from broker.transport import ClientStats, Completion, Message, PublishHandle, Transport, Will

__all__ = ["ClientStats", "Message", "MqttClient", "MqttSettings", "PublishHandle", "Will"]

_log = logging.getLogger(__name__)


#: A connection that lasted this long resets the reconnect backoff.
_STABLE_AFTER_S = 10.0


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class MqttClient(Transport):
    """Synchronous MQTT 5 client; use as a context manager or call connect()/close()."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: Will | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._v5 = settings.protocol == "5"
        self._endpoints = settings.endpoints
        #: Index in ``_endpoints`` of the node this client connects (or last connected) to.
        self._node = 0
        self._reached = False
        self._retained = (
            RetainedRefresh(
                settings.republish_retained_s, self._resend_retained, settings.client_id
            )
            if settings.republish_retained_s > 0
            else None
        )
        self.stats = ClientStats()
        self._rng = rng or random.Random()
        self._delays: Iterator[float] | None = None
        self._attempts = 0
        self._ever_connected = False
        self._connected_at = 0.0
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._first_outcome = threading.Event()
        self._refused: ConnectRefusedError | None = None
        self._started = False
        self._lock = threading.Lock()
        self._pending: dict[int, Completion] = {}
        self._early: dict[int, tuple[tuple[int, ...], str]] = {}
        self._subs: dict[str, int] = {}
        self._incoming: queue.Queue[Message | None] = queue.Queue()
        self._broker_max_packet: int | None = None
        self._paho = self._make_paho(will)

    # -- setup -------------------------------------------------------------------------------

    def _make_paho(self, will: Will | None) -> paho.Client:
        s = self.settings
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else clean_session(s),
            reconnect_on_failure=True,
        )
        c.enable_logger(paho_logger())
        # paho's suppress_exceptions would also swallow _on_pre_connect's deliberate abort (and
        # reconnect anyway); the other callbacks are @guarded instead.
        c.suppress_exceptions = False
        c.connect_timeout = s.connect_timeout_s
        c.max_inflight_messages_set(s.max_inflight)
        c.max_queued_messages_set(0)  # paho's local outgoing queue: unbounded, never drops
        c.reconnect_delay_set(0, 0)  # the real (jittered) delay is slept in _on_pre_connect
        if s.username is not None:
            pw = s.password.get_secret_value() if s.password is not None else None
            c.username_pw_set(s.username, pw)
        if s.tls is not None:
            c.tls_set_context(tls_context(s.tls))
        if will is not None:
            wp: Properties | None = None
            if self._v5:  # 3.1.1: the will goes out at once and never expires
                wp = _properties(PacketTypes.WILLMESSAGE)
                wp.WillDelayInterval = will.delay_s
                if will.expiry_s is not None:
                    wp.MessageExpiryInterval = will.expiry_s
            c.will_set(will.topic, will.payload, will.qos, will.retain, wp)
        c.on_pre_connect = self._on_pre_connect
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self, timeout: float | None = 10.0) -> None:
        """Start the network thread and wait up to ``timeout`` s for the first CONNACK.

        ``timeout=None`` returns at once (the client keeps trying in the background). On a
        refused CONNACK or a timeout the client is closed and ConnectRefusedError /
        ConnectError is raised.
        """
        if self._closing.is_set():
            raise ClientClosedError("client is closed")
        if self._started:
            return
        self._started = True
        s = self.settings
        if self._v5:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
            self._paho.connect_async(
                s.host, s.port, s.keepalive_s, clean_start=s.clean_start, properties=props
            )
        else:  # clean_session was set on the paho client; the broker's config expires sessions
            self._paho.connect_async(s.host, s.port, s.keepalive_s)
        self._paho.loop_start()
        if self._retained is not None:
            self._retained.start()
        if timeout is None:
            return
        if not self._first_outcome.wait(timeout):
            self.close()
            where = ", ".join(f"{h}:{p}" for h, p in self._endpoints)
            raise ConnectError(
                f"no CONNACK from {where} within {timeout}s "
                f"({self._attempts} attempts; broker down, wrong port or TLS mismatch?)"
            )
        if self._refused is not None:
            self.close()
            raise self._refused

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def broker_max_packet_size(self) -> int | None:
        """Maximum Packet Size from the last CONNACK (None if the broker set none)."""
        return self._broker_max_packet

    @property
    def endpoint(self) -> tuple[str, int]:
        """``(host, port)`` of the node this client is connected (or connecting) to."""
        return self._endpoints[self._node]

    def close(self) -> None:
        """Disconnect cleanly (no will), stop the network thread, fail pending waits."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._started:
            self._paho.disconnect()
            self._paho.loop_stop()
        self._shutdown()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash would (the will fires)."""
        if self._closing.is_set():
            return
        self._closing.set()
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._started:
            self._paho.loop_stop()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._retained is not None:
            self._retained.stop()
        if self._started:
            # Close paho's loop_start() wake-up socket pair now: left to the garbage collector
            # (MqttClient <-> paho form a cycle) it may be finalized after the sockets.
            self._paho.reinitialise()
        self._connected.clear()
        with self._lock:
            waiters, self._pending = list(self._pending.values()), {}
        for w in waiters:
            w.resolve((), "closed", closed=True)
        self._incoming.put(None)

    # -- publish / subscribe -----------------------------------------------------------------

    def send(self, message: Message) -> PublishHandle:
        """Queue a PUBLISH; messages published while disconnected go out after reconnecting."""
        if self._closing.is_set():
            raise ClientClosedError("client is closed")
        topic, payload, qos = message.topic, message.payload, message.qos
        props = self._publish_properties(message)
        # An MQTT 5 PUBLISH has a property section (1 byte when empty); a 3.1.1 one has none.
        packed = len(props.pack()) if props is not None else int(self._v5)  # type: ignore[no-untyped-call]
        size = packet_size(topic, payload, qos, packed)
        check_packet_size(topic, size, self._broker_max_packet, self.settings.max_packet_size)
        if message.retain and self._retained is not None:
            info = self._retained.send(message, lambda: self._paho_publish(message, props))
        else:
            info = self._paho_publish(message, props)
        waiter = self._register(info.mid)
        if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            waiter.resolve((0x80,), paho.error_string(info.rc))
        self.stats.published += 1
        self.stats.published_bytes += size
        return PublishHandle(info.mid, topic, size, waiter)

    def _publish_properties(self, message: Message) -> Properties | None:
        """MQTT 5 properties of a PUBLISH; 3.1.1 sends none (user properties are refused:
        dropping them silently would change what the receiver sees)."""
        if not self._v5:
            if message.user_properties:
                raise PublishError(
                    f"user properties on {message.topic!r} need MQTT 5 (protocol is 3.1.1)",
                    reason="unsupported",
                )
            return None
        if message.expiry_s is None and not message.user_properties:
            return None
        props = _properties(PacketTypes.PUBLISH)
        if message.expiry_s is not None:
            props.MessageExpiryInterval = message.expiry_s
        if message.user_properties:
            props.UserProperty = list(message.user_properties)
        return props

    def _paho_publish(self, message: Message, props: Properties | None) -> paho.MQTTMessageInfo:
        try:
            return self._paho.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain,
                properties=props,
            )  # fmt: skip
        except ValueError as exc:
            raise PublishError(
                f"invalid publish to {message.topic!r}: {exc}", reason="invalid"
            ) from None

    def _subscribe_packet(self, topic_filter: str, qos: int, handling: int) -> tuple[Any, Any]:
        """paho's (rc, mid) of one SUBSCRIBE; 3.1.1 has no options (retained always re-sent)."""
        if self._v5:
            opts = SubscribeOptions(qos=qos, retainHandling=handling)
            return self._paho.subscribe(topic_filter, options=opts)
        return self._paho.subscribe(topic_filter, qos=qos)

    def _resend_retained(self, message: Message) -> None:
        """One retained copy again (called by the RetainedRefresh thread, under its lock)."""
        if self.is_connected:
            self._register(self._paho_publish(message, self._publish_properties(message)).mid)

    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout: float | None = 10.0) -> None:
        """Subscribe (waiting up to ``timeout`` s for SUBACK) and again after every reconnect.

        Before the first connection the filter is only recorded and sent on connect.
        """
        if self._closing.is_set():
            raise ClientClosedError("client is closed")
        with self._lock:
            self._subs[topic_filter] = qos
        if not self.is_connected:
            return  # sent by _on_connect
        try:
            rc, mid = self._subscribe_packet(topic_filter, qos, 0)
        except ValueError as exc:
            raise SubscribeError(
                f"invalid filter {topic_filter!r}: {exc}", reason="invalid"
            ) from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # connection just dropped; _on_connect resubscribes
        waiter = self._register(mid)
        if timeout is None:
            return
        if not waiter.event.wait(timeout):
            raise SubscribeError(f"no SUBACK for {topic_filter!r} in {timeout}s", reason="timeout")
        failed = [c for c in waiter.codes if c >= 0x80]
        if failed or waiter.closed:
            with self._lock:
                self._subs.pop(topic_filter, None)
            code = failed[0] if failed else None
            raise SubscribeError(
                f"subscribe to {topic_filter!r} failed: {waiter.text}", reason_code=code
            )

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.is_connected:
            self._paho.unsubscribe(topic_filter)

    def _register(self, mid: int) -> Completion:
        waiter = Completion()
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._pending[mid] = waiter
        if early is not None:
            waiter.resolve(*early)
        return waiter

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message | None:
        """Next received message, or None on timeout or after close."""
        try:
            msg = self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is None:
            self._incoming.put(None)  # keep the close marker for other readers
        return msg

    @property
    def pending(self) -> int:
        """Received messages not yet taken by receive()."""
        return self._incoming.qsize()

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        if self._attempts > 0:
            if self._delays is None:
                s = self.settings
                self._delays = full_jitter(s.backoff_base_s, s.backoff_max_s, rng=self._rng)
            self._closing.wait(next(self._delays))
            if not self._reached and len(self._endpoints) > 1:
                # The last attempt got no CONNACK: try the next node of the cluster.
                self._node = (self._node + 1) % len(self._endpoints)
                _log.info("MQTT %s: trying %s:%d", self.settings.client_id, *self.endpoint)
        if self._closing.is_set():
            raise ConnectionAbortedError("client closing")  # an OSError: paho stops this attempt
        self._reached = False
        # paho 2.2's host/port setters refuse while CONNECTING, the state reconnect() set before
        # this callback; its socket is closed here and the next one is made from these fields.
        client._host, client._port = self.endpoint
        self._attempts += 1

    @guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        if rc.is_failure:
            self._refused = ConnectRefusedError(
                f"broker refused the connection: {rc} (0x{rc.value:02x})", reason_code=rc.value
            )
            _log.warning("CONNACK refused for %s: %s", self.settings.client_id, rc)
            self._first_outcome.set()
            return
        self._reached = True
        self._connected_at = time.monotonic()
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None)
        # Retained messages again unless the broker kept our subscriptions (session present).
        handling = 1 if (flags.session_present and self._ever_connected) else 0
        self._ever_connected = True
        self.stats.connects += 1
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, qos in subs:
            _, mid = self._subscribe_packet(topic_filter, qos, handling)
            if mid is not None:
                with self._lock:  # same thread as _on_subscribe: no early-ack race here
                    self._pending[mid] = Completion()
        self._connected.set()
        self._first_outcome.set()
        if self._retained is not None:
            self._retained.wake()  # the node we reached may not hold our retained messages

    @guarded
    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            # Reset the backoff only after a stable connection: a message that makes the broker
            # drop us right after CONNACK must not cause a tight reconnect loop.
            if time.monotonic() - self._connected_at >= _STABLE_AFTER_S:
                self._attempts, self._delays = 0, None
        self._connected.clear()
        self.stats.last_disconnect = str(rc)
        if not self._closing.is_set():
            _log.info("MQTT disconnected (%s): %s; reconnecting", self.settings.client_id, rc)

    def _complete(self, mid: int, codes: tuple[int, ...], text: str) -> None:
        with self._lock:
            waiter = self._pending.pop(mid, None)
            if waiter is None:
                self._early[mid] = (codes, text)
                return
        waiter.resolve(codes, text)

    @guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        self._complete(mid, (rc.value,), str(rc))

    @guarded
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        codes = tuple(r.value for r in rcs)
        if any(c >= 0x80 for c in codes):
            _log.warning("SUBACK failure for mid %d: %s", mid, [str(r) for r in rcs])
        self._complete(mid, codes, ", ".join(str(r) for r in rcs))

    @guarded
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user_props = tuple(getattr(props, "UserProperty", None) or ())
        expiry = getattr(props, "MessageExpiryInterval", None)
        payload = bytes(msg.payload)
        self.stats.received += 1
        self.stats.received_bytes += len(payload)
        self._incoming.put(
            Message(msg.topic, payload, msg.qos, bool(msg.retain), user_props, expiry)
        )
