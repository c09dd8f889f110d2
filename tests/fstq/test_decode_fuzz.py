"""The decoder faces the network: malformed bytes of any kind raise only DecodeError."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from functools import cache

import numpy as np
import pytest
import torch
from codec_cases import (
    METHOD_IDS,
    METHODS,
    dense_fp16_bytes,
    fix_crc,
    lora_update,
    mixed_update,
    streams_coded,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fstq.compressors import DecodeLimits, FstqCompressor, TopkCompressor, decompress
from fstq.container import FORMAT_VERSION, MAGIC, ByteWriter, Method, TensorSpec, write_table
from fstq.errors import DecodeError
from fstq.index_coding import IndexMode

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def valid_payloads() -> tuple[bytes, ...]:
    update = mixed_update(np.random.default_rng(70))
    out = []
    for _, factory, kwargs in METHODS:
        out.append(factory().compress(update, **kwargs(dense_fp16_bytes(update))).payload)
    # Sparse supports, so that varint and Rice index sections get fuzzed too.
    sparse = {
        "s": torch.from_numpy(np.random.default_rng(71).standard_t(2, 1500).astype(np.float32))
    }
    out.append(TopkCompressor(fraction=0.01).compress(sparse).payload)  # varint
    out.append(TopkCompressor(fraction=0.1).compress(sparse).payload)  # Rice
    out.append(FstqCompressor().compress(sparse, budget_bytes=200).payload)
    out.append(_coded_fstq_payload())  # ANS-coded tag and INT streams
    dense = lora_update(np.random.default_rng(73), layers=1, hidden=16, kv=8, r=2)
    out.append(FstqCompressor().compress(dense, budget_bytes=dense_fp16_bytes(dense)).payload)
    return tuple(out)


def _decode_or_decode_error(payload: bytes) -> None:
    try:
        decoded = decompress(payload)
    except DecodeError:
        return
    for t in decoded.values():  # a payload that decodes yields finite, well-formed tensors
        assert torch.isfinite(t.float()).all()


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decompress(data)


@FUZZ
@given(data=st.binary(max_size=600), method=st.sampled_from(list(Method)), count=st.integers(0, 6))
def test_random_bodies_behind_a_valid_frame(data: bytes, method: Method, count: int) -> None:
    body = MAGIC + bytes([FORMAT_VERSION, int(method), count]) + data
    _decode_or_decode_error(body + struct.pack("<I", zlib.crc32(body)))


EXTRA = ["varint", "rice", "fstq_sparse", "fstq_coded", "fstq_dense"]


@pytest.mark.parametrize("index", range(len(METHODS) + len(EXTRA)), ids=[*METHOD_IDS, *EXTRA])
def test_every_truncation(index: int) -> None:
    payload = valid_payloads()[index]
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decompress(payload[:cut])
        _decode_or_decode_error(fix_crc(payload[:cut] + b"\0\0\0\0"))


@FUZZ
@given(
    index=st.integers(0, len(METHODS) + len(EXTRA) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_byte_flips(index: int, flips: list[tuple[int, int]]) -> None:
    original = valid_payloads()[index]
    payload = bytearray(original)
    for pos, xor in flips:
        payload[pos % len(payload)] ^= xor
    assume(payload != original)  # two flips of the same byte may cancel
    with pytest.raises(DecodeError):  # the CRC catches every flip...
        decompress(bytes(payload))
    _decode_or_decode_error(fix_crc(bytes(payload)))  # ...and the parser what gets past it


@FUZZ
@given(
    index=st.integers(0, len(METHODS) + len(EXTRA) - 1),
    pos=st.integers(0, 10**6),
    insert=st.binary(min_size=0, max_size=8),
    delete=st.integers(0, 8),
)
def test_splices_behind_a_fixed_crc(index: int, pos: int, insert: bytes, delete: int) -> None:
    payload = valid_payloads()[index][:-4]
    pos %= len(payload) + 1
    _decode_or_decode_error(fix_crc(payload[:pos] + insert + payload[pos + delete :] + b"\0" * 4))


def test_trailing_garbage() -> None:
    for payload in valid_payloads():
        with pytest.raises(DecodeError, match="trailing"):
            decompress(fix_crc(payload[:-4] + b"\x00" + b"\0\0\0\0"))


def _hostile(
    specs: list[TensorSpec], method: Method = Method.DENSE_FP32, body: bytes = b""
) -> bytes:
    out = ByteWriter()
    write_table(out, method, specs)
    out.raw(body)
    return out.finish()


@pytest.mark.parametrize(
    "specs",
    [
        [TensorSpec("w", torch.float32, (1 << 27, 1 << 27))],  # 2**54 elements
        [TensorSpec(f"w{i}", torch.float32, (1 << 20,)) for i in range(300)],  # too many in total
        [TensorSpec("w", torch.float32, (2,) * 9)],  # rank above the limit
        [TensorSpec("x" * 2000, torch.float32, (1,))],  # name above the limit
    ],
    ids=["huge_shape", "huge_total", "deep", "long_name"],
)
def test_hostile_tables_fail_before_allocating(specs: list[TensorSpec]) -> None:
    payload = _hostile(specs)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            decompress(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_declared_dense_tensor_without_data_allocates_nothing_big() -> None:
    payload = _hostile([TensorSpec("w", torch.float32, (1 << 26,))])  # 256 MiB declared, 0 sent
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="needs"):
            decompress(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_limits_are_the_callers() -> None:
    payload = FstqCompressor().compress({"w": torch.ones(100)}, budget_bytes=500).payload
    assert decompress(payload)["w"].shape == (100,)
    for limits in (
        DecodeLimits(max_total_elements=99),
        DecodeLimits(max_tensors=0),
        DecodeLimits(max_name_bytes=0),
    ):
        with pytest.raises(DecodeError):
            decompress(payload, limits)


def _head(mode: IndexMode, index_bytes: int = 0, coded: int = 0) -> bytes:
    """A section head (format 2): index_bytes << 6 | coded streams << 3 | mode, as LEB128."""
    out = ByteWriter()
    out.varint(index_bytes << 6 | coded << 3 | int(mode))
    return out.finish()[:-4]


BITMAP, RICE, VARINT = IndexMode.BITMAP, IndexMode.RICE, IndexMode.VARINT
ONE = b"\x01"  # a bitmap of n = 3 sending index 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_head(VARINT, 1) + bytes([5]), "does not fit"),  # varint support index 5 >= n = 3
        (_head(VARINT, 2) + bytes([0x80, 0x00]), "non-canonical"),  # overlong varint
        (_head(BITMAP) + bytes([0b1000]), "padding"),  # bitmap bit beyond n = 3
        (_head(BITMAP) + bytes([0b000]), "empty"),  # bitmap with nothing set
        (_head(BITMAP) + ONE + bytes([0b11]), "tag 3"),  # invalid precision tag
        (_head(BITMAP) + ONE + b"\x00" + struct.pack("<f", float("nan")) + b"\x00", "scale"),
        (_head(BITMAP) + ONE + b"\x01" + struct.pack("<f", 1.0) + b"\x0f", "out of range"),
        (_head(BITMAP) + ONE + bytes([0b10, 0x00, 0x7C]), "inf or NaN"),  # fp16 +inf
        (_head(RICE, 3) + bytes([0, 1, 0x80]), "does not fit"),  # Rice gap 7 >= n = 3
        (_head(RICE), "empty coded index"),
        (bytes([6]), "unknown index mode"),
        (_head(IndexMode.FULL, 1) + b"\x00", "index length"),
        (_head(IndexMode.EMPTY, 0, 1), "without tags"),  # coded streams flagged, nothing sent
        (_head(BITMAP, 0, 1) + ONE + bytes([2]), "exceeds the limit"),  # k2 = 2 of k = 1
        (_head(BITMAP, 0, 2) + ONE + b"\x01" + struct.pack("<f", 1.0), "no codes"),  # all INT4
        (_head(BITMAP, 0, 2) + ONE + b"\x00" + struct.pack("<f", 1.0) + b"\x00", "precision"),
        (_head(BITMAP, 0, 2) + ONE + b"\x00" + struct.pack("<f", 1.0) + b"\x0d", "precision"),
        (_head(BITMAP, 0, 2) + ONE + b"\x00" + struct.pack("<f", 1.0) + b"\x02\x00", "no symbol"),
        (_head(BITMAP, 0, 2) + ONE + b"\x00" + struct.pack("<f", 1.0) + b"\x02\xff", "padding"),
    ],
    ids=[
        "index_range",
        "overlong",
        "padding",
        "empty_bitmap",
        "tag3",
        "nan_scale",
        "int4",
        "inf",
        "rice_range",
        "rice_empty",
        "unknown_mode",
        "full_with_bytes",
        "coded_empty",
        "tag_counts",
        "coded_no_codes",
        "precision0",
        "precision13",
        "model_empty",
        "model_padding",
    ],
)
def test_crafted_sections(body: bytes, message: str) -> None:
    payload = _hostile([TensorSpec("w", torch.float32, (3,))], Method.FSTQ, body)
    with pytest.raises(DecodeError, match=message):
        decompress(payload)


def _coded_fstq_payload() -> bytes:
    """A valid FSTQ payload with ANS-coded tag and INT streams (non-empty blocks)."""
    update = lora_update(np.random.default_rng(72), layers=1, hidden=64, kv=32, r=8)
    result = FstqCompressor().compress(update, budget_bytes=2500)
    assert streams_coded(result.report) == (True, True)
    return result.payload


def test_hostile_coded_streams() -> None:
    good = _coded_fstq_payload()
    body = good[:-4]
    # Blocks are at the end: the INT block's words, then its length varint before them.
    cases = {
        "extra word": body[:-1] + bytes([body[-1] ^ 0x40]),  # a different ANS stack
        "zero last word": body[:-4] + b"\0\0\0\0",
        "truncated words": body[:-4],
        "appended word": body + b"\x01\0\0\0",
    }
    for label, bad in cases.items():
        with pytest.raises(DecodeError):
            decompress(fix_crc(bad + b"\0\0\0\0"))
        assert label


def test_coded_tags_must_match_their_counts() -> None:
    # One tensor of 3 coordinates, all sent: the tag model says 1 INT2, 1 INT4, 1 fp16, and
    # the tag block holds the ANS stack of different tags, which must be refused.
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.Categorical(np.array([1.0, 1.0, 1.0]), perfect=False)
    coder.encode_reverse(np.array([0, 0, 2], dtype=np.int32), model)
    words = coder.get_compressed().astype("<u4").tobytes()
    int2 = b"\x00"  # packed INT2 code (q = -1) for the one INT2 coordinate
    int4 = b"\x07"  # packed INT4 code (q = 0)
    body = (
        _head(IndexMode.FULL, 0, 1)
        + bytes([1, 1])
        + struct.pack("<ff", 1.0, 1.0)
        + int2
        + int4
        + b"\x00\x3c"  # fp16 1.0
        + bytes([len(words) // 4])
        + words
        + b"\x00"
    )
    payload = _hostile([TensorSpec("w", torch.float32, (3,))], Method.FSTQ, body)
    with pytest.raises(DecodeError, match="disagree"):
        decompress(payload)


def test_format_1_payload_is_refused_with_its_version() -> None:
    good = FstqCompressor().compress({"w": torch.ones(3)}, budget_bytes=200).payload
    old = bytearray(good)
    old[4] = 1
    with pytest.raises(
        DecodeError, match=r"version 1 .*before entropy coding.*reads only version 2"
    ):
        decompress(fix_crc(bytes(old)))


def test_unknown_version_method_and_dtype() -> None:
    good = FstqCompressor().compress({"w": torch.ones(3)}, budget_bytes=200).payload
    # magic 0-3, version 4, method 5, count 6, name prefix 7, length 8, "w" 9, dtype 10
    for pos, value, message in ((4, 99, "version"), (5, 77, "method"), (10, 9, "dtype")):
        bad = bytearray(good)
        bad[pos] = value
        with pytest.raises(DecodeError, match=message):
            decompress(fix_crc(bytes(bad)))


def test_non_bytes_payload() -> None:
    with pytest.raises(DecodeError):
        decompress("not bytes")  # type: ignore[arg-type]
