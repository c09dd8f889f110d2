"""The flags of ``fedfstq aggregator``, apart from the service so ``fedfstq --help`` stays fast.

Imports nothing but the standard library: building the ``fedfstq`` parser loads this module,
and the service itself (torch, peft, paho, pydantic) only loads when the command runs
(:mod:`aggregator.cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the aggregator's flags on ``parser`` (a ``fedfstq aggregator`` subparser)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML file (tables as in aggregator/README.md); FEDFSTQ_AGG_* variables override it",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="health check of a running service (container HEALTHCHECK): exit 0 if its store "
        "opens and its heartbeat is fresh",
    )
    over = parser.add_argument_group(
        "overrides",
        "take precedence over the TOML file; a flag and the FEDFSTQ_AGG_* variable of the same "
        "setting together are refused",
    )
    over.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="store, global adapters: state_dir"
    )
    over.add_argument("--broker-host", metavar="HOST", help="broker host name: mqtt.host")
    over.add_argument("--broker-port", type=int, metavar="PORT", help="broker port: mqtt.port")
