"""How a device compresses its update: the uplink compressor and the round's byte budget.

Policy only (no I/O): the settings' ``[compression]`` table turned into a compressor, the fstq
options the training hook shares with it, whether an error-feedback residual is kept, and the
byte budget of a round (decision 10). The trainer calls the compressor; the device state stores
the residual.
"""

from __future__ import annotations

import math

from broker.messages import RoundAnnouncement
from edge_agent.settings import AgentSettings, CompressionSettings
from fstq.compressors import Compressor, make_compressor
from fstq.config import FstqConfig

__all__ = ["budget_for", "fstq_config", "make_uplink_compressor", "uses_residual"]


def budget_for(settings: AgentSettings, ann: RoundAnnouncement, n_coords: int) -> int | None:
    """Upload byte budget per ``compression.budget_mode`` (decision 10: slow links send less).

    ``announced`` falls back to ``budget_bytes`` when the round names no hint for this device;
    ``rate`` is ``uplink_rate_bps`` (bits per second) over the round's upload window. fstq's
    budgeted allocation always gets a budget: ``default_budget_fraction`` of the dense fp16 size
    of the update (``n_coords`` adapter coordinates) when nothing else applies.
    """
    c = settings.compression
    if c.budget_mode == "rate":
        assert c.uplink_rate_bps is not None  # the settings validator guarantees it
        return int(c.uplink_rate_bps * ann.upload_window_s / 8)
    budget = c.budget_bytes
    if c.budget_mode == "announced":
        budget = ann.budget_bytes.get(settings.client_id, budget)
    if budget is None and c.method == "fstq" and c.allocation == "budget":
        budget = math.ceil(c.default_budget_fraction * 2 * n_coords)
    return budget


def fstq_config(c: CompressionSettings) -> FstqConfig:
    """The fstq options; the training hook (token mask, Fisher) and the compressor share them."""
    return FstqConfig(
        token_keep_ratio=c.token_keep_ratio,
        allocation=c.allocation,
        rounding=c.rounding,
        error_feedback=c.error_feedback,
    )


def make_uplink_compressor(c: CompressionSettings) -> Compressor:
    """The compressor the settings name (options of other methods are ignored)."""
    if c.method == "fstq":
        return make_compressor("fstq", config=fstq_config(c))
    if c.method == "qsgd":
        return make_compressor("qsgd", bits=c.qsgd_bits)
    if c.method == "topk":
        return make_compressor("topk", fraction=c.topk_fraction, error_feedback=c.error_feedback)
    return make_compressor(c.method)


def uses_residual(c: CompressionSettings) -> bool:
    """Only fstq and top-k carry an error-feedback residual (the others refuse one)."""
    return c.error_feedback and c.method in ("fstq", "topk")
