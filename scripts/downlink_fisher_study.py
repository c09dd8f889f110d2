"""Does a held-out Fisher help the catch-up downlink? A small closed-loop study (issue 12, part 2).

Three arms share the data, the client selection and the training seeds and differ only in how
selected devices get the global adapter:

* ``full``: the fp16 adapter (today's downlink);
* ``magnitude``: a per-device catch-up through the real planner (``aggregator.downlink``) at the
  downlink budget, bits allocated by magnitude;
* ``fisher``: the same, bits weighed by the coordinate Fisher of the held-out loss at the new
  global (``AdapterModel.fisher``, what ``downlink.fisher = true`` uses).

Each arm is closed-loop: its devices train from what they hold and upload dense deltas
(``trained - held``); its master is FedAvg of those. Per round it records the master's held-out
loss and, over the devices that caught up, the held-out loss of what they then hold and the
Fisher-weighted error left of the gap, ``sum F (master - held_after)^2 / sum F (master -
held_before)^2`` (F: the held-out Fisher at that arm's master, the same for both catch-up arms).

    .venv/bin/python scripts/downlink_fisher_study.py --model tiny --rounds 3   # a smoke run
    .venv/bin/python scripts/downlink_fisher_study.py --model smollm2 --json runs/fisher.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.adapter_model import AdapterModel
from aggregator.downlink import Downlink
from aggregator.global_adapter import GlobalAdapter
from aggregator.settings import DownlinkSettings
from aggregator.store import AggregatorStore, GlobalRecord
from broker.messages import DownlinkRoute
from fstq.adapter_state import adapter_parameters
from fstq.compressors import decompress
from fstq.training import set_adapter_state
from workload.batches import batches, encode_pair
from workload.catchup import apply_update, canonical_bytes, state_from_bytes, state_id
from workload.data import federated_split, load_chatterbot
from workload.models import LoraSpec, load_base_model

State = dict[str, torch.Tensor]
ARMS = ("full", "magnitude", "fisher")


def train(model: Any, pad: int, examples: list[Any], start: State, args: argparse.Namespace,
          seed: int) -> State:  # fmt: skip
    """Local steps from ``start`` (AdamW, answer-token loss); the trained adapter (fp32)."""
    set_adapter_state(model, start)
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(list(params.values()), lr=args.lr)
    model.train(True)
    rng = np.random.default_rng(seed)
    for batch in batches(examples, args.batch_size, pad, rng, args.steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.train(False)
    return {k: p.detach().float().clone() for k, p in params.items()}


def weighted_gap(fisher: Mapping[str, torch.Tensor], master: State, held: State) -> float:
    return sum(float((fisher[k] * (master[k] - held[k].float()).square()).sum()) for k in master)


class Arm:
    """One downlink arm: its master, its planner and store, what each device holds."""

    def __init__(self, name: str, root: Path, master: State, args: argparse.Namespace,
                 fisher_of: Any) -> None:  # fmt: skip
        self.name = name
        self.store = AggregatorStore(root / name / "agg.db")
        settings = DownlinkSettings(
            mode="full" if name == "full" else "catchup",
            budget_fraction=args.budget_fraction,
            fisher=name == "fisher",
            max_chain=1024,
        )
        self.versions: dict[int, State] = {}
        self.planner = Downlink(settings, self.store, chunk_size=1 << 20,
                                load_master=self.versions.get, fisher=fisher_of)  # fmt: skip
        self.held: dict[int, bytes] = {}
        self.publish(master)

    def publish(self, master: State) -> None:
        version = len(self.versions)
        g = GlobalAdapter.build(version, version, master, spec=SPEC, base_model="-",
                                chunk_size=1 << 20)  # fmt: skip
        self.versions[version] = g.master
        self.store.add_global(GlobalRecord(version, version, g.sha256_hex, "-", time.time()))
        self.planner.publish(g)
        self.v0 = self.v0 if version else g.payload

    def fetch(self, device: int) -> tuple[bytes, bytes, str]:
        """(held before, held after, route) of a device fetching the current version."""
        before = self.held.get(device, self.v0)
        plan = self.planner.plan(f"d{device}", state_id(before), time.time()).served
        msg = plan.message
        if msg.route is DownlinkRoute.FULL:
            after = self.planner.current.payload
        elif msg.route is DownlinkRoute.NONE:
            after = before
        else:
            payload = b"".join(c.data for c in plan.chunks)
            after = canonical_bytes(apply_update(state_from_bytes(before), decompress(payload)))
        assert state_id(after) == msg.result, "a device would have refused this state"
        self.held[device] = after
        return before, after, msg.route.value


SPEC = LoraSpec()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--held-out", type=int, default=48)
    p.add_argument("--budget-fraction", type=float, default=1 / 8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    global SPEC
    SPEC = LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, target_modules=("q_proj", "v_proj"))

    base, tokenizer = load_base_model(args.model)
    pad = int(tokenizer.pad_token_id)
    split = federated_split(load_chatterbot(["english"]), args.clients, 0.5,
                            np.random.default_rng(args.seed), by="category",
                            max_per_client=64, max_test=args.held_out)  # fmt: skip
    clients = [[encode_pair(tokenizer, q, args.max_len) for q in c] for c in split.clients]
    held_out = [encode_pair(tokenizer, q, args.max_len) for q in split.test]
    model_box = AdapterModel(lambda: (copy.deepcopy(base), tokenizer), SPEC, args.seed)
    v0 = model_box.initial_state()
    trainer = model_box._ensure()[0]  # one peft model for all training

    def loss(state: State) -> float:
        q = model_box.evaluate(state, held_out, 16)
        return float("nan") if q.loss is None else q.loss

    fishers: dict[bytes, dict[str, torch.Tensor]] = {}

    def fisher_of(g: GlobalAdapter) -> dict[str, torch.Tensor]:
        """The held-out Fisher at ``g`` (once per global: allocation and measurement share it)."""
        key = g.manifest.sha256
        if key not in fishers:
            fishers[key] = model_box.fisher(g.master, held_out)
        return fishers[key]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        arms = {a: Arm(a, Path(tmp), v0, args, fisher_of) for a in ARMS}
        print(f"v0 held-out loss {loss(v0):.4f}; full adapter {len(arms['full'].v0)} B")
        for r in range(1, args.rounds + 1):
            rng = np.random.default_rng([args.seed, r])
            chosen = sorted(int(i) for i in rng.choice(args.clients, args.per_round, replace=False))
            row: dict[str, Any] = {"round": r, "selected": chosen}
            for name, arm in arms.items():
                master = arm.planner.current.master
                fisher = fisher_of(arm.planner.current) if name != "full" else None
                deltas, weights, held_losses, fwe, routes = [], [], [], [], []
                for d in chosen:
                    before, after, route = arm.fetch(d)
                    routes.append(route)
                    held = state_from_bytes(after)
                    if fisher is not None and route == "catchup":
                        gap = weighted_gap(fisher, master, state_from_bytes(before))
                        fwe.append(weighted_gap(fisher, master, held) / gap)
                        held_losses.append(loss({k: t.float() for k, t in held.items()}))
                    start = {k: t.float() for k, t in held.items()}
                    trained = train(trainer, pad, clients[d], start, args, seed=1000 * r + d)
                    deltas.append({k: trained[k] - start[k] for k in start})
                    weights.append(float(len(clients[d])))
                total = sum(weights)
                new = {k: master[k] + sum(w * dl[k] for w, dl in zip(weights, deltas,
                                                                     strict=True)) / total
                       for k in master}  # fmt: skip
                arm.publish(new)
                row[name] = {
                    "target_loss": loss(dict(master)),  # what the devices caught up to
                    "master_loss": loss(new),
                    "routes": routes,
                    "held_loss_after_catchup": statistics.fmean(held_losses)
                    if held_losses
                    else None,
                    "fisher_weighted_error": statistics.fmean(fwe) if fwe else None,
                }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "selected"}))
    summary = {a: rows[-1][a]["master_loss"] for a in ARMS}
    fwe = {a: statistics.fmean(x[a]["fisher_weighted_error"] for x in rows
                               if x[a]["fisher_weighted_error"] is not None)
           for a in ARMS[1:]}  # fmt: skip
    print("final master held-out loss:", summary)
    print("mean Fisher-weighted error left of the gap:", fwe)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rounds": rows, "final": summary, "fwe": fwe},
                                        indent=2, allow_nan=True))  # fmt: skip
    if any(math.isnan(v) for v in summary.values()):
        raise SystemExit("a loss was not finite")


if __name__ == "__main__":
    main()
