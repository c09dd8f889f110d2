"""The fleet run record: what ``fedfstq bench fleet`` measured, as written to its ``--json`` file
(docs/evaluation/*.json) and read back by ``--report``, the summary and the plots.

:class:`FleetRun` holds the fleet's settings (:class:`RunConfig`), one :class:`MethodRun` per
compared method (its rounds, round 0 being the initial adapter) and the quality target fixed for
the comparison. Field meanings are in evaluation/README.md ("The fleet runner").
"""

from __future__ import annotations

from dataclasses import dataclass as std_dataclass
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic.dataclasses import dataclass

from aggregator.round_result import HeldOutEval, RoundStatus
from common.record import RECORD_CONFIG, RecordError, from_json, omitted_if_none, to_json
from evaluation.downlink import DownlinkRound, Route, Staleness
from evaluation.fleet_config import FleetConfig
from evaluation.targets import Target

__all__ = [
    "DeviceRound",
    "Dropout",
    "FleetEval",
    "FleetRound",
    "FleetRun",
    "MethodRun",
    "RunConfig",
    "RunRecordError",
    "Scalar",
    "read_run",
    "write_run",
]

#: How a selected device dropped out of a round (a fate other than "ok", evaluation.fleet_wire).
Dropout = Literal["silent", "halfway", "offline"]
#: A value of a method's compression settings.
Scalar = bool | int | float | str


class RunRecordError(RecordError):
    """A fleet run record missing a field or holding a wrong type."""


@std_dataclass(frozen=True, kw_only=True)
class RunConfig(FleetConfig):
    """The run's settings and what the run derived from them."""

    budget_bytes: int  # the matched budget of the budgeted methods
    dense_fp16_bytes: int  # one dense fp16 update of this LoRA
    links: dict[str, float]  # device -> uplink bit/s
    # Records before the downlink accounting have neither (None, left out of the JSON):
    # downlink / uplink rate where a trace gave no downlink (evaluation.links.DOWNLINK_ASYMMETRY)
    downlink_asymmetry: Annotated[float | None, omitted_if_none()] = None
    downlinks: Annotated[dict[str, float] | None, omitted_if_none()] = None  # device -> bit/s

    @classmethod
    def of(
        cls,
        config: FleetConfig,
        *,
        budget_bytes: int,
        dense_fp16_bytes: int,
        links: dict[str, float],
        downlink_asymmetry: float | None = None,
        downlinks: dict[str, float] | None = None,
    ) -> RunConfig:
        settings = {f.name: getattr(config, f.name) for f in fields(FleetConfig)}
        return cls(
            **settings, budget_bytes=budget_bytes, dense_fp16_bytes=dense_fp16_bytes, links=links,
            downlink_asymmetry=downlink_asymmetry, downlinks=downlinks,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class FleetEval(HeldOutEval):
    """The global adapter after a round on the held-out set: overall, per group (language or
    category), and ROUGE-L of greedy answers (None without generation examples)."""

    rouge_l: float | None
    groups: dict[str, HeldOutEval]

    def metric(self, name: str) -> float | None:
        """``loss``, ``accuracy`` or ``rouge_l`` by name; None for another name."""
        return {"loss": self.loss, "accuracy": self.accuracy, "rouge_l": self.rouge_l}.get(name)


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class DeviceRound:
    """One selected device in one round."""

    client: str
    compute_s: float | None  # CPU seconds of its round over torch's threads; None: never trained
    measured_s: float | None  # wall seconds of the same work
    wire_bytes: int  # what it put on its upload topic, re-sends included
    payload_bytes: int  # its accepted compressed update (0: none accepted)
    rate_bps: float  # its uplink
    arrived: bool
    dropped: Dropout | None
    # The downlink (absent from records before the downlink accounting: evaluation.downlink
    # reads those as a full fetch by every device that saw the round).
    downlink_bytes: int | None = omitted_if_none()  # what it received to start the round
    downlink_route: Route | None = omitted_if_none()  # None: it never saw the round
    staleness: Staleness | None = omitted_if_none()  # versions behind, or "new"
    first_contact: bool | None = omitted_if_none()  # it held nothing fetched before
    downlink_fallbacks: int | None = omitted_if_none()  # catch-ups that failed to verify
    downlink_rate_bps: float | None = omitted_if_none()  # its downlink


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class FleetRound:
    """One round of one method; round 0 is the initial adapter (no traffic, no devices)."""

    round: int
    status: Literal["initial"] | RoundStatus
    base_version: int | None = omitted_if_none()  # the global version trained on
    selected: tuple[str, ...]
    arrived: tuple[str, ...]
    dropped: tuple[str, ...]
    uplink_wire_bytes: int  # the aggregator's count: every upload packet, framing and re-sends
    uplink_payload_bytes: int
    uplink_resent_bytes: int  # chunk data of re-sent chunks (rounds.jsonl: duplicate_bytes)
    device_upload_bytes: int | None = omitted_if_none()  # the devices' count; not in round 0
    downlink_wire_bytes: int
    downlink: DownlinkRound | None = omitted_if_none()  # by route and staleness; not in round 0
    late: int | None = omitted_if_none()  # not in round 0
    rejected: dict[str, int] | None = omitted_if_none()  # not in round 0
    clients: tuple[DeviceRound, ...]
    server_s: float  # the aggregator's close (aggregation, saving the new global)
    # Simulated (evaluation/round_time): server_s + the slowest arrived device's compute and
    # upload; the key keeps the meaning it has in older records.
    round_time_s: float
    # The same with each device's download first (absent from older records).
    round_time_with_downlink_s: float | None = omitted_if_none()
    eval: FleetEval


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class MethodRun:
    """One method's run, from the shared initial adapter."""

    method: str  # the compressor (a METHODS entry's "method")
    options: dict[str, Scalar]  # its other compression settings
    budget_bytes: int | None  # None: not budgeted
    #: The aggregator's downlink settings (evaluation.fleet_config.METHODS); None: full fp16,
    #: what every record before the catch-up downlink did.
    downlink: dict[str, Scalar] | None = omitted_if_none()
    dense_fp16_bytes: int
    rounds: tuple[FleetRound, ...]
    skipped_wait_s: float | None = omitted_if_none()  # once the run ended
    agent_peak_rss_mb: float | None = omitted_if_none()  # once measured


@dataclass(frozen=True, kw_only=True, config=RECORD_CONFIG)
class FleetRun:
    """The run record: settings, methods (by label) and the quality target."""

    config: RunConfig
    methods: dict[str, MethodRun]
    target: Target | None = None


def read_run(path: Path) -> FleetRun:
    """A run record file; :class:`RunRecordError` naming the file and the first bad field."""
    return from_json(FleetRun, path.read_bytes(), str(path), RunRecordError)


def write_run(path: Path, run: FleetRun) -> None:
    """Write the run record as ``fedfstq bench fleet`` always has (one-space indent, no NaN)."""
    path.write_text(to_json(run, indent=1) + "\n")
