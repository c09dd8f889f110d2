"""The aggregator's Prometheus endpoint, scraped over HTTP while a real round runs."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import Device, FakeClock, compressed, global_state, random_delta, running

from aggregator.adapter_model import ModelLoader
from aggregator.metrics import RoundMetrics
from aggregator.prometheus import NAMESPACE, ServiceMetrics
from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings
from broker.local import free_port
from broker.messages import AckStatus

pytestmark = pytest.mark.broker

Settings = Callable[..., AggregatorSettings]
Devices = Callable[..., list[Device]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(agg: Aggregator) -> Samples:
    address = agg.prometheus.address
    assert address is not None
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name.removeprefix(NAMESPACE + "_"), tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _until(agg: Aggregator, check: Callable[[Samples], bool], timeout: float = 10) -> Samples:
    deadline = time.monotonic() + timeout
    while not check(samples := _scrape(agg)):
        assert time.monotonic() < deadline, "metrics did not reach the expected state"
        time.sleep(0.05)
    return samples


def test_metrics_endpoint_counts_a_round_as_it_happens(
    make_settings: Settings, devices: Devices, tiny_loader: ModelLoader
) -> None:
    settings = make_settings(
        metrics_port=free_port(), rounds={"clients_per_round": 2, "min_clients": 2}
    )
    with running(settings, tiny_loader, FakeClock()) as agg:
        assert agg.prometheus.address == ("127.0.0.1", settings.metrics_port)  # loopback default
        before = _scrape(agg)
        assert _get(before, "rounds_opened_total") == 0 and _get(before, "global_version") == 0
        d1, d2, intruder = devices("d1", "d2", "intruder")
        d1.online()
        d2.online()
        assert sorted(d1.announcement(1).selected) == ["d1", "d2"]
        opened = _scrape(agg)
        assert _get(opened, "rounds_opened_total") == 1
        assert _get(opened, "clients_selected_total") == 2
        assert _get(opened, "current_round") == 1 and _get(opened, "round_open") == 1
        assert _get(opened, "round_selected_clients") == 2
        assert _get(opened, "clients_live") == 2  # the intruder has not said anything yet

        v0 = global_state(settings, 0)
        m_bad, c_bad = intruder.prepare(compressed(random_delta(v0, 9)), round_id=1)
        intruder.send_upload(m_bad, c_bad)
        assert intruder.ack(m_bad.upload_id, AckStatus.REJECTED).reason == "not_selected"
        m1, c1 = d1.prepare(compressed(random_delta(v0, 1)), round_id=1)
        d1.send_upload(m1, c1, dup=0)
        d1.ack(m1.upload_id, AckStatus.COMPLETE)
        # Mid-round: one upload in, one refused, the duplicate chunk counted as re-sent.
        mid = _until(agg, lambda s: _get(s, "uplink_received_bytes_total", kind="resent") > 0)
        assert _get(mid, "clients_arrived_total") == 1
        assert _get(mid, "uploads_rejected_total", reason="not_selected") == 1
        assert _get(mid, "upload_completion_seconds_count") == 1
        assert _get(mid, "uplink_received_bytes_total", kind="resent") == len(c1[0].data)
        assert _get(mid, "rounds_closed_total", status="closed") == 0

        m2, c2 = d2.prepare(compressed(random_delta(v0, 2)), round_id=1)
        d2.send_upload(m2, c2)
        d2.ack(m2.upload_id, AckStatus.COMPLETE)
        d1.global_manifest(1)
        d1.announcement(2)  # both stay live, so round 2 opens right away
        after = _until(agg, lambda s: _get(s, "rounds_opened_total") == 2)
        # d2 fetches the new global: the downlink split adds up to the round's downlink bytes.
        got = {m.index: len(m.data) for m in d2.fetch_chunks(d2.fetch_plan(1))}
        down = _until(agg, lambda s: _get(s, "downlink_sent_bytes_total", kind="payload") > 0)
        down_wire = agg.rounds.metrics.downlink_wire_bytes
        assert _get(down, "downlink_sent_bytes_total", kind="payload") == sum(got.values())
        assert sum(_get(down, "downlink_sent_bytes_total", kind=k) for k in
                   ("payload", "framing")) == down_wire  # fmt: skip

    assert agg.prometheus.address is None  # the endpoint stops with the service
    assert _get(after, "rounds_closed_total", status="closed") == 1
    assert _get(after, "rounds_closed_total", status="failed") == 0
    assert _get(after, "clients_arrived_total") == 2
    assert _get(after, "aggregation_seconds_count") == 1
    assert _get(after, "global_version") == 1 and _get(after, "current_round") == 2
    assert _get(after, "round_selected_clients") == 2 and _get(after, "clients_live") == 3
    # The byte split adds up to the round's record: payload + re-sent + framing = wire bytes.
    rec = json.loads(settings.rounds_path.read_text().splitlines()[0])
    kinds = {k: _get(after, "uplink_received_bytes_total", kind=k) for k in
             ("payload", "resent", "framing")}  # fmt: skip
    assert kinds["payload"] == rec["uplink_payload_bytes"]
    assert kinds["resent"] == rec["duplicate_bytes"]
    assert sum(kinds.values()) == rec["uplink_wire_bytes"]
    assert _get(after, "round_duration_seconds_count", status="closed") == 1
    assert _get(after, "round_duration_seconds_sum", status="closed") == rec["duration_s"]
    assert _get(after, "round_duration_seconds_count", status="failed") == 0


def test_metrics_are_off_by_default_and_private_to_each_instance(
    make_settings: Settings, tiny_loader: ModelLoader
) -> None:
    a = Aggregator(make_settings(), model_loader=tiny_loader)
    b = Aggregator(make_settings(), model_loader=tiny_loader)
    assert a.prometheus.address is None and a.settings.metrics_port == 0
    a.prometheus.rejection("origin", late=False)
    assert a.prometheus.registry is not b.prometheus.registry
    value = b.prometheus.registry.get_sample_value(
        f"{NAMESPACE}_uploads_rejected_total", {"reason": "origin"}
    )
    assert value is None


def test_round_gauges_follow_a_resumed_round_and_its_failure() -> None:
    m = ServiceMetrics("f")

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(f"{NAMESPACE}_{name}", labels)

    m.state(7, frozenset({"a", "b", "c"}), 4)  # restarted with round 7 open on v4
    assert value("round_open") == 1 and value("round_selected_clients") == 3
    assert value("current_round") == 7 and value("global_version") == 4
    failed = RoundMetrics(7, 4, ("a",), 0.0).record(
        status="failed", global_version=4, closed_at=420
    )
    m.ended(failed)
    assert value("round_open") == 0 and value("round_selected_clients") == 0
    assert value("round_duration_seconds_sum", status="failed") == 420.0
    assert value("round_duration_seconds_bucket", status="failed", le="300.0") == 0
    assert value("round_duration_seconds_bucket", status="failed", le="420.0") == 1
    assert value("aggregation_seconds_count") == 0  # a failed round aggregates nothing
    m.state(7, None, 4)
    assert value("round_open") == 0 and value("round_selected_clients") == 0
