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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from workload.data import DEFAULT_LANGUAGES

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=3, help="edge agent processes (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--steps", type=int, default=6, help="local steps per round (default 6)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64, help="tokens per example")
    p.add_argument(
        "--method",
        default="fstq",
        choices=["fstq", "dense_fp16", "dense_fp32", "qsgd", "topk"],
        help="update compression (fstq or a baseline)",
    )
    p.add_argument("--budget-bytes", type=int, default=None, help="per-client upload budget")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    p.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES))
    p.add_argument("--examples-per-client", type=int, default=120)
    p.add_argument("--eval-examples", type=int, default=48)
    p.add_argument("--model", default="smollm2", help='"smollm2", "tiny" or a model directory')
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--broker", default=None, help="mqtt://host:port of an existing broker")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--json", type=Path, default=None, help="write per-round records here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many s")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """Write a two-level dict as TOML (enough for the services' settings files)."""
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{kk} = {_toml(vv)}" for kk, vv in v.items() if vv is not None)
    path.write_text("\n".join(lines) + "\n")


def _prepare_data(args: argparse.Namespace, workdir: Path) -> tuple[list[Path], Path]:
    from workload.data import federated_split, load_chatterbot, write_jsonl

    pairs = load_chatterbot(args.languages.split(","))
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


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row(rec: dict[str, Any]) -> str:
    ev = rec.get("eval") or {}
    loss = ev.get("loss")
    acc = ev.get("accuracy")
    ratio = rec.get("ratio_vs_fp16")
    return (
        f"{rec['round']:>5} {rec['status']:>7} "
        f"{(f'{loss:.4f}' if loss is not None else '-'):>9} "
        f"{(f'{acc:.4f}' if acc is not None else '-'):>8} "
        f"{rec['uplink_wire_bytes']:>12,} {rec['accepted_payload_bytes']:>12,} "
        f"{(f'{ratio:.1f}x' if ratio else '-'):>8} "
        f"{len(rec['arrived'])}/{len(rec['selected'])}"
    )


HEADER = (
    "round  status  eval_loss  eval_acc  uplink_wire_B  payload_B  vs_fp16  arrived\n" + "-" * 80
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
            "mqtt": {"host": host, "port": port},
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
                "mqtt": {"host": host, "port": port},
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
    procs: list[subprocess.Popen[bytes]], metrics: Path, workdir: Path, timeout: float
) -> int:
    """Print rounds as the aggregator closes them; return when it exits (or on failure)."""
    shown = 0
    started = time.monotonic()
    while True:
        exited = procs[0].poll() is not None  # checked first: its last record is then on disk
        records = _read_rounds(metrics)
        for rec in records[shown:]:
            print(_row(rec), flush=True)
        shown = len(records)
        if exited:
            return procs[0].returncode or 0
        dead = [p for p in procs[1:] if p.poll() not in (None, 0)]
        if dead:
            print(f"an agent exited with code {dead[0].returncode}; see {workdir / 'logs'}")
            return 1
        if time.monotonic() - started > timeout:
            print(f"timed out after {timeout:.0f} s")
            return 1
        time.sleep(0.5)


def main(args: argparse.Namespace) -> int:
    from broker.local import LocalBroker
    from workload.models import load_base_model

    workdir: Path = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    print(f"fedfstq demo: {args.clients} agents, {args.rounds} rounds, method {args.method}")
    print(f"work dir {workdir} (logs in {workdir / 'logs'})")
    print(f"data: chatterbot-corpus, Dirichlet alpha={args.alpha} over languages")
    clients, eval_path = _prepare_data(args, workdir)
    print(f"model: {args.model} (first use converts the packaged GGUF once)")
    load_base_model(args.model)  # convert/cache before N processes race for it

    broker: LocalBroker | None = None
    if args.broker:
        url = urlparse(args.broker)
        host, port = url.hostname or "127.0.0.1", url.port or 1883
    else:
        broker = LocalBroker("dev", workdir=workdir / "broker").start()
        host, port = broker.host, broker.port
        print(f"broker: private Mosquitto on {host}:{port} (pid {broker.pid})")

    agg_cfg, agent_cfgs = _write_configs(args, workdir, host, port, clients, eval_path)
    procs = [_service("aggregator", agg_cfg, workdir / "logs" / "aggregator.log")]
    procs += [_service("agent", cfg, workdir / "logs" / f"{cfg.stem}.log") for cfg in agent_cfgs]
    metrics = workdir / "aggregator" / "rounds.jsonl"
    print("\n" + HEADER)
    try:
        code = _watch(procs, metrics, workdir, args.timeout)
    except KeyboardInterrupt:
        code = 130
    finally:
        _stop(procs)
        if broker is not None:
            broker.stop()

    records = _read_rounds(metrics)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        print(f"\nper-round records: {args.json}")
    globals_dir = workdir / "aggregator" / "global"
    final = sorted(globals_dir.glob("v*")) if globals_dir.is_dir() else []
    if final:
        print(f"final global adapter (stock peft layout): {final[-1]}")
    if code == 0 and len([r for r in records if r["status"] == "closed"]) < args.rounds:
        print("the aggregator stopped before all rounds closed; see the logs")
        code = 1
    return code
