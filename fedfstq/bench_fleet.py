"""`fedfstq bench fleet`: the evaluation fleet (issue 4) — methods compared through the service.

Runs every method on one fleet (evaluation.fleet), writes the run record as JSON after each
round (a long run that is stopped keeps what it measured), fixes the quality target (decision
14: ``--target-value``, or the rule "95% of the dense run's improvement"), and prints the
summary tables; ``--plots DIR`` draws quality versus bytes (uplink, and both ways) and versus
simulated time (with the downlink, and uplink only). ``--seeds 0,1`` runs the whole comparison
once per seed, each its own fleet with its own record; the report keeps seeds apart and sets
their headline numbers side by side.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.fleet_config import METHODS, FleetConfig
from fedfstq.option_types import (
    comma_list,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from fedfstq.workdir import claim_workdir

if TYPE_CHECKING:
    from evaluation.links import LinkProfile
    from evaluation.run_record import FleetRound, FleetRun, RunConfig
    from evaluation.targets import Target

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)

_HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "rouge_l": True}


def _seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated, distinct integers >= 0."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    seeds = tuple(non_negative_int(item) for item in items)
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1, got {text!r}")
    return seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fedfstq bench fleet`` (defaults: :class:`FleetConfig`)."""
    d = FleetConfig()
    p.add_argument("--clients", type=positive_int, default=d.clients, help="devices in the fleet")
    p.add_argument(
        "--per-round", type=positive_int, default=d.per_round, help="clients selected a round"
    )
    p.add_argument("--rounds", type=positive_int, default=d.rounds, help="federated rounds")
    p.add_argument(
        "--alpha", type=positive_float, default=d.alpha,
        help="Dirichlet concentration over languages (smaller: more non-IID)",
    )  # fmt: skip
    p.add_argument(
        "--dropout", type=probability, default=d.dropout,
        help="probability that a selected client drops out of its round",
    )  # fmt: skip
    p.add_argument(
        "--methods", type=comma_list(list(METHODS), "method"), default=",".join(METHODS),
        help=f"comma-separated, of: {', '.join(METHODS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=fraction, default=d.budget_fraction,
        help="matched budget of the budgeted methods, as a share of the dense fp16 update",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=non_negative_int, default=d.seed, help="data split, links, dropouts, LoRA"
    )
    p.add_argument(
        "--seeds", type=_seed_list, default=None, metavar="S,S",
        help="run the comparison once per seed (each its own fleet and record: --json PATH "
        "becomes PATH-s<seed>.json, the work dir gets an s<seed> folder); overrides --seed",
    )  # fmt: skip
    p.add_argument(
        "--downlink-asymmetry", type=positive_float, default=None, metavar="RATIO",
        help="downlink rate / uplink rate where a trace gives no downlink (default: 13/6, the "
        "LTE medians of evaluation/links)",
    )  # fmt: skip
    p.add_argument("--model", default=d.model, help='"smollm2", "tiny" or a model directory')
    p.add_argument(
        "--steps", type=positive_int, default=d.steps, help="local training steps per round"
    )
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="training batch")
    p.add_argument("--max-len", type=positive_int, default=d.max_len, help="tokens per example")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="local learning rate")
    p.add_argument("--lora-r", type=positive_int, default=d.lora_r, help="LoRA rank (alpha 2r)")
    p.add_argument(
        "--examples-per-client", type=positive_int, default=d.examples_per_client,
        help="training examples of a device at most",
    )  # fmt: skip
    p.add_argument(
        "--held-out", type=positive_int, default=d.held_out, help="held-out evaluation examples"
    )
    p.add_argument(
        "--generation-examples", type=non_negative_int, default=d.generation_examples,
        help="held-out questions answered by greedy generation for ROUGE-L",
    )  # fmt: skip
    p.add_argument(
        "--trace", type=Path, default=None, metavar="PATH",
        help="link trace JSON (evaluation/links); default: log-normal links",
    )  # fmt: skip
    p.add_argument(
        "--target-metric", choices=sorted(_HIGHER_IS_BETTER), default="loss",
        help="the quality metric of the target",
    )  # fmt: skip
    p.add_argument(
        "--target-value", type=float, default=None,
        help="the target, fixed before the run; default: --target-fraction of dense's improvement",
    )  # fmt: skip
    p.add_argument(
        "--target-fraction", type=fraction, default=0.95,
        help="the target as a share of the dense fp16 run's improvement by its last round",
    )  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the per-method agent RSS")
    p.add_argument(
        "--memory", action="store_true",
        help="with --report: measure the agent RSS per method (needs the runs' --workdir)",
    )  # fmt: skip
    p.add_argument(
        "--workdir", type=Path, default=Path("runs/fleet"), metavar="DIR",
        help="the devices' and the aggregator's state; each method's folder is replaced; a "
        "non-empty folder fedfstq did not make is refused (see --overwrite)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="use a non-empty --workdir fedfstq did not make (its method folders are replaced)",
    )  # fmt: skip
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the run record here"
    )
    p.add_argument(
        "--plots", type=Path, default=None, metavar="DIR", help="write PNG plots to this folder"
    )
    p.add_argument(
        "--report", type=Path, nargs="+", default=None, metavar="RUN.json",
        help="run nothing: merge these run records (same config and seeds, other methods), "
        "fix the target, print the tables and draw the plots",
    )  # fmt: skip


