"""The `fedfstq` console entry point: one place that parses arguments and configures logging.

Subcommands import their implementation lazily so `fedfstq --help` stays fast and a service
process loads only what it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _configure_logging(verbose: bool, json_logs: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if json_logs:
        from fedfstq.logs import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler], force=True)
    else:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )


def _bench_codec(args: argparse.Namespace) -> int:
    from fedfstq import bench_codec

    return bench_codec.main(args)


def _bench_inference(args: argparse.Namespace) -> int:
    from fedfstq import bench_inference

    return bench_inference.main(args)


def _bench_fleet(args: argparse.Namespace) -> int:
    from fedfstq import bench_fleet

    return bench_fleet.main(args)


def _demo(args: argparse.Namespace) -> int:
    from fedfstq import demo

    return demo.main(args)


def _agent(args: argparse.Namespace) -> int:
    from edge_agent import cli

    return cli.main(args)


def _aggregator(args: argparse.Namespace) -> int:
    from aggregator import cli

    return cli.main(args)


def _enrol(args: argparse.Namespace) -> int:
    from fedfstq import enrol

    return enrol.main(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfstq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    from aggregator import cli as aggregator_cli
    from edge_agent import cli as agent_cli

    agent = sub.add_parser("agent", help="run the edge agent daemon (systemd service)")
    agent_cli.add_arguments(agent)
    agent.set_defaults(func=_agent)
    agg = sub.add_parser("aggregator", help="run the aggregator service (container)")
    aggregator_cli.add_arguments(agg)
    agg.set_defaults(func=_aggregator)

    enrol = sub.add_parser("enrol", help="broker credentials + agent config for a new device")
    from fedfstq import enrol as enrol_mod

    enrol_mod.add_arguments(enrol)
    enrol.set_defaults(func=_enrol)

    demo = sub.add_parser("demo", help="run the main job (see README)")
    from fedfstq import demo as demo_mod

    demo_mod.add_arguments(demo)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks (numbers go to BENCHMARKS.md)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    codec = bench_sub.add_parser("codec", help="compress/decompress throughput, ratios, entropy")
    from fedfstq import bench_codec

    bench_codec.add_arguments(codec)
    codec.set_defaults(func=_bench_codec)
    inference = bench_sub.add_parser(
        "inference", help="token reduction at inference: speedup and quality vs keep ratio"
    )
    from fedfstq import bench_inference

    bench_inference.add_arguments(inference)
    inference.set_defaults(func=_bench_inference)
    fleet = bench_sub.add_parser(
        "fleet", help="the evaluation fleet: methods compared on bytes and time to target"
    )
    from fedfstq import bench_fleet

    bench_fleet.add_arguments(fleet)
    fleet.set_defaults(func=_bench_fleet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, configure logging once, run the subcommand and return its exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data ship in packages; never fetch
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.log_json)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
