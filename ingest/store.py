"""The history store: every accepted comment, paged newest first.

SQLite by default (one file, WAL so the gateway reads while the archiver writes). Writes are
idempotent on (stream_id, comment_id) because the archiver is at-least-once. Deletes are
tombstones (``is_deleted``, with who removed it and why: ``delete_code``, ``delete_reason``)
that history pages and recovery honour, except that a page fetched by the comment's author
shows it to them, marked deleted with that code and reason; a moderator's restore lifts the
tombstone. A shadowed comment
(``is_shadow``: its author was shadow-banned) is on the pages of its author only and never
in recovery.

Moderation keeps its records here too (DESIGN.md 4): ``moderation_actions`` (every decision,
with stage, score and reason; one row per comment, action and stage, so a replay adds
none), the ``review_queue`` of flagged comments and automatic shadow-bans (with the offences
that led to them, ``evidence``), the ``sanctions`` in force (bans and time-outs, so they can
be put back into Redis when it restarted empty), and each stream's current pin.

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

from chorus.errors import Unavailable
from chorus.ingest.records import Comment

__all__ = ["HistoryStore", "ModerationAction", "ReviewItem", "SqliteStore", "StoreUnavailable", "StoredComment",
           "deleted_shape", "event_shape"]

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
CREATE TABLE IF NOT EXISTS sanctions (
    stream_id  TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    until_ms   INTEGER,
    reason     TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    PRIMARY KEY (stream_id, user_id)
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
                    "is_shadow": "INTEGER NOT NULL DEFAULT 0", "delete_code": "TEXT NOT NULL DEFAULT ''",
                    "delete_reason": "TEXT NOT NULL DEFAULT ''"}
ACTION_COLUMNS = {"actor": "TEXT NOT NULL DEFAULT ''"}
REVIEW_COLUMNS = {"evidence": "TEXT NOT NULL DEFAULT '[]'"}


class StoreUnavailable(Unavailable):
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
    # an automatic shadow-ban: the offences that led to it ({"stream", "id", "text", "reason"})
    evidence: tuple[dict[str, Any], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.comment_id, "stream": self.stream, "user": {"id": self.user_id, "name": self.user_name},
                "text": self.text, "stage": self.stage, "score": self.score, "reason": self.reason,
                "ts": self.created_at, "resolution": self.resolution or None, "resolved_by": self.resolved_by or None,
                "evidence": list(self.evidence)}


class HistoryStore(Protocol):
    """What the archiver, gateways, moderator and CLI use: SqliteStore and CassandraStore
    (ingest/store_cassandra.py). Every method blocks; a caller on an event loop runs it in a
    thread (``asyncio.to_thread``). Failures raise StoreUnavailable."""

    def write_comments(self, comments: Sequence[Comment]) -> int: ...

    def page(self, stream: str, before: int | None, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """Live comments, newest first; shadowed ones only when ``viewer`` is their author."""
        ...

    def since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        """Up to ``limit`` comments of ``stream`` in ``epoch`` from ``offset`` on (inclusive),
        tombstones too, in offset order."""
        ...

    def last_position(self, stream: str) -> tuple[str, int] | None:
        """(epoch, offset) of the newest stored comment with a position, or None."""
        ...

    def delete_comments(self, stream: str, ids: Sequence[str], code: str = "", reason: str = "") -> int: ...
    def restore_comments(self, stream: str, ids: Sequence[str]) -> int: ...
    def shadow_comments(self, stream: str, ids: Sequence[str]) -> int: ...
    def deleted_comment(self, stream: str, comment_id: str) -> dict[str, Any] | None: ...
    def comment(self, stream: str, comment_id: str) -> tuple[dict[str, Any], bool] | None: ...
    def deleted_automatically(self, stream: str, comment_id: str) -> bool: ...
    def recent_of_user(self, stream: str, user: str, since_ms: int, limit: int) -> list[str]: ...
    def record_actions(self, actions: Sequence[ModerationAction]) -> int: ...
    def actions(self, stream: str, limit: int = 100) -> list[ModerationAction]: ...
    def offences_of(self, user: str, since_ms: int, limit: int) -> list[dict[str, Any]]: ...
    def queue_for_review(self, items: Sequence[ReviewItem]) -> int: ...
    def review_queue(self, stream: str, limit: int, resolved: bool = False) -> list[ReviewItem]: ...
    def review_item(self, stream: str, comment_id: str) -> ReviewItem | None: ...
    def open_reviews(self, stream: str | None = None) -> int: ...

    def resolve_review(self, stream: str, comment_id: str, resolution: str, by: str,
                       resolved_too: bool = False) -> bool: ...

    def record_sanction(self, stream: str, user: str, until_ms: int | None, reason: str = "") -> None: ...
    def lift_sanction(self, stream: str, user: str) -> None: ...
    def sanctions_in_force(self, now_ms: int) -> list[tuple[str, str, int | None]]: ...
    def set_pin(self, stream: str, comment: dict[str, Any] | None) -> None: ...
    def pin(self, stream: str) -> dict[str, Any] | None: ...
    def count(self, stream: str) -> int: ...
    def close(self) -> None: ...


class SqliteStore:
    """Thread-safe: writes come from the archiver's worker thread, reads from the gateway."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._use_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
            self._db.executescript(INDEXES)

    def _use_wal(self) -> None:
        """Switch a new file to WAL. The switch takes the file's lock without waiting on the busy
        timeout, so a role opening the file while another switches it retries (WAL then sticks
        to the file, and later opens need no lock)."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _add_missing_columns(self) -> None:
        """Migrate a file made by an older version. In one write transaction: roles started
        together (gateway, archiver, moderator) open the same new file, and two that both saw
        a column missing would both add it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in (("comments", POSITION_COLUMNS), ("moderation_actions", ACTION_COLUMNS),
                                   ("review_queue", REVIEW_COLUMNS)):
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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
        shadowed and deleted comments only when ``viewer`` (a user id) wrote them, a deleted one
        marked ``"deleted": true`` with the delete's ``code`` and ``reason``."""
        sql = (
            "SELECT comment_id, user_id, user_name, badges, message, created_at, offset, is_deleted, delete_code,"
            " delete_reason FROM comments WHERE stream_id = ? AND comment_id < ?"
            " AND ((is_deleted = 0 AND is_shadow = 0) OR user_id = ?) ORDER BY comment_id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (stream, before if before is not None else 2**63 - 1,
                                          viewer if viewer is not None else "", limit)).fetchall()
        return [event_shape(stream, *row[:7]) | (deleted_shape(row[8], row[9]) if row[7] else {}) for row in rows]

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
        return [StoredComment(row[6], bool(row[7]), event_shape(stream, *row[:7])) for row in rows]

    def last_position(self, stream: str) -> tuple[str, int] | None:
        """(epoch, offset) of the stream's newest stored comment that has a position (tombstones
        count: the log moved past them), or None: a welcome's position when the cache is gone."""
        rows = self._read("SELECT epoch, MAX(offset) FROM comments WHERE stream_id = ? AND epoch = (SELECT epoch"
                          " FROM comments WHERE stream_id = ? AND epoch != '' ORDER BY comment_id DESC LIMIT 1)",
                          (stream, stream))
        return (rows[0][0], int(rows[0][1])) if rows and rows[0][0] is not None else None

    # -- moderation ------------------------------------------------------------------------

    def delete_comments(self, stream: str, ids: Sequence[str], code: str = "", reason: str = "") -> int:
        """Tombstone the comments ``ids`` (who removed them and why: ``code``, ``reason``); how many
        were live before."""
        rows = [(code, reason, stream, int(i)) for i in ids]
        return self._write("UPDATE comments SET is_deleted = 1, delete_code = ?, delete_reason = ?"
                           " WHERE stream_id = ? AND comment_id = ? AND is_deleted = 0", rows)

    def restore_comments(self, stream: str, ids: Sequence[str]) -> int:
        """Lift the tombstones of ``ids``; how many were deleted before."""
        rows = [(stream, int(i)) for i in ids]
        return self._write("UPDATE comments SET is_deleted = 0, delete_code = '', delete_reason = ''"
                           " WHERE stream_id = ? AND comment_id = ? AND is_deleted = 1", rows)

    def deleted_comment(self, stream: str, comment_id: str) -> dict[str, Any] | None:
        """A tombstoned (not shadowed) comment in wire shape C, or None: what a restore brings back."""
        rows = self._read("SELECT comment_id, user_id, user_name, badges, message, created_at, offset FROM comments"
                          " WHERE stream_id = ? AND comment_id = ? AND is_deleted = 1 AND is_shadow = 0",
                          (stream, int(comment_id)))
        return event_shape(stream, *rows[0]) if rows else None

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
        return (event_shape(stream, *rows[0][:7]), bool(rows[0][7])) if rows else None

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
        """Add flagged comments and automatic shadow-bans to the review queue (a replay is ignored)."""
        rows = [(i.stream, int(i.comment_id), i.user_id, i.user_name, i.text, i.stage, i.score, i.reason, i.created_at,
                 json.dumps(list(i.evidence), ensure_ascii=False), i.resolution, i.resolved_by) for i in items]
        return self._write("INSERT OR IGNORE INTO review_queue (stream_id, comment_id, user_id, user_name, message,"
                           " stage, score, reason, created_at, evidence, resolution, resolved_by)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def review_queue(self, stream: str, limit: int, resolved: bool = False) -> list[ReviewItem]:
        """Open (or resolved) review items of ``stream``, oldest first."""
        op = "!=" if resolved else "="
        rows = self._read("SELECT stream_id, comment_id, user_id, user_name, message, stage, score, reason,"
                          " created_at, resolution, resolved_by, evidence FROM review_queue"
                          f" WHERE stream_id = ? AND resolution {op} '' ORDER BY comment_id LIMIT ?", (stream, limit))
        return [_review_item(r) for r in rows]

    def review_item(self, stream: str, comment_id: str) -> ReviewItem | None:
        """The open review item of a comment, or None."""
        rows = self._read("SELECT stream_id, comment_id, user_id, user_name, message, stage, score, reason,"
                          " created_at, resolution, resolved_by, evidence FROM review_queue"
                          " WHERE stream_id = ? AND comment_id = ? AND resolution = ''", (stream, int(comment_id)))
        return _review_item(rows[0]) if rows else None

    def offences_of(self, user: str, since_ms: int, limit: int) -> list[dict[str, Any]]:
        """``user``'s deleted comments (automatic or a moderator's) recorded since ``since_ms``,
        newest first: {"stream", "id", "text", "reason"}, what an automatic shadow-ban shows."""
        rows = self._read(
            "SELECT a.stream_id, a.comment_id, COALESCE(c.message, ''), a.reason FROM moderation_actions a"
            " LEFT JOIN comments c ON c.stream_id = a.stream_id AND c.comment_id = a.comment_id"
            " WHERE a.user_id = ? AND a.action = 'delete' AND a.comment_id IS NOT NULL AND a.created_at >= ?"
            " ORDER BY a.action_id DESC LIMIT ?", (user, since_ms, limit))
        return [{"stream": r[0], "id": str(r[1]), "text": r[2], "reason": r[3]} for r in rows]

    # -- sanctions in force (re-seeded into Redis when it restarted empty) ------------------

    def record_sanction(self, stream: str, user: str, until_ms: int | None, reason: str = "") -> None:
        """A ban (``until_ms`` None) or a time-out until ``until_ms``, replacing any before."""
        self._write("INSERT OR REPLACE INTO sanctions (stream_id, user_id, until_ms, reason, created_at)"
                    " VALUES (?, ?, ?, ?, ?)", [(stream, user, until_ms, reason, time.time_ns() // 1_000_000)])

    def lift_sanction(self, stream: str, user: str) -> None:
        self._write("DELETE FROM sanctions WHERE stream_id = ? AND user_id = ?", [(stream, user)])

    def sanctions_in_force(self, now_ms: int) -> list[tuple[str, str, int | None]]:
        """(stream, user, until ms or None for a ban) of every ban and unexpired time-out."""
        rows = self._read("SELECT stream_id, user_id, until_ms FROM sanctions WHERE until_ms IS NULL OR until_ms > ?",
                          (now_ms,))
        return [(r[0], r[1], r[2]) for r in rows]

    def open_reviews(self, stream: str | None = None) -> int:
        """How many flagged comments wait for review (on ``stream``, or on every stream)."""
        if stream is None:
            rows = self._read("SELECT COUNT(*) FROM review_queue WHERE resolution = ''", ())
        else:
            rows = self._read("SELECT COUNT(*) FROM review_queue WHERE stream_id = ? AND resolution = ''", (stream,))
        return int(rows[0][0])

    def resolve_review(self, stream: str, comment_id: str, resolution: str, by: str,
                       resolved_too: bool = False) -> bool:
        """Close an open review item (``keep``, ``delete``, ``restore``, ``lift``), or with
        ``resolved_too`` one already closed (an automatic delete restored); False if none was."""
        state = "" if resolved_too else " AND resolution = ''"
        return self._write("UPDATE review_queue SET resolution = ?, resolved_by = ?, resolved_at = ?"
                           f" WHERE stream_id = ? AND comment_id = ?{state}",
                           [(resolution, by, time.time_ns() // 1_000_000, stream, int(comment_id))]) > 0

    def deleted_automatically(self, stream: str, comment_id: str) -> bool:
        """Is the comment a tombstone of automatic moderation (not a moderator's)?"""
        rows = self._read("SELECT delete_code FROM comments WHERE stream_id = ? AND comment_id = ? AND is_deleted = 1",
                          (stream, int(comment_id)))
        return bool(rows) and rows[0][0] in ("", "moderated")

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


def _review_item(r: Sequence[Any]) -> ReviewItem:
    """A review_queue row (its columns in the order the queries above select them)."""
    return ReviewItem(r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                      tuple(json.loads(r[11])))


def deleted_shape(code: str, reason: str) -> dict[str, Any]:
    """What a deleted comment shows its author: who removed it and why."""
    return {"deleted": True, "code": code or "moderated", "reason": reason or "removed"}


def event_shape(stream: str, cid: int, uid: str, name: str, badges: str, text: str, ts: int,
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
