"""The history store: every accepted comment, paged newest first.

SQLite by default (one file, WAL so the gateway reads while the archiver writes). Writes are
idempotent on (stream_id, comment_id) because the archiver is at-least-once. Deletes are
tombstones (``is_deleted``) that history pages and recovery honour. A shadowed comment
(``is_shadow``: its author was shadow-banned) is on the pages of its author only and never
in recovery.

Moderation keeps its records here too (DESIGN.md 4): ``moderation_actions`` (every decision,
with stage, score and reason; one row per comment, action and stage, so a replay adds
none), the ``review_queue`` of flagged comments, and each stream's current pin.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chorus.ingest.records import Comment

__all__ = ["HistoryStore", "ModerationAction", "ReviewItem", "SqliteStore", "StoreUnavailable", "StoredComment"]

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
CREATE TABLE IF NOT EXISTS review_queue (
    stream_id   TEXT    NOT NULL,
    comment_id  INTEGER NOT NULL,
    user_id     TEXT    NOT NULL,
    user_name   TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    stage       TEXT    NOT NULL,
    score       REAL,
    reason      TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    resolution  TEXT    NOT NULL DEFAULT '',
    resolved_by TEXT    NOT NULL DEFAULT '',
    resolved_at INTEGER,
    PRIMARY KEY (stream_id, comment_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins (
    stream_id  TEXT    PRIMARY KEY,
    comment    TEXT    NOT NULL,
    pinned_at  INTEGER NOT NULL
);
"""
# After the tables exist (or were migrated): the range a resume reads, a user's recent
# comments (clearing them), each decision once, and the open review queue.
INDEXES = """
CREATE INDEX IF NOT EXISTS comments_position ON comments (stream_id, epoch, offset);
CREATE INDEX IF NOT EXISTS comments_user ON comments (stream_id, user_id, comment_id);
CREATE UNIQUE INDEX IF NOT EXISTS moderation_once ON moderation_actions (stream_id, comment_id, action, stage)
    WHERE comment_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS review_open ON review_queue (stream_id, resolution, comment_id);
"""
POSITION_COLUMNS = {"epoch": "TEXT NOT NULL DEFAULT ''", "offset": "INTEGER NOT NULL DEFAULT -1",
                    "is_shadow": "INTEGER NOT NULL DEFAULT 0"}
ACTION_COLUMNS = {"actor": "TEXT NOT NULL DEFAULT ''"}


class StoreUnavailable(Exception):
    """The store did not take the write; the archiver must not commit past it."""


@dataclass(frozen=True, slots=True)
class StoredComment:
    offset: int
    deleted: bool
    event: dict[str, Any]  # wire shape C, with its offset


