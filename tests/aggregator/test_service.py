"""The aggregator service against a real Mosquitto, with fake devices speaking the wire protocol.

Each test runs the service in a background thread (``service_support.running``) on a private
fleet; devices are plain MQTT clients publishing manifests and chunks built by
``broker.chunking.upload_messages`` around payloads from ``fstq.compressors``.
"""

from __future__ import annotations

import json
import logging
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model_state_dict
from service_support import (
    Device,
    FakeClock,
    compressed,
    global_state,
    random_delta,
    running,
)

from aggregator.adapter_model import ModelLoader
from aggregator.fedavg import apply_delta, fedavg
from aggregator.settings import AggregatorSettings
from aggregator.store import AggregatorStore
from broker.chunking import Download
from broker.codec import encode
from broker.messages import AckStatus, DownlinkPlan, DownlinkRoute, GlobalChunk, UploadManifest
from fstq.compressors import decompress
from workload.adapters import adapter_from_bytes

pytestmark = pytest.mark.broker

Settings = Callable[..., AggregatorSettings]
Devices = Callable[..., list[Device]]


def _records(settings: AggregatorSettings) -> list[dict[str, Any]]:
    lines = settings.rounds_path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def _expected(
    old: dict[str, torch.Tensor], payloads: list[bytes], weights: list[float]
) -> dict[str, torch.Tensor]:
    """The reference: old + batch FedAvg of the decoded updates."""
    return apply_delta(old, fedavg([decompress(p) for p in payloads], weights))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0)


def _fetch(
    dev: Device, version: int, indices: list[int] | None
) -> tuple[DownlinkPlan, list[GlobalChunk]]:
    """The full plan of ``version`` (the device holds nothing) and its chunks (all if
    ``indices`` is None)."""
    plan = dev.fetch_plan(version)
    assert plan.route is DownlinkRoute.FULL
    return plan, dev.fetch_chunks(plan, indices)


