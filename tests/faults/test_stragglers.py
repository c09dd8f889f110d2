"""Scenario 5: stragglers and dropouts in one round, against a real Mosquitto.

Five selected devices (fake ones speaking the wire protocol, ``service_support.Device``) and an
aggregator whose clock only moves when the test says so. In round 1:

* ``good1``, ``good2`` upload on time (distinct sample counts, so a wrong weighting shows);
* ``silent`` comes online, is selected, and never sends anything;
* ``half`` sends its manifest and half of its chunks, then stops for good;
* ``late`` sends its manifest and all but one chunk before the deadline, the last one after.

At the deadline the round closes on quorum (2): global v1 must be v0 + FedAvg of exactly the two
on-time uploads; ``late`` is told ``late`` and its upload is discarded; the half upload is
discarded. Round 2 opens on v1 and closes with the four devices that upload in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from e2e_support import aggregator_settings, expected_global, read_rounds, tiny_loader, unique
from report import FaultRow
from service_support import Device, FakeClock, compressed, global_state, random_delta, running

from aggregator.store import AggregatorStore
from broker.chunking import indices_from_bitmap
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import AckStatus, UploadAck

pytestmark = [pytest.mark.broker]

NAMES = ("good1", "good2", "silent", "half", "late")
TIMEOUT_S = 60.0
ATOL = 1e-6


def _status_query(
    dev: Device, manifest: bytes, upload_id: str, have: int | None = None
) -> UploadAck:
    """Re-send a round-1 manifest ("what do you have?") and return the answer to it.

    ``have``: wait for a ``receiving`` ack holding that many chunks (acks of earlier manifests
    may still be on their way); otherwise for the first ack that is not ``receiving``.
    """
    dev.seen.clear()
    dev.send(dev.upload_topic(1), manifest)

    def answer(_: str, m: object) -> bool:
        if not isinstance(m, UploadAck) or m.upload_id != upload_id:
            return False
        if have is None:
            return m.status is not AckStatus.RECEIVING
        got = indices_from_bitmap(m.have, m.chunk_count) if m.have else []
        return m.status is AckStatus.RECEIVING and len(got) == have

    ack = dev.wait_for(answer)
    assert isinstance(ack, UploadAck)
    return ack


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.timeout(90)
def test_round_closes_on_quorum_without_the_silent_the_half_and_the_late_device(
    mosquitto: LocalBroker, tmp_path: Path, fault_report: Callable[[FaultRow], None]
) -> None:
    settings = aggregator_settings(
        mosquitto, unique("straggle"), tmp_path / "agg",
        rounds={"clients_per_round": 5, "min_clients": 5, "quorum": 2,
                "round_timeout_s": TIMEOUT_S, "heartbeat_ttl_s": 1e6, "budget_bytes": None},
    )  # fmt: skip
    clock = FakeClock()
    devices = {n: Device(mosquitto, settings.fleet, n) for n in NAMES}
    produced: dict[tuple[int, str], tuple[str, str]] = {}  # (round, client) -> (upload, sha)
    acked: list[str] = []  # upload ids the aggregator acknowledged ``complete``
    try:
        with running(settings, tiny_loader, clock) as agg:
            for d in devices.values():
                d.online()
            assert sorted(devices["good1"].announcement(1).selected) == sorted(NAMES)
            v0 = global_state(settings, 0)

            def build(name: str, round_id: int, seed: int, samples: int) -> tuple[bytes, ...]:
                payload = compressed(random_delta(v0, seed))
                m, chunks = devices[name].prepare(payload, round_id=round_id, samples=samples,
                                                  base_version=round_id - 1)  # fmt: skip
                produced[(round_id, name)] = (m.upload_id, hashlib.sha256(payload).hexdigest())
                return (payload, encode(m), *(encode(c) for c in chunks))

            def upload_complete(name: str, round_id: int, seed: int, samples: int) -> bytes:
                payload, manifest, *chunks = build(name, round_id, seed, samples)
                dev = devices[name]
                for raw in (manifest, *chunks):
                    dev.send(dev.upload_topic(round_id), raw)
                upload_id = produced[(round_id, name)][0]
                assert dev.ack(upload_id, AckStatus.COMPLETE).have
                acked.append(upload_id)
                return payload

            # Round 1: two devices on time.
            on_time = [upload_complete("good1", 1, 1, 10), upload_complete("good2", 1, 2, 30)]

            # ``half`` sends half of its chunks and is never heard from again.
            _, half_manifest, *half_chunks = build("half", 1, 3, 20)
            half_dev, half_id = devices["half"], produced[(1, "half")][0]
            for raw in (half_manifest, *half_chunks[: len(half_chunks) // 2]):
                half_dev.send(half_dev.upload_topic(1), raw)
            # ``late`` is still sending when the deadline comes: all but its last chunk.
            late_payload, late_manifest, *late_chunks = build("late", 1, 4, 40)
            late_dev, late_id = devices["late"], produced[(1, "late")][0]
            for raw in (late_manifest, *late_chunks[:-1]):
                late_dev.send(late_dev.upload_topic(1), raw)
            # Both uploads are really in progress at the aggregator (not lost on the way).
            half_ack = _status_query(half_dev, half_manifest, half_id, len(half_chunks) // 2)
            assert indices_from_bitmap(half_ack.have, half_ack.chunk_count) == list(
                range(len(half_chunks) // 2)
            )
            _status_query(late_dev, late_manifest, late_id, len(late_chunks) - 1)
            assert agg.open_round == 1 and agg.global_version == 0  # waiting for stragglers

            # The deadline: 2 of 5 arrived, quorum 2 -> closes; round 2 opens on v1.
            clock.advance(TIMEOUT_S + 1)
            devices["good1"].global_manifest(1)
            ann2 = devices["good1"].announcement(2)
            assert ann2.global_version == 1 and sorted(ann2.selected) == sorted(NAMES)

            # The late device finishes: its last chunk is answered ``late``, not stored.
            late_dev.seen.clear()
            late_dev.send(late_dev.upload_topic(1), late_chunks[-1])
            late_answer = late_dev.ack(late_id)
            assert (late_answer.status, late_answer.reason) == (AckStatus.LATE, "round_closed")
            assert _status_query(late_dev, late_manifest, late_id).status is AckStatus.LATE
            # The half device's upload is gone too (a re-sent manifest hears ``late``).
            assert _status_query(half_dev, half_manifest, half_id).status is AckStatus.LATE
            v1 = global_state(settings, 1)

            # Round 2 proceeds: everyone but ``silent`` uploads; it closes at its deadline.
            second = [
                (upload_complete(n, 2, 10 + i, 5 * (i + 1)), 5 * (i + 1))
                for i, n in enumerate(("good1", "good2", "half", "late"))
            ]
            assert agg.open_round == 2 and agg.global_version == 1
            clock.advance(TIMEOUT_S + 1)
            devices["good1"].global_manifest(2)
            late_total, late_chunks_total = (
                agg.counters["late"],
                agg.counters["round_closed_chunks"],
            )
    finally:
        for d in devices.values():
            d.close()

    # Global v1 = v0 + FedAvg of exactly the on-time uploads (weights 10 and 30) ...
    want1 = expected_global(v0, [(on_time[0], 10), (on_time[1], 30)])
    for k in want1:
        torch.testing.assert_close(v1[k], want1[k], atol=ATOL, rtol=0)
    # ... which the late upload would have changed (the check can fail).
    with_late = expected_global(v0, [(on_time[0], 10), (on_time[1], 30), (late_payload, 40)])
    assert _max_diff(want1, with_late) > 100 * ATOL
    v2 = global_state(settings, 2)
    want2 = expected_global(v1, second)
    for k in want2:
        torch.testing.assert_close(v2[k], want2[k], atol=ATOL, rtol=0)

    r1, r2 = read_rounds(settings)
    assert (r1["status"], r1["arrived"], r1["global_version"]) == ("closed", ["good1", "good2"], 1)
    assert r1["late"] == 0 and r1["rejected"] == {}
    assert (r2["status"], r2["arrived"]) == ("closed", ["good1", "good2", "half", "late"])
    assert r2["duplicate_chunks"] == 0  # the late chunk is not a re-send of anything
    assert late_total == 2  # the late device's re-sent manifest and the half device's
    assert late_chunks_total == 1  # the late device's last chunk, answered

    # The ledger: what is stored is exactly what the devices produced and was acknowledged.
    store = AggregatorStore(settings.db_path)
    try:
        stored = {
            (u.round_id, u.client_id): (u.upload_id, hashlib.sha256(u.payload).hexdigest())
            for r in (1, 2)
            for u in store.accepted_uploads(r)
        }
    finally:
        store.close()
    assert set(stored) == {(1, "good1"), (1, "good2")} | {
        (2, n) for n in ("good1", "good2", "half", "late")
    }
    corrupted = sum(stored[k] != produced[k] for k in stored)
    lost = set(acked) - {uid for uid, _ in stored.values()}
    assert corrupted == 0 and not lost
    fault_report(
        FaultRow(
            scenario="5 stragglers/dropouts",
            rounds_completed=len([r for r in (r1, r2) if r["status"] == "closed"]),
            uploads_acknowledged=len(acked),
            uploads_aggregated=len(stored),
            bytes_resent=0,  # no device re-sends a chunk here
            corrupted_aggregated=corrupted,
            acknowledged_lost=len(lost),
            notes="silent + half-upload + past-deadline devices; quorum close; late/half dropped",
        )
    )
