"""The history store: every accepted comment, paged newest first.

SQLite by default (one file, WAL so the gateway reads while the archiver writes). Writes are
idempotent on (stream_id, comment_id) because the archiver is at-least-once. Deletes are
tombstones (``is_deleted``) that history pages honour.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from chorus.ingest.records import Comment

__all__ = ["HistoryStore", "SqliteStore", "StoreUnavailable"]

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


class StoreUnavailable(Exception):
    """The store did not take the write; the archiver must not commit past it."""


class HistoryStore(Protocol):
    def write_comments(self, comments: Sequence[Comment]) -> int: ...
    def page(self, stream: str, before: int | None, limit: int) -> list[dict[str, Any]]: ...
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

    def write_comments(self, comments: Sequence[Comment]) -> int:
        """Insert those not stored yet; returns how many were new."""
        rows = [
            (c.stream, int(c.id), c.user_id, c.user_name, json.dumps(list(c.badges)), c.text, c.ts)
            for c in comments
        ]
        try:
            with self._lock:
                before = self._db.total_changes
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR IGNORE INTO comments (stream_id, comment_id, user_id, user_name, badges,"
                    " message, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
            "SELECT comment_id, user_id, user_name, badges, message, created_at FROM comments"
            " WHERE stream_id = ? AND comment_id < ? AND is_deleted = 0"
            " ORDER BY comment_id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (stream, before if before is not None else 2**63 - 1, limit)).fetchall()
        return [
            {
                "id": str(cid),
                "stream": stream,
                "user": {"id": uid, "name": name, "badges": json.loads(badges)},
                "text": text,
                "ts": ts,
            }
            for cid, uid, name, badges, text, ts in rows
        ]

    def count(self, stream: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM comments WHERE stream_id = ?", (stream,)).fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._db.close()