def _config(args: argparse.Namespace, seed: int) -> FleetConfig:
    return FleetConfig(
        clients=args.clients, per_round=args.per_round, rounds=args.rounds, alpha=args.alpha,
        dropout=args.dropout, seed=seed, model=args.model, steps=args.steps,
        batch_size=args.batch_size, max_len=args.max_len, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, examples_per_client=args.examples_per_client,
        held_out=args.held_out, generation_examples=args.generation_examples,
        budget_fraction=args.budget,
    )  # fmt: skip


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(args.seeds) if args.seeds is not None else (args.seed,)


def _per_seed(path: Path, seed: int, many: bool) -> Path:
    """Where seed ``seed``'s file or folder goes: ``path`` itself for a single seed."""
    if not many:
        return path
    return path.with_name(f"{path.stem}-s{seed}{path.suffix}") if path.suffix else path / f"s{seed}"


def _target(args: argparse.Namespace, record: FleetRun) -> Target | None:
    from evaluation.targets import Target, metric_value, target_from_reference

    metric, higher = args.target_metric, _HIGHER_IS_BETTER[args.target_metric]
    if args.target_value is not None:
        rule = "fixed before the run (--target-value)"
        return Target(metric, args.target_value, higher, rule)
    dense = record.methods.get("dense_fp16")
    if dense is None:
        return None
    values = [metric_value(r, metric) for r in dense.rounds]
    if len(values) < 2 or any(v is None for v in values):
        return None  # the dense run has not trained a round yet
    try:
        target = target_from_reference(
            [float(v) for v in values if v is not None], metric=metric, higher_is_better=higher,
            fraction=args.target_fraction,
        )  # fmt: skip
    except ValueError as exc:
        log.warning("no target: %s", exc)
        return None
    return target


def _print_round(method: str, r: FleetRound) -> None:
    ev = r.eval
    print(
        f"{method:>16} round {r.round:>3}: loss {ev.loss:.4f} acc {ev.accuracy:.4f} "
        f"rougeL {ev.rouge_l if ev.rouge_l is None else f'{ev.rouge_l:.4f}'} "
        f"up {r.uplink_wire_bytes:>10,} B  down {r.downlink_wire_bytes:>10,} B  "
        f"time {r.round_time_with_downlink_s or r.round_time_s:8.2f} s  "
        f"arrived {len(r.arrived)}/{len(r.selected)} dropped {list(r.dropped)}",
        flush=True,
    )


def _fleet(config: RunConfig) -> RunConfig:
    """What makes runs one fleet: the config without what a run measured, how long it ran (a
    method may run longer to reach the target) and the budget (a method setting: runs at another
    budget keep their methods apart, in :func:`merge_records`)."""
    return replace(
        config, budget_bytes=0, dense_fp16_bytes=0, links={}, downlinks=None, rounds=0,
        budget_fraction=0.0, downlink_asymmetry=None,
    )  # fmt: skip


def merge_by_seed(records: Sequence[FleetRun]) -> dict[int, FleetRun]:
    """Records grouped by seed (each seed its own fleet), each group merged; by seed."""
    groups: dict[int, list[FleetRun]] = {}
    for rec in records:
        groups.setdefault(rec.config.seed, []).append(rec)
    return {seed: merge_records(groups[seed]) for seed in sorted(groups)}


def merge_records(records: list[FleetRun]) -> FleetRun:
    """One record from runs of the same fleet (config equal but for what runs measured)."""
    from evaluation.run_record import FleetRun, MethodRun

    first = records[0]
    methods: dict[str, MethodRun] = {}
    for rec in records:
        same, other = _fleet(first.config), _fleet(rec.config)
        mismatch = {f.name for f in fields(same) if getattr(same, f.name) != getattr(other, f.name)}
        if mismatch:
            raise ValueError(f"runs differ in {sorted(mismatch)}: not the same fleet")
        fraction = rec.config.budget_fraction
        for label, method in rec.methods.items():
            other_budget = fraction != first.config.budget_fraction
            key = f"{label}@{fraction:g}" if other_budget and method.budget_bytes else label
            methods[key] = method
    return FleetRun(config=first.config, methods=methods)