def test_full_round_closes_early_and_publishes_the_fedavg_global(
    make_settings: Settings, devices: Devices, tiny_loader: ModelLoader
) -> None:
    # Arrange: three devices online, a fixed clock (the round closes when all arrived).
    settings = make_settings()
    clock = FakeClock()
    with running(settings, tiny_loader, clock) as agg:
        fleet = devices("d1", "d2", "d3")
        v0 = global_state(settings, 0)
        for d in fleet:
            d.online()
        started = time.perf_counter()
        ann = fleet[0].announcement(1)
        assert sorted(ann.selected) == ["d1", "d2", "d3"] and ann.global_version == 0
        assert ann.chunk_size == 1024 and ann.global_sha256 == agg.rounds.current.manifest.sha256
        manifest0 = fleet[0].global_manifest(0)
        assert manifest0.format == "safetensors-fp16"
        assert manifest0.metadata["lora_r"] == 4 and manifest0.metadata["lora_alpha"] == 8
        assert manifest0.metadata["lora_targets"] == "q_proj,v_proj"
        # Act: each device uploads one update (different methods; one duplicate chunk).
        methods = ["dense_fp32", "fstq", "dense_fp16"]
        payloads = [compressed(random_delta(v0, i), m) for i, m in enumerate(methods)]
        samples = [10, 30, 20]
        for d, payload, n, m in zip(fleet, payloads, samples, methods, strict=True):
            manifest, chunks = d.prepare(payload, round_id=1, samples=n, method=m)
            d.send_upload(manifest, chunks, dup=0 if d.name == "d1" else None)
            assert d.ack(manifest.upload_id, AckStatus.COMPLETE).have
        manifest1 = fleet[0].global_manifest(1)
        round_wall_s = time.perf_counter() - started
        # Fetch: everything, then only the chunks a device says it misses.
        plan1, everything = _fetch(fleet[1], 1, None)
        _, some = _fetch(fleet[2], 1, [0, manifest1.chunk_count - 1])
        time.sleep(0.3)  # nothing beyond the two asked for may arrive
        extra = [m for m in fleet[2].client.messages(0.2)]
    # Assert: the peft directory is old + FedAvg (weights = sample counts) ...
    expected = _expected(v0, payloads, [float(n) for n in samples])
    _assert_close(global_state(settings, 1), expected, atol=1e-6)
    base, _ = tiny_loader()
    loaded = PeftModel.from_pretrained(base, str(settings.global_dir(1)))
    state = get_peft_model_state_dict(loaded)
    _assert_close(state, expected, atol=1e-6)
    # The usual way too: adapter_config.json names a base model that loads (the tiny one's dir).
    auto = AutoPeftModelForCausalLM.from_pretrained(str(settings.global_dir(1)))
    _assert_close(get_peft_model_state_dict(auto), expected, atol=1e-6)
    # ... the downlink carries it as fp16 ...
    assert plan1.result == plan1.sha256 == manifest1.sha256
    download = Download(plan1, held=None)
    for c in everything:
        download.add(c)
    _assert_close(adapter_from_bytes(download.payload()), expected, atol=1e-3)
    assert sorted(c.index for c in some) == [0, manifest1.chunk_count - 1] and not extra
    # ... and the round's metrics tell what it cost.
    (rec,) = _records(settings)
    assert rec["status"] == "closed" and rec["global_version"] == 1
    assert rec["arrived"] == ["d1", "d2", "d3"] and rec["rejected"] == {} and rec["late"] == 0
    assert rec["duplicate_chunks"] == 1
    assert rec["uplink_payload_bytes"] == sum(len(p) for p in payloads)
    assert rec["uplink_wire_bytes"] > rec["uplink_payload_bytes"] + rec["duplicate_bytes"]
    dense = 2 * sum(t.numel() for t in v0.values())
    assert rec["clients"]["d2"]["dense_fp16_bytes"] == dense
    assert rec["clients"]["d2"]["ratio_vs_fp16"] == pytest.approx(dense / len(payloads[1]))
    assert rec["clients"]["d2"]["ratio_vs_fp16"] > 1.0 > rec["clients"]["d1"]["ratio_vs_fp16"]
    print(f"round wall time (tiny model, 3 devices): {round_wall_s:.2f}s")


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _with_nan(payload: bytes, sentinel: float) -> bytes:
    """Replace the fp32 ``sentinel`` in a dense payload by NaN and fix the CRC-32 trailer."""
    at = payload.index(struct.pack("<f", sentinel))
    body = payload[:at] + struct.pack("<f", float("nan")) + payload[at + 4 : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_bad_input_is_rejected_counted_and_logged_without_poisoning_the_sum(
    make_settings: Settings,
    devices: Devices,
    tiny_loader: ModelLoader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aggregator")
    settings = make_settings(
        rounds={"clients_per_round": 2, "min_clients": 2}, inbox={"max_total_size": 64 * 1024}
    )
    with running(settings, tiny_loader, FakeClock()) as agg:
        good1, good2, intruder = devices("good1", "good2", "intruder")
        good1.online()
        good2.online()
        assert sorted(good1.announcement(1).selected) == ["good1", "good2"]
        v0 = global_state(settings, 0)
        topic = good1.upload_topic(1)

        # Undecodable bytes cannot be answered (no upload id): counted and logged.
        good1.send(topic, b"\xc1 not msgpack")
        good1.send(topic, msgpack.packb({"v": 99, "kind": "up.manifest"}))
        _eventually(lambda: agg.counters["malformed"] == 1 and agg.counters["bad_version"] == 1)

        # A manifest declaring more than the inbox allows: refused before allocation.
        huge = UploadManifest(
            upload_id="huge", round=1, client="good1", base_version=0, total_size=1 << 20,
            chunk_count=1024, chunk_size=1024, sha256=bytes(32), sample_count=1,
            method="dense_fp32",
        )  # fmt: skip
        good1.send(topic, encode(huge))
        assert good1.ack("huge", AckStatus.REJECTED).reason == "too_large"

        # The manifest's SHA-256 does not match the chunks (each chunk's CRC is fine).
        honest = compressed(random_delta(v0, 1))
        manifest, chunks = good1.prepare(honest, round_id=1, upload_id="badsha")
        good1.send_upload(manifest.model_copy(update={"sha256": b"\x01" * 32}), chunks)
        assert good1.ack("badsha", AckStatus.REJECTED).reason == "payload_sha256"

        # A chunk nobody announced: the device is told to start from its manifest.
        good1.send(topic, encode(chunks[0].model_copy(update={"upload_id": "ghost"})))
        good1.ack("ghost", AckStatus.UNKNOWN)

        # A client that was not selected, and a manifest on someone else's topic.
        m_intruder, c_intruder = intruder.prepare(honest, round_id=1, upload_id="intr")
        intruder.send_upload(m_intruder, c_intruder)
        assert intruder.ack("intr", AckStatus.REJECTED).reason == "not_selected"
        forged, _ = good1.prepare(honest, round_id=1, upload_id="forged")
        intruder.send(intruder.upload_topic(1), encode(forged))
        assert intruder.ack("forged", AckStatus.REJECTED).reason == "origin"

        # Reassembled fine but unusable: a NaN, and tensors of the wrong shapes.
        nan_delta = random_delta(v0, 2)
        next(iter(nan_delta.values())).view(-1)[0] = 1234.5
        m_nan, c_nan = good1.prepare(_with_nan(compressed(nan_delta), 1234.5), round_id=1,
                                     upload_id="nan")  # fmt: skip
        good1.send_upload(m_nan, c_nan)
        assert good1.ack("nan", AckStatus.REJECTED).reason == "payload_decode"
        transposed = {k: t.t().contiguous() for k, t in random_delta(v0, 3).items()}
        m_shape, c_shape = good2.prepare(compressed(transposed), round_id=1, upload_id="shape")
        good2.send_upload(m_shape, c_shape)
        assert good2.ack("shape", AckStatus.REJECTED).reason == "shape_mismatch"
        good2.seen.clear()
        good2.send(good2.upload_topic(1), encode(m_shape))  # asking again gets the same verdict
        assert good2.ack("shape").status is AckStatus.REJECTED

        # The honest uploads still make the round.
        payloads = [compressed(random_delta(v0, 10)), compressed(random_delta(v0, 11))]
        for dev, payload in zip((good1, good2), payloads, strict=True):
            m, c = dev.prepare(payload, round_id=1, samples=5)
            dev.send_upload(m, c)
            dev.ack(m.upload_id, AckStatus.COMPLETE)
        good1.global_manifest(1)

        # Too late: round 1 is closed (round 2 is already open).
        good1.announcement(2)
        m_late, c_late = good1.prepare(honest, round_id=1, upload_id="late")
        good1.send_upload(m_late, c_late)
        assert good1.ack("late", AckStatus.LATE).reason == "round_closed"
        _eventually(lambda: agg.counters["late"] == 1)
        counters = dict(agg.counters)

    _assert_close(global_state(settings, 1), _expected(v0, payloads, [5.0, 5.0]), atol=1e-6)
    reasons = {
        "malformed", "bad_version", "too_large", "payload_sha256", "not_selected", "origin",
        "payload_decode", "shape_mismatch",
    }  # fmt: skip
    assert {r: counters.get(r) for r in reasons} == dict.fromkeys(reasons, 1)
    rec = _records(settings)[0]
    assert rec["rejected"] == dict.fromkeys(sorted(reasons), 1) and rec["arrived"] == sorted(
        ["good1", "good2"]
    )
    store = AggregatorStore(settings.db_path)
    assert store.rejection_counts() == {**dict.fromkeys(reasons, 1), "round_closed": 1}
    store.close()
    logged = {getattr(r, "reason", None) for r in caplog.records if r.levelno == logging.WARNING}
    assert reasons | {"round_closed"} <= logged
    assert all(hasattr(r, "round") and hasattr(r, "client") for r in caplog.records
               if getattr(r, "reason", None) in reasons)  # fmt: skip


def test_restart_resumes_the_open_round_from_the_store(
    make_settings: Settings, devices: Devices, tiny_loader: ModelLoader
) -> None:
    settings = make_settings(rounds={"clients_per_round": 2, "min_clients": 2})
    a, b = devices("a", "b")
    with running(settings, tiny_loader, FakeClock()):
        a.online()
        b.online()
        b.announcement(1)
        v0 = global_state(settings, 0)
        payloads = [compressed(random_delta(v0, 20)), compressed(random_delta(v0, 21), "fstq")]
        m_a, c_a = a.prepare(payloads[0], round_id=1, samples=3)
        a.send_upload(m_a, c_a)
        a.ack(m_a.upload_id, AckStatus.COMPLETE)
    # The service is down: b's upload waits in the aggregator's persistent broker session.
    m_b, c_b = b.prepare(payloads[1], round_id=1, samples=7, method="fstq")
    b.send_upload(m_b, c_b)
    a.seen.clear()
    with running(settings, tiny_loader, FakeClock()) as agg:
        assert agg.open_round == 1
        a.announcement(1)  # re-announced
        a.send(a.upload_topic(1), encode(m_a))  # "what do you have?" after the restart
        assert a.ack(m_a.upload_id).status is AckStatus.COMPLETE
        b.ack(m_b.upload_id, AckStatus.COMPLETE)
        a.global_manifest(1)
    _assert_close(global_state(settings, 1), _expected(v0, payloads, [3.0, 7.0]), atol=1e-6)
    (rec,) = _records(settings)
    assert rec["resumed"] and rec["arrived"] == ["a", "b"] and rec["status"] == "closed"


def test_deadline_extends_then_fails_without_quorum_and_closes_with_it(
    make_settings: Settings, devices: Devices, tiny_loader: ModelLoader, tmp_path: Path
) -> None:
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(4))
    )
    settings = make_settings(
        rounds={"quorum": 2, "round_timeout_s": 60, "extension_s": 30, "max_extensions": 1},
        eval={"path": held_out, "max_examples": 3},
    )
    clock = FakeClock()
    with running(settings, tiny_loader, clock):
        fleet = devices("d1", "d2", "d3")
        for d in fleet:
            d.online()
        first = fleet[0].announcement(1)
        v0 = global_state(settings, 0)
        m, c = fleet[0].prepare(compressed(random_delta(v0, 30)), round_id=1)
        fleet[0].send_upload(m, c)
        fleet[0].ack(m.upload_id, AckStatus.COMPLETE)
        clock.advance(61)  # deadline, 1 of quorum 2: extended and re-announced
        extended = fleet[0].wait_for(
            lambda _, msg: getattr(msg, "deadline", None) == first.deadline + 30
        )
        assert getattr(extended, "round", None) == 1
        clock.advance(31)  # out of extensions: round 1 fails, round 2 opens on v0
        assert fleet[0].announcement(2).global_version == 0
        payloads = [compressed(random_delta(v0, 31)), compressed(random_delta(v0, 32))]
        for d, payload in zip(fleet[:2], payloads, strict=True):
            m, c = d.prepare(payload, round_id=2, samples=4)
            d.send_upload(m, c)
            d.ack(m.upload_id, AckStatus.COMPLETE)
        clock.advance(61)  # deadline with quorum: closes without d3
        fleet[0].global_manifest(1)
    failed, closed = _records(settings)
    assert failed["status"] == "failed" and failed["global_version"] == 0
    assert failed["extensions"] == 1 and failed["arrived"] == ["d1"]
    assert closed["status"] == "closed" and closed["arrived"] == ["d1", "d2"]
    assert closed["round"] == 2 and closed["global_version"] == 1
    assert closed["eval"]["tokens"] > 0 and 0.0 <= closed["eval"]["accuracy"] <= 1.0
    assert closed["eval"]["loss"] > 0 and failed["eval"] is None
    _assert_close(global_state(settings, 1), _expected(v0, payloads, [4.0, 4.0]), atol=1e-6)
    assert not settings.global_dir(2).exists()
