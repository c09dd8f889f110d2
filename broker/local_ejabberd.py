"""A private ejabberd (mod_mqtt) cluster on free loopback ports, with its own epmd.

Used by the broker-matrix tests and ``fedfstq bench brokers``::

    with EjabberdCluster(2) as ej:
        ej.endpoints            # [(host, mqtt_port), ...] one per node; MQTT 5 and 3.1.1
        ej.credentials          # (user, password) every client logs in with (dev.yml)
        ej.kill_node(0)         # SIGKILL: that node's sessions and queues are gone

Each node is ``erl -name <node>@127.0.0.1 -s ejabberd`` run directly (what ``ejabberdctl
foreground`` runs, without its switch to the ``ejabberd`` user, so any user can run the tests),
with a node name and an Erlang cookie unique to the run, its own spool and log directories, the
Erlang distribution on loopback and a private ``epmd`` on a free port (never the system's). The
config is ``broker/ejabberd/dev.yml`` (or ``prod.yml``) with only the listener's port replaced
(and TLS dropped); every other key, the limits included, is the shipped one. Nodes 2..n join
node 1 with ``ejabberdctl join_cluster`` (through ``ejabberd_ctl`` on a hidden node). Every
process is stopped by PID.
"""

from __future__ import annotations

import glob
import os
import secrets
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from broker._local_process import BrokerError, NodeProcess, find_binary, free_port, port_open
from broker.ejabberd import DEV_YML, PROD_YML
from broker.local_cluster import LocalCluster

__all__ = ["DEV_PASSWORD", "EjabberdCluster", "find_ejabberd", "render_ejabberd_config"]

#: dev.yml logs any client in without an account but refuses an empty password.
DEV_PASSWORD = "fstq-dev"
#: Where Debian and the upstream installers put ejabberd's Erlang application.
_APP_GLOBS = (
    "/usr/lib/*/ejabberd-*/ebin/ejabberd.app",
    "/usr/lib/erlang/lib/ejabberd-*/ebin/ejabberd.app",
    "/opt/ejabberd*/lib/ejabberd-*/ebin/ejabberd.app",
)


def find_ejabberd() -> tuple[str, str, str]:
    """``(erl, epmd, ERL_LIBS)`` for running ejabberd; BrokerError if it is not installed."""
    hint = "apt-get install -y ejabberd"
    erl = find_binary("erl", hint, ("/usr/bin", "/usr/local/bin"))
    epmd = find_binary("epmd", hint, ("/usr/bin", "/usr/local/bin"))
    apps = sorted(a for pattern in _APP_GLOBS for a in glob.glob(pattern))
    if not apps:
        raise BrokerError(f"ejabberd is not installed (no ejabberd.app found); `{hint}`")
    return erl, epmd, str(Path(apps[-1]).parents[2])


def render_ejabberd_config(
    template: Path, port: int, *, tls: bool = False, mqtt: Mapping[str, Any] | None = None
) -> str:
    """The template with its (first) mod_mqtt listener on ``127.0.0.1:port``; ``tls=False`` drops
    the TLS keys; ``mqtt`` overrides mod_mqtt options (tests only)."""
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    (listener,) = [x for x in config["listen"] if x.get("module") == "mod_mqtt"]
    listener.update(port=port, ip="127.0.0.1")
    if not tls:
        listener.pop("tls", None)
        config.pop("certfiles", None)
    config["modules"]["mod_mqtt"].update(mqtt or {})
    return yaml.safe_dump(config, sort_keys=False)


