"""A private Mosquitto on a free loopback port, rendered from the project's config files.

Used by the test fixtures and by local simulations::

    with LocalBroker("dev") as b:
        settings = MqttSettings(host=b.host, port=b.port, client_id="dev-1")

:func:`render_config` keeps every line of ``dev.conf`` / ``prod.conf`` except the directives it
overrides (listener, persistence location, logging, password/ACL/TLS paths), so the limits under
test are the production ones. The broker is stopped by PID: SIGTERM (Mosquitto saves its
persistence database), then SIGKILL after a grace period. :meth:`LocalBroker.restart` brings it
back on the same port with the same persistence directory; :meth:`LocalBroker.kill` simulates a
crash. The clustered brokers have their own launchers (:mod:`broker.local_ejabberd`,
:mod:`broker.local_nats`); :mod:`broker.local_setups` names every setup the tests run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from broker._local_process import (
    BrokerError,
    LocalService,
    NodeProcess,
    find_binary,
    free_port,
    port_open,
    wait_until,
)
from broker.mosquitto import DEV_CONF, PROD_CONF

__all__ = [
    "BrokerError",
    "LocalBroker",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "render_config",
]

_TLS_DIRECTIVES = (
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "tls_version",
    "ciphers",
    "require_certificate",
    "use_identity_as_username",
    "crlfile",
)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


def find_mosquitto() -> str:
    """Path of the mosquitto binary (PATH, then /usr/sbin); BrokerError if missing."""
    return find_binary(
        "mosquitto",
        "apt-get install -y mosquitto mosquitto-clients",
        ("/usr/sbin", "/usr/local/sbin"),
    )


def render_config(
    template: str, overrides: Mapping[str, str | None], *, append: Sequence[str] = ()
) -> str:
    """Rewrite a mosquitto.conf text.

    For each directive in ``overrides``: its first occurrence is replaced in place by
    ``"<directive> <value>"`` (later occurrences are dropped); ``None`` drops every occurrence;
    a directive absent from the template is appended at the end (after the listener, so
    listener-scoped settings apply to it). ``append`` lines are added last.
    """
    out: list[str] = []
    done: set[str] = set()
    for line in template.splitlines():
        words = line.split(None, 1)
        key = words[0] if words and not words[0].startswith("#") else None
        if key is None or key not in overrides:
            out.append(line)
            continue
        value = overrides[key]
        if value is not None and key not in done:
            out.append(f"{key} {value}")
        done.add(key)
    out += [f"{k} {v}" for k, v in overrides.items() if v is not None and k not in done]
    out += list(append)
    return "\n".join(out) + "\n"


class LocalBroker(LocalService):
    """A Mosquitto process owned by this object (one workdir, one port)."""

    host = "127.0.0.1"

    def __init__(
        self,
        config: str | Path = "dev",
        *,
        workdir: Path | None = None,
        port: int | None = None,
        persistence: bool = True,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: TlsFiles | None = None,
        overrides: Mapping[str, str | None] | None = None,
        extra: Sequence[str] = (),
        start_timeout_s: float = 10.0,
        binary: str | None = None,
    ) -> None:
        named = {"dev": DEV_CONF, "prod": PROD_CONF}
        self.template = (
            named[config] if isinstance(config, str) and config in named else Path(config)
        )
        super().__init__(workdir, "fstq-mosquitto-")
        self.port = port or 0
        self._fixed_port = port is not None
        self.persistence = persistence
        self.password_file, self.acl_file, self.tls = password_file, acl_file, tls
        self.overrides = dict(overrides or {})
        self.extra = tuple(extra)
        self.start_timeout_s = start_timeout_s
        self.binary = binary or find_mosquitto()
        if not os.access(self.binary, os.X_OK):
            raise BrokerError(f"mosquitto binary {self.binary!r} is not executable")
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.output_path = self.workdir / "output.log"
        self.data_dir = self.workdir / "data"
        self._proc = NodeProcess([self.binary, "-c", str(self.conf_path)], self.output_path)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> Self:
        """Render the config, start Mosquitto, wait until it accepts connections."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            if not self._fixed_port and (self.port == 0 or attempt > 0):
                self.port = free_port(self.host)
            self.conf_path.write_text(self._render())
            self.log_path.unlink(missing_ok=True)
            self._proc.start()
            if self._wait_ready():
                return self
            in_use = "Address already in use" in self.log_tail()
            self._proc.kill()
            if not in_use or self._fixed_port:
                break
        raise BrokerError(
            f"mosquitto did not start on {self.host}:{self.port} within {self.start_timeout_s}s "
            f"(config {self.conf_path}).\n--- log tail ---\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM (persistence is saved), SIGKILL after ``grace_s``; returns the exit code."""
        return self._proc.stop(grace_s)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        self._proc.kill()

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) and start again on the same port with the same persistence dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        self._fixed_port = self._fixed_port or self.port != 0
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.output_path, self.log_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------------------

    def _render(self) -> str:
        overrides: dict[str, str | None] = {
            "listener": f"{self.port} {self.host}",
            "port": None,
            "bind_address": None,
            "pid_file": None,
            "include_dir": None,
            "user": "root" if os.geteuid() == 0 else None,  # else it drops to `mosquitto`
            "persistence": "true" if self.persistence else "false",
            "persistence_location": f"{self.data_dir}/",
            "log_dest": f"file {self.log_path}",
            "password_file": str(self.password_file) if self.password_file else None,
            "acl_file": str(self.acl_file) if self.acl_file else None,
        }
        tls_values = dict.fromkeys(_TLS_DIRECTIVES, None)
        if self.tls is not None:
            tls_values |= {
                "cafile": str(self.tls.ca_file),
                "certfile": str(self.tls.cert_file),
                "keyfile": str(self.tls.key_file),
                "require_certificate": str(self.tls.require_certificate).lower(),
                "tls_version": "tlsv1.2",
            }
        merged = overrides | tls_values | self.overrides
        return render_config(self.template.read_text(), merged, append=self.extra)

    def _wait_ready(self) -> bool:
        def ready() -> bool:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            return " running" in log and port_open(self.host, self.port)

        return wait_until(ready, self.start_timeout_s, alive=lambda: self.running)
