"""What the private-cluster launchers share: a work directory, nodes, their MQTT endpoints.

:class:`LocalCluster` owns its nodes (:class:`broker._local_process.NodeProcess`, one per node)
and the work directory; a subclass says how to start them (:meth:`LocalCluster._launch`) and
how to stop the helpers it started besides the nodes (:meth:`LocalCluster._stop_helpers`).
Fault tests and the broker benchmark use the node operations: :meth:`LocalCluster.kill_node`
(SIGKILL), :meth:`LocalCluster.start_node` (back with the same name, ports and data),
:meth:`LocalCluster.pause_node` / :meth:`LocalCluster.resume_node` (SIGSTOP / SIGCONT).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Self

from broker._local_process import (
    BrokerError,
    LocalService,
    NodeProcess,
    port_open,
    wait_until,
)

__all__ = ["LocalCluster"]


class LocalCluster(LocalService):
    """Broker nodes owned by this object; every node's MQTT listener is on ``host``."""

    host = "127.0.0.1"
    #: The MQTT protocol versions the broker speaks ("5" or "3.1.1").
    protocols: tuple[str, ...] = ("5", "3.1.1")

    def __init__(self, nodes: int, workdir: Path | None, start_timeout_s: float) -> None:
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        super().__init__(workdir, f"fstq-{self.kind}-")
        self.start_timeout_s = start_timeout_s
        self.mqtt_ports: list[int] = []
        self.nodes: list[NodeProcess] = []
        self._size = nodes

    @property
    @abstractmethod
    def kind(self) -> str:
        """Short broker name (``ejabberd``, ``nats``): work directory prefix, log lines."""

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each node's MQTT listener, in node order."""
        return [(self.host, p) for p in self.mqtt_ports]

    @property
    def pids(self) -> list[int | None]:
        return [n.pid for n in self.nodes]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every node and form the cluster; BrokerError with the logs if it fails."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._launch(self._size)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every node by PID (SIGTERM, SIGKILL after ``grace_s``), then the helpers."""
        for node in self.nodes:
            node.stop(grace_s)
        self._stop_helpers()

    # -- one node ------------------------------------------------------------------------------

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``: a crash; its sockets close, nothing it held in memory survives."""
        self.nodes[i].kill()

    def start_node(self, i: int) -> None:
        """Start node ``i`` again (same name, ports and data directory) and wait for it."""
        self.nodes[i].start()
        self.wait_node(i)

    def pause_node(self, i: int) -> None:
        """SIGSTOP node ``i``: frozen, its connections open but silent."""
        self.nodes[i].pause()

    def resume_node(self, i: int) -> None:
        self.nodes[i].resume()

    def wait_node(self, i: int) -> None:
        """Wait until node ``i`` serves MQTT; BrokerError with its log tail if it does not."""
        node = self.nodes[i]
        if not wait_until(lambda: self._ready(i), self.start_timeout_s, alive=lambda: node.running):
            raise BrokerError(
                f"{self.kind} node {i} did not serve MQTT on {self.host}:{self.mqtt_ports[i]} "
                f"within {self.start_timeout_s}s.\n--- log tail ---\n{self.log_tail(i)}"
            )

    def log_tail(self, i: int, lines: int = 40) -> str:
        return self.nodes[i].output_tail(lines)

    # -- for subclasses --------------------------------------------------------------------------

    @abstractmethod
    def _launch(self, n: int) -> None:
        """Create and start ``n`` nodes (appending to ``nodes`` and ``mqtt_ports``), joined."""

    def _ready(self, i: int) -> bool:
        """Node ``i`` serves MQTT (subclasses add their own conditions)."""
        return port_open(self.host, self.mqtt_ports[i])

    @abstractmethod
    def _stop_helpers(self) -> None:
        """Stop what the cluster started besides its nodes (after them)."""