class EjabberdCluster(LocalCluster):
    """``nodes`` ejabberd nodes joined into one cluster (Erlang distribution on loopback)."""

    protocols = ("5", "3.1.1")

    def __init__(
        self,
        nodes: int = 2,
        *,
        config: Literal["dev", "prod"] = "dev",
        users: Mapping[str, str] | None = None,
        mqtt: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        """``users``: accounts to register (``prod``); ``mqtt``: mod_mqtt option overrides."""
        super().__init__(nodes, workdir, start_timeout_s)
        self.erl, self.epmd, self.erl_libs = find_ejabberd()
        self.template = DEV_YML if config == "dev" else PROD_YML
        self.vhost: str = yaml.safe_load(self.template.read_text())["hosts"][0]
        self.users = dict(users or {})
        self.mqtt_overrides = dict(mqtt or {})
        run = secrets.token_hex(4)
        self.node_names: list[str] = []
        self._prefix = f"fstq{run}"
        self._cookie = secrets.token_hex(16)
        self._epmd: NodeProcess | None = None
        self._epmd_port = 0

    @property
    def kind(self) -> str:
        return "ejabberd"

    @property
    def credentials(self) -> tuple[str, str]:
        """The user name and password a client of ``dev.yml`` logs in with."""
        return "fstq", DEV_PASSWORD

    def ctl(self, node: int, *args: str, timeout: float = 60.0) -> str:
        """``ejabberdctl <args>`` against node ``node``; its output, BrokerError if it fails."""
        argv = [
            self.erl, "-name", f"ctl{secrets.token_hex(3)}@{self.host}", "-setcookie",
            self._cookie, "-start_epmd", "false", "-hidden", "-noinput",
            "-s", "ejabberd_ctl", "-extra", self.node_names[node], *args,
        ]  # fmt: skip
        done = subprocess.run(
            argv, env=self._env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise BrokerError(
                f"ejabberdctl {' '.join(args)} on {self.node_names[node]} failed "
                f"({done.returncode}): {(done.stdout + done.stderr).strip()[-2000:]}"
            )
        return done.stdout

    def cluster_members(self, node: int = 0) -> list[str]:
        """The nodes node ``node`` sees in its cluster (``ejabberdctl list_cluster``)."""
        return [n.strip("'") for n in self.ctl(node, "list_cluster").split()]

    # -- LocalCluster ----------------------------------------------------------------------------

    def _launch(self, n: int) -> None:
        self._epmd_port = free_port(self.host)
        self._epmd = NodeProcess(
            [self.epmd, "-port", str(self._epmd_port), "-address", self.host],
            self.workdir / "epmd.log",
        )
        self._epmd.start()
        for i in range(n):
            self._add_node(i)
        for node in self.nodes:
            node.start()
        for i in range(n):
            self.wait_node(i)
        for i in range(1, n):
            # join_cluster restarts ejabberd on the joining node (about 2 s): wait again.
            self.ctl(i, "join_cluster", self.node_names[0])
            self.wait_node(i)
        members = sorted(self.cluster_members(0))
        if members != sorted(self.node_names):
            raise BrokerError(f"ejabberd cluster is {members}, expected {self.node_names}")
        for user, password in self.users.items():
            self.ctl(0, "register", user, self.vhost, password)

    def _add_node(self, i: int) -> None:
        node_dir = self.workdir / f"n{i + 1}"
        for sub in ("spool", "logs"):
            (node_dir / sub).mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        config = node_dir / "ejabberd.yml"
        config.write_text(render_ejabberd_config(self.template, port, mqtt=self.mqtt_overrides))
        name = f"{self._prefix}n{i + 1}@{self.host}"
        argv = [
            self.erl, "-name", name, "-setcookie", self._cookie, "-start_epmd", "false",
            "+K", "true", "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            # A lost node is noticed in ~20 s instead of 60 (and a frozen one unfreezes sooner).
            "-kernel", "net_ticktime", "20",
            "-mnesia", "dir", f'"{node_dir / "spool"}"', "-s", "ejabberd", "-noinput",
        ]  # fmt: skip
        env = self._env() | {
            "EJABBERD_CONFIG_PATH": str(config),
            "EJABBERD_LOG_PATH": str(node_dir / "logs" / "ejabberd.log"),
            "ERL_CRASH_DUMP": str(node_dir / "logs" / "erl_crash.dump"),
            "ERL_CRASH_DUMP_BYTES": "0",
        }
        self.node_names.append(name)
        self.mqtt_ports.append(port)
        self.nodes.append(NodeProcess(argv, node_dir / "output.log", env=env, cwd=node_dir))

    def _env(self) -> dict[str, str]:
        # HOME: Erlang may write a cookie file there; keep it out of the user's home.
        return dict(os.environ) | {
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_LIBS": self.erl_libs,
            "HOME": str(self.workdir),
        }

    def _ready(self, i: int) -> bool:
        started = "is started in the node" in self.log_tail(i, 400)
        return started and port_open(self.host, self.mqtt_ports[i])

    def _stop_helpers(self) -> None:
        if self._epmd is not None:
            self._epmd.stop()
