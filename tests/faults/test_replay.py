"""Scenario 6: duplicated, reordered and replayed upload messages change nothing.

The same two rounds of uploads (devices ``a`` and ``b``, fake ones speaking the wire protocol
through a real Mosquitto, same payloads, same completion order) are played twice, each against
its own aggregator: once cleanly, once with every duplicate, reordering and replay below. The
global adapters of the two runs must be identical bit for bit, and equal (to float32 rounding)
to old + FedAvg of exactly the intended uploads; the service must count what it refused.

Faults of the second run:

1. chunks before their manifest (not buffered: ``unknown``), then all chunks shuffled, each
   sent twice, and the manifest re-sent mid-way;
2. a whole upload replayed right after it completed;
3. in round 2, a whole round-1 upload replayed verbatim on its round-1 topic (valid CRCs and
   SHA-256: answered ``complete`` from the store, not counted again);
4. round-1 chunks replayed on the round-2 topic (``origin``), and a round-1 upload
   re-announced for round 2 on its old base version (``base_version``; its chunks ``unknown``);
5. a second, different upload by a device that already has one this round (``duplicate``);
6. chunks in reverse order; and after round 2, both round-2 uploads replayed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_support import aggregator_settings, expected_global, read_rounds, tiny_loader, unique
from report import FaultRow
from service_support import Device, FakeClock, compressed, global_state, random_delta, running

from aggregator.service import Aggregator
from aggregator.store import AggregatorStore
from broker.codec import encode
from broker.local import LocalBroker
from broker.messages import AckStatus, UploadAck, UploadChunk, UploadManifest, WireMessage

pytestmark = [pytest.mark.broker]

ATOL = 1e-6
SAMPLES = {"a": 10, "b": 30}
SEEDS = {(1, "a"): 1, (1, "b"): 2, (2, "a"): 3, (2, "b"): 4}


@dataclass
class Upload:
    manifest: UploadManifest
    chunks: tuple[UploadChunk, ...]
    payload: bytes


@dataclass
class Run:
    """What one play-through left behind."""

    globals: list[dict[str, torch.Tensor]]
    records: list[dict[str, Any]]
    counters: dict[str, int]
    stored: dict[tuple[int, str], tuple[str, str]]  # (round, client) -> (upload, payload sha)
    uploads: dict[tuple[int, str], Upload]
    acked: list[str] = field(default_factory=list)
    resent_bytes: int = 0
    unknown_acks: int = 0


class Sender:
    """Publishes upload messages for the fake devices; tallies the payload bytes of chunks
    sent again (a chunk of the same round, upload and index as one sent before)."""

    def __init__(self) -> None:
        self.sent: set[tuple[int, str, int]] = set()
        self.resent_bytes = 0

    def __call__(self, dev: Device, topic_round: int, msgs: Sequence[WireMessage]) -> None:
        for msg in msgs:
            raw = encode(msg)
            if isinstance(msg, UploadChunk):
                key = (msg.round, msg.upload_id, msg.index)
                self.resent_bytes += len(msg.data) if key in self.sent else 0
                self.sent.add(key)
            dev.send(dev.upload_topic(topic_round), raw)


def answer(dev: Device, upload_id: str, status: AckStatus, reason: str = "") -> None:
    """Wait for that ack (callers clear ``dev.seen`` before sending what it answers)."""
    dev.wait_for(
        lambda _, m: (
            isinstance(m, UploadAck)
            and (m.upload_id, m.status, m.reason) == (upload_id, status, reason)
        )
    )


def play(broker: LocalBroker, root: Path, *, faults: bool) -> Run:
    settings = aggregator_settings(
        broker, unique("replay"), root,
        rounds={"clients_per_round": 2, "min_clients": 2, "quorum": 2, "round_timeout_s": 60,
                "heartbeat_ttl_s": 1e6, "budget_bytes": None, "max_rounds": 0},
    )  # fmt: skip
    devs = {n: Device(broker, settings.fleet, n) for n in ("a", "b")}
    send = Sender()
    uploads: dict[tuple[int, str], Upload] = {}
    acked: list[str] = []
    unknown_acks = 0
    try:
        with running(settings, tiny_loader, FakeClock()) as agg:
            for d in devs.values():
                d.online()
            devs["a"].announcement(1)
            # Sorted: the tensor order of a loaded adapter varies, the draws must not.
            v0 = dict(sorted(global_state(settings, 0).items()))
            for (r, n), seed in SEEDS.items():
                payload = compressed(random_delta(v0, seed))
                m, chunks = devs[n].prepare(payload, round_id=r, base_version=r - 1,
                                            samples=SAMPLES[n], upload_id=f"{n}-r{r}")  # fmt: skip
                uploads[(r, n)] = Upload(m, chunks, payload)

            def complete(n: str, r: int, order: Sequence[WireMessage]) -> None:
                dev = devs[n]
                dev.seen.clear()
                send(dev, r, order)
                answer(dev, uploads[(r, n)].manifest.upload_id, AckStatus.COMPLETE)
                acked.append(uploads[(r, n)].manifest.upload_id)

            def replay_complete(n: str, topic_round: int, up: Upload) -> None:
                """A whole upload replayed, its manifest again at the end: both manifests are
                answered ``complete`` from the store, the second after every replayed chunk
                was handled (one device's messages are handled in order)."""
                dev = devs[n]
                dev.seen.clear()
                send(dev, topic_round, (up.manifest, *up.chunks, up.manifest))
                for _ in range(2):
                    answer(dev, up.manifest.upload_id, AckStatus.COMPLETE)
                    dev.seen.clear()  # wait_for stops at the first match: the next is queued

            # Round 1: b, then a.
            b1, a1 = uploads[(1, "b")], uploads[(1, "a")]
            complete("b", 1, (b1.manifest, *b1.chunks))
            if faults:
                replay_complete("b", 1, b1)  # fault 2
                shuffled = list(a1.chunks)
                random.Random(6).shuffle(shuffled)
                devs["a"].seen.clear()
                send(devs["a"], 1, shuffled[:3])  # fault 1: before the manifest
                devs["a"].ack(a1.manifest.upload_id, AckStatus.UNKNOWN)
                unknown_acks += 1
                half = len(shuffled) // 2
                doubled = [c for c in shuffled[:half] for _ in (0, 1)]
                send(devs["a"], 1, (a1.manifest, *doubled, a1.manifest))
                rest = [c for c in shuffled[half:] for _ in (0, 1)]
                complete("a", 1, rest)
            else:
                complete("a", 1, (a1.manifest, *a1.chunks))
            devs["a"].global_manifest(1)
            devs["a"].announcement(2)

            # Round 2: a, then b.
            a2, b2 = uploads[(2, "a")], uploads[(2, "b")]
            complete("a", 2, (a2.manifest, *a2.chunks))
            if faults:
                replay_complete("a", 1, a1)  # fault 3
                b = devs["b"]
                b.seen.clear()
                # Fault 4: round-1 chunks on the round-2 topic, then the round-1 upload
                # relabelled round 2 (base_version 0; the round is on v1). b's messages are
                # handled in order, so the answer to the latter comes after all the former.
                relabel = {"round": 2}
                stale = b1.manifest.model_copy(update=relabel)
                send(b, 2, (*b1.chunks, stale, *(c.model_copy(update=relabel) for c in b1.chunks)))
                answer(b, stale.upload_id, AckStatus.REJECTED, "base_version")
                b.ack(stale.upload_id, AckStatus.UNKNOWN)  # its chunks: no such upload
                unknown_acks += 1
                other = uploads[(1, "a")].payload  # fault 5: a second upload by ``a``
                m, chunks = devs["a"].prepare(other, round_id=2, base_version=1, upload_id="a-2nd")
                devs["a"].seen.clear()
                send(devs["a"], 2, (m, *chunks))
                answer(devs["a"], "a-2nd", AckStatus.REJECTED, "duplicate")
                complete("b", 2, (b2.manifest, *reversed(b2.chunks)))  # fault 6
            else:
                complete("b", 2, (b2.manifest, *b2.chunks))
            devs["a"].global_manifest(2)
            devs["a"].announcement(3)
            if faults:  # fault 6: after the round, both of its uploads again
                replay_complete("a", 2, a2)
                replay_complete("b", 2, b2)
            assert agg.global_version == 2 and agg.open_round == 3
            counters = dict(agg.counters)
            arrived3 = _arrived(agg)
    finally:
        for d in devs.values():
            d.close()
    assert arrived3 == frozenset()  # nothing replayed counts for the next round
    store = AggregatorStore(settings.db_path)
    try:
        stored = {
            (u.round_id, u.client_id): (u.upload_id, hashlib.sha256(u.payload).hexdigest())
            for r in (1, 2, 3)
            for u in store.accepted_uploads(r)
        }
        ledger = store.rejection_counts()
    finally:
        store.close()
    rejections = {k: v for k, v in counters.items() if k in ledger}
    assert rejections == ledger  # every refusal counted is also recorded
    return Run(
        [global_state(settings, v) for v in (0, 1, 2)], read_rounds(settings), counters, stored,
        uploads, acked, send.resent_bytes, unknown_acks,
    )  # fmt: skip


def _arrived(agg: Aggregator) -> frozenset[str]:
    rnd = agg.rounds.round
    assert rnd is not None
    return rnd.state.arrived


@pytest.mark.timeout(120)
def test_duplicates_reordering_and_replays_change_nothing(
    mosquitto: LocalBroker, tmp_path: Path, fault_report: Callable[[FaultRow], None]
) -> None:
    clean = play(mosquitto, tmp_path / "clean", faults=False)
    faulty = play(mosquitto, tmp_path / "faulty", faults=True)

    # The globals of the faulty run are those of the clean run, bit for bit ...
    for version, (want, got) in enumerate(zip(clean.globals, faulty.globals, strict=True)):
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (version, k)
    # ... and old + FedAvg of exactly the intended uploads (an independent reference).
    v0, v1, v2 = faulty.globals
    ups = faulty.uploads
    for r, (old, new) in enumerate(((v0, v1), (v1, v2)), start=1):
        want = expected_global(old, [(ups[(r, n)].payload, SAMPLES[n]) for n in ("a", "b")])
        for k in want:
            torch.testing.assert_close(new[k], want[k], atol=ATOL, rtol=0)
        assert max(float((new[k] - old[k]).abs().max()) for k in new) > 100 * ATOL  # it moved

    # Exactly the intended uploads are stored, byte for byte as the devices produced them.
    produced = {
        k: (u.manifest.upload_id, hashlib.sha256(u.payload).hexdigest()) for k, u in ups.items()
    }
    assert faulty.stored == produced == clean.stored
    corrupted = sum(faulty.stored[k] != produced[k] for k in faulty.stored)
    lost = set(faulty.acked) - {uid for uid, _ in faulty.stored.values()}
    assert corrupted == 0 and not lost

    # The service counted what it saw: every repeat of a chunk as a duplicate (charged to the
    # round open when it arrived), every refusal by its reason.
    n_a, n_b = len(ups[(1, "a")].chunks), len(ups[(1, "b")].chunks)
    r1, r2 = faulty.records
    # a's doubled chunks + b's replay; the second copy of a's completing chunk comes after
    # the round closed (the loop ticks between two messages), with a's round-1 replay.
    assert r1["duplicate_chunks"] == (n_a - 1) + n_b
    assert r2["duplicate_chunks"] == 1 + n_a
    assert clean.records[0]["duplicate_chunks"] == clean.records[1]["duplicate_chunks"] == 0
    assert all(r["status"] == "closed" and r["arrived"] == ["a", "b"] for r in faulty.records)
    assert r1["rejected"] == {} and r1["late"] == 0
    assert r2["rejected"] == {"origin": n_b, "base_version": 1, "duplicate": 1}
    for reason, n in r2["rejected"].items():
        assert faulty.counters[reason] == n
    assert not {"origin", "base_version", "duplicate"} & clean.counters.keys()
    assert faulty.unknown_acks == 2 and faulty.resent_bytes > 0

    fault_report(
        FaultRow(
            scenario="6 duplicates/reorder/replay",
            rounds_completed=len(faulty.records),
            uploads_acknowledged=len(faulty.acked),
            uploads_aggregated=len(faulty.stored),
            bytes_resent=faulty.resent_bytes,
            corrupted_aggregated=corrupted,
            acknowledged_lost=len(lost),
            notes=f"globals bit-identical to a clean run; {r1['duplicate_chunks']}+"
            f"{r2['duplicate_chunks']} duplicate chunks, {sum(r2['rejected'].values())} refused",
        )
    )
