"""Builders of fleet run records (evaluation.run_record) for the summary, target, plot and
``bench fleet --report`` tests: typed, so a renamed record field breaks these at mypy time too.
"""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.fleet_config import FleetConfig
from evaluation.run_record import (
    DeviceRound,
    FleetEval,
    FleetRound,
    FleetRun,
    MethodRun,
    RunConfig,
    Scalar,
)
from evaluation.targets import Target

__all__ = ["device", "fleet_eval", "fleet_round", "fleet_run", "method_run", "run_config"]


def fleet_eval(
    loss: float | None, accuracy: float | None = 0.3, rouge_l: float | None = 0.1
) -> FleetEval:
    return FleetEval(loss=loss, accuracy=accuracy, tokens=100, rouge_l=rouge_l, groups={})


def device(
    client: str, *, arrived: bool = True, payload_bytes: int = 0, wire_bytes: int = 0
) -> DeviceRound:
    return DeviceRound(
        client=client, compute_s=1.0, measured_s=1.5, wire_bytes=wire_bytes,
        payload_bytes=payload_bytes, rate_bps=2e6, arrived=arrived,
        dropped=None if arrived else "silent",
    )  # fmt: skip


def fleet_round(
    number: int,
    evaluation: FleetEval,
    *,
    wire: int = 1000,
    time_s: float = 2.0,
    clients: Sequence[DeviceRound] = (),
    resent: int = 0,
    downlink: int = 0,
    time_with_downlink_s: float | None = None,
    legacy: bool = False,
) -> FleetRound:
    """Round ``number``; round 0 (the initial adapter) costs nothing, whatever it is given.

    Its time with the downlink is ``time_with_downlink_s`` (default: ``time_s``); ``legacy``
    leaves it out, as records before the downlink accounting did.
    """
    trained = number > 0
    with_downlink = time_s if time_with_downlink_s is None else time_with_downlink_s
    return FleetRound(
        round=number,
        status="closed" if trained else "initial",
        selected=tuple(c.client for c in clients),
        arrived=tuple(c.client for c in clients if c.arrived),
        dropped=tuple(c.client for c in clients if c.dropped),
        uplink_wire_bytes=wire if trained else 0,
        uplink_payload_bytes=sum(c.payload_bytes for c in clients),
        uplink_resent_bytes=resent,
        device_upload_bytes=sum(c.wire_bytes for c in clients) if trained else None,
        downlink_wire_bytes=downlink,
        late=0 if trained else None,
        rejected={} if trained else None,
        clients=tuple(clients),
        server_s=0.1 if trained else 0.0,
        round_time_s=time_s if trained else 0.0,
        round_time_with_downlink_s=None if legacy else with_downlink if trained else 0.0,
        eval=evaluation,
    )


def method_run(
    method: str,
    rounds: Sequence[FleetRound],
    *,
    options: dict[str, Scalar] | None = None,
    budget_bytes: int | None = None,
    agent_peak_rss_mb: float | None = None,
) -> MethodRun:
    return MethodRun(
        method=method,
        options=options or {},
        budget_bytes=budget_bytes,
        dense_fp16_bytes=80,
        rounds=tuple(rounds),
        skipped_wait_s=0.0,
        agent_peak_rss_mb=agent_peak_rss_mb,
    )


def run_config(alpha: float = 0.1, budget_fraction: float = 0.125) -> RunConfig:
    return RunConfig.of(
        FleetConfig(alpha=alpha, budget_fraction=budget_fraction),
        budget_bytes=10,
        dense_fp16_bytes=80,
        links={"c000": 1e6},
    )


def fleet_run(
    methods: dict[str, MethodRun], target: Target | None = None, config: RunConfig | None = None
) -> FleetRun:
    return FleetRun(config=config or run_config(), methods=methods, target=target)
