"""What a device says about its progress inside ``ClientStatus.info``.

``ClientStatus.state`` is the coarse phase the aggregator acts on; observers (``fedfstq
status``, the demo) also want to know how far along it is. That travels as four keys of the
status ``info`` map, so it needs no new message kind and an aggregator that ignores it keeps
working:

==========  ======================================================================
``stage``   ``fetching`` (global chunks received), ``training`` (local steps),
            ``compressing``, ``uploading`` (chunks the broker acknowledged),
            ``awaiting_ack`` (every chunk sent; waiting for the aggregator's verdict)
``done``    units finished (chunks or steps)
``total``   units in the stage
``loss``    training loss of the last step (``training`` only)
==========  ======================================================================

``offline`` statuses carry ``cause``: ``stopped`` (the agent said goodbye) or ``link_lost``
(the broker published the will: the timestamp is then when the device connected, not when it
was last heard from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from broker.messages import Scalar

__all__ = ["CAUSE_KEY", "DeviceProgress", "OfflineCause", "Stage"]

CAUSE_KEY = "cause"


class Stage(StrEnum):
    FETCHING = "fetching"
    TRAINING = "training"
    COMPRESSING = "compressing"
    UPLOADING = "uploading"
    AWAITING_ACK = "awaiting_ack"


class OfflineCause(StrEnum):
    STOPPED = "stopped"
    LINK_LOST = "link_lost"


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """How far a device is in its current stage."""

    stage: Stage
    done: int = 0
    total: int = 0
    loss: float | None = None

    def to_info(self) -> dict[str, Scalar]:
        info: dict[str, Scalar] = {
            "stage": self.stage.value,
            "done": self.done,
            "total": self.total,
        }
        if self.loss is not None and math.isfinite(self.loss):  # metadata refuses NaN
            info["loss"] = round(self.loss, 4)
        return info

    @classmethod
    def from_info(cls, info: Mapping[str, Scalar]) -> DeviceProgress | None:
        """The progress in a status ``info`` map; None when it has none (or a malformed one)."""
        raw = info.get("stage")
        if not isinstance(raw, str) or raw not in Stage.__members__.values():
            return None
        stage = Stage(raw)
        done, total, loss = info.get("done", 0), info.get("total", 0), info.get("loss")
        if not (_count(done) and _count(total)):
            return None
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            loss = None
        return cls(stage, int(done), int(total), None if loss is None else float(loss))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
