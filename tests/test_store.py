"""The history stores: positions per row, range reads for recovery, tombstones, moderation
records. The behaviour tests run against SQLite and against the real Cassandra node
(``store`` is parametrized; the Cassandra one gets a fresh keyspace); old SQLite files migrated."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chorus.config import load_config
from chorus.ingest.history import open_store
from chorus.ingest.records import Comment
from chorus.ingest.store import HistoryStore, ModerationAction, ReviewItem, SqliteStore, StoreUnavailable

_keyspaces = itertools.count()


@pytest.fixture(params=["sqlite", "cassandra"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    """Each backend, empty."""
    if request.param == "sqlite":
        config = load_config(env={}, history__path=str(tmp_path / "h.sqlite3"))
    else:
        node = request.getfixturevalue("cassandra_service")
        config = load_config(env={}, history__backend="cassandra", history__cassandra_contact_points=[node.address],
                             history__cassandra_keyspace=f"test_store_{os.getpid()}_{next(_keyspaces)}")
    opened = open_store(config)  # the backend the config names, as the roles open it
    assert type(opened).__name__ == {"sqlite": "SqliteStore", "cassandra": "CassandraStore"}[request.param]
    yield opened
    opened.close()


def comment(i: int, offset: int, epoch: str = "e", stream: str = "s") -> Comment:
    return Comment(str(7000 + i), stream, "u1", "Una", (), f"c{i}", 1_764_000_000_000 + i, epoch, offset)


def test_rows_keep_their_position_and_writes_are_idempotent(store: HistoryStore) -> None:
    batch = [comment(1, 10), comment(2, 13), comment(3, 20)]
    assert store.write_comments(batch) == 3
    replayed = store.write_comments(batch)  # a replayed batch adds nothing
    assert replayed == (0 if isinstance(store, SqliteStore) else 3)  # Cassandra cannot tell new rows
    assert store.count("s") == 3
    assert [c["offset"] for c in store.page("s", None, 10)] == [20, 13, 10]


def test_since_reads_a_range_in_offset_order(store: HistoryStore) -> None:
    store.write_comments([comment(i, 100 + 3 * i) for i in range(10)])  # offsets 100, 103, ... 127
    store.write_comments([comment(50, 110, epoch="other"), comment(51, 111, stream="t")])
    rows = store.since("s", "e", 109, 100)
    assert [r.offset for r in rows] == [109, 112, 115, 118, 121, 124, 127]
    assert [r.event["id"] for r in rows][:2] == ["7003", "7004"]
    assert rows[0].event == {"id": "7003", "stream": "s", "user": {"id": "u1", "name": "Una", "badges": []},
                             "text": "c3", "ts": 1_764_000_000_003, "offset": 109}
    assert [r.offset for r in store.since("s", "e", 110, 2)] == [112, 115]
    assert store.since("s", "nope", 0, 10) == []
    assert store.last_position("s") == ("other", 110)  # the epoch of the newest id
    assert store.last_position("t") == ("e", 111)
    assert store.last_position("none") is None


def test_tombstones_are_read_as_such(store: HistoryStore) -> None:
    store.write_comments([comment(1, 1), comment(2, 2), comment(3, 3)])
    assert store.delete_comments("s", ["7002"], "moderated", "spam") == 1
    assert store.delete_comments("s", ["7002", "9999"]) == 0  # already deleted, never stored
    assert [(r.offset, r.deleted) for r in store.since("s", "e", 1, 10)] == [(1, False), (2, True), (3, False)]
    assert [c["id"] for c in store.page("s", None, 10)] == ["7003", "7001"]
    # its author still sees it, marked with who removed it and why
    mine = store.page("s", None, 10, viewer="u1")[1]
    assert (mine["id"], mine["deleted"], mine["code"], mine["reason"]) == ("7002", True, "moderated", "spam")
    assert store.deleted_automatically("s", "7002")
    assert store.deleted_comment("s", "7002") is not None and store.comment("s", "7002") is not None
    assert store.restore_comments("s", ["7002"]) == 1
    assert [c["id"] for c in store.page("s", None, 10)] == ["7003", "7002", "7001"]
    assert store.comment("s", "9999") is None


def test_a_replayed_comment_does_not_undo_a_later_shadow_or_delete(store: HistoryStore) -> None:
    batch = [comment(1, 1), comment(2, 2)]
    store.write_comments(batch)
    store.shadow_comments("s", ["7001"])
    store.delete_comments("s", ["7002"])
    store.write_comments(batch)  # the archiver read the same records again
    assert store.page("s", None, 10) == []
    assert [r.deleted for r in store.since("s", "e", 0, 10)] == [True, True]


def test_pages_go_back_by_id_across_time_buckets(store: HistoryStore) -> None:
    # ids a minute apart: every Cassandra partition (30 s) holds one
    rows = [Comment(str((i * 60_000) << 22), "s", f"u{i % 3}", "N", (), f"c{i}", 1_764_000_000_000 + i, "e", i)
            for i in range(1, 31)]
    store.write_comments(rows)
    first = store.page("s", None, 12)
    assert [c["text"] for c in first] == [f"c{i}" for i in range(30, 18, -1)]
    rest = store.page("s", int(first[-1]["id"]), 100)
    assert [c["text"] for c in rest] == [f"c{i}" for i in range(18, 0, -1)]
    assert store.recent_of_user("s", "u1", 0, 3) == [rows[i - 1].id for i in (28, 25, 22)]


def test_moderation_records(store: HistoryStore) -> None:
    store.write_comments([comment(1, 1), comment(2, 2)])
    decisions = [ModerationAction("s", "delete", "rules", "7001", "u1", 0.9, "slur", created_at=1),
                 ModerationAction("s", "ban", "api", None, "u2", None, "spam", actor="mod", created_at=2)]
    store.record_actions(decisions)
    store.record_actions(decisions[:1])  # the moderator read that comment again
    assert sorted(a.action for a in store.actions("s")) == ["ban", "delete"]
    assert store.offences_of("u1", 0, 10) == [{"stream": "s", "id": "7001", "text": "c1", "reason": "slur"}]
    item = ReviewItem("s", "7002", "u1", "Una", "c2", "model", 0.7, "rude?", 5)
    assert store.queue_for_review([item]) == 1
    assert store.queue_for_review([item]) == 0
    assert store.open_reviews("s") == 1 and store.open_reviews() == 1
    assert [i.comment_id for i in store.review_queue("s", 10)] == ["7002"]
    assert store.review_item("s", "7002") is not None
    assert store.resolve_review("s", "7002", "keep", "mod")
    assert not store.resolve_review("s", "7002", "keep", "mod")
    assert store.open_reviews() == 0 and store.review_item("s", "7002") is None
    assert [i.resolution for i in store.review_queue("s", 10, resolved=True)] == ["keep"]
    store.record_sanction("s", "u2", None, "spam")
    store.record_sanction("s", "u3", 1000)
    assert store.sanctions_in_force(2000) == [("s", "u2", None)]
    store.lift_sanction("s", "u2")
    assert store.sanctions_in_force(0) == [("s", "u3", 1000)]
    store.set_pin("s", {"id": "7001", "text": "c1"})
    assert store.pin("s") == {"id": "7001", "text": "c1"}
    store.set_pin("s", None)
    assert store.pin("s") is None


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
