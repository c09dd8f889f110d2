"""The broker set-ups the tests and ``fedfstq bench brokers`` run, by name, started privately.

=================  =====================================  ========  ============================
name               what                                   protocol  clients of node ``i``
=================  =====================================  ========  ============================
``mosquitto-5``    one Mosquitto (``dev.conf``)           5         the one node
``mosquitto-311``  the same Mosquitto                     3.1.1     the one node
``ejabberd-2``     2 ejabberd nodes, one cluster          5         node ``i % 2``, failover
``nats-3``         3 NATS JetStream nodes (R3), one       3.1.1     node ``i % 3``, failover
                   cluster
=================  =====================================  ========  ============================

:func:`start_setup` starts one and yields a :class:`BrokerSetup`; :meth:`BrokerSetup.mqtt`
gives the ``[mqtt]`` settings table of a client on node ``i`` (host and port of that node, the
other nodes as ``failover``, the protocol, credentials, and for ejabberd the re-publishing of
retained messages its per-node retained store needs). :func:`missing` says why a set-up cannot
start on this machine (its broker is not installed), for a skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker._local_process import BrokerError
from broker.local import LocalBroker, find_mosquitto
from broker.local_cluster import LocalCluster
from broker.local_ejabberd import EjabberdCluster, find_ejabberd
from broker.local_nats import NatsCluster, find_nats_server
from broker.settings import MqttSettings

__all__ = ["SETUPS", "BrokerSetup", "missing", "mosquitto_setup", "start_setup"]

#: Every set-up, in the order of the broker matrix (RELIABILITY.md).
SETUPS = ("mosquitto-5", "mosquitto-311", "ejabberd-2", "nats-3")

Protocol = Literal["5", "3.1.1"]


@dataclass
class BrokerSetup:
    """A started set-up: its name, protocol, nodes and the launcher that owns them."""

    name: str
    protocol: Protocol
    broker: LocalBroker | LocalCluster
    #: Settings every client of this set-up needs besides host/port/failover/protocol.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        if isinstance(self.broker, LocalBroker):
            return [(self.broker.host, self.broker.port)]
        return self.broker.endpoints

    @property
    def clustered(self) -> bool:
        return len(self.endpoints) > 1

    def node_of(self, i: int) -> int:
        """The node client number ``i`` connects to first (clients spread over the nodes)."""
        return i % len(self.endpoints)

    def mqtt(self, node: int = 0, **changes: Any) -> dict[str, Any]:
        """The ``[mqtt]`` table of a client connecting to ``node`` first (then the others)."""
        nodes = self.endpoints
        node %= len(nodes)
        host, port = nodes[node]
        others = nodes[node + 1 :] + nodes[:node]
        table: dict[str, Any] = {
            "host": host,
            "port": port,
            "failover": [f"{h}:{p}" for h, p in others],
            "protocol": self.protocol,
            **self.extra,
        }
        return table | changes

    def settings(self, client_id: str, node: int = 0, **changes: Any) -> MqttSettings:
        return MqttSettings(**self.mqtt(node, client_id=client_id, **changes))

    def kill_node(self, i: int) -> None:
        if isinstance(self.broker, LocalBroker):
            self.broker.kill()
        else:
            self.broker.kill_node(i)

    def start_node(self, i: int) -> None:
        if isinstance(self.broker, LocalBroker):
            self.broker.start()
        else:
            self.broker.start_node(i)


def mosquitto_setup(name: str, broker: LocalBroker) -> BrokerSetup:
    """Set-up ``mosquitto-5`` or ``mosquitto-311`` on a running Mosquitto."""
    if name not in ("mosquitto-5", "mosquitto-311"):
        raise ValueError(f"{name!r} is not a Mosquitto set-up")
    return BrokerSetup(name, "5" if name == "mosquitto-5" else "3.1.1", broker)


def missing(name: str) -> str | None:
    """Why set-up ``name`` cannot start here (a missing broker), or None if it can."""
    find = {
        "mosquitto-5": find_mosquitto,
        "mosquitto-311": find_mosquitto,
        "ejabberd-2": find_ejabberd,
        "nats-3": find_nats_server,
    }[name]
    try:
        find()
    except BrokerError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def start_setup(
    name: str, workdir: Path | None = None, *, republish_retained_s: float = 2.0
) -> Iterator[BrokerSetup]:
    """Start set-up ``name`` (its processes stopped by PID on exit).

    ``republish_retained_s``: what ejabberd clients use for ``mqtt.republish_retained_s`` (its
    retained store is per node; 2 s keeps the tests short, 30 s is the production advice).
    """
    if name not in SETUPS:
        raise ValueError(f"unknown broker set-up {name!r}; one of {', '.join(SETUPS)}")
    if name.startswith("mosquitto"):
        with LocalBroker("dev", workdir=workdir) as mosquitto:
            yield mosquitto_setup(name, mosquitto)
    elif name == "ejabberd-2":
        with EjabberdCluster(2, workdir=workdir) as ejabberd:
            user, password = ejabberd.credentials
            extra = {
                "username": user,
                "password": password,
                "republish_retained_s": republish_retained_s,
            }
            yield BrokerSetup(name, "5", ejabberd, extra)
    else:
        with NatsCluster(3, workdir=workdir) as nats:
            yield BrokerSetup(name, "3.1.1", nats)
