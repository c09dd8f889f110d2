"""Typed errors of the broker package.

Two small hierarchies:

* :class:`WireError` -- anything wrong with bytes or plain data received from the network
  (topics, envelopes, fields, chunks, reassembly limits).
* :class:`TransportError` -- anything wrong with talking to the MQTT broker (connect, publish,
  subscribe).  Defined here, not in ``broker.mqtt``, so callers can catch it without importing
  paho.

Every error carries a short, stable ``reason`` string (``snake_case``) meant for metrics labels
and for the ``reason`` field of an :class:`~broker.messages.UploadAck`; the message text is for
humans and may change.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BitmapError",
    "ChecksumError",
    "ChunkChecksumError",
    "ChunkIndexError",
    "ChunkSizeError",
    "ClientClosedError",
    "ConnectError",
    "ConnectRefusedError",
    "DecodeError",
    "ExpiredError",
    "LimitError",
    "ManifestConflictError",
    "OriginError",
    "PacketTooLargeError",
    "PayloadChecksumError",
    "PublishError",
    "PublishRejectedError",
    "PublishTimeoutError",
    "StaleVersionError",
    "SubscribeError",
    "TopicError",
    "TransferError",
    "TransportError",
    "UnexpectedKindError",
    "UnknownKindError",
    "UnknownUploadError",
    "VersionError",
    "WireError",
]


class WireError(ValueError):
    """Base of every rejection of received bytes or plain data."""

    default_reason: ClassVar[str] = "wire"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason


class TopicError(WireError):
    """A topic string or an id segment is malformed."""

    default_reason = "bad_topic"


class DecodeError(WireError):
    """Bytes are not a valid message: bad msgpack, limits exceeded, bad or extra fields."""

    default_reason = "decode"


class VersionError(DecodeError):
    """The envelope's protocol version is not one this code speaks."""

    default_reason = "bad_version"

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class UnknownKindError(DecodeError):
    """The envelope's ``kind`` is not registered."""

    default_reason = "unknown_kind"


class UnexpectedKindError(DecodeError):
    """The message decoded fine but is not the kind the caller expected."""

    default_reason = "unexpected_kind"


class BitmapError(WireError):
    """A chunk bitmap has the wrong length or non-zero padding bits."""

    default_reason = "bad_bitmap"


class ChecksumError(WireError):
    """Base of integrity failures."""

    default_reason = "checksum"


class ChunkChecksumError(ChecksumError):
    """A chunk's CRC-32 does not match its data; the chunk is dropped, a resend can fix it."""

    default_reason = "chunk_crc"


class PayloadChecksumError(ChecksumError):
    """The reassembled payload's SHA-256 does not match the manifest; the transfer is void."""

    default_reason = "payload_sha256"


class TransferError(WireError):
    """Base of chunked-transfer rejections (index, size, limits, unknown uploads...)."""

    default_reason = "transfer"


class ChunkIndexError(TransferError):
    """A chunk index is outside ``[0, chunk_count)``."""

    default_reason = "chunk_index"


class ChunkSizeError(TransferError):
    """A chunk's length does not match what the manifest implies for its index."""

    default_reason = "chunk_size"


class LimitError(TransferError):
    """A hard limit would be exceeded; raised before anything is allocated.

    ``reason`` is one of ``too_large``, ``too_many_chunks``, ``chunk_too_large``,
    ``too_many_uploads``, ``client_uploads``, ``memory``.
    """

    default_reason = "limit"


class UnknownUploadError(TransferError):
    """A chunk refers to an upload whose manifest was never accepted (or was dropped)."""

    default_reason = "unknown_upload"


class ManifestConflictError(TransferError):
    """A second, different manifest arrived for an upload key that is already open."""

    default_reason = "manifest_conflict"


class ExpiredError(TransferError):
    """The upload expired (its deadline passed) before it completed."""

    default_reason = "expired"


class OriginError(TransferError):
    """The client id inside a message differs from the client id of the topic it came on."""

    default_reason = "origin"


class StaleVersionError(TransferError):
    """A fetch or chunk names a global adapter version (or downlink plan) other than the one
    being served or downloaded."""

    default_reason = "stale_version"


class TransportError(Exception):
    """Base of MQTT transport failures (translated from paho return codes and OSErrors)."""

    default_reason: ClassVar[str] = "transport"

    def __init__(
        self, message: str, *, reason: str | None = None, reason_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason
        #: MQTT 5 reason code (e.g. 0x87 Not authorized), when the broker sent one.
        self.reason_code = reason_code


class ConnectError(TransportError):
    """No connection could be established (network error or timeout)."""

    default_reason = "connect"


class ConnectRefusedError(ConnectError):
    """The broker answered CONNACK with a failure reason code (e.g. 0x86, 0x87)."""

    default_reason = "connect_refused"


class ClientClosedError(TransportError):
    """The client was closed while an operation was pending, or used after close."""

    default_reason = "closed"


class PublishError(TransportError):
    """Base of publish failures."""

    default_reason = "publish"


class PublishRejectedError(PublishError):
    """The broker's PUBACK carried a failure reason code (>= 0x80), e.g. 0x87 or 0x97."""

    default_reason = "publish_rejected"


class PublishTimeoutError(PublishError):
    """No PUBACK within the timeout (the message stays queued in the session)."""

    default_reason = "publish_timeout"


class PacketTooLargeError(PublishError):
    """The PUBLISH packet would exceed the broker's Maximum Packet Size; nothing was sent."""

    default_reason = "packet_too_large"

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class SubscribeError(TransportError):
    """SUBACK carried a failure reason code, or it did not arrive in time."""

    default_reason = "subscribe"
