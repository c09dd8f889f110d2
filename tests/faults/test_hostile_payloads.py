"""Scenario 7: hostile payloads on the upload topic, published by the real ``mosquitto_pub``.

A real aggregator (tiny model, clip_norm set) runs a round with two selected devices: ``evil``
and ``good``. Every hostile message goes through Mosquitto's own command-line client (MQTT v5,
QoS 1, bytes from stdin), so nothing of ours shapes the bytes on the wire. For each one the test
checks the rejection reason in the lifetime counters, the store's rejection ledger and the log,
and that the inbox holds no reserved bytes afterwards. The huge-norm upload is not rejected but
clipped: the new global moves by at most ``clip_norm``. Afterwards ``good``'s legitimate upload
completes and the round closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import resource
import shutil
import struct
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from e2e_support import aggregator_settings, tiny_loader, unique
from report import FaultRow
from service_support import Device, compressed, global_state, random_delta, running

from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import PROTOCOL_VERSION, AckStatus, UploadManifest

pytestmark = [pytest.mark.broker]

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
CLIP = 0.5
MiB = 1 << 20


def mosquitto_pub(broker: LocalBroker, topic: str, payload: bytes) -> None:
    """Publish ``payload`` with the real third-party client (QoS 1, MQTT v5, stdin)."""
    done = subprocess.run(
        [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic,
         "-s", "-q", "1", "-V", "mqttv5", "-i", unique("hostile-pub")],
        input=payload, capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def raw_manifest(version: int = PROTOCOL_VERSION, **fields: Any) -> bytes:
    """A manifest envelope packed by hand: no pydantic validation on the way out."""
    body = {"v": version, "kind": "up.manifest", **fields}
    packed = msgpack.packb(body, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def with_fp32(payload: bytes, old: float, new: float) -> bytes:
    """A dense_fp32 payload with one value replaced and its CRC32 trailer recomputed."""
    needle = struct.pack("<f", old)
    i = payload.find(needle)
    assert i >= 0, "value not found in the payload"
    body = payload[:i] + struct.pack("<f", new) + payload[i + 4 : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_hostile_uploads_are_rejected_bounded_and_the_round_still_closes(
    mosquitto: LocalBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault_report: Callable[[FaultRow], None],
) -> None:
    # Arrange: two selected devices; clip_norm bounds any accepted update.
    fleet = unique("hostile")
    settings: AggregatorSettings = aggregator_settings(
        mosquitto, fleet, tmp_path / "agg",
        rounds={"clients_per_round": 2, "min_clients": 2, "heartbeat_ttl_s": 1e6,
                "budget_bytes": None},
        clip_norm=CLIP,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="aggregator")
    evil = Device(mosquitto, fleet, "evil")
    good = Device(mosquitto, fleet, "good")
    try:
        with running(settings, tiny_loader) as agg:
            for d in (evil, good):
                d.online()
            ann = evil.announcement(1)
            assert sorted(ann.selected) == ["evil", "good"]
            v0 = global_state(settings, 0)
            topic = evil.upload_topic(1)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            reserved: list[int] = []

            def hostile(payload: bytes, reason: str) -> None:
                """Publish, wait until ``reason`` is counted once more, check the inbox."""
                before = agg.counters[reason]
                mosquitto_pub(mosquitto, topic, payload)
                wait(lambda: agg.counters[reason] > before, f"a {reason!r} rejection")
                reserved.append(agg._inbox.reserved_bytes)

            def upload(payload: bytes, upload_id: str) -> tuple[UploadManifest, AckStatus]:
                m, chunks = evil.prepare(
                    payload, round_id=1, upload_id=upload_id, chunk_size=64 * 1024
                )
                for msg in (m, *chunks):
                    mosquitto_pub(mosquitto, topic, encode(msg))
                ack = evil.wait_for(
                    lambda _, a: (
                        getattr(a, "upload_id", None) == upload_id
                        and getattr(a, "status", None) in (AckStatus.COMPLETE, AckStatus.REJECTED)
                    )
                )
                reserved.append(agg._inbox.reserved_bytes)
                return m, ack.status  # type: ignore[attr-defined]

            # Act 1: undecodable / wrong-protocol messages (no upload id: counted and logged).
            junk = random.Random(7).randbytes(4096)
            hostile(b"\xc1" + junk, "malformed")  # 0xc1 is never valid msgpack
            good_manifest, _ = evil.prepare(b"x" * 5000, round_id=1, upload_id="trunc")
            hostile(encode(good_manifest)[:-7], "malformed")  # truncated msgpack
            fields = {**good_manifest.model_dump(), "upload_id": "v2"}
            hostile(raw_manifest(PROTOCOL_VERSION + 1, **fields), "bad_version")
            # Act 2: manifests whose declared sizes would exhaust memory.
            sha = b"\x00" * 32
            common = dict(round=1, client="evil", base_version=0, sha256=sha, sample_count=1,
                          method="dense_fp32", metadata={})  # fmt: skip
            hostile(raw_manifest(upload_id="huge-size", total_size=1 << 30, chunk_count=128,
                                 chunk_size=8 * MiB, **common), "too_large")  # fmt: skip
            hostile(raw_manifest(upload_id="absurd-size", total_size=1 << 62, chunk_count=1,
                                 chunk_size=1 << 62, **common), "invalid_fields")  # fmt: skip
            hostile(raw_manifest(upload_id="many-chunks", total_size=1 << 16, chunk_count=1 << 16,
                                 chunk_size=1, **common), "too_many_chunks")  # fmt: skip
            hostile(raw_manifest(upload_id="absurd-chunks", total_size=1 << 40,
                                 chunk_count=1 << 40, chunk_size=1, **common),
                    "invalid_fields")  # fmt: skip
            # Act 3: complete uploads whose decoded update is unacceptable.
            base = {k: torch.full_like(t, 0.25) for k, t in v0.items()}
            dense = compressed(base, "dense_fp32")
            # The payload decoder already refuses non-finite values (``payload_decode``); the
            # aggregator's own ``non_finite`` check is the second line behind it.
            for bad in (float("nan"), float("inf"), float("-inf")):
                before = agg.counters["payload_decode"] + agg.counters["non_finite"]
                _, status = upload(with_fp32(dense, 0.25, bad), f"nonfinite-{bad}")
                after = agg.counters["payload_decode"] + agg.counters["non_finite"]
                assert status is AckStatus.REJECTED and after == before + 1
            # Wrong shapes: one tensor short of a column, one transposed (same element count;
            # a larger shape is already refused by the decoder's element limit).
            name = sorted(v0)[0]
            rows, cols = v0[name].shape
            assert rows != cols
            for i, shape in enumerate(((rows, cols - 1), (cols, rows))):
                misshapen = {**base, name: torch.zeros(shape)}
                before = agg.counters["shape_mismatch"]
                _, status = upload(compressed(misshapen, "dense_fp32"), f"misshapen-{i}")
                assert status is AckStatus.REJECTED
                assert agg.counters["shape_mismatch"] == before + 1
            # ... and one accepted but clipped: a huge norm.
            huge = {k: 1e4 * t for k, t in random_delta(v0, 99).items()}
            assert norm(huge) > 1000 * CLIP
            huge_payload = compressed(huge, "dense_fp32")
            _, status = upload(huge_payload, "huge-norm")
            assert status is AckStatus.COMPLETE
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # Act 4: the legitimate device still gets through and the round closes.
            legit = compressed(random_delta(v0, 1), "dense_fp32")
            m, chunks = good.prepare(legit, round_id=1, samples=10)
            good.send_upload(m, chunks)
            assert good.ack(m.upload_id, AckStatus.COMPLETE).have
            # What the devices produced, of the two uploads the aggregator acknowledged.
            acked = {("evil", "huge-norm"): huge_payload, ("good", m.upload_id): legit}
            good.global_manifest(1)
            wait(lambda: agg.global_version == 1, "the round to close")
            counters = Counter(agg.counters)
        # Assert: every hostile message was rejected for its reason and left nothing reserved.
        assert reserved and all(r == 0 for r in reserved), reserved
        assert (rss_after - rss_before) < 50 * 1024, f"maxrss grew {rss_after - rss_before} KiB"
        expected = {"malformed": 2, "bad_version": 1, "too_large": 1, "invalid_fields": 2,
                    "too_many_chunks": 1, "payload_decode": 3, "shape_mismatch": 2}  # fmt: skip
        for reason, n in expected.items():
            assert counters[reason] == n, (reason, counters)
        store = AggregatorStore(settings.db_path)
        try:
            ledger = store.rejection_counts()
            stored = {(u.client_id, u.upload_id): u.payload for u in store.accepted_uploads(1)}
        finally:
            store.close()
        for reason, n in expected.items():
            assert ledger.get(reason) == n, (reason, ledger)
        logged = Counter(
            getattr(r, "reason", None) for r in caplog.records if r.levelno >= logging.WARNING
        )
        for reason, n in expected.items():
            assert logged[reason] >= n, (reason, logged)
        nan_lines = [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
        assert len(nan_lines) == 3, [r.getMessage() for r in nan_lines]
        # The global moved by at most clip_norm (a convex mix of updates each <= CLIP).
        v1 = global_state(settings, 1)
        moved = norm({k: v1[k].double() - v0[k].double() for k in v0})
        assert 0 < moved <= CLIP * (1 + 1e-5), moved
        (record,) = [json.loads(line) for line in settings.rounds_path.read_text().splitlines()]
        assert record["status"] == "closed" and record["clipped"] == 1
        assert sorted(record["clients"]) == ["evil", "good"]
        # The reliability row: the acknowledged uploads are stored as produced, none is lost.
        corrupted = sum(
            hashlib.sha256(stored[k]).digest() != hashlib.sha256(p).digest()
            for k, p in acked.items()
            if k in stored
        )
        lost = len(acked.keys() - stored.keys())
        assert corrupted == 0 and lost == 0 and stored.keys() == acked.keys()
        fault_report(
            FaultRow(
                scenario="7 hostile payloads",
                rounds_completed=1,
                uploads_acknowledged=len(acked),
                uploads_aggregated=len(stored),
                bytes_resent=0,  # nothing is re-sent: every hostile message is new
                corrupted_aggregated=corrupted,
                acknowledged_lost=lost,
                notes=f"{sum(expected.values())} hostile messages rejected by reason, "
                "1 huge-norm update clipped",
            )
        )
    finally:
        evil.close()
        good.close()
