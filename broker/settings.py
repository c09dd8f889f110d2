"""Connection settings for :class:`broker.mqtt.MqttClient`, built by callers (no env reads here).

Services embed :class:`MqttSettings` in their own settings through :class:`MqttServiceSettings`
(the ``[mqtt]`` table and the broker password file); this module never looks at the environment
or files itself: :class:`common.settings.ServiceSettings` says how the entry point builds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    model_validator,
)

from common.settings import ServiceSettings

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "Endpoint",
    "MqttServiceSettings",
    "MqttSettings",
    "TlsSettings",
]

#: The packet limit of every broker config the project ships (broker/mosquitto, ejabberd, nats):
#: enforced client-side too, since MQTT 3.1.1 and ejabberd's CONNACK announce none.
DEFAULT_MAX_PACKET_SIZE = 1 << 20

#: ``host:port`` of a broker node (``[v6addr]:port`` for IPv6 literals).
Endpoint = Annotated[
    str, StringConstraints(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
]


class TlsSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: CA bundle used to verify the broker; None = system trust store.
    ca_file: Path | None = None
    #: Client certificate and key (only if the broker requires certificates).
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Skip host-name verification (test setups only; the chain is still verified).
    insecure: bool = False

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    #: Other nodes of the same broker cluster, tried in turn after ``host:port`` stops
    #: answering (a reconnect tries the node it lost first, then the next one).
    failover: tuple[Endpoint, ...] = ()
    #: "5" (default) or "3.1.1" for brokers without MQTT 5 (NATS, RabbitMQ); what the 3.1.1
    #: profile does instead of each MQTT 5 feature: broker/README.md ("MQTT 3.1.1 profile").
    protocol: Literal["5", "3.1.1"] = "5"
    #: Stable client id: a persistent session (clean_start=False) is keyed on it.
    client_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsSettings | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=65535)] = 30
    #: False keeps the broker-side session (subscriptions + queued QoS 1 messages) across
    #: reconnects and restarts of this process, for ``session_expiry_s`` seconds.
    clean_start: bool = False
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 3600
    #: paho's socket connect timeout for one attempt.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    #: Reconnect delays: full jitter, ceiling doubling from backoff_base_s up to backoff_max_s.
    backoff_base_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    #: Outgoing QoS 1 messages in flight before paho queues locally (broker Receive Maximum).
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 20
    #: Client-side cap on PUBLISH packet size, checked with the broker's advertised maximum
    #: (None: only the broker's, which MQTT 3.1.1 and ejabberd do not announce).
    max_packet_size: Annotated[int, Field(ge=1)] | None = DEFAULT_MAX_PACKET_SIZE
    #: Re-publish this client's retained messages every this many seconds and after every
    #: reconnect (0: never). For brokers whose retained store is per node (ejabberd): a client
    #: of another node then sees the round and the global manifest within this period.
    republish_retained_s: Annotated[float, Field(ge=0)] = 0.0

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` of the first node, then of each ``failover`` node, in order."""
        out = [(self.host, self.port)]
        for endpoint in self.failover:
            host, _, port = endpoint.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return tuple(out)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if any(not 1 <= port <= 65535 for _, port in self.endpoints):
            raise ValueError("failover ports must be 1..65535")
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError("backoff_base_s must not exceed backoff_max_s")
        if self.password is not None and self.username is None:
            raise ValueError("password without username")
        return self


class MqttServiceSettings(ServiceSettings):
    """Base of the services' settings: the MQTT connection and its password file.

    The password is read from ``mqtt_password_file`` (systemd ``LoadCredential=``, Docker
    secrets) so it never sits in the TOML file or the unit's environment.
    """

    mqtt: MqttSettings
    #: File holding the broker password (e.g. $CREDENTIALS_DIRECTORY/mqtt_password).
    mqtt_password_file: Path | None = None

    @model_validator(mode="after")
    def _read_password(self) -> Self:
        if self.mqtt_password_file is not None:
            try:
                secret = self.mqtt_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read mqtt_password_file: {exc}") from None
            mqtt = self.mqtt.model_copy(update={"password": SecretStr(secret)})
            object.__setattr__(self, "mqtt", mqtt)
        return self
