"""`fedfstq demo`: a private broker, the aggregator and N edge agents as separate processes.

Clients get non-IID shares (Dirichlet over languages) of the real multilingual chatterbot-corpus
Q/A pairs, train SmolLM2-135M-Instruct LoRA adapters, and talk real MQTT through Mosquitto. The
demo prints each round as the aggregator closes it, then a table, and can write the per-round
records as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedfstq.demo_preflight import check_languages, remote_broker
from fedfstq.option_types import int_at_least, non_negative_int, positive_float, positive_int
from fedfstq.workdir import MARKER, claim_workdir
from workload.languages import DEFAULT_LANGUAGES

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq demo``."""
    p.add_argument("--clients", type=positive_int, default=3, help="edge agent processes")
    p.add_argument("--rounds", type=positive_int, default=3, help="federated rounds")
    p.add_argument("--steps", type=positive_int, default=6, help="local training steps per round")
    p.add_argument("--batch-size", type=positive_int, default=4, help="training batch size")
    p.add_argument(
        "--max-len", type=int_at_least(8), default=64, help="tokens per example; longer are cut"
    )
    p.add_argument(
        "--method",
        default="fstq",
        choices=["fstq", "dense_fp16", "dense_fp32", "qsgd", "topk"],
        help="update compression: fstq or a baseline",
    )
    p.add_argument(
        "--budget-bytes",
        type=int_at_least(64),
        default=None,
        metavar="BYTES",
        help="fixed per-client upload budget; without it fstq sends 1/8 of a dense fp16 update "
        "and the baselines what they make",
    )
    p.add_argument(
        "--downlink",
        default="catchup",
        choices=["catchup", "full"],
        help="how devices get each new global adapter: one catch-up payload on top of what "
        "they hold, or the full fp16 adapter (the baseline)",
    )
    p.add_argument(
        "--downlink-budget",
        type=int_at_least(64),
        default=None,
        metavar="BYTES",
        help="size of a catch-up payload; without it 1/8 of the full fp16 adapter",
    )
    p.add_argument(
        "--alpha",
        type=positive_float,
        default=0.1,
        help="Dirichlet concentration over languages (smaller: each client holds fewer)",
    )
    p.add_argument(
        "--languages",
        default=",".join(DEFAULT_LANGUAGES),
        help="comma-separated chatterbot-corpus languages",
    )
    p.add_argument(
        "--examples-per-client", type=positive_int, default=120, help="training examples at most"
    )
    p.add_argument(
        "--eval-examples",
        type=positive_int,
        default=48,
        help="held-out examples the aggregator evaluates each global adapter on",
    )
    p.add_argument("--model", default="smollm2", help='"smollm2", "tiny" or a model directory')
    p.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (alpha is 2r)")
    p.add_argument(
        "--broker",
        default=None,
        metavar="URL",
        help="mqtt://host:port of an existing broker (anonymous, no TLS); default: a private "
        "Mosquitto",
    )
    p.add_argument(
        "--mqtt-protocol",
        choices=("5", "3.1.1"),
        default="5",
        help="MQTT version every service speaks (3.1.1: broker/README.md, 'MQTT 3.1.1 profile')",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs/demo"),
        metavar="DIR",
        help=f"data, configs, logs and state of the run; a folder an earlier demo made (it holds "
        f"{MARKER}) is replaced, any other non-empty folder is refused (see --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the contents of a non-empty --workdir the demo did not make",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write per-round records here"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="data split, selection, training"
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=1800.0,
        metavar="S",
        help="seconds until it gives up",
    )


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """Write a services' settings file; None means "not set", so those keys are left out."""

    def drop_none(table: dict[str, Any]) -> dict[str, Any]:
        return {
            k: drop_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None
        }

    path.write_text(tomli_w.dumps(drop_none(data)))


def _prepare_data(
    args: argparse.Namespace, languages: list[str], workdir: Path
) -> tuple[list[Path], Path]:
    import numpy as np

    from workload.data import federated_split, load_chatterbot, write_jsonl

    pairs = load_chatterbot(languages)
    split = federated_split(
        pairs,
        args.clients,
        args.alpha,
        np.random.default_rng(args.seed),
        max_per_client=args.examples_per_client,
        max_test=args.eval_examples,
    )
    paths = []
    for i, part in enumerate(split.clients):
        path = workdir / "data" / f"device-{i}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, part)
        langs: dict[str, int] = {}
        for p in part:
            langs[p.language] = langs.get(p.language, 0) + 1
        top = ", ".join(f"{k} {v}" for k, v in sorted(langs.items(), key=lambda kv: -kv[1])[:3])
        print(f"  device-{i}: {len(part)} examples ({top})")
        paths.append(path)
    eval_path = workdir / "data" / "heldout.jsonl"
    write_jsonl(eval_path, split.test)
    return paths, eval_path


