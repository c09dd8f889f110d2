"""`fedfstq status`: the fleet as an operator sees it on the broker.

Reads only what the broker holds for observers (the retained global manifest, round
announcement and round progress, and every device's retained status or will) as a read-only
observer (:mod:`fedfstq.observer`), and prints it once, as a table or one JSON document;
``--watch`` keeps following it. The argument definitions import nothing heavy; the rest is
imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        default=None,
        help="mqtt://host:port or mqtts://host:port (default: the --config file's, else "
        "mqtt://127.0.0.1:1883)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a TOML file with fleet, [mqtt] (host, port, tls, username) and mqtt_password_file",
    )
    p.add_argument("--fleet", default=None, help="fleet id (default: the --config file's)")
    p.add_argument("--username", default=None, help="observer account on the broker")
    p.add_argument("--password-file", type=Path, default=None, help="its password")
    p.add_argument(
        "--mqtt-protocol",
        choices=("5", "3.1.1"),
        default=None,
        help="MQTT version to speak (default: the --config file's, else 5)",
    )
    p.add_argument("--watch", action="store_true", help="keep following the fleet (Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON document (per change: --watch)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="give up reaching the broker after this (s)"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="collect retained messages until none came for this long (s)",
    )


def main(args: argparse.Namespace) -> int:
    """Print the fleet (or follow it); a bad configuration raises ``ConfigError`` (exit 2), a
    broker that cannot be reached or refuses us ``ObserverError`` (its code: 2 or 5)."""
    import json
    import logging
    import time

    from common.exit_codes import ExitCode
    from fedfstq.fleet_view import FleetView
    from fedfstq.fleet_watch import FleetOutput, Mode, pump
    from fedfstq.observer import connect, drain, target

    broker = args.broker if args.broker or args.config else "mqtt://127.0.0.1:1883"
    where = target(
        broker=broker, config=args.config, fleet=args.fleet, username=args.username,
        password_file=args.password_file, protocol=args.mqtt_protocol,
    )  # fmt: skip
    # The one-line error of a failed connection says it all; what the client and paho log about
    # each attempt (refusals, resets, reconnects) would repeat it.
    mqtt_log = logging.getLogger("broker.mqtt")
    level = mqtt_log.level
    mqtt_log.setLevel(logging.CRITICAL)
    try:
        client = connect(where, args.timeout)
    finally:
        mqtt_log.setLevel(level)
    view = FleetView(where.fleet)
    try:
        seen = [
            update
            for msg in drain(client, args.settle, limit_s=max(args.settle, 10.0))
            for update in view.apply(msg.topic, msg.payload, time.time(), retained=msg.retain)
        ]
        if not args.watch:
            snapshot = view.snapshot(time.time())
            if args.json:
                print(json.dumps(snapshot.to_json(), indent=2))
            else:
                from rich.console import Console

                from fedfstq.fleet_render import render

                Console().print(render(snapshot))
            return int(ExitCode.OK)
        mode: Mode = "json" if args.json else ("live" if sys.stdout.isatty() else "lines")
        with FleetOutput(mode, sys.stdout) as out:
            if mode == "json":  # the starting point, even when the broker held nothing yet
                print(json.dumps(view.snapshot(time.time()).to_json()), flush=True)
            else:
                out.show(view, seen)
            try:
                while True:
                    if pump(client, view, out, wait_s=0.5) == 0:
                        out.refresh(view)
            except KeyboardInterrupt:
                pass
        return int(ExitCode.OK)
    finally:
        client.close()
