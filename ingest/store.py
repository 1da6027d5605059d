"""The history store: every accepted comment, paged newest first.

SQLite by default (one file, WAL so the gateway reads while the archiver writes). Writes are
idempotent on (stream_id, comment_id) because the archiver is at-least-once. Deletes are
tombstones (``is_deleted``) that history pages and recovery honour.

Each row keeps the comment's log position (``epoch``, ``offset``: see ``ingest/log.py``), so
a reconnecting viewer's "everything after offset X" is one index range
(:meth:`SqliteStore.since`). The archiver writes a partition's records in log order and each
batch in one transaction, so for every stream and epoch the store holds a prefix of the log.
Files from before these columns get them on open (rows without a position have epoch "" and
offset -1, and recovery never serves them).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chorus.ingest.records import Comment

__all__ = ["HistoryStore", "SqliteStore", "StoreUnavailable", "StoredComment"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS comments (
    stream_id  TEXT    NOT NULL,
    comment_id INTEGER NOT NULL,
    user_id    TEXT    NOT NULL,
    user_name  TEXT    NOT NULL,
    badges     TEXT    NOT NULL DEFAULT '[]',
    message    TEXT    NOT NULL,
    is_deleted INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    epoch      TEXT    NOT NULL DEFAULT '',
    offset     INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (stream_id, comment_id DESC)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS moderation_actions (
    action_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id  TEXT    NOT NULL,
    comment_id INTEGER,
    user_id    TEXT,
    action     TEXT    NOT NULL,
    stage      TEXT    NOT NULL,
    score      REAL,
    reason     TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
);
"""
# After the table exists (or was migrated): the range a resume reads.
INDEXES = "CREATE INDEX IF NOT EXISTS comments_position ON comments (stream_id, epoch, offset);"
POSITION_COLUMNS = {"epoch": "TEXT NOT NULL DEFAULT ''", "offset": "INTEGER NOT NULL DEFAULT -1"}


class StoreUnavailable(Exception):
    """The store did not take the write; the archiver must not commit past it."""


@dataclass(frozen=True, slots=True)
class StoredComment:
    offset: int
    deleted: bool
    event: dict[str, Any]  # wire shape C, with its offset


class HistoryStore(Protocol):
    def write_comments(self, comments: Sequence[Comment]) -> int: ...
    def page(self, stream: str, before: int | None, limit: int) -> list[dict[str, Any]]: ...

    def since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        """Up to ``limit`` comments of ``stream`` in ``epoch`` from ``offset`` on (inclusive),
        tombstones too, in offset order."""
        ...

    def close(self) -> None: ...



class SqliteStore:
    """Thread-safe: writes come from the archiver's worker thread, reads from the gateway."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(comments)")}
            for name, decl in POSITION_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE comments ADD COLUMN {name} {decl}")
            self._db.executescript(INDEXES)

    def write_comments(self, comments: Sequence[Comment]) -> int:
        """Insert those not stored yet; returns how many were new."""
        rows = [
            (c.stream, int(c.id), c.user_id, c.user_name, json.dumps(list(c.badges)), c.text, c.ts, c.epoch, c.offset)
            for c in comments
        ]
        try:
            with self._lock:
                before = self._db.total_changes
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR IGNORE INTO comments (stream_id, comment_id, user_id, user_name, badges,"
                    " message, created_at, epoch, offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
                return self._db.total_changes - before
        except sqlite3.Error as exc:
            with self._lock:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise StoreUnavailable(str(exc)) from exc

    def page(self, stream: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` live comments of ``stream`` older than id ``before``, newest first."""
        sql = (
            "SELECT comment_id, user_id, user_name, badges, message, created_at, offset FROM comments"
            " WHERE stream_id = ? AND comment_id < ? AND is_deleted = 0"
            " ORDER BY comment_id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (stream, before if before is not None else 2**63 - 1, limit)).fetchall()
        return [_event(stream, *row) for row in rows]

    def since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        sql = (
            "SELECT comment_id, user_id, user_name, badges, message, created_at, offset, is_deleted"
            " FROM comments WHERE stream_id = ? AND epoch = ? AND offset >= ? ORDER BY offset LIMIT ?"
        )
        try:
            with self._lock:
                rows = self._db.execute(sql, (stream, epoch, offset, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [StoredComment(row[6], bool(row[7]), _event(stream, *row[:7])) for row in rows]

    def count(self, stream: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM comments WHERE stream_id = ?", (stream,)).fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _event(stream: str, cid: int, uid: str, name: str, badges: str, text: str, ts: int,
           offset: int) -> dict[str, Any]:
    """A stored row in wire shape C (with its offset when it has one)."""
    c: dict[str, Any] = {
        "id": str(cid),
        "stream": stream,
        "user": {"id": uid, "name": name, "badges": json.loads(badges)},
        "text": text,
        "ts": ts,
    }
    if offset >= 0:
        c["offset"] = offset
    return c