def main(args: argparse.Namespace) -> int:
    if args.report is not None:
        from evaluation.run_record import read_run

        try:
            records = merge_by_seed([read_run(path) for path in args.report])
        except (OSError, ValueError) as exc:
            print(f"fedfstq bench fleet --report: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            records = _run(args)
        except ValueError as exc:  # unknown method, bad trace file, bad option values
            print(f"fedfstq bench fleet: {exc}", file=sys.stderr)
            return 2
    return _report(args, records)


def _run(args: argparse.Namespace) -> dict[int, FleetRun]:
    """Every seed's comparison in turn; the records, by seed."""
    from evaluation.fleet import compression_for
    from evaluation.links import load_trace

    # SIGTERM unwinds like Ctrl-C, so the private Mosquitto and the agents are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A hundred agents log every step; the bench prints its own progress.
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("broker.mqtt.paho").setLevel(logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for label in methods:
        compression_for(label, 1)  # unknown names fail before anything starts
    trace = load_trace(args.trace) if args.trace is not None else None
    # The run replaces only its own per-method folders, in a folder it made (or an empty one).
    workdir = claim_workdir(
        args.workdir, overwrite=args.overwrite, command="fedfstq bench fleet", fresh=False
    )
    seeds = _seeds(args)
    records: dict[int, FleetRun] = {}
    for seed in seeds:
        many = len(seeds) > 1
        records[seed] = _run_seed(
            args, _config(args, seed), methods, trace, _per_seed(workdir, seed, many),
            None if args.json is None else _per_seed(args.json, seed, many),
        )  # fmt: skip
    return records  # their targets are fixed by _report


def _run_seed(
    args: argparse.Namespace,
    config: FleetConfig,
    methods: list[str],
    trace: dict[str, LinkProfile] | None,
    workdir: Path,
    json_path: Path | None,
) -> FleetRun:
    from evaluation.fleet import run_fleet
    from evaluation.links import DOWNLINK_ASYMMETRY
    from evaluation.run_record import write_run

    links = None
    if trace is not None:
        import numpy as np

        from evaluation.links import assign_links

        names = [f"c{i:03d}" for i in range(config.clients)]
        links = assign_links(names, trace, np.random.default_rng(config.seed))

    def save(label: str, rec: FleetRun) -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_run(json_path, replace(rec, target=_target(args, rec)))

    def progress(label: str, rec: FleetRun, rnd: FleetRound) -> None:
        _print_round(f"{label} s{config.seed}", rnd)
        save(label, rec)

    result = run_fleet(
        config, methods, workdir, links=links, on_method=save, on_round=progress,
        downlink_asymmetry=args.downlink_asymmetry or DOWNLINK_ASYMMETRY,
    )  # fmt: skip
    if not args.no_memory:
        result = measure_memory(result, workdir)
    save("", result)
    return result


def measure_memory(record: FleetRun, workdir: Path) -> FleetRun:
    """Peak RSS of one device's process per method (evaluation.agent_memory), into the record.

    Uses the run's settings and the data of its first device (left in ``workdir`` by the run).
    """
    from evaluation.agent_memory import measure_peak_rss_mb
    from evaluation.fleet import compression_for

    c = record.config
    methods = dict(record.methods)
    for label, rec in methods.items():
        settings = {
            "client_id": "memory", "model": c.model,
            "data_path": workdir / label / "devices" / "c000" / "data.jsonl",
            "state_dir": workdir / "memory" / label,
            "training": {"steps": c.steps, "batch_size": c.batch_size,
                         "max_len": c.max_len, "lr": c.lr},
            "compression": compression_for(label, c.budget_bytes),
        }  # fmt: skip
        lora = {"r": c.lora_r, "alpha": c.lora_alpha, "target_modules": list(c.lora_targets)}
        rss = measure_peak_rss_mb(settings, lora, workdir / "memory" / label)
        methods[label] = replace(rec, agent_peak_rss_mb=rss)
        print(f"{label:>16}: agent peak RSS {rss:.0f} MB", flush=True)
    return replace(record, methods=methods)


def _report(args: argparse.Namespace, records: dict[int, FleetRun]) -> int:
    from evaluation.run_record import write_run
    from evaluation.summary import Summary, summarize
    from evaluation.tables import markdown_tables

    many = len(records) > 1
    summaries: dict[int, Summary] = {}
    for seed, found in records.items():
        record = replace(found, target=_target(args, found))
        if args.report is not None and args.memory:
            record = measure_memory(record, _per_seed(args.workdir, seed, many))
        if args.report is not None and args.json is not None:
            write_run(_per_seed(args.json, seed, many), record)
        summaries[seed] = summarize(record)
        print()
        if many:
            print(f"## Seed {seed}\n")
        print(markdown_tables(summaries[seed]))
        if args.plots is not None:
            _plots(record, _per_seed(args.plots, seed, many))
    if many:
        from evaluation.seeds import seeds_table

        print(f"## Across seeds {', '.join(map(str, records))} (each its own fleet and target)\n")
        print(seeds_table(summaries))
    return 0


def _plots(record: FleetRun, folder: Path) -> None:
    """Quality against uplink and total bytes, against time with and without the downlink."""
    from evaluation.plots import plot_quality_vs_bytes, plot_quality_vs_time

    folder.mkdir(parents=True, exist_ok=True)
    for metric in ("loss", "rouge_l"):
        plot_quality_vs_bytes(record, metric, folder / f"{metric}_vs_uplink.png")
        plot_quality_vs_bytes(record, metric, folder / f"{metric}_vs_total.png", both_ways=True)
        plot_quality_vs_time(record, metric, folder / f"{metric}_vs_time.png")
        plot_quality_vs_time(
            record, metric, folder / f"{metric}_vs_uplink_time.png", downlink=False
        )
    print(f"plots in {folder}", file=sys.stderr)
