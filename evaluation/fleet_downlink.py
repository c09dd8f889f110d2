"""Where the catch-up downlink (decision 13) meets the fleet runner.

The only place that knows the names of the aggregator's downlink settings
(``aggregator.settings.DownlinkSettings``), of its round record's downlink fields
(``RoundResult.downlink``) and of what an agent says about its fetches (``EdgeAgent.downlinks``);
everything else reads the run record (:mod:`evaluation.downlink`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from evaluation.downlink import (
    FIRST_CONTACT,
    ROUTES,
    CatchupError,
    DownlinkCount,
    DownlinkRound,
    Route,
    Staleness,
    sort_staleness,
)
from evaluation.fleet_config import downlink_for

if TYPE_CHECKING:
    from aggregator.round_result import DownlinkTraffic, RoundResult
    from edge_agent.agent import EdgeAgent

__all__ = [
    "DownlinkReportError",
    "Reported",
    "agent_downlink",
    "aggregator_downlink",
    "downlink_settings",
]


class DownlinkReportError(RuntimeError):
    """The aggregator or a device reported a downlink route the run record does not know."""


def downlink_settings(label: str, dense_fp16_bytes: int) -> dict[str, object]:
    """The aggregator's ``downlink`` table of method ``label`` (aggregator.settings)."""
    return {"downlink": downlink_for(label, dense_fp16_bytes)}


def aggregator_downlink(rec: RoundResult) -> DownlinkRound | None:
    """The round's downlink breakdown as the aggregator counted it (None: it did not)."""
    d = rec.downlink
    if d is None:
        return None
    unknown = set(d.routes) - set(ROUTES)
    if unknown:
        raise DownlinkReportError(
            f"round {rec.round}: the aggregator counted unknown routes {unknown}"
        )

    def count(t: DownlinkTraffic) -> DownlinkCount:
        return DownlinkCount(fetches=t.fetches, wire_bytes=t.wire_bytes)

    error = None
    if d.catchup_error is not None and d.catchup_error_vs_master is not None:
        error = CatchupError(vs_gap=d.catchup_error, vs_master=d.catchup_error_vs_master)
    return DownlinkRound(
        by_route={r: count(d.routes[r]) for r in ROUTES if r in d.routes},
        by_staleness=sort_staleness({k: count(t) for k, t in d.staleness.items()}),
        catchup_error=error, plans_computed=d.plans_computed, plans_reused=d.plans_reused,
        plan_compute_s=d.plan_compute_s,
    )  # fmt: skip


def agent_downlink(agent: EdgeAgent, round_id: int) -> Reported | None:
    """How the device says it got the adapter it trained ``round_id`` from; for a round it did
    not train, how it got (or was getting) the adapter it held (None: it got none)."""
    d = agent.downlinks.get(round_id) or agent.pending_downlink()
    if d is None:
        return None
    route = _AGENT_ROUTES.get(d.route)
    if route is None:
        raise DownlinkReportError(
            f"round {round_id}: a device reported the unknown downlink route {d.route!r}"
        )
    staleness: Staleness = FIRST_CONTACT if d.staleness is None else d.staleness
    return Reported(route, staleness, d.first_contact, d.fallbacks)


@dataclass(frozen=True)
class Reported:
    """How one device got the adapter of one round, as the run record keeps it."""

    route: Route
    staleness: Staleness
    first_contact: bool
    fallbacks: int


#: The agent's routes as the run record counts them: "held" (it needed no request: it already
#: held a state for the version) is the aggregator's "none" without the asking.
_AGENT_ROUTES: dict[str, Route] = {
    "held": "none", "none": "none", "catchup": "catchup", "full": "full", "derived": "derived",
}  # fmt: skip
