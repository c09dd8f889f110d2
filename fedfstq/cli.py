"""The `fedfstq` console entry point: one place that parses arguments, configures logging and
turns a command's typed errors into one line and an exit code (:mod:`fedfstq.errors`).

Every module imported here is light: the fedfstq command modules keep their heavy imports inside
their functions, and the services' flags live apart from them (``edge_agent/arguments.py``,
``aggregator/arguments.py``). So ``fedfstq --help`` answers at once and a command loads only
what it runs; ``tests/fedfstq/test_cli_help.py`` checks that torch, transformers, peft, paho,
numpy and pydantic stay out of every ``--help``. To add a command: a module with
``add_arguments(parser)`` and ``main(args) -> int``, and a row in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aggregator import arguments as aggregator_arguments
from common.exit_codes import ExitCode
from edge_agent import arguments as agent_arguments
from fedfstq import bench_brokers, bench_codec, bench_fleet, bench_inference, demo, enrol, status
from fedfstq.errors import INTERRUPTED, exit_codes_text, one_line, report

__all__ = ["main"]

DESCRIPTION = """\
fedfstq fine-tunes a language model's LoRA adapter across many small devices without moving \
their data. Each device trains on the examples it holds and sends only a compressed update over \
MQTT (Fed-FSTQ: the adapter coordinates that matter most, at 2, 4 or 16 bits, within a byte \
budget); the aggregator averages the updates into a new shared adapter every round. Start with \
`fedfstq demo`: a broker, the aggregator and three devices on this machine. `agent` and \
`aggregator` run the two services, `enrol` adds a device, `status` shows a running fleet, \
`bench` measures.
"""

EPILOG = f"""\
exit codes, the same for every command (agent and aggregator included; `aggregator --check`: \
0 healthy, 1 unhealthy, 2 configuration):

{exit_codes_text()}

