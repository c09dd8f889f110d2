"""A private NATS JetStream cluster with the MQTT gateway, on free loopback ports.

Used by the broker-matrix tests and ``fedfstq bench brokers``::

    with NatsCluster(3) as nats:
        nats.endpoints          # [(host, mqtt_port), ...] one per node; MQTT 3.1.1 only
        nats.kill_node(1)       # SIGKILL; R3 streams keep sessions, queues and retained messages
        nats.start_node(1)

Each node runs ``nats-server -c <workdir>/nN/nats.conf``, rendered from
``broker/nats/fstq.conf``: only the per-node variables (``FSTQ_*`` lines: name, ports, store
directory, routes) are rewritten, every other line (limits, replication) is the shipped one.
Nodes are stopped by PID.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from broker._local_process import (
    BrokerError,
    NodeProcess,
    find_binary,
    free_port,
    port_open,
    wait_until,
)
from broker.local_cluster import LocalCluster
from broker.nats import DEV_CONF

__all__ = ["NatsCluster", "find_nats_server", "render_variables"]


def find_nats_server() -> str:
    return find_binary("nats-server", "apt-get install -y nats-server", ("/usr/sbin", "/usr/bin"))


def render_variables(template: str, values: Mapping[str, object]) -> str:
    """Rewrite the ``NAME: value`` lines of the given top-level variables (values as JSON, which
    NATS configs accept); every other line is kept. KeyError if the template lacks one."""
    out, missing = [], set(values)
    for line in template.splitlines():
        name = line.split(":", 1)[0] if line[:1].isupper() else ""
        if name in values:
            out.append(f"{name}: {json.dumps(values[name])}")
            missing.discard(name)
        else:
            out.append(line)
    if missing:
        raise KeyError(f"variables not in the template: {sorted(missing)}")
    return "\n".join(out) + "\n"


class NatsCluster(LocalCluster):
    """``nodes`` nats-server processes forming one JetStream cluster (R3 needs 3)."""

    protocols = ("3.1.1",)

    def __init__(
        self,
        nodes: int = 3,
        *,
        workdir: Path | None = None,
        template: Path = DEV_CONF,
        start_timeout_s: float = 60.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(nodes, workdir, start_timeout_s)
        self.binary = binary or find_nats_server()
        self.template = template
        self.monitor_ports: list[int] = []

    @property
    def kind(self) -> str:
        return "nats"

    def _launch(self, n: int) -> None:
        ports = [[free_port(self.host) for _ in range(4)] for _ in range(n)]
        routes = [f"nats-route://{self.host}:{p[2]}" for p in ports]
        for i, (client, monitor, route, mqtt) in enumerate(ports):
            node_dir = self.workdir / f"n{i + 1}"
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "nats.conf"
            conf.write_text(
                render_variables(
                    self.template.read_text(),
                    {
                        "FSTQ_NODE_NAME": f"fstq-n{i + 1}",
                        "FSTQ_CLIENT_LISTEN": f"{self.host}:{client}",
                        "FSTQ_MONITOR_LISTEN": f"{self.host}:{monitor}",
                        "FSTQ_ROUTE_LISTEN": f"{self.host}:{route}",
                        "FSTQ_MQTT_LISTEN": f"{self.host}:{mqtt}",
                        "FSTQ_STORE_DIR": str(node_dir / "jetstream"),
                        "FSTQ_ROUTES": routes,
                    },
                )
            )
            self.mqtt_ports.append(mqtt)
            self.monitor_ports.append(monitor)
            self.nodes.append(NodeProcess([self.binary, "-c", str(conf)], node_dir / "nats.log"))
        for node in self.nodes:
            node.start()
        for i in range(n):
            self.wait_node(i)
        # JetStream elects its meta leader once a quorum of nodes is up; MQTT clients that
        # connect before it are kept waiting, so the cluster is ready only then.
        if not wait_until(self._js_ready, self.start_timeout_s, alive=self._all_running):
            raise BrokerError(
                f"the NATS cluster formed no JetStream quorum in {self.start_timeout_s}s\n"
                f"--- node 1 log tail ---\n{self.log_tail(0)}"
            )

    def _ready(self, i: int) -> bool:
        return port_open(self.host, self.mqtt_ports[i]) and self._healthy(i)

    def start_node(self, i: int) -> None:
        super().start_node(i)
        if not wait_until(self._js_ready, self.start_timeout_s, alive=self._all_running):
            raise BrokerError(f"NATS node {i} rejoined no JetStream quorum\n{self.log_tail(i)}")

    def _monitor(self, i: int, path: str) -> dict[str, object]:
        """A JSON page of node ``i``'s monitoring endpoint ({} if it does not answer)."""
        url = f"http://{self.host}:{self.monitor_ports[i]}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                page = json.load(resp)
        except (OSError, ValueError, urllib.error.URLError):
            return {}
        return page if isinstance(page, dict) else {}

    def _healthy(self, i: int) -> bool:
        return self._monitor(i, "healthz").get("status") == "ok"

    def _js_ready(self) -> bool:
        """Every running node knows the JetStream meta leader."""
        for i, node in enumerate(self.nodes):
            meta = self._monitor(i, "jsz").get("meta_cluster") if node.running else {"leader": 1}
            if not isinstance(meta, dict) or not meta.get("leader"):
                return False
        return True

    def _stop_helpers(self) -> None:
        """Nothing besides the nodes: their stores stay in the work directory."""

    def _all_running(self) -> bool:
        return all(n.running for n in self.nodes)
