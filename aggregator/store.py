"""Durable aggregator state in SQLite: the round ledger, accepted uploads, global adapter history.

An upload is acknowledged as complete only after `accept_upload` has committed it, so a crash
after the acknowledgement can never lose it: on restart the running FedAvg sum is rebuilt from
the stored payloads of the open round. WAL mode with synchronous=FULL makes each commit durable.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.downlink_store import DownlinkStore

__all__ = ["AcceptedUpload", "AggregatorStore", "GlobalRecord", "RoundRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    quorum INTEGER NOT NULL,
    selected TEXT NOT NULL,          -- JSON list of client ids
    base_version INTEGER NOT NULL,   -- global adapter version the clients train from
    extensions INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,             -- open | closed | failed
    closed_at REAL,
    metrics TEXT                     -- JSON, filled at close
);
CREATE TABLE IF NOT EXISTS uploads (
    round_id INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    method TEXT NOT NULL,
    payload BLOB NOT NULL,
    wire_bytes INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (round_id, client_id)
);
CREATE TABLE IF NOT EXISTS rejections (
    round_id INTEGER,
    client_id TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY,
    round_id INTEGER,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    opened_at: float
    deadline: float
    quorum: int
    selected: tuple[str, ...]
    base_version: int
    extensions: int = 0
    state: str = "open"
    closed_at: float | None = None
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class AcceptedUpload:
    round_id: int
    client_id: str
    upload_id: str
    sha256: str
    sample_count: int
    method: str
    payload: bytes
    wire_bytes: int
    accepted_at: float


@dataclass(frozen=True)
class GlobalRecord:
    version: int
    round_id: int | None
    sha256: str
    path: str
    created_at: float


class AggregatorStore:
    """A thin typed layer over one SQLite file; every write is its own durable transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        #: The catch-up downlink's states, plans and per-device records (same file).
        self.downlink = DownlinkStore(self._db)

    def close(self) -> None:
        self._db.close()

    # rounds ---------------------------------------------------------------------------------
    def open_round(self, rec: RoundRecord) -> None:
        self._db.execute(
            "INSERT INTO rounds (round_id, opened_at, deadline, quorum, selected, base_version,"
            " extensions, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'open')",
            (
                rec.round_id,
                rec.opened_at,
                rec.deadline,
                rec.quorum,
                json.dumps(list(rec.selected)),
                rec.base_version,
                rec.extensions,
            ),
        )

    def extend_round(self, round_id: int, deadline: float, extensions: int) -> None:
        self._db.execute(
            "UPDATE rounds SET deadline = ?, extensions = ? WHERE round_id = ?",
            (deadline, extensions, round_id),
        )

    def finish_round(
        self, round_id: int, state: str, closed_at: float, metrics: dict[str, Any]
    ) -> None:
        if state not in ("closed", "failed"):
            raise ValueError(f"bad final state {state!r}")
        self._db.execute(
            "UPDATE rounds SET state = ?, closed_at = ?, metrics = ? WHERE round_id = ?",
            (state, closed_at, json.dumps(metrics), round_id),
        )

    def _round(self, row: tuple[Any, ...]) -> RoundRecord:
        return RoundRecord(
            round_id=row[0],
            opened_at=row[1],
            deadline=row[2],
            quorum=row[3],
            selected=tuple(json.loads(row[4])),
            base_version=row[5],
            extensions=row[6],
            state=row[7],
            closed_at=row[8],
            metrics=json.loads(row[9]) if row[9] else None,
        )

    def get_round(self, round_id: int) -> RoundRecord | None:
        row = self._db.execute("SELECT * FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return self._round(row) if row else None

    def open_round_record(self) -> RoundRecord | None:
        """The round left open (at most one), e.g. by a crash."""
        row = self._db.execute(
            "SELECT * FROM rounds WHERE state = 'open' ORDER BY round_id DESC LIMIT 1"
        ).fetchone()
        return self._round(row) if row else None

    def last_round_id(self) -> int:
        row = self._db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def rounds(self) -> list[RoundRecord]:
        return [self._round(r) for r in self._db.execute("SELECT * FROM rounds ORDER BY round_id")]

    # uploads --------------------------------------------------------------------------------
    def accept_upload(self, up: AcceptedUpload) -> bool:
        """Store a verified upload; False if this client already has one for the round."""
        try:
            self._db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    up.round_id,
                    up.client_id,
                    up.upload_id,
                    up.sha256,
                    up.sample_count,
                    up.method,
                    up.payload,
                    up.wire_bytes,
                    up.accepted_at,
                ),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def accepted_uploads(self, round_id: int) -> Iterator[AcceptedUpload]:
        """Accepted uploads of a round in acceptance order (payloads streamed one at a time)."""
        cur = self._db.execute(
            "SELECT * FROM uploads WHERE round_id = ? ORDER BY accepted_at, client_id", (round_id,)
        )
        for row in cur:
            yield AcceptedUpload(*row)

    def accepted_upload(self, round_id: int, client_id: str) -> AcceptedUpload | None:
        row = self._db.execute(
            "SELECT * FROM uploads WHERE round_id = ? AND client_id = ?", (round_id, client_id)
        ).fetchone()
        return AcceptedUpload(*row) if row else None

    def record_rejection(
        self, round_id: int | None, client_id: str | None, reason: str, detail: str, at: float
    ) -> None:
        self._db.execute(
            "INSERT INTO rejections VALUES (?, ?, ?, ?, ?)",
            (round_id, client_id, reason, detail[:500], at),
        )

    def rejection_counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT reason, COUNT(*) FROM rejections GROUP BY reason")
        return {str(r): int(n) for r, n in rows}

    # global adapters ------------------------------------------------------------------------
    def add_global(self, rec: GlobalRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO globals VALUES (?, ?, ?, ?, ?)",
            (rec.version, rec.round_id, rec.sha256, rec.path, rec.created_at),
        )

    def latest_global(self) -> GlobalRecord | None:
        row = self._db.execute("SELECT * FROM globals ORDER BY version DESC LIMIT 1").fetchone()
        return GlobalRecord(*row) if row else None

    def global_record(self, version: int) -> GlobalRecord | None:
        row = self._db.execute("SELECT * FROM globals WHERE version = ?", (version,)).fetchone()
        return GlobalRecord(*row) if row else None

    def global_with_sha256(self, sha256_hex: str) -> GlobalRecord | None:
        """The version whose full fp16 adapter has this SHA-256 (the newest, if several)."""
        row = self._db.execute(
            "SELECT * FROM globals WHERE sha256 = ? ORDER BY version DESC LIMIT 1", (sha256_hex,)
        ).fetchone()
        return GlobalRecord(*row) if row else None
