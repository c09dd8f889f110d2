"""The compared methods' settings: the agents' compression and the aggregator's downlink."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from evaluation.fleet_config import METHODS, compression_for, downlink_for

DENSE = 921_600  # SmolLM2's LoRA as dense fp16


def test_the_issue_12_arms_are_there_with_one_uplink_and_their_downlinks() -> None:
    arms = ("dense_fp16", "qsgd", "topk_ef", "fstq", "fstq_down8", "fstq_down16")
    assert set(arms) <= set(METHODS)
    # Every baseline and plain fstq serve the full fp16 adapter; every method derives v0.
    for label in ("dense_fp16", "qsgd", "topk_ef", "fstq"):
        assert downlink_for(label, DENSE) == {"mode": "full", "derive_v0": True, "fisher": False}
    assert downlink_for("fstq_down8", DENSE) == {
        "mode": "catchup", "budget_bytes": 115_200, "derive_v0": True, "fisher": False
    }  # fmt: skip
    assert downlink_for("fstq_down16", DENSE)["budget_bytes"] == 57_600
    assert downlink_for("fstq_down16", 1001)["budget_bytes"] == 63  # rounded up, like uplinks
    # The catch-up arms upload exactly as fstq does: only the downlink differs.
    assert compression_for("fstq_down8", 115_200) == compression_for("fstq", 115_200)
    assert "downlink" not in compression_for("fstq_down16", 1)


@pytest.mark.parametrize("which", [compression_for, downlink_for])
def test_an_unknown_method_is_a_clear_error(which: Callable[[str, int], object]) -> None:
    with pytest.raises(ValueError, match="unknown method 'zip'"):
        which("zip", 1)
