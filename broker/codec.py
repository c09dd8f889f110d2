"""msgpack encoding of wire messages: a versioned envelope, a kind registry, hard decode limits.

Envelope: one msgpack map ``{"v": 2, "kind": "<kind>", <fields of the model>...}``; bytes
fields are msgpack ``bin``, tuples arrays, floats float64. Encoding is deterministic (field
order is the model's declaration order), which the golden files in ``tests/broker/golden/``
pin down.

Decoding never trusts its input: the raw size is checked first, msgpack runs with explicit
``max_*_len`` limits (so a hostile length prefix cannot make it allocate), extension types are
refused, then the version, the kind and every field are validated. Any failure is a
:class:`~broker.errors.DecodeError` (or its subclasses ``VersionError``, ``UnknownKindError``,
``UnexpectedKindError``). Never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeVar, overload

import msgpack
from pydantic import ValidationError

from broker.errors import DecodeError, UnexpectedKindError, UnknownKindError, VersionError
from broker.messages import (
    MAX_CHUNK_BYTES,
    MAX_CLIENTS,
    MAX_META_STR,
    PROTOCOL_VERSION,
    ClientStatus,
    DownlinkPlan,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
    RoundProgress,
    UploadAck,
    UploadChunk,
    UploadManifest,
    WireMessage,
)

__all__ = ["DEFAULT_LIMITS", "KINDS", "DecodeLimits", "decode", "encode", "peek_kind"]

M = TypeVar("M", bound=WireMessage)

#: kind -> model class; decode dispatches on it.
KINDS: Final[dict[str, type[WireMessage]]] = {
    cls.kind: cls
    for cls in (
        RoundAnnouncement,
        UploadManifest,
        UploadChunk,
        UploadAck,
        GlobalManifest,
        FetchRequest,
        DownlinkPlan,
        GlobalChunk,
        ClientStatus,
        RoundProgress,
    )
}


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Raw limits applied before and during msgpack unpacking."""

    max_message_bytes: int = MAX_CHUNK_BYTES + 64 * 1024
    max_bin_len: int = MAX_CHUNK_BYTES
    max_str_len: int = 4 * MAX_META_STR
    max_array_len: int = MAX_CLIENTS
    max_map_len: int = MAX_CLIENTS + 16


DEFAULT_LIMITS: Final = DecodeLimits()


def encode(msg: WireMessage) -> bytes:
    """Encode ``msg`` into its msgpack envelope."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": msg.kind}
    body.update(msg.model_dump(mode="python"))
    packed = msgpack.packb(body, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _unpack(data: bytes, limits: DecodeLimits) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", reason="not_bytes")
    if len(data) > limits.max_message_bytes:
        raise DecodeError(
            f"message of {len(data)} bytes exceeds {limits.max_message_bytes}", reason="too_large"
        )
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.StackError) as exc:
        # FormatError/OutOfData/ExtraData/limits are ValueError subclasses; bad UTF-8 too.
        raise DecodeError(f"malformed msgpack: {exc!r}"[:300], reason="malformed") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"envelope must be a map, got {type(obj).__name__}", reason="envelope")
    return obj


def peek_kind(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> str:
    """Return the envelope's kind after checking the version, without validating fields."""
    return _check_envelope(_unpack(data, limits))[0]


def _check_envelope(obj: dict[str, Any]) -> tuple[str, type[WireMessage]]:
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DecodeError("envelope has no integer 'v'", reason="envelope")
    if version != PROTOCOL_VERSION:
        raise VersionError(
            f"protocol version {version} not supported (speaks {PROTOCOL_VERSION})",
            version=version,
        )
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise DecodeError("envelope has no string 'kind'", reason="envelope")
    cls = KINDS.get(kind)
    if cls is None:
        raise UnknownKindError(f"unknown message kind {kind[:64]!r}")
    return kind, cls


@overload
def decode(data: bytes, *, expect: type[M], limits: DecodeLimits = ...) -> M: ...
@overload
def decode(data: bytes, *, expect: None = None, limits: DecodeLimits = ...) -> WireMessage: ...


def decode(
    data: bytes, *, expect: type[M] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> M | WireMessage:
    """Decode and validate one envelope.

    Parameters
    ----------
    data
        The MQTT payload.
    expect
        If given, the message must be of this model class, else :class:`UnexpectedKindError`.
    limits
        Raw size limits (defaults fit every message the protocol can describe).
    """
    obj = _unpack(data, limits)
    kind, cls = _check_envelope(obj)
    if expect is not None and cls is not expect:
        raise UnexpectedKindError(f"expected {expect.kind!r}, got {kind!r}")
    fields = {k: v for k, v in obj.items() if k not in ("v", "kind")}
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise DecodeError(f"invalid {kind!r}: {summary}"[:500], reason="invalid_fields") from None
