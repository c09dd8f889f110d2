"""The flags of ``fedfstq agent``, apart from the service so ``fedfstq --help`` stays fast.

Imports nothing but the standard library: building the ``fedfstq`` parser loads this module,
and the agent itself (torch, transformers, peft, paho) only loads when the command runs
(:mod:`edge_agent.cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the agent's flags on ``parser`` (a ``fedfstq agent`` subparser)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="agent TOML file (deploy/config/agent.example.toml); FEDFSTQ_AGENT_* variables "
        "override it",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, read the data file, reach the broker, then exit",
    )
    parser.add_argument(
        "--check-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds --check-config waits for the broker",
    )
    over = parser.add_argument_group(
        "overrides",
        "take precedence over the TOML file; a flag and the FEDFSTQ_AGENT_* variable of the "
        "same setting together are refused",
    )
    over.add_argument("--client-id", help="device id (also the MQTT client id): client_id")
    over.add_argument("--fleet", help="fleet id: fleet")
    over.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="outbox, state and caches: state_dir"
    )
    over.add_argument("--data", type=Path, metavar="PATH", help="local JSONL data: data_path")
    over.add_argument("--model", help='"smollm2", "tiny" or a model directory: model')
    over.add_argument("--broker-host", metavar="HOST", help="broker host name: mqtt.host")
    over.add_argument("--broker-port", type=int, metavar="PORT", help="broker port: mqtt.port")
    over.add_argument(
        "--max-rounds", type=int, metavar="N", help="stop after N rounds, 0 never: max_rounds"
    )