`fedfstq COMMAND --help` lists a command's options. Documentation: README.md, fedfstq/README.md.
"""


VERBOSE_HELP = "debug logging, and the traceback of an error"


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default; wraps prose but keeps indented lines (tables) as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = "%(default)" in text or "default:" in text
        unset = default is None or default is False or default is argparse.SUPPRESS
        if shown or unset or not action.option_strings:
            return text
        if isinstance(default, list | tuple):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = text.split("\n\n")
        return "\n\n".join(
            block if block.startswith(" ") else textwrap.fill(block, width, initial_indent=indent,
                                                             subsequent_indent=indent)
            for block in blocks
        )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2 (ExitCode.CONFIG), like argparse's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(
            int(ExitCode.CONFIG),
            f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n",
        )


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, reading the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        import importlib.metadata  # ~50 ms of email/zipfile imports: not for every --help

        try:
            version = importlib.metadata.version("fedfstq")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        print(f"{parser.prog} {version}")
        parser.exit()


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


def _agent(args: argparse.Namespace) -> int:
    from edge_agent import cli  # the service: torch, transformers, peft, paho

    return cli.main(args)


def _aggregator(args: argparse.Namespace) -> int:
    from aggregator import cli  # the service: torch, peft, paho

    return cli.main(args)


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    description: str
    #: Registers the options; its module must import nothing heavy (test_cli_help.py).
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: Runs the command; heavy imports happen inside it.
    main: Callable[[argparse.Namespace], int]


COMMANDS = (
    _Command(
        "agent",
        "run the edge agent daemon (systemd service)",
        "Run the edge agent, the daemon on a device (deploy/README.md): it takes part in the "
        "rounds, trains the LoRA adapter on the device's own data and uploads a compressed "
        "update. Settings come from the TOML file, FEDFSTQ_AGENT_* variables and these flags "
        "(edge_agent/README.md). Exit codes: the table of `fedfstq --help`.",
        agent_arguments.add_arguments,
        _agent,
    ),
    _Command(
        "aggregator",
        "run the aggregator service (container)",
        "Run the aggregator service (deploy/README.md): it announces rounds, collects and "
        "confirms the devices' uploads, averages them and publishes each new global adapter. "
        "Settings come from the TOML file, FEDFSTQ_AGG_* variables and these flags "
        "(aggregator/README.md). Exit codes: the table of `fedfstq --help`; --check exits 0 "
        "healthy, 1 unhealthy, 2 configuration error.",
        aggregator_arguments.add_arguments,
        _aggregator,
    ),
    _Command(
        "enrol",
        "add a device: its broker password and agent config",
        "Add a device to a deployment: a random broker password in the Mosquitto password "
        "file, and OUT_DIR/<client-id>/agent.toml and mqtt_password to install on the device "
        "(deploy/README.md).",
        enrol.add_arguments,
        enrol.main,
    ),
    _Command(
        "status",
        "the fleet on the broker: global, round, devices",
        "Show a fleet as its broker holds it: the global adapter, the open round and every "
        "device's state, once or (--watch) as it changes. Connects as a read-only observer.",
        status.add_arguments,
        status.main,
    ),
    _Command(
        "demo",
        "start here: broker, aggregator and 3 devices on this machine",
        "Run the whole system on this machine: a private Mosquitto, the aggregator and "
        "--clients edge agents as separate processes, each fine-tuning SmolLM2-135M on its own "
        "non-IID share of the chatterbot-corpus Q/A pairs. Shows the fleet live, then a table "
        "of quality and uplink bytes per round. About 5 minutes on 2 cores; --model tiny is a "
        "quick try.",
        demo.add_arguments,
        demo.main,
    ),
)

BENCHMARKS = (
    _Command(
        "codec",
        "compress/decompress throughput, ratios, entropy",
        "Throughput, compression ratio and entropy efficiency of every uplink method, on one "
        "thread (BENCHMARKS.md).",
        bench_codec.add_arguments,
        bench_codec.main,
    ),
    _Command(
        "inference",
        "token reduction at inference: speedup and quality vs keep ratio",
        "Inference-time token reduction: the speedup and the answer quality of dropping "
        "low-scoring prompt tokens, per keep ratio (BENCHMARKS.md).",
        bench_inference.add_arguments,
        bench_inference.main,
    ),
    _Command(
        "fleet",
        "the evaluation fleet: methods compared on bytes and time to target",
        "A fleet of devices through the real aggregator and Mosquitto: each method's quality "
        "against uplink bytes and simulated time, and the bytes and time it needs to reach the "
        "target quality (EVALUATION.md).",
        bench_fleet.add_arguments,
        bench_fleet.main,
    ),
    _Command(
        "brokers",
        "one round of chunk uploads through each broker set-up: MB/s, chunks/s",
        "The same round of chunk uploads through each broker set-up the tests run (Mosquitto "
        "over MQTT 5 and 3.1.1, a 2-node ejabberd cluster, a 3-node NATS cluster), started "
        "privately on loopback: MB/s and chunk messages per second (RELIABILITY.md).",
        bench_brokers.add_arguments,
        bench_brokers.main,
    ),
)


def _add(sub: Any, command: _Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        command.name, help=command.help, description=command.description
    )
    command.add_arguments(parser)
    # Also after the command (`fedfstq demo ... -v`), where the error hint makes people put it;
    # SUPPRESS keeps a missing one from resetting `fedfstq -v demo`.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )
    parser.set_defaults(func=command.main)
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedfstq", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        _add(sub, command)
    bench = sub.add_parser(
        "bench",
        help="benchmarks (numbers go to BENCHMARKS.md)",
        description="Benchmarks; their numbers are in BENCHMARKS.md and EVALUATION.md.",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for command in BENCHMARKS:
        _add(bench_sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, configure logging once, run the subcommand and return its exit code.

    A typed error of a command becomes one line on stderr and its exit code
    (:func:`fedfstq.errors.report`); so does any other exception, as UNEXPECTED, with its
    traceback under ``-v``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data ship in packages; never fetch
    # transformers draws a bar for every model load, and peft 0.21 trips a transformers 5
    # deprecation on every adapter: noise in the demo, the services' logs and the benchmarks.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 0
    _configure_logging(args.verbose, args.log_json)
    prog = " ".join(["fedfstq", args.command, *([args.bench] if args.command == "bench" else [])])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        return report(exc, prog, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