def _service(cmd: str, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed by the OS at exit
    return subprocess.Popen(
        [sys.executable, "-m", "fedfstq.cli", cmd, "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _write_configs(
    args: argparse.Namespace,
    workdir: Path,
    host: str,
    port: int,
    clients: list[Path],
    eval_path: Path,
) -> tuple[Path, list[Path]]:
    agg_cfg = workdir / "aggregator.toml"
    write_toml(
        agg_cfg,
        {
            "fleet": "demo",
            "state_dir": str(workdir / "aggregator"),
            "model": args.model,
            "mqtt": {"host": host, "port": port, "protocol": args.mqtt_protocol},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r},
            "rounds": {
                "clients_per_round": args.clients,
                "min_clients": args.clients,
                "quorum": max(1, args.clients - 1),
                "round_timeout_s": 300.0,
                "max_rounds": args.rounds,
                "budget_bytes": args.budget_bytes,
                "selection_seed": args.seed,
            },
            "eval": {"path": str(eval_path), "max_examples": args.eval_examples},
            "downlink": {"mode": args.downlink, "budget_bytes": args.downlink_budget},
        },
    )
    agent_cfgs = []
    for i, data in enumerate(clients):
        cfg = workdir / f"device-{i}.toml"
        write_toml(
            cfg,
            {
                "client_id": f"device-{i}",
                "fleet": "demo",
                "data_path": str(data),
                "state_dir": str(workdir / f"device-{i}"),
                "model": args.model,
                "max_rounds": args.rounds,
                "heartbeat_s": 5.0,
                "progress_s": 1.0,  # the live view shows each training step
                "mqtt": {"host": host, "port": port, "protocol": args.mqtt_protocol},
                "training": {
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "max_len": args.max_len,
                    "seed": args.seed + i,
                },
                "compression": {
                    "method": args.method,
                    "budget_mode": "fixed" if args.budget_bytes else "announced",
                    "budget_bytes": args.budget_bytes,
                },
            },
        )
        agent_cfgs.append(cfg)
    return agg_cfg, agent_cfgs


def _watch(
    procs: list[subprocess.Popen[bytes]],
    metrics: Path,
    workdir: Path,
    timeout: float,
    broker: tuple[str, int],
    protocol: str,
) -> int:
    """Show the fleet live (from the broker) until the aggregator exits, an agent fails or
    ``timeout`` passes; returns the demo's exit code."""
    from fedfstq.demo_watch import Run, watch

    run = Run(procs, metrics, workdir / "logs", *broker, protocol=protocol)
    return watch(run, timeout, sys.stdout)


def _report(args: argparse.Namespace, workdir: Path, eval_path: Path, code: int) -> int:
    """The per-round table, the records as JSON, and held-out answers before and after."""
    from aggregator.round_result import read_rounds
    from common.record import jsonable
    from fedfstq.demo_report import compare_answers, table_text

    records = read_rounds(workdir / "aggregator" / "rounds.jsonl")
    if records:
        print("\n" + table_text(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([jsonable(r) for r in records], indent=2))
        print(f"\nper-round records: {args.json}")
    globals_dir = workdir / "aggregator" / "global"
    versions = sorted(globals_dir.glob("v*")) if globals_dir.is_dir() else []
    if len(versions) > 1:
        first, last = versions[0], versions[-1]
        print(f"\nheld-out questions: the initial adapter ({first.name}) and the final one "
              f"({last.name}), greedy answers (generating...)", flush=True)  # fmt: skip
        for a in compare_answers(args.model, eval_path, first, last):
            print(f"\n  Q: {a.question}\n  expected: {a.reference}")
            print(f"    its perplexity: {a.before_ppl:.1f} under {first.name}, "
                  f"{a.after_ppl:.1f} under {last.name}")  # fmt: skip
            print(f"  {first.name}: {a.before}\n  {last.name}: {a.after}")
    if versions:
        print(f"\nfinal global adapter (stock peft layout): {versions[-1]}")
    if code == 0 and len([r for r in records if r.status == "closed"]) < args.rounds:
        print("the aggregator stopped before all rounds closed; see the logs")
        code = 1
    return code


def main(args: argparse.Namespace) -> int:
    # What can be refused is checked before anything is deleted or loaded; the errors reach
    # fedfstq.cli, which prints them as one line with their exit code.
    languages = check_languages(args.languages)
    remote = remote_broker(args.broker, args.mqtt_protocol) if args.broker else None
    workdir = claim_workdir(args.workdir, overwrite=args.overwrite)
    (workdir / "logs").mkdir()
    print(f"fedfstq demo: {args.clients} agents, {args.rounds} rounds, method {args.method}")
    print(f"work dir {workdir} (logs in {workdir / 'logs'})")
    print(f"data: chatterbot-corpus, Dirichlet alpha={args.alpha} over languages")
    clients, eval_path = _prepare_data(args, languages, workdir)

    from broker.local import LocalBroker
    from workload.models import load_base_model

    print(f"model: {args.model} (first use converts the packaged GGUF once)")
    load_base_model(args.model)  # convert/cache before N processes race for it

    broker: LocalBroker | None = None
    if remote is not None:
        host, port = remote
    else:
        broker = LocalBroker("dev", workdir=workdir / "broker").start()
        host, port = broker.host, broker.port
        print(f"broker: private Mosquitto on {host}:{port} (pid {broker.pid})")

    agg_cfg, agent_cfgs = _write_configs(args, workdir, host, port, clients, eval_path)
    procs = [_service("aggregator", agg_cfg, workdir / "logs" / "aggregator.log")]
    procs += [_service("agent", cfg, workdir / "logs" / f"{cfg.stem}.log") for cfg in agent_cfgs]
    metrics = workdir / "aggregator" / "rounds.jsonl"
    print(f"\nthe fleet as the broker shows it (what `fedfstq status --watch "
          f"--broker mqtt://{host}:{port} --fleet demo` shows):")  # fmt: skip
    try:
        code = _watch(procs, metrics, workdir, args.timeout, (host, port), args.mqtt_protocol)
    except KeyboardInterrupt:
        code = 130
    finally:
        _stop(procs)
        if broker is not None:
            broker.stop()
    return _report(args, workdir, eval_path, code)
