"""The SQLite history store: positions per row, range reads for recovery, old files migrated."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from chorus.ingest.records import Comment
from chorus.ingest.store import SqliteStore, StoreUnavailable


def comment(i: int, offset: int, epoch: str = "e", stream: str = "s") -> Comment:
    return Comment(str(7000 + i), stream, "u1", "Una", (), f"c{i}", 1_764_000_000_000 + i, epoch, offset)


def test_rows_keep_their_position_and_writes_are_idempotent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3")
    batch = [comment(1, 10), comment(2, 13), comment(3, 20)]
    assert store.write_comments(batch) == 3
    assert store.write_comments(batch) == 0  # a replayed batch adds nothing
    assert [c["offset"] for c in store.page("s", None, 10)] == [20, 13, 10]
    store.close()


def test_since_reads_a_range_in_offset_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3")
    store.write_comments([comment(i, 100 + 3 * i) for i in range(10)])  # offsets 100, 103, ... 127
    store.write_comments([comment(50, 110, epoch="other"), comment(51, 111, stream="t")])
    rows = store.since("s", "e", 109, 100)
    assert [r.offset for r in rows] == [109, 112, 115, 118, 121, 124, 127]
    assert [r.event["id"] for r in rows][:2] == ["7003", "7004"]
    assert rows[0].event == {"id": "7003", "stream": "s", "user": {"id": "u1", "name": "Una", "badges": []},
                             "text": "c3", "ts": 1_764_000_000_003, "offset": 109}
    assert [r.offset for r in store.since("s", "e", 110, 2)] == [112, 115]
    assert store.since("s", "nope", 0, 10) == []
    store.close()


def test_tombstones_are_read_as_such(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3")
    store.write_comments([comment(1, 1), comment(2, 2), comment(3, 3)])
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    with db:
        db.execute("UPDATE comments SET is_deleted = 1 WHERE comment_id = 7002")
    db.close()
    assert [(r.offset, r.deleted) for r in store.since("s", "e", 1, 10)] == [(1, False), (2, True), (3, False)]
    assert [c["id"] for c in store.page("s", None, 10)] == ["7003", "7001"]
    store.close()


OLD_SCHEMA = """
CREATE TABLE comments (
    stream_id TEXT NOT NULL, comment_id INTEGER NOT NULL, user_id TEXT NOT NULL,
    user_name TEXT NOT NULL, badges TEXT NOT NULL DEFAULT '[]', message TEXT NOT NULL,
    is_deleted INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
    PRIMARY KEY (stream_id, comment_id DESC)
) WITHOUT ROWID;
INSERT INTO comments (stream_id, comment_id, user_id, user_name, message, created_at)
VALUES ('s', 1, 'u', 'U', 'from before', 1);
"""


def test_a_file_from_before_positions_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    store = SqliteStore(path)
    store.write_comments([comment(1, 5)])
    assert [c.get("offset") for c in store.page("s", None, 10)] == [5, None]  # the old row has no position
    assert [r.offset for r in store.since("s", "e", -1, 10)] == [5]
    indexes = {row[1] for row in store._db.execute("PRAGMA index_list(comments)")}
    assert "comments_position" in indexes
    store.close()


def test_a_failing_read_is_store_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3")
    store.close()
    with pytest.raises(StoreUnavailable):
        store.since("s", "e", 0, 10)


def _open_store_at(path: str, barrier: Any) -> None:
    barrier.wait()
    SqliteStore(path).close()


def test_roles_opening_a_new_file_together_migrate_it_once(tmp_path: Path) -> None:
    """`chorus gateway` and `chorus archiver` started together open the same new file: each
    saw the added columns missing and both added them ("duplicate column name")."""
    ctx = multiprocessing.get_context("fork")
    failed = 0
    for i in range(8):
        path = str(tmp_path / f"h{i}.sqlite3")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_store_at, args=(path, barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        failed += sum(p.exitcode != 0 for p in procs)
    assert failed == 0
