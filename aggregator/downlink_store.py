"""What the aggregator remembers of the catch-up downlink, in its SQLite store: states, not devices.

* ``states``: one row per adapter state a catch-up produced (its id = SHA-256 of its canonical
  fp16 bytes): the state it was computed from (``parent_id``), the plan that made it, the global
  version it targets, its depth (catch-ups since a full adapter) and the plan bytes of its chain.
  The full adapter of every stored global version is a root; roots are not rows here (the
  ``globals`` table and the peft directories hold them).
* ``plans``: the catch-up payloads, content-addressed by plan id (a hash of what determines
  the plan: the held state, the target global, budget and Fisher source), so devices holding
  the same state share one plan.
* ``device_states``: per device, the state it last said it holds and the state it was last
  served: what keeps states alive. :meth:`DownlinkStore.collect_garbage` deletes every state
  and plan no device's chain needs, so the store is O(devices x max_chain x budget) at worst.

A plan and its state are committed (:meth:`DownlinkStore.record`) before the plan is published:
a device never holds a state the aggregator cannot reconstruct after a crash.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

__all__ = ["DeviceRecord", "DownlinkStore", "StateNode", "StoredPlan"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    id BLOB PRIMARY KEY,            -- SHA-256 of the state's canonical fp16 bytes
    parent_id BLOB NOT NULL,        -- the state the catch-up was applied to
    plan_id BLOB NOT NULL,          -- the plan (payload) that made it
    target_version INTEGER NOT NULL,
    depth INTEGER NOT NULL,         -- catch-ups since a full adapter (root = 0)
    chain_bytes INTEGER NOT NULL,   -- payload bytes of those catch-ups
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS plans (
    id BLOB PRIMARY KEY,            -- plan id (hash of its key)
    version INTEGER NOT NULL,       -- the global version it catches up to
    base_id BLOB NOT NULL,
    result_id BLOB NOT NULL,
    payload BLOB NOT NULL,          -- fstq payload of master - base
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS device_states (
    client_id TEXT PRIMARY KEY,
    held_id BLOB,                   -- what it said it holds in its last plan request
    served_id BLOB NOT NULL,        -- the result of the plan it was last served
    version INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StateNode:
    id: bytes
    parent_id: bytes
    plan_id: bytes
    target_version: int
    depth: int
    chain_bytes: int
    created: float


@dataclass(frozen=True)
class StoredPlan:
    id: bytes
    version: int
    base_id: bytes
    result_id: bytes
    payload: bytes
    created: float


@dataclass(frozen=True)
class DeviceRecord:
    client_id: str
    held_id: bytes | None
    served_id: bytes
    version: int
    updated: float


class DownlinkStore:
    """The three downlink tables on the aggregator's SQLite connection (autocommit, WAL)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(SCHEMA)

    def node(self, state_id: bytes) -> StateNode | None:
        row = self._db.execute("SELECT * FROM states WHERE id = ?", (state_id,)).fetchone()
        return StateNode(*row) if row else None

    def plan(self, plan_id: bytes) -> StoredPlan | None:
        row = self._db.execute("SELECT * FROM plans WHERE id = ?", (plan_id,)).fetchone()
        return StoredPlan(*row) if row else None

    def device(self, client_id: str) -> DeviceRecord | None:
        row = self._db.execute(
            "SELECT * FROM device_states WHERE client_id = ?", (client_id,)
        ).fetchone()
        return DeviceRecord(*row) if row else None

    def record(
        self,
        device: DeviceRecord,
        plan: StoredPlan | None = None,
        node: StateNode | None = None,
    ) -> None:
        """One transaction: a new catch-up plan and its state (if any), and what the device was
        served. Committed (durably: synchronous=FULL) when this returns."""
        with self._db:  # BEGIN ... COMMIT, or ROLLBACK on an error
            self._db.execute("BEGIN")
            if plan is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO plans VALUES (?, ?, ?, ?, ?, ?)",
                    (plan.id, plan.version, plan.base_id, plan.result_id, plan.payload,
                     plan.created),
                )  # fmt: skip
            if node is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO states VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (node.id, node.parent_id, node.plan_id, node.target_version, node.depth,
                     node.chain_bytes, node.created),
                )  # fmt: skip
            self._db.execute(
                "INSERT OR REPLACE INTO device_states VALUES (?, ?, ?, ?, ?)",
                (device.client_id, device.held_id, device.served_id, device.version,
                 device.updated),
            )  # fmt: skip

    def collect_garbage(self) -> tuple[int, int]:
        """Delete the states and plans no device's chain reaches; (states, plans) deleted."""
        with self._db:
            self._db.execute("BEGIN")
            states = self._db.execute(
                """
                WITH RECURSIVE live(id) AS (
                    SELECT held_id FROM device_states WHERE held_id IS NOT NULL
                    UNION SELECT served_id FROM device_states
                    UNION SELECT s.parent_id FROM states s JOIN live ON s.id = live.id
                )
                DELETE FROM states WHERE id NOT IN (SELECT id FROM live)
                """
            ).rowcount
            plans = self._db.execute(
                "DELETE FROM plans WHERE id NOT IN (SELECT plan_id FROM states)"
            ).rowcount
        return states, plans

    def counts(self) -> dict[str, int]:
        """Rows per table (states, plans, device_states)."""
        query = "SELECT (SELECT COUNT(*) FROM states), (SELECT COUNT(*) FROM plans), "
        query += "(SELECT COUNT(*) FROM device_states)"
        states, plans, devices = self._db.execute(query).fetchone()
        return {"states": int(states), "plans": int(plans), "device_states": int(devices)}