@dataclass(frozen=True, slots=True)
class ModerationAction:
    """One moderation decision: automatic (``actor`` "moderator") or a moderator's through the API."""

    stream: str
    action: str  # accept, delete, shadow, flag, ban, timeout, unban, clear, pin, unpin, slow_mode, keep
    stage: str  # rules, model, reputation, spam, api
    comment_id: str | None = None
    user_id: str | None = None
    score: float | None = None
    reason: str = ""
    actor: str = "moderator"
    created_at: int = 0  # ms since the Unix epoch; 0: now


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A flagged comment waiting for a moderator (or resolved: ``resolution`` keep or delete)."""

    stream: str
    comment_id: str
    user_id: str
    user_name: str
    text: str
    stage: str
    score: float | None
    reason: str
    created_at: int
    resolution: str = ""
    resolved_by: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.comment_id, "stream": self.stream, "user": {"id": self.user_id, "name": self.user_name},
                "text": self.text, "stage": self.stage, "score": self.score, "reason": self.reason,
                "ts": self.created_at, "resolution": self.resolution or None, "resolved_by": self.resolved_by or None}


class HistoryStore(Protocol):
    def write_comments(self, comments: Sequence[Comment]) -> int: ...

    def page(self, stream: str, before: int | None, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """Live comments, newest first; shadowed ones only when ``viewer`` is their author."""
        ...

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
            for table, columns in (("comments", POSITION_COLUMNS), ("moderation_actions", ACTION_COLUMNS)):
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            self._db.executescript(INDEXES)

    def write_comments(self, comments: Sequence[Comment]) -> int:
        """Insert those not stored yet; returns how many were new."""
        rows = [
            (c.stream, int(c.id), c.user_id, c.user_name, json.dumps(list(c.badges)), c.text, c.ts, c.epoch, c.offset,
             int(c.shadow))
            for c in comments
        ]
        return self._write(
            "INSERT OR IGNORE INTO comments (stream_id, comment_id, user_id, user_name, badges,"
            " message, created_at, epoch, offset, is_shadow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
        """``sql`` for every row in one transaction; how many rows it changed."""
        try:
            with self._lock:
                before = self._db.total_changes
                self._db.execute("BEGIN")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
                return self._db.total_changes - before
        except sqlite3.Error as exc:
            with self._lock:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise StoreUnavailable(str(exc)) from exc

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    def page(self, stream: str, before: int | None, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` live comments of ``stream`` older than id ``before``, newest first;
        shadowed comments only when ``viewer`` (a user id) wrote them."""
        sql = (
            "SELECT comment_id, user_id, user_name, badges, message, created_at, offset FROM comments"
            " WHERE stream_id = ? AND comment_id < ? AND is_deleted = 0 AND (is_shadow = 0 OR user_id = ?)"
            " ORDER BY comment_id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (stream, before if before is not None else 2**63 - 1,
                                          viewer if viewer is not None else "", limit)).fetchall()
        return [_event(stream, *row) for row in rows]

    def since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        """Tombstones and shadowed comments both count as deleted: recovery never sends them."""
        sql = (
            "SELECT comment_id, user_id, user_name, badges, message, created_at, offset, is_deleted OR is_shadow"
            " FROM comments WHERE stream_id = ? AND epoch = ? AND offset >= ? ORDER BY offset LIMIT ?"
        )
        try:
            with self._lock:
                rows = self._db.execute(sql, (stream, epoch, offset, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [StoredComment(row[6], bool(row[7]), _event(stream, *row[:7])) for row in rows]

    # -- moderation ------------------------------------------------------------------------

    def delete_comments(self, stream: str, ids: Sequence[str]) -> int:
        """Tombstone the comments ``ids``; how many were live before."""
        rows = [(stream, int(i)) for i in ids]
        return self._write("UPDATE comments SET is_deleted = 1"
                           " WHERE stream_id = ? AND comment_id = ? AND is_deleted = 0", rows)

    def shadow_comments(self, stream: str, ids: Sequence[str]) -> int:
        """Hide the comments ``ids`` from everyone but their authors."""
        rows = [(stream, int(i)) for i in ids]
        return self._write("UPDATE comments SET is_shadow = 1"
                           " WHERE stream_id = ? AND comment_id = ? AND is_shadow = 0", rows)

    def comment(self, stream: str, comment_id: str) -> tuple[dict[str, Any], bool] | None:
        """A stored comment in wire shape C and whether it is a tombstone (or shadowed), or None."""
        rows = self._read("SELECT comment_id, user_id, user_name, badges, message, created_at, offset,"
                          " is_deleted OR is_shadow FROM comments WHERE stream_id = ? AND comment_id = ?",
                          (stream, int(comment_id)))
        return (_event(stream, *rows[0][:7]), bool(rows[0][7])) if rows else None

    def recent_of_user(self, stream: str, user: str, since_ms: int, limit: int) -> list[str]:
        """Ids of ``user``'s live comments on ``stream`` since ``since_ms``, newest first."""
        rows = self._read("SELECT comment_id FROM comments WHERE stream_id = ? AND user_id = ? AND is_deleted = 0"
                          " AND created_at >= ? ORDER BY comment_id DESC LIMIT ?", (stream, user, since_ms, limit))
        return [str(r[0]) for r in rows]

    def record_actions(self, actions: Sequence[ModerationAction]) -> int:
        """Write decisions; one about a comment already recorded (same action and stage) is ignored."""
        now = time.time_ns() // 1_000_000
        rows = [(a.stream, int(a.comment_id) if a.comment_id else None, a.user_id, a.action, a.stage, a.score,
                 a.reason, a.actor, a.created_at or now) for a in actions]
        return self._write("INSERT OR IGNORE INTO moderation_actions (stream_id, comment_id, user_id, action, stage,"
                           " score, reason, actor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def actions(self, stream: str, limit: int = 100) -> list[ModerationAction]:
        """The stream's newest decisions first."""
        rows = self._read("SELECT stream_id, action, stage, comment_id, user_id, score, reason, actor, created_at"
                          " FROM moderation_actions WHERE stream_id = ? ORDER BY action_id DESC LIMIT ?",
                          (stream, limit))
        return [ModerationAction(r[0], r[1], r[2], str(r[3]) if r[3] is not None else None, *r[4:]) for r in rows]

    def queue_for_review(self, items: Sequence[ReviewItem]) -> int:
        """Add flagged comments to the review queue (a replayed flag is ignored)."""
        rows = [(i.stream, int(i.comment_id), i.user_id, i.user_name, i.text, i.stage, i.score, i.reason, i.created_at)
                for i in items]
        return self._write("INSERT OR IGNORE INTO review_queue (stream_id, comment_id, user_id, user_name, message,"
                           " stage, score, reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def review_queue(self, stream: str, limit: int, resolved: bool = False) -> list[ReviewItem]:
        """Open (or resolved) flagged comments of ``stream``, oldest first."""
        op = "!=" if resolved else "="
        rows = self._read("SELECT stream_id, comment_id, user_id, user_name, message, stage, score, reason,"
                          " created_at, resolution, resolved_by FROM review_queue"
                          f" WHERE stream_id = ? AND resolution {op} '' ORDER BY comment_id LIMIT ?", (stream, limit))
        return [ReviewItem(r[0], str(r[1]), *r[2:]) for r in rows]

    def open_reviews(self, stream: str | None = None) -> int:
        """How many flagged comments wait for review (on ``stream``, or on every stream)."""
        if stream is None:
            rows = self._read("SELECT COUNT(*) FROM review_queue WHERE resolution = ''", ())
        else:
            rows = self._read("SELECT COUNT(*) FROM review_queue WHERE stream_id = ? AND resolution = ''", (stream,))
        return int(rows[0][0])

    def resolve_review(self, stream: str, comment_id: str, resolution: str, by: str) -> bool:
        """Close an open review item (``keep`` or ``delete``); False if none was open."""
        return self._write("UPDATE review_queue SET resolution = ?, resolved_by = ?, resolved_at = ?"
                           " WHERE stream_id = ? AND comment_id = ? AND resolution = ''",
                           [(resolution, by, time.time_ns() // 1_000_000, stream, int(comment_id))]) > 0

    def set_pin(self, stream: str, comment: dict[str, Any] | None) -> None:
        """Keep the stream's pin (None: unpinned), for a welcome when Redis lost it."""
        if comment is None:
            self._write("DELETE FROM pins WHERE stream_id = ?", [(stream,)])
        else:
            self._write("INSERT OR REPLACE INTO pins (stream_id, comment, pinned_at) VALUES (?, ?, ?)",
                        [(stream, json.dumps(comment, ensure_ascii=False), time.time_ns() // 1_000_000)])

    def pin(self, stream: str) -> dict[str, Any] | None:
        rows = self._read("SELECT comment FROM pins WHERE stream_id = ?", (stream,))
        return json.loads(rows[0][0]) if rows else None

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
