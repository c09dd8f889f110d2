"""A lossy, rate-limited link to a Mosquitto in a network namespace of its own (root only).

``lossy_link()`` creates a namespace and a veth pair with private /30 addresses (host side and
namespace side), limits the rate in both directions with ``tc qdisc ... tbf`` and drops packets
at random with nftables ``numgen random mod 100 < N drop`` on the namespace's veth: ingress
(host -> namespace) always, egress (namespace -> host) where the kernel has that hook.
``NetnsBroker`` is a ``LocalBroker`` started with ``ip netns exec`` and listening on the
namespace's address, so every byte between the services (in the test process, on the host
side) and the broker crosses the lossy link. Everything is deleted on exit, whatever happened;
nothing is changed outside the namespace but the host end of the veth pair, which goes with it.

``unavailable()`` says why the run cannot happen here (not root, a tool missing, namespaces not
permitted), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from broker.local import LocalBroker, find_mosquitto

__all__ = ["LossyLink", "NetnsBroker", "lossy_link", "unavailable"]

PREFIX = "fstqloss"
TABLE = "fstq_loss"
_ids = itertools.count()


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=20, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why a namespace run is impossible here, or None if it is possible."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, tc)"
    missing = [tool for tool in ("ip", "nft", "tc") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup.sh installs nftables)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class LossyLink:
    namespace: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    egress_loss: bool  # False where the kernel has no netdev egress hook

    def dropped(self) -> dict[str, int]:
        """Packets dropped so far by the nftables rules, per chain (ingress, egress)."""
        text = _run("ip", "netns", "exec", self.namespace, "nft", "list", "table", "netdev", TABLE)
        out: dict[str, int] = {}
        for chain, body in re.findall(r"chain (\w+) \{(.*?)\}", text, re.S):
            counted = re.search(r"counter packets (\d+)", body)
            out[chain] = int(counted.group(1)) if counted else 0
        return out

    def retransmitted(self) -> int:
        """TCP segments the namespace (the broker) retransmitted: the losses TCP repaired."""
        snmp = _run("ip", "netns", "exec", self.namespace, "cat", "/proc/net/snmp")
        header, values = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
        return int(values[header.index("RetransSegs")])

    def tbf_stats(self) -> dict[str, str]:
        """``tc -s qdisc`` of both veth ends (what the rate limiter did)."""
        return {
            "host": _run("tc", "-s", "qdisc", "show", "dev", self.host_if),
            "namespace": _run(
                "ip", "netns", "exec", self.namespace, "tc", "-s", "qdisc", "show",
                "dev", self.ns_if,
            ),
        }  # fmt: skip


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.213.0.0/16 that no address or route of the host overlaps."""
    used = [
        ipaddress.ip_network(m, strict=False)
        for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+/\d+)", _run("ip", "-4", "-o", "addr", "show"))
    ]
    used += [
        ipaddress.ip_network(m)
        for m in re.findall(r"^(\d+\.\d+\.\d+\.\d+/\d+)", _run("ip", "-4", "route"), re.M)
    ]
    base = int(ipaddress.IPv4Address("10.213.0.0"))
    start = (os.getpid() * 7) % (1 << 14)
    for i in range(1 << 14):
        net = ipaddress.IPv4Network((base + 4 * ((start + i) % (1 << 14)), 30))
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /30 in 10.213.0.0/16")


def _sweep_stale() -> None:
    """Delete namespaces this module created in test processes that no longer exist."""
    for line in _run("ip", "netns", "list").splitlines():
        match = re.match(rf"({PREFIX}-(\d+)-\d+)\b", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _run("ip", "netns", "del", match.group(1), check=False)


def _nft_rules(ns_if: str, loss_percent: int, hook: str) -> str:
    return (
        f"table netdev {TABLE} {{\n  chain {hook} {{\n"
        f'    type filter hook {hook} device "{ns_if}" priority 0; policy accept;\n'
        f"    numgen random mod 100 < {loss_percent} counter drop\n  }}\n}}\n"
    )


@contextlib.contextmanager
def lossy_link(
    loss_percent: int = 10, rate: str = "2mbit", burst: str = "16kb", latency: str = "400ms"
) -> Iterator[LossyLink]:
    """A namespace behind a veth pair with ``loss_percent`` random loss and a ``rate`` limit."""
    _sweep_stale()
    n = next(_ids)
    namespace = f"{PREFIX}-{os.getpid()}-{n}"
    tag = f"{os.getpid() % 1_000_000}{n}"
    host_if, ns_if = f"fqh{tag}"[:15], f"fqn{tag}"[:15]
    net = _free_subnet()
    host_ip, ns_ip = (str(a) for a in net.hosts())
    in_ns = ("ip", "netns", "exec", namespace)
    try:
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
             "netns", namespace)  # fmt: skip
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run(*in_ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _run(*in_ns, "ip", "link", "set", ns_if, "up")
        _run(*in_ns, "ip", "link", "set", "lo", "up")
        tbf = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
        _run("tc", "qdisc", "add", "dev", host_if, *tbf)
        _run(*in_ns, "tc", "qdisc", "add", "dev", ns_if, *tbf)
        _run(*in_ns, "nft", "-f", "-", stdin=_nft_rules(ns_if, loss_percent, "ingress"))
        try:  # the netdev egress hook needs Linux 5.16+ and nftables 1.0.1+
            _run(*in_ns, "nft", "-f", "-", stdin=_nft_rules(ns_if, loss_percent, "egress"))
            egress = True
        except RuntimeError:
            egress = False
        yield LossyLink(namespace, host_if, ns_if, host_ip, ns_ip, egress)
    finally:
        _run("ip", "netns", "del", namespace, check=False)  # takes the veth pair with it
        _run("ip", "link", "del", host_if, check=False)


class NetnsBroker(LocalBroker):
    """A private Mosquitto (dev.conf) started in ``link``'s namespace, on its address."""

    def __init__(self, link: LossyLink, port: int = 1883) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix="fstq-netns-broker-"))
        wrapper = self._scratch / "mosquitto-in-netns"
        # exec all the way down: the PID LocalBroker signals is Mosquitto's own.
        wrapper.write_text(
            f'#!/bin/sh\nexec ip netns exec {link.namespace} {find_mosquitto()} "$@"\n'
        )
        wrapper.chmod(0o755)
        super().__init__("dev", workdir=self._scratch, port=port, binary=str(wrapper),
                         start_timeout_s=30.0)  # fmt: skip
        self.host = link.ns_addr

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(et, ev, tb)
        if et is None:  # like LocalBroker: the config and logs stay when something failed
            shutil.rmtree(self._scratch, ignore_errors=True)
