"""MQTT 5 packet-size arithmetic (no paho): what a PUBLISH costs on the wire.

Used to refuse packets over the broker's Maximum Packet Size before sending, and to count
framing bytes in the per-round traffic accounting.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import PacketTooLargeError

__all__ = ["check_packet_size", "packet_size", "publish_size", "varint_len"]

_EXPIRY_PROPERTY = 1 + 4  # identifier byte + four-byte integer


def varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer holding ``n``."""
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def packet_size(topic: str, payload: bytes, qos: int, packed_properties: int) -> int:
    """Exact size of an MQTT 5 PUBLISH packet (``packed_properties``: length incl. its varint)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + packed_properties + len(payload)
    return 1 + varint_len(remaining) + remaining


def publish_size(
    topic: str,
    payload: bytes,
    qos: int,
    *,
    expiry_s: int | None = None,
    user_properties: Sequence[tuple[str, str]] = (),
) -> int:
    """Size of the MQTT 5 PUBLISH packet carrying these (message expiry and user properties)."""
    props = _EXPIRY_PROPERTY if expiry_s is not None else 0
    for key, value in user_properties:
        props += 1 + 2 + len(key.encode()) + 2 + len(value.encode())
    return packet_size(topic, payload, qos, varint_len(props) + props)


def check_packet_size(topic: str, size: int, *limits: int | None) -> None:
    """:class:`PacketTooLargeError` if ``size`` exceeds the smallest limit set (None: unset)."""
    limit = min((x for x in limits if x), default=None)
    if limit is not None and size > limit:
        raise PacketTooLargeError(
            f"PUBLISH of {size} bytes to {topic!r} exceeds the {limit} byte limit",
            size=size,
            limit=limit,
        )
