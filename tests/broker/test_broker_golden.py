"""Golden wire bytes: an accidental change of the wire format fails here.

If a change is intended, bump ``PROTOCOL_VERSION`` (or add a kind) and regenerate with::

    .venv/bin/python tests/broker/test_broker_golden.py --regen
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from broker import messages as m
from broker.codec import decode, encode

GOLDEN = Path(__file__).resolve().parent / "golden"
SHA = hashlib.sha256(b"fedfstq").digest()
HELD = hashlib.sha256(b"held").digest()
PLAN = hashlib.sha256(b"plan").digest()

SAMPLES: dict[str, m.WireMessage] = {
    "round": m.RoundAnnouncement(
        fleet="demo",
        round=7,
        global_version=6,
        global_sha256=SHA,
        selected=("dev-01", "dev-02", "dev-03"),
        deadline=1767225600.5,
        quorum=2,
        upload_window_s=120.0,
        chunk_size=262144,
        budget_bytes={"dev-01": 500000, "dev-02": 250000},
        params={"bits": "0,2,4,16", "r_tok": 0.5, "error_feedback": False, "H": 10},
    ),
    "up.manifest": m.UploadManifest(
        upload_id="dev-01.r7.a1",
        round=7,
        client="dev-01",
        base_version=6,
        total_size=600000,
        chunk_count=3,
        chunk_size=262144,
        sha256=SHA,
        sample_count=128,
        method="fstq",
        metadata={"bits_per_coord": 2.41, "matrices": 60},
    ),
    "up.chunk": m.UploadChunk(
        upload_id="dev-01.r7.a1",
        round=7,
        client="dev-01",
        index=2,
        crc32=0xDEADBEEF,
        data=bytes(range(256)) * 2,
    ),
    "up.ack": m.UploadAck(
        upload_id="dev-01.r7.a1",
        round=7,
        status=m.AckStatus.RECEIVING,
        chunk_count=3,
        have=b"\x05",
        reason="",
    ),
    "global.manifest": m.GlobalManifest(
        version=7,
        round=7,
        total_size=1800000,
        chunk_count=7,
        chunk_size=262144,
        sha256=SHA,
        format="safetensors-fp16",
        metadata={"base_model": "SmolLM2-135M-Instruct"},
    ),
    "fetch": m.FetchRequest(version=7, held=HELD, plan=PLAN, wanted=b"\x7e"),
    "down.plan": m.DownlinkPlan(
        version=7,
        route=m.DownlinkRoute.CATCHUP,
        plan=PLAN,
        base=HELD,
        result=SHA,
        total_size=120000,
        chunk_count=1,
        chunk_size=262144,
        sha256=SHA,
    ),
    "global.chunk": m.GlobalChunk(version=7, plan=PLAN, index=0, crc32=12345, data=b"\x00" * 64),
    "status": m.ClientStatus(
        client="dev-01",
        state=m.ClientState.OFFLINE,
        timestamp=1767225600.25,
        round=None,
        info={"reason": "will"},
    ),
    "progress": m.RoundProgress(
        fleet="demo",
        round=7,
        phase=m.RoundPhase.OPEN,
        base_version=6,
        selected=("dev-01", "dev-02", "dev-03"),
        arrived=("dev-02",),
        rejected=1,
        late=0,
        opened_at=1767225480.5,
        deadline=1767225600.5,
        uplink_wire_bytes=690239,
        downlink_wire_bytes=1874312,
        timestamp=1767225555.25,
    ),
}


def _path(kind: str) -> Path:
    return GOLDEN / f"{kind}.msgpack"


def regen() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for kind, msg in SAMPLES.items():
        _path(kind).write_bytes(encode(msg))
        print(f"wrote {_path(kind)}")


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_encoding_matches_golden_bytes(kind: str) -> None:
    # Arrange
    golden = _path(kind).read_bytes()
    # Act / Assert
    assert encode(SAMPLES[kind]) == golden
    assert decode(golden) == SAMPLES[kind]


def test_every_kind_has_a_golden_file() -> None:
    from broker.codec import KINDS

    assert set(SAMPLES) == set(KINDS)
    assert {p.stem for p in GOLDEN.glob("*.msgpack")} == set(KINDS)


if __name__ == "__main__":
    if sys.argv[1:] == ["--regen"]:
        regen()
    else:
        print(__doc__)
