"""Wire codec: round trips for every kind (hypothesis) and rejection of hostile input."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import messages as m
from broker.codec import KINDS, DecodeLimits, decode, encode, peek_kind
from broker.errors import DecodeError, UnexpectedKindError, UnknownKindError, VersionError

ids = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
u63 = st.integers(min_value=0, max_value=2**63 - 1)
sha = st.binary(min_size=32, max_size=32)
crc = st.integers(min_value=0, max_value=0xFFFFFFFF)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
scalars = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
metadata = st.dictionaries(st.text(min_size=1, max_size=12), scalars, max_size=6)


@st.composite
def transfer_fields(draw: st.DrawFn) -> dict[str, Any]:
    chunk_size = draw(st.integers(1, m.MAX_CHUNK_BYTES))
    count = draw(st.integers(1, 64))
    total = draw(st.integers((count - 1) * chunk_size + (count > 1), count * chunk_size))
    total = min(total, m.MAX_TRANSFER_BYTES)
    return {
        "total_size": total,
        "chunk_count": m.chunk_count_for(total, chunk_size),
        "chunk_size": chunk_size,
        "sha256": draw(sha),
    }


@st.composite
def round_announcements(draw: st.DrawFn) -> m.RoundAnnouncement:
    selected = draw(st.lists(ids, max_size=8, unique=True))
    budgets = {c: draw(st.integers(0, 2**40)) for c in selected if draw(st.booleans())}
    return m.RoundAnnouncement(
        fleet=draw(ids),
        round=draw(u63),
        global_version=draw(u63),
        global_sha256=draw(sha),
        selected=tuple(selected),
        deadline=draw(times),
        quorum=draw(st.integers(1, max(1, len(selected)))),
        upload_window_s=draw(st.floats(min_value=0.001, max_value=86400)),
        chunk_size=draw(st.integers(1, m.MAX_CHUNK_BYTES)),
        budget_bytes=budgets,
        params=draw(metadata),
    )


@st.composite
def upload_manifests(draw: st.DrawFn) -> m.UploadManifest:
    return m.UploadManifest(
        upload_id=draw(ids),
        round=draw(u63),
        client=draw(ids),
        base_version=draw(u63),
        sample_count=draw(u63),
        method=draw(ids),
        metadata=draw(metadata),
        **draw(transfer_fields()),
    )


@st.composite
def global_manifests(draw: st.DrawFn) -> m.GlobalManifest:
    return m.GlobalManifest(
        version=draw(u63),
        round=draw(u63),
        format=draw(ids),
        metadata=draw(metadata),
        **draw(transfer_fields()),
    )


@st.composite
def downlink_plans(draw: st.DrawFn) -> m.DownlinkPlan:
    route = draw(st.sampled_from(m.DownlinkRoute))
    result = draw(sha)
    base = {"full": None, "none": result}.get(route.value, draw(sha))
    fields = draw(transfer_fields())
    del fields["sha256"]
    if route is m.DownlinkRoute.NONE:
        fields = {"total_size": 0, "chunk_count": 1, "chunk_size": fields["chunk_size"]}
    return m.DownlinkPlan(
        version=draw(u63),
        route=route,
        plan=draw(sha),
        base=base,
        result=result,
        sha256=result if route is m.DownlinkRoute.FULL else draw(sha),
        **fields,
    )


@st.composite
def upload_acks(draw: st.DrawFn) -> m.UploadAck:
    count = draw(st.integers(0, 200))
    have = b""
    if count and draw(st.booleans()):
        bits = draw(st.lists(st.integers(0, count - 1), max_size=count))
        buf = bytearray(m.bitmap_len(count))
        for i in bits:
            buf[i >> 3] |= 1 << (i & 7)
        have = bytes(buf)
    return m.UploadAck(
        upload_id=draw(ids),
        round=draw(u63),
        status=draw(st.sampled_from(m.AckStatus)),
        chunk_count=count,
        have=bytes(have),
        reason=draw(st.text(max_size=40)),
    )


@st.composite
def round_progress(draw: st.DrawFn) -> m.RoundProgress:
    selected = draw(st.lists(ids, max_size=8, unique=True))
    arrived = [c for c in selected if draw(st.booleans())]
    return m.RoundProgress(
        fleet=draw(ids),
        round=draw(u63),
        phase=draw(st.sampled_from(m.RoundPhase)),
        base_version=draw(u63),
        selected=tuple(selected),
        arrived=tuple(arrived),
        rejected=draw(u63),
        late=draw(u63),
        opened_at=draw(times),
        deadline=draw(times),
        uplink_wire_bytes=draw(u63),
        downlink_wire_bytes=draw(u63),
        timestamp=draw(times),
    )


messages_strategy = st.one_of(
    round_announcements(),
    round_progress(),
    upload_manifests(),
    global_manifests(),
    upload_acks(),
    st.builds(
        m.UploadChunk,
        upload_id=ids,
        round=u63,
        client=ids,
        index=st.integers(0, m.MAX_CHUNKS - 1),
        crc32=crc,
        data=st.binary(max_size=2048),
    ),
    st.builds(
        m.FetchRequest,
        version=u63,
        held=st.none() | sha,
        plan=st.none() | sha,
        wanted=st.binary(max_size=64),
    ),
    downlink_plans(),
    st.builds(
        m.GlobalChunk,
        version=u63,
        plan=sha,
        index=st.integers(0, m.MAX_CHUNKS - 1),
        crc32=crc,
        data=st.binary(max_size=2048),
    ),
    st.builds(
        m.ClientStatus,
        client=ids,
        state=st.sampled_from(m.ClientState),
        timestamp=times,
        round=st.none() | u63,
        info=metadata,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages_strategy)
def test_every_message_round_trips(msg: m.WireMessage) -> None:
    # Act
    data = encode(msg)
    back = decode(data)
    # Assert
    assert back == msg
    assert type(back) is type(msg)
    assert decode(data, expect=type(msg)) == msg
    assert peek_kind(data) == msg.kind
    assert encode(back) == data  # deterministic


def test_registry_covers_every_message_kind() -> None:
    assert set(KINDS) == {
        "round",
        "up.manifest",
        "up.chunk",
        "up.ack",
        "global.manifest",
        "fetch",
        "down.plan",
        "global.chunk",
        "status",
        "progress",
    }
    assert all(cls.kind == kind for kind, cls in KINDS.items())


def test_envelope_layout_and_bytes_are_msgpack_bin() -> None:
    # Arrange
    chunk = m.UploadChunk(upload_id="u", round=1, client="c", index=0, crc32=5, data=b"\x00\xff")
    # Act
    raw = msgpack.unpackb(encode(chunk), raw=True)
    # Assert
    assert list(raw)[:2] == [b"v", b"kind"]
    assert raw[b"v"] == m.PROTOCOL_VERSION == 2 and raw[b"kind"] == b"up.chunk"
    assert raw[b"data"] == b"\x00\xff"  # bin, not str


def _chunk_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": m.PROTOCOL_VERSION,
        "kind": "up.chunk",
        "upload_id": "u1",
        "round": 3,
        "client": "dev-1",
        "index": 0,
        "crc32": 1,
        "data": b"abc",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def _pack(obj: object) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_decode_error(data: bytes) -> None:
    # Act: any outcome but a DecodeError (or a valid message) escapes and fails the test
    reasons = []
    try:
        decode(data)
    except DecodeError as exc:
        reasons.append(exc.reason)
    # Assert: rejections carry a metrics label
    assert all(reasons)


@settings(max_examples=100, deadline=None)
@given(msg=messages_strategy, cut=st.integers(min_value=1))
def test_truncated_messages_are_rejected(msg: m.WireMessage, cut: int) -> None:
    data = encode(msg)
    truncated = data[: len(data) - 1 - cut % len(data)]
    with pytest.raises(DecodeError):
        decode(truncated)


@pytest.mark.parametrize("version", [0, 1, 3, 99, -1])
def test_other_versions_raise_version_error(version: int) -> None:
    with pytest.raises(VersionError) as info:
        decode(_pack(_chunk_body(v=version)))
    assert info.value.version == version
    assert info.value.reason == "bad_version"


@pytest.mark.parametrize("v", [_DROP, "1", 1.0, True, None])
def test_missing_or_non_int_version_is_a_decode_error(v: object) -> None:
    with pytest.raises(DecodeError) as info:
        decode(_pack(_chunk_body(v=v)))
    assert not isinstance(info.value, VersionError)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(UnknownKindError) as info:
        decode(_pack(_chunk_body(kind="up.pickle")))
    assert info.value.reason == "unknown_kind"


def test_expect_rejects_another_kind() -> None:
    data = _pack(_chunk_body())
    assert isinstance(decode(data, expect=m.UploadChunk), m.UploadChunk)
    with pytest.raises(UnexpectedKindError):
        decode(data, expect=m.UploadManifest)


@pytest.mark.parametrize(
    "changes",
    [
        {"index": "0"},  # str where int expected: strict, no coercion
        {"index": 1.0},
        {"index": True},
        {"index": -1},
        {"index": m.MAX_CHUNKS},
        {"crc32": 2**32},
        {"data": "abc"},  # str where bin expected
        {"client": "a/b"},
        {"client": "+"},
        {"client": ""},
        {"upload_id": "x" * 65},
        {"round": -1},
        {"extra_field": 1},
        {"data": _DROP},
    ],
)
def test_malformed_fields_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as info:
        decode(_pack(_chunk_body(**changes)))
    assert info.value.reason == "invalid_fields"


def _manifest_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": m.PROTOCOL_VERSION,
        "kind": "up.manifest",
        "upload_id": "u1",
        "round": 3,
        "client": "dev-1",
        "base_version": 2,
        "total_size": 10,
        "chunk_count": 1,
        "chunk_size": 16,
        "sha256": hashlib.sha256(b"x").digest(),
        "sample_count": 5,
        "method": "fstq",
        "metadata": {},
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"total_size": m.MAX_TRANSFER_BYTES + 1, "chunk_count": 1, "chunk_size": 2**23},
        {"chunk_count": m.MAX_CHUNKS + 1},
        {"chunk_size": m.MAX_CHUNK_BYTES + 1},
        {"chunk_size": 0},
        {"chunk_count": 2},  # inconsistent with total_size / chunk_size
        {"sha256": b"short"},
        {"metadata": {f"k{i}": i for i in range(m.MAX_META_ENTRIES + 1)}},
        {"metadata": {"k": "v" * (m.MAX_META_STR + 1)}},
        {"metadata": {"k": [1, 2]}},
        {"metadata": {"k": None}},
        {"metadata": {"": 1}},
        {"metadata": {"k": float("inf")}},
    ],
)
def test_oversized_or_inconsistent_manifests_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(_pack(_manifest_body(**changes)))


def test_ack_bitmap_must_fit_chunk_count() -> None:
    body = {
        "v": m.PROTOCOL_VERSION,
        "kind": "up.ack",
        "upload_id": "u",
        "round": 1,
        "status": "receiving",
        "chunk_count": 9,
        "have": b"\x01",  # 9 chunks need 2 bytes
        "reason": "",
    }
    with pytest.raises(DecodeError):
        decode(_pack(body))
    with pytest.raises(DecodeError):
        decode(_pack({**body, "have": b"\x01\x00", "status": "bogus"}))
    assert decode(_pack({**body, "have": b"\x01\x00"})) == m.UploadAck(
        upload_id="u", round=1, status=m.AckStatus.RECEIVING, chunk_count=9, have=b"\x01\x00"
    )


def test_round_announcement_consistency_is_checked() -> None:
    base: dict[str, Any] = {
        "fleet": "f",
        "round": 1,
        "global_version": 0,
        "global_sha256": bytes(32),
        "selected": ("a", "b"),
        "deadline": 1.0,
        "quorum": 2,
        "upload_window_s": 60.0,
        "chunk_size": 1024,
        "budget_bytes": {"a": 100},
    }
    assert m.RoundAnnouncement(**base).quorum == 2
    for bad in ({"quorum": 3}, {"selected": ("a", "a")}, {"budget_bytes": {"z": 1}}):
        with pytest.raises(ValueError, match="validation error"):
            m.RoundAnnouncement(**{**base, **bad})
    with pytest.raises(DecodeError):  # NaN deadline
        decode(_pack({"v": m.PROTOCOL_VERSION, "kind": "round", **base, "deadline": float("nan")}))


def test_round_progress_consistency_is_checked() -> None:
    base: dict[str, Any] = {
        "fleet": "f",
        "round": 1,
        "phase": "open",
        "base_version": 0,
        "selected": ("a", "b"),
        "arrived": ("b",),
        "rejected": 0,
        "late": 0,
        "opened_at": 1.0,
        "deadline": 2.0,
        "uplink_wire_bytes": 10,
        "downlink_wire_bytes": 20,
        "timestamp": 1.5,
    }
    assert decode(_pack({"v": m.PROTOCOL_VERSION, "kind": "progress", **base})).arrived == ("b",)
    for bad in ({"arrived": ("z",)}, {"arrived": ("a", "a")}, {"phase": "ajar"}):
        with pytest.raises(DecodeError):
            decode(_pack({"v": m.PROTOCOL_VERSION, "kind": "progress", **base, **bad}))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),  # never-used msgpack byte
        (_pack([1, "round"]), "envelope"),
        (_pack({1: 2}), "malformed"),  # strict_map_key: int keys refused
        (_pack(_chunk_body()) + b"\x00", "malformed"),  # trailing bytes
        (msgpack.packb(msgpack.ExtType(5, b"x")), "malformed"),  # extension types refused
    ],
)
def test_structurally_broken_payloads(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == reason


def test_hostile_length_prefixes_are_refused_before_allocation() -> None:
    # A bin32 header claiming 4 GiB followed by nothing, and a 2**31-entry array header.
    for data in (b"\xc6\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdf\x7f\xff\xff\xff"):
        with pytest.raises(DecodeError):
            decode(data)


def test_raw_limits_apply_to_the_whole_message() -> None:
    big = _pack(_chunk_body(data=b"x" * 5000))
    with pytest.raises(DecodeError) as info:
        decode(big, limits=DecodeLimits(max_message_bytes=1000))
    assert info.value.reason == "too_large"
    with pytest.raises(DecodeError):
        decode(big, limits=DecodeLimits(max_bin_len=4096))
    with pytest.raises(DecodeError):
        decode(_pack(_chunk_body(client="c" * 40)), limits=DecodeLimits(max_str_len=16))


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(DecodeError):
        decode("not bytes")  # type: ignore[call-overload]


def test_messages_are_frozen() -> None:
    msg = m.FetchRequest(version=1, wanted=b"\x01")
    with pytest.raises(ValueError, match="frozen"):
        msg.version = 2
