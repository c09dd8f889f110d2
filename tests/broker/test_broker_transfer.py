"""The chunked-transfer protocol end to end through a real Mosquitto, both directions.

Uplink: manifest -> chunks (some lost) -> re-sent manifest -> ack with have-bitmap -> resend of
the missing chunks only -> ack "complete". Downlink: retained global manifest -> fetch request
with a wanted-bitmap -> chunks on the device's down topic -> verified adapter.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from broker import topics
from broker.chunking import (
    Download,
    chunks_for_fetch,
    chunks_missing,
    global_manifest,
    plan_messages,
    upload_messages,
)
from broker.codec import decode, encode, peek_kind
from broker.inbox import Inbox, UploadKey, check_origin
from broker.messages import (
    AckStatus,
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    UploadAck,
    UploadChunk,
    UploadManifest,
)
from broker.mqtt import MqttClient

pytestmark = pytest.mark.broker

ClientFactory = Callable[..., MqttClient]


def _serve_uploads(agg: MqttClient, inbox: Inbox, fleet: str, n: int, now: float) -> list[bytes]:
    """Aggregator side: handle ``n`` upload messages, answer with acks; return payloads."""
    done = []
    for _ in range(n):
        msg = agg.receive(10)
        assert msg is not None
        where = topics.topic_as(msg.topic, topics.UploadTopic)
        assert where is not None
        if peek_kind(msg.payload) == UploadManifest.kind:
            manifest = decode(msg.payload, expect=UploadManifest)
            check_origin(manifest, where)
            ack = inbox.open(manifest, now=now)
        else:
            chunk = decode(msg.payload, expect=UploadChunk)
            check_origin(chunk, where)
            result = inbox.add(chunk, now=now)
            if result.completed is None:
                continue
            done.append(result.completed.payload)
            ack = inbox.ack(result.key)
        agg.publish_wait(topics.ack_topic(fleet, where.client), encode(ack))
    return done


def test_upload_with_lost_chunks_recovers_by_bitmap(clients: ClientFactory, fleet: str) -> None:
    # Arrange
    agg = clients("agg-" + fleet)
    for f in topics.aggregator_filters(fleet):
        agg.subscribe(f)
    dev = clients("dev-" + fleet)
    dev.subscribe(topics.ack_topic(fleet, "d1"))
    payload = random.Random(0).randbytes(600_000)
    manifest, chunks = upload_messages(
        payload, upload_id="d1.r5.a1", round_id=5, client="d1", base_version=4, sample_count=64,
        method="fstq", chunk_size=64 * 1024,
    )  # fmt: skip
    lost = {1, 4, 7}
    up = topics.upload_topic(fleet, "d1", 5)
    inbox = Inbox()

    # Act 1: manifest and a lossy first pass
    dev.publish_wait(up, encode(manifest))
    for ch in chunks:
        if ch.index not in lost:
            dev.publish(up, encode(ch), expiry_s=300, user_properties=[("round", "5")]).wait(10)
    assert _serve_uploads(agg, inbox, fleet, 1 + len(chunks) - len(lost), now=0.0) == []
    first = decode(_next(dev), expect=UploadAck)
    assert first.status is AckStatus.RECEIVING and first.have == bytes(2)

    # Act 2: re-sending the manifest asks "what do you have?"; resend only what is missing
    dev.publish_wait(up, encode(manifest))
    assert _serve_uploads(agg, inbox, fleet, 1, now=1.0) == []
    status = decode(_next(dev), expect=UploadAck)
    resend = chunks_missing(chunks, status)
    assert [ch.index for ch in resend] == sorted(lost)
    for ch in resend:
        dev.publish_wait(up, encode(ch), expiry_s=300)
    completed = _serve_uploads(agg, inbox, fleet, len(resend), now=2.0)

    # Assert
    assert completed == [payload]
    final = decode(_next(dev), expect=UploadAck)
    assert final.status is AckStatus.COMPLETE and chunks_missing(chunks, final) == []
    assert inbox.ack(UploadKey.of(manifest)).status is AckStatus.COMPLETE


def test_global_adapter_download_by_fetch_bitmap(clients: ClientFactory, fleet: str) -> None:
    # Arrange: the aggregator publishes a retained manifest and serves fetches
    agg = clients("agg-" + fleet)
    agg.subscribe(topics.fetch_filter(fleet))
    adapter = random.Random(1).randbytes(300_000)
    manifest = global_manifest(
        adapter, version=5, round_id=5, format="safetensors-fp16", chunk_size=32 * 1024
    )
    plan, chunks = plan_messages(
        adapter, version=5, route=DownlinkRoute.FULL, plan=bytes(32), base=None,
        result=manifest.sha256, chunk_size=32 * 1024,
    )  # fmt: skip
    agg.publish_wait(topics.global_manifest_topic(fleet), encode(manifest), retain=True)
    dev = clients("dev-" + fleet)
    dev.subscribe(topics.global_manifest_topic(fleet))
    dev.subscribe(topics.down_topic(fleet, "d1"))
    announced = decode(_next(dev), expect=GlobalManifest)
    # The device asks how to get it (holding nothing); the answer is the full plan.
    dev.publish_wait(topics.fetch_topic(fleet, "d1"), encode(FetchRequest(version=5)))
    asked = agg.receive(10)
    assert asked is not None and decode(asked.payload, expect=FetchRequest).plan is None
    agg.publish(topics.down_topic(fleet, "d1"), encode(plan), expiry_s=600).wait(10)
    download = Download(decode(_next(dev), expect=DownlinkPlan), held=None)
    assert download.plan.result == announced.sha256

    # Act: fetch in windows of 4 chunks, AWS-style, until complete
    rounds = 0
    while not download.complete:
        rounds += 1
        dev.publish_wait(topics.fetch_topic(fleet, "d1"), encode(download.fetch_request(4)))
        req_msg = agg.receive(10)
        assert req_msg is not None
        fetch = topics.topic_as(req_msg.topic, topics.FetchTopic)
        assert fetch is not None
        client = fetch.client
        request = decode(req_msg.payload, expect=FetchRequest)
        answer = chunks_for_fetch(plan, chunks, request)
        for ch in answer:
            agg.publish(topics.down_topic(fleet, client), encode(ch), expiry_s=600).wait(10)
        for _ in answer:
            download.add(decode(_next(dev), expect=GlobalChunk))

    # Assert
    assert download.payload() == adapter
    assert rounds == -(-manifest.chunk_count // 4)


def _next(client: MqttClient) -> bytes:
    msg = client.receive(10)
    assert msg is not None
    return msg.payload
