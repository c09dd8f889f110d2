"""Bit packing, LEB128 varints and support coding: round trips, exact sizes, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fstq.bitpack import (
    pack_codes,
    pack_uint,
    packed_size,
    unpack_codes,
    unpack_uint,
    varint_decode_array,
    varint_encode_array,
    varint_size,
    varint_sizes_total,
)
from fstq.container import ByteReader, ByteWriter
from fstq.errors import DecodeError
from fstq.index_coding import IndexMode, choose_support_code, decode_support, encode_support


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), count=st.integers(0, 70))
def test_pack_round_trip(width: int, seed: int, count: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << width, count).astype(np.uint8)
    packed = pack_codes(codes, width)
    assert packed.size == packed_size(count, width)
    assert np.array_equal(unpack_codes(packed, count, width), codes)


def test_pack_is_lsb_first() -> None:
    assert pack_codes(np.array([1, 2, 3], dtype=np.uint8), 2).tolist() == [0b111001]
    assert pack_codes(np.array([0xA, 0x5, 0x1], dtype=np.uint8), 4).tolist() == [0x5A, 0x01]


def test_unpack_rejects_bad_length_and_padding() -> None:
    with pytest.raises(DecodeError):
        unpack_codes(np.zeros(2, dtype=np.uint8), 5, 4)
    with pytest.raises(DecodeError, match="padding"):
        unpack_codes(np.array([0xF0], dtype=np.uint8), 1, 4)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 2**35 - 1), max_size=40))
def test_varint_round_trip(values: list[int]) -> None:
    arr = np.array(values, dtype=np.int64)
    encoded = varint_encode_array(arr)
    assert encoded.size == varint_sizes_total(arr) == sum(varint_size(v) for v in values)
    assert varint_decode_array(encoded).tolist() == values
    # the scalar writer/reader agree with the array coder
    out = ByteWriter()
    for v in values:
        out.varint(v)
    body = out.finish()[:-4]
    assert body == encoded.tobytes()
    reader = ByteReader(np.frombuffer(body, dtype=np.uint8), len(body))
    assert [reader.varint("v", 2**35) for _ in values] == values


@pytest.mark.parametrize(
    "raw", [b"\x80", b"\x80\x00", b"\xff\xff\xff\xff\xff\x01", b"\x01\x80"], ids=str
)
def test_varint_decoder_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        varint_decode_array(np.frombuffer(raw, dtype=np.uint8))
    reader = ByteReader(np.frombuffer(raw, dtype=np.uint8), len(raw))

    def read_all() -> None:
        for _ in range(len(raw)):
            reader.varint("v", 2**35)

    with pytest.raises(DecodeError):
        read_all()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_support_coding_round_trip_and_chooses_the_smaller(
    n: int, density: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    support = np.flatnonzero(rng.random(n) < density)
    code = encode_support(support, n)
    choice = choose_support_code(support, n)
    size = choice.nbytes
    assert (code.mode, code.data.size) == (choice.mode, size)
    assert np.array_equal(decode_support(code.mode, code.data, n), support)
    if support.size:
        gaps = np.diff(support, prepend=-1) - 1
        assert size <= min((n + 7) // 8, varint_sizes_total(gaps))  # Rice only ever helps
    else:
        assert code.mode is IndexMode.EMPTY and size == 0


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5000), density=st.floats(0.001, 0.4), seed=st.integers(0, 2**32 - 1))
def test_rice_code_round_trip_and_is_near_the_entropy(n: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    support = np.flatnonzero(rng.random(n) < density)
    if support.size < 30:
        return
    code = encode_support(support, n)
    assert np.array_equal(decode_support(code.mode, code.data, n), support)
    p = support.size / n
    entropy_bytes = -n * (p * np.log2(p) + (1 - p) * np.log2(1 - p)) / 8
    assert code.data.size <= 1.15 * entropy_bytes + 8


@settings(max_examples=100, deadline=None)
@given(width=st.integers(0, 32), values=st.lists(st.integers(0, 2**32 - 1), max_size=30))
def test_pack_uint_round_trip(width: int, values: list[int]) -> None:
    arr = np.array([v % (1 << width) for v in values], dtype=np.int64)
    packed = pack_uint(arr, width)
    assert packed.size == packed_size(arr.size, width)
    assert np.array_equal(unpack_uint(packed, arr.size, width), arr)


@pytest.mark.parametrize(
    "data",
    [
        bytes([31, 1, 1]),  # parameter above 30
        bytes([0, 1, 0]),  # no index in the quotients
        bytes([0, 2, 1, 0]),  # quotients padded by a whole byte
        bytes([2, 1, 1]),  # remainders missing
        bytes([2, 1, 1, 0x04]),  # remainder padding bits set
        bytes([0, 1, 0x80]),  # gap 7 in a tensor of 3
    ],
    ids=str,
)
def test_rice_decoder_rejects_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_support(IndexMode.RICE, np.frombuffer(data, dtype=np.uint8), 3)


def test_support_decoder_rejects_out_of_range() -> None:
    with pytest.raises(DecodeError):
        decode_support(IndexMode.VARINT, np.array([2, 0], dtype=np.uint8), 3)  # index 3 of 3
    with pytest.raises(DecodeError):
        decode_support(IndexMode.EMPTY, np.array([1], dtype=np.uint8), 3)
    with pytest.raises(DecodeError):
        decode_support(6, np.zeros(0, dtype=np.uint8), 3)  # no such mode
    with pytest.raises(DecodeError):
        decode_support(IndexMode.FULL, np.array([0], dtype=np.uint8), 3)  # full with bytes
    with pytest.raises(DecodeError):  # complement leaving out all 3 indices: empty support
        decode_support(IndexMode.COMPLEMENT, np.frombuffer(bytes([0, 1, 0b111]), np.uint8), 3)
