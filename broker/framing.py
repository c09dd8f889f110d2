"""MQTT 5 packet-size arithmetic (no paho): what a PUBLISH costs on the wire.

Used to refuse packets over the broker's Maximum Packet Size before sending, and to count
framing bytes in the per-round traffic accounting.
"""

from __future__ import annotations

__all__ = ["packet_size", "varint_len"]


def varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer holding ``n``."""
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def packet_size(topic: str, payload: bytes, qos: int, packed_properties: int) -> int:
    """Exact size of an MQTT 5 PUBLISH packet (``packed_properties``: length incl. its varint)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + packed_properties + len(payload)
    return 1 + varint_len(remaining) + remaining
