"""The binary container every method shares: framing, tensor table, limits, bounded reading.

Layout (all multi-byte integers little-endian; ``varint`` = unsigned LEB128)::

    magic    4 bytes  b"FSTQ"
    version  u8       FORMAT_VERSION
    method   u8       Method id
    count    varint   number of tensors
    table    per tensor, in upload order:
               prefix  varint  bytes shared with the previous name (front coding)
               suffix  varint  length, then that many utf-8 bytes
               dtype   u8      DTYPE_CODES
               ndim    u8
               dims    varint each
    params   method-specific (e.g. QSGD bits and bucket size)
    sections method-specific, one per tensor, in table order
    crc32    u32      zlib.crc32 of every byte before it

Front coding matters: peft names share long prefixes, and every header byte counts against the
budget. The CRC makes any corruption a :class:`DecodeError` instead of a silently wrong tensor.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from math import prod

import numpy as np
import numpy.typing as npt
import torch

from fstq.bitpack import MAX_VARINT_BYTES, varint_size
from fstq.errors import ConfigError, DecodeError

__all__ = [
    "CRC_BYTES",
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "MAGIC",
    "METHOD_NAMES",
    "ByteReader",
    "ByteWriter",
    "DecodeLimits",
    "Method",
    "TensorSpec",
    "open_payload",
    "specs_of",
    "table_size",
    "write_table",
]

U8 = npt.NDArray[np.uint8]

MAGIC = b"FSTQ"
# 2: ANS-coded tag and INT streams, complement and full index codes (fstq/README.md, row 12).
# Format 1 (fixed-width streams) is refused: payloads live for one round, between services of
# one release, and a mixed fleet must fail loudly rather than misread.
FORMAT_VERSION = 2
CRC_BYTES = 4


class Method(IntEnum):
    """Method ids on the wire (never renumber)."""

    DENSE_FP32 = 0
    DENSE_FP16 = 1
    FSTQ = 2
    QSGD = 3
    TOPK = 4


METHOD_NAMES: dict[Method, str] = {
    Method.DENSE_FP32: "dense_fp32",
    Method.DENSE_FP16: "dense_fp16",
    Method.FSTQ: "fstq",
    Method.QSGD: "qsgd",
    Method.TOPK: "topk",
}

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class DecodeLimits:
    """Ceilings checked against declared counts and shapes *before* anything is allocated."""

    max_tensors: int = 4096
    max_name_bytes: int = 1024
    max_ndim: int = 8
    max_total_elements: int = 1 << 28  # 256M coordinates (1 GiB as float32) over all tensors
    max_bucket_size: int = 1 << 24  # QSGD bucket

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_name_bytes", "max_ndim", "max_total_elements"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DecodeLimits.{name} must be >= 0")
        if self.max_total_elements >= 1 << 31 or self.max_bucket_size < 1:
            raise ConfigError("DecodeLimits.max_total_elements must be < 2**31, bucket >= 1")


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of an update."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)


def specs_of(tensors: dict[str, torch.Tensor], limits: DecodeLimits) -> list[TensorSpec]:
    """Specs of an update to encode; refuses what the decoder (with ``limits``) would reject."""
    if len(tensors) > limits.max_tensors:
        raise ConfigError(f"{len(tensors)} tensors exceed the limit of {limits.max_tensors}")
    specs = []
    total = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ConfigError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        try:
            nbytes = len(name.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ConfigError(f"tensor name {name!r} is not valid unicode") from exc
        if nbytes > limits.max_name_bytes or t.dim() > limits.max_ndim:
            raise ConfigError(f"tensor {name!r}: name or rank exceeds the decode limits")
        total += t.numel()
        specs.append(TensorSpec(name, t.dtype, tuple(int(d) for d in t.shape)))
    if total > limits.max_total_elements:
        raise ConfigError(f"{total} coordinates exceed the limit of {limits.max_total_elements}")
    return specs


class ByteWriter:
    """Accumulates payload pieces; ``size`` is always the exact byte count so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def raw(self, data: bytes | U8) -> int:
        chunk = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        self._parts.append(chunk)
        self.size += len(chunk)
        return len(chunk)

    def u8(self, value: int) -> int:
        return self.raw(bytes((value,)))

    def varint(self, value: int) -> int:
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return self.raw(bytes(out))

    def f32(self, value: float) -> int:
        return self.raw(struct.pack("<f", value))

    def finish(self) -> bytes:
        """The payload with its CRC32 trailer."""
        body = b"".join(self._parts)
        return body + struct.pack("<I", zlib.crc32(body))


