from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.device_state import DeviceState
from edge_agent.outbox import Outbox, OutboxEntry, OutboxError


def _entry(upload_id: str, payload: bytes, round_id: int = 1, at: float = 0.0) -> OutboxEntry:
    return OutboxEntry(
        upload_id=upload_id,
        round_id=round_id,
        base_version=0,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        sample_count=7,
        method="fstq",
        metadata={"budget": 100},
        created_at=at,
    )


def test_outbox_survives_a_new_process_view(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(_entry("u1", b"abc", at=1.0), b"abc")
    box.put(_entry("u2", b"xyz" * 1000, round_id=2, at=2.0), b"xyz" * 1000)
    again = Outbox(tmp_path)  # as after a restart
    assert [e.upload_id for e in again.pending()] == ["u1", "u2"]
    assert again.payload("u2") == b"xyz" * 1000
    again.mark("u1", "complete")
    assert [e.upload_id for e in Outbox(tmp_path).pending()] == ["u2"]
    assert Outbox(tmp_path).prune(keep_round_from=2) == 1
    assert [e.upload_id for e in Outbox(tmp_path).entries()] == ["u2"]


def test_outbox_refuses_mismatched_payload_and_detects_corruption(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(OutboxError, match="does not match"):
        box.put(_entry("u1", b"abc"), b"abd")
    box.put(_entry("u2", b"hello"), b"hello")
    (tmp_path / "u2" / "payload.bin").write_bytes(b"hellO")
    with pytest.raises(OutboxError, match="corrupted"):
        box.payload("u2")
    (tmp_path / "u2" / "meta.json").write_text("{")
    with pytest.raises(OutboxError, match="unreadable"):
        box.entries()


def test_device_state_round_trips(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    assert st.load_token_scores() is None and st.load_residual() is None
    st.save_token_scores({"scores": np.arange(5, dtype=np.float32)})
    st.save_residual({"a": torch.ones(2, 3)})
    st.save_progress({"last_round": 4})
    again = DeviceState(tmp_path)
    scores = again.load_token_scores()
    assert scores is not None and scores["scores"].tolist() == [0, 1, 2, 3, 4]
    res = again.load_residual()
    assert res is not None and torch.equal(res["a"], torch.ones(2, 3))
    assert again.load_progress() == {"last_round": 4}
    again.save_residual(None)
    assert again.load_residual() is None
