from __future__ import annotations

from pathlib import Path

from aggregator.store import AcceptedUpload, AggregatorStore, GlobalRecord, RoundRecord


def _upload(client: str, at: float, payload: bytes = b"p") -> AcceptedUpload:
    return AcceptedUpload(1, client, f"u-{client}", "00" * 32, 10, "fstq", payload, 123, at)


def test_state_survives_reopen(tmp_path: Path) -> None:
    # Arrange
    db = tmp_path / "state.db"
    s = AggregatorStore(db)
    s.open_round(RoundRecord(1, 0.0, 10.0, 2, ("a", "b"), base_version=0))
    assert s.accept_upload(_upload("b", 2.0, b"\x00\x01"))
    assert s.accept_upload(_upload("a", 1.0))
    s.record_rejection(1, "c", "not_selected", "x", 3.0)
    s.add_global(GlobalRecord(1, 1, "ab" * 32, "/tmp/g1", 4.0))
    s.close()  # Act: "crash" and reopen
    s2 = AggregatorStore(db)
    # Assert
    rec = s2.open_round_record()
    assert rec is not None and rec.selected == ("a", "b") and rec.state == "open"
    assert [u.client_id for u in s2.accepted_uploads(1)] == ["a", "b"]
    stored = s2.accepted_upload(1, "b")
    assert stored is not None and stored.payload == b"\x00\x01"
    assert s2.rejection_counts() == {"not_selected": 1}
    latest = s2.latest_global()
    assert latest is not None and latest.version == 1
    assert s2.last_round_id() == 1


def test_duplicate_upload_for_a_client_is_refused(tmp_path: Path) -> None:
    s = AggregatorStore(tmp_path / "s.db")
    assert s.accept_upload(_upload("a", 1.0, b"first"))
    assert not s.accept_upload(_upload("a", 2.0, b"second"))
    stored = s.accepted_upload(1, "a")
    assert stored is not None and stored.payload == b"first"


def test_round_lifecycle(tmp_path: Path) -> None:
    s = AggregatorStore(tmp_path / "s.db")
    s.open_round(RoundRecord(1, 0.0, 10.0, 1, ("a",), 0))
    s.extend_round(1, 20.0, 1)
    s.finish_round(1, "closed", 21.0, {"arrived": 1})
    r = s.get_round(1)
    assert (
        r is not None and r.deadline == 20.0 and r.state == "closed" and r.metrics == {"arrived": 1}
    )
    assert s.open_round_record() is None