def write_table(out: ByteWriter, method: Method, specs: list[TensorSpec]) -> int:
    """Write magic, version, method and the tensor table; returns the bytes written."""
    start = out.size
    out.raw(MAGIC)
    out.u8(FORMAT_VERSION)
    out.u8(int(method))
    out.varint(len(specs))
    prev = b""
    for spec in specs:
        name = spec.name.encode("utf-8")
        shared = _common_prefix(prev, name)
        out.varint(shared)
        out.varint(len(name) - shared)
        out.raw(name[shared:])
        out.u8(DTYPE_CODES[spec.dtype])
        out.u8(len(spec.shape))
        for dim in spec.shape:
            out.varint(dim)
        prev = name
    return out.size - start


def table_size(specs: list[TensorSpec]) -> int:
    """Bytes :func:`write_table` writes for ``specs`` (no encoding needed)."""
    size = len(MAGIC) + 2 + varint_size(len(specs))
    prev = b""
    for spec in specs:
        name = spec.name.encode("utf-8")
        shared = _common_prefix(prev, name)
        size += varint_size(shared) + varint_size(len(name) - shared) + len(name) - shared
        size += 2 + sum(varint_size(d) for d in spec.shape)
        prev = name
    return size


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ByteReader:
    """Bounds-checked reading of a payload body; every failure is a :class:`DecodeError`."""

    def __init__(self, buf: U8, end: int) -> None:
        self.buf = buf
        self.pos = 0
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> U8:
        if n < 0 or n > self.remaining:
            raise DecodeError(f"{what}: needs {n} bytes, {self.remaining} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def varint(self, what: str, maximum: int) -> int:
        """A canonical LEB128 value, which must be ``<= maximum``."""
        value = 0
        for i in range(MAX_VARINT_BYTES):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if i and byte == 0:
                    raise DecodeError(f"{what}: non-canonical varint")
                if value > maximum:
                    raise DecodeError(f"{what}: {value} exceeds the limit {maximum}")
                return value
        raise DecodeError(f"{what}: varint too long")

    def f32(self, what: str) -> float:
        return float(self.take(4, what).view("<f4")[0])

    def expect_end(self) -> None:
        if self.remaining:
            raise DecodeError(f"{self.remaining} trailing bytes after the last section")


def open_payload(
    payload: bytes, limits: DecodeLimits
) -> tuple[Method, list[TensorSpec], ByteReader]:
    """Check framing and CRC, parse the tensor table; the reader is left at the method params."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    min_size = len(MAGIC) + 3 + CRC_BYTES
    if buf.size < min_size:
        raise DecodeError(f"payload of {buf.size} bytes is shorter than the minimal {min_size}")
    if bytes(payload[: len(MAGIC)]) != MAGIC:
        raise DecodeError("bad magic: not an fstq payload")
    body_end = buf.size - CRC_BYTES
    (crc,) = struct.unpack("<I", bytes(payload[body_end:]))
    if zlib.crc32(memoryview(payload)[:body_end]) != crc:
        raise DecodeError("CRC32 mismatch: payload corrupted or truncated")
    reader = ByteReader(buf, body_end)
    reader.pos = len(MAGIC)
    version = reader.u8("version")
    if version != FORMAT_VERSION:
        hint = " (fixed-width streams, before entropy coding)" if version == 1 else ""
        raise DecodeError(
            f"unsupported format version {version}{hint}: this build reads only version "
            f"{FORMAT_VERSION}; sender and receiver must run the same fstq release"
        )
    method_id = reader.u8("method")
    if method_id not in Method._value2member_map_:
        raise DecodeError(f"unknown method id {method_id}")
    return Method(method_id), _read_table(reader, limits), reader


def _read_table(reader: ByteReader, limits: DecodeLimits) -> list[TensorSpec]:
    count = reader.varint("tensor count", limits.max_tensors)
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    prev = b""
    total = 0
    for i in range(count):
        shared = reader.varint(f"tensor {i} name prefix", len(prev))
        suffix = reader.varint(f"tensor {i} name length", limits.max_name_bytes - shared)
        raw = prev[:shared] + reader.take(suffix, f"tensor {i} name").tobytes()
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"tensor {i} name is not utf-8") from exc
        if name in seen:
            raise DecodeError(f"duplicate tensor name {name!r}")
        seen.add(name)
        dtype_code = reader.u8(f"tensor {name!r} dtype")
        if dtype_code not in _CODE_DTYPES:
            raise DecodeError(f"tensor {name!r}: unknown dtype code {dtype_code}")
        ndim = reader.u8(f"tensor {name!r} rank")
        if ndim > limits.max_ndim:
            raise DecodeError(f"tensor {name!r}: rank {ndim} exceeds the limit {limits.max_ndim}")
        shape = []
        for _ in range(ndim):
            dim = reader.varint(f"tensor {name!r} shape", limits.max_total_elements)
            shape.append(dim)
        numel = prod(shape)
        total += numel
        if total > limits.max_total_elements:
            raise DecodeError(
                f"declared shapes hold more than {limits.max_total_elements} elements"
            )
        specs.append(TensorSpec(name, _CODE_DTYPES[dtype_code], tuple(shape)))
        prev = raw
    return specs
