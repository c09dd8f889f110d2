"""The on-disk outbox: an upload is written here before its first byte is published.

Each upload is a directory `<outbox>/<upload_id>/` holding `payload.bin` and `meta.json`, written
to a temporary name, fsync'd and renamed (:mod:`common.atomic`), so a crash leaves either a
complete entry or none. After a restart of the agent (or the broker) the pending entry is
published again from the bytes on disk, so nothing is retrained; only chunks the aggregator
reports missing are re-sent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import atomic

__all__ = ["Outbox", "OutboxEntry", "OutboxError"]

_PAYLOAD = "payload.bin"
_META = "meta.json"


class OutboxError(RuntimeError):
    """An outbox entry is unreadable or does not match its recorded hash."""


@dataclass(frozen=True)
class OutboxEntry:
    """What is needed to (re)publish one upload without retraining."""

    upload_id: str
    round_id: int
    base_version: int
    sha256: str
    size: int
    sample_count: int
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    state: str = "pending"  # pending | complete | rejected | late
    # A re-sent manifest must equal the first one (the aggregator refuses a different manifest
    # for the same upload), so the chunking travels with the entry; the deadline sets expiry.
    chunk_size: int = 256 * 1024
    deadline: float = 0.0


class Outbox:
    """A folder of uploads; at most a handful exist at once (one per unfinished round)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, entry: OutboxEntry, payload: bytes) -> OutboxEntry:
        """Durably store `payload` (fsync'd) with its metadata; returns the stored entry."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest != entry.sha256 or len(payload) != entry.size:
            raise OutboxError(f"upload {entry.upload_id}: payload does not match its hash/size")
        with atomic.replace_dir(self.root / entry.upload_id) as tmp:
            (tmp / _PAYLOAD).write_bytes(payload)
            (tmp / _META).write_text(json.dumps(asdict(entry)))
        return entry

    def entries(self) -> list[OutboxEntry]:
        """All stored entries, oldest first; unreadable ones are reported, not skipped silently."""
        out = []
        for d in sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            out.append(self._meta(d))
        return sorted(out, key=lambda e: (e.created_at, e.upload_id))

    def pending(self) -> list[OutboxEntry]:
        return [e for e in self.entries() if e.state == "pending"]

    def payload(self, upload_id: str) -> bytes:
        """The stored bytes, verified against the recorded SHA-256."""
        d = self.root / upload_id
        entry = self._meta(d)
        try:
            data = (d / _PAYLOAD).read_bytes()
        except OSError as exc:
            raise OutboxError(f"upload {upload_id}: cannot read payload: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise OutboxError(f"upload {upload_id}: payload on disk is corrupted (hash mismatch)")
        return data

    def mark(self, upload_id: str, state: str) -> None:
        """Record the final state (complete/rejected/late) of an upload."""
        d = self.root / upload_id
        entry = self._meta(d)
        updated = {**asdict(entry), "state": state}
        atomic.write_text(d / _META, json.dumps(updated))

    def prune(self, keep_round_from: int) -> int:
        """Delete finished entries of rounds before `keep_round_from`; returns how many."""
        removed = 0
        for e in self.entries():
            if e.state != "pending" and e.round_id < keep_round_from:
                shutil.rmtree(self.root / e.upload_id, ignore_errors=True)
                removed += 1
        return removed

    def _meta(self, d: Path) -> OutboxEntry:
        try:
            raw = json.loads((d / _META).read_text())
            return OutboxEntry(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise OutboxError(f"outbox entry {d.name} is unreadable: {exc}") from None
