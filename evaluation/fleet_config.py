"""The evaluation's settings and compared methods, apart from the runner.

Imports neither torch nor the services, so ``fedfstq bench fleet --help`` can show the defaults
without loading them (:mod:`evaluation.fleet` runs what these describe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workload.languages import DEFAULT_LANGUAGES

if TYPE_CHECKING:
    from workload.models import LoraSpec

__all__ = ["METHODS", "FleetConfig", "compression_for", "downlink_for"]

#: The compared methods (issue 4): compression settings of the agents; ``budgeted`` ones get the
#: matched per-round byte budget, the others send what their method makes. ``downlink`` is the
#: aggregator's downlink (decision 13): absent = ``{"mode": "full"}``, the fp16 adapter to every
#: fetch; ``catchup`` serves ``master - held`` through the fstq codec at ``budget_fraction`` of the
#: dense fp16 adapter. Every method's devices derive v0 themselves.
METHODS: dict[str, dict[str, Any]] = {
    "dense_fp16": {"method": "dense_fp16"},
    "qsgd": {"method": "qsgd", "qsgd_bits": 4},
    "topk_ef": {"method": "topk", "error_feedback": True, "budgeted": True},
    "fstq": {"method": "fstq", "budgeted": True},
    # The paper's percentile bands fix the share of each width, not the bytes: unbudgeted.
    "fstq_percentile": {"method": "fstq", "allocation": "percentile"},
    "fstq_ef": {"method": "fstq", "error_feedback": True, "budgeted": True},
    "fstq_stochastic": {"method": "fstq", "rounding": "stochastic", "budgeted": True},
    "fstq_down8": {
        "method": "fstq", "budgeted": True,
        "downlink": {"mode": "catchup", "budget_fraction": 1 / 8},
    },
    "fstq_down16": {
        "method": "fstq", "budgeted": True,
        "downlink": {"mode": "catchup", "budget_fraction": 1 / 16},
    },
}  # fmt: skip
_FULL_DOWNLINK: dict[str, Any] = {"mode": "full"}
#: Settled for every method, so a changed aggregator default cannot change the comparison.
_DOWNLINK_COMMON: dict[str, Any] = {"derive_v0": True, "fisher": False}


def _spec(label: str) -> dict[str, Any]:
    if label not in METHODS:
        raise ValueError(f"unknown method {label!r}; known: {', '.join(METHODS)}")
    return dict(METHODS[label])


def compression_for(label: str, budget_bytes: int) -> dict[str, bool | int | float | str]:
    """The agents' ``compression`` settings of method ``label`` at the matched budget."""
    spec = _spec(label)
    spec.pop("downlink", None)
    if spec.pop("budgeted", False):
        spec.update(budget_mode="fixed", budget_bytes=budget_bytes)
    return spec


def downlink_for(label: str, dense_fp16_bytes: int) -> dict[str, bool | int | float | str]:
    """The aggregator's ``downlink`` settings of method ``label``: a catch-up budget as a share
    of the dense fp16 adapter becomes ``budget_bytes``."""
    spec = {**_DOWNLINK_COMMON, **_spec(label).get("downlink", _FULL_DOWNLINK)}
    fraction = spec.pop("budget_fraction", None)
    if fraction is not None:
        spec["budget_bytes"] = math.ceil(fraction * dense_fp16_bytes)
    return spec


@dataclass(frozen=True)
class FleetConfig:
    """One evaluation setting; every method of a run shares it (and so its seeds and data)."""

    clients: int = 100
    per_round: int = 10
    rounds: int = 10
    alpha: float = 0.1
    dropout: float = 0.1
    seed: int = 0
    model: str = "smollm2"
    model_cache_dir: Path | None = None
    partition_by: str = "language"
    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    examples_per_client: int | None = 64
    held_out: int = 96
    generation_examples: int = 16
    max_new_tokens: int = 24
    eval_batch_size: int = 16
    steps: int = 5
    batch_size: int = 4
    max_len: int = 64
    lr: float = 5e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    #: Matched budget of the budgeted methods, as a share of the dense fp16 update.
    budget_fraction: float = 0.125
    quorum_fraction: float = 0.5
    chunk_size: int = 64 * 1024
    #: Log-normal uplink rates (evaluation.links) unless a trace is given.
    link_median_mbps: float = 4.0
    link_sigma: float = 1.0
    link_lo_mbps: float = 0.5
    link_hi_mbps: float = 20.0
    #: Give up on a round that has not closed after this much real time.
    round_wall_limit_s: float = 1800.0

    @property
    def lora(self) -> LoraSpec:
        from workload.models import LoraSpec  # torch: only when a run builds its model

        return LoraSpec(r=self.lora_r, alpha=self.lora_alpha, target_modules=self.lora_targets)
