"""The history store on Apache Cassandra: the interface of ``SqliteStore`` for deployments
whose history does not fit one host (no shared volume; every role reads and writes over CQL).

Schema (made for 10k comments/s on one stream and weeks of retention)::

    comments          ((stream_id, bucket), comment_id DESC)  a row per comment; bucket is the id's
                       millisecond // bucket_ms, so a partition holds bucket_ms of one stream
                       (30 s: ~60 MB at 10k comments/s) and a row is found from its id alone
    comment_buckets   ((stream_id), bucket DESC)             which buckets a stream has: pages walk it
    comment_positions ((stream_id, epoch, block), offset)    log position -> id, for recovery's range
    position_blocks   ((stream_id, epoch), block)            which offset blocks (2^20 offsets) exist
    moderation_actions((stream_id), seq DESC, action, stage) seq: the comment's id (so a replayed
                       decision is the same row), else an id-shaped number made of the time
    offences          ((user_id), seq DESC, stream_id)        a user's deleted comments on every stream
    review_queue      ((stream_id), comment_id)               flagged comments (resolved ones stay)
    reviews_open      ((shard), stream_id, comment_id)        the open ones only: counts are one read
    sanctions         ((shard), stream_id, user_id)           bans and time-outs in force
    pins              ((stream_id))

The comment tables use TimeWindowCompactionStrategy and the configured retention as their
default TTL, so expired windows are dropped as whole SSTables. A user's recent comments
(a moderator's "clear") are found through a storage-attached index on ``user_id``, queried one
partition at a time.

Writes are idempotent: a comment's row is written ``USING TIMESTAMP`` of its id's millisecond,
so a record the archiver reads again from Kafka writes the same cells with the same timestamp
and can never undo a later delete or shadow (those are written at the current time, and a
comment insert never sets ``is_deleted``; it sets ``is_shadow`` only when true). Comments are
sent as unlogged batches of one partition each (a batch is then one mutation on its replicas),
every statement prepared, routed token-aware to a replica of its partition.

The driver is acsylla (the Scylla/DataStax C++ driver under asyncio): on this machine it wrote
the archiver's batches about twice as fast as the Python ``cassandra-driver`` (bench/store.py).
It runs on a loop of its own in one thread; the blocking methods here submit to that loop, so
callers on another event loop use ``asyncio.to_thread`` like they do for SQLite, and no lock is
shared between reads and the archiver's writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from chorus.ids import EPOCH_MS
from chorus.ingest.records import Comment
from chorus.ingest.store import (
    ModerationAction,
    ReviewItem,
    StoredComment,
    StoreUnavailable,
    deleted_shape,
    event_shape,
)

__all__ = ["CassandraSettings", "CassandraStore"]

log = logging.getLogger("chorus.store")

T = TypeVar("T")
ID_SHIFT = 22  # a comment id is (ms since EPOCH_MS) << 22 | node | sequence (chorus/ids.py)
BLOCK_BITS = 20  # offsets per comment_positions partition: 2^20 rows of ~40 bytes
BATCH_MAX_ROWS = 100  # rows in one partition's batch (its size stays under batch_size_fail_threshold)
BATCH_MAX_BYTES = 32 * 1024  # ... and about this many bytes of values (the default warning is at 5 KiB)
INFLIGHT_MAX = 64  # requests one write_comments keeps in flight
SEEN_MAX = 100_000  # bucket and block index rows this process remembers having written
SHARD = 0  # the one partition of the small cross-stream tables (open reviews, sanctions)


@dataclass(frozen=True, slots=True)
class CassandraSettings:
    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    keyspace: str = "chorus"
    replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    consistency: str = "LOCAL_QUORUM"
    ttl_s: int = 0
    bucket_s: int = 30
    timeout_ms: int = 10_000


def _tables(ttl_s: int) -> list[str]:
    """CREATE TABLE statements of the schema above (run in the keyspace)."""
    twcs = ("compaction = {'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'HOURS',"
            f" 'compaction_window_size': 1}} AND default_time_to_live = {ttl_s}")
    return [
        "CREATE TABLE IF NOT EXISTS comments (stream_id text, bucket bigint, comment_id bigint, user_id text,"
        " user_name text, badges text, message text, created_at bigint, epoch text, offset bigint,"
        " is_shadow boolean, is_deleted boolean, delete_code text, delete_reason text,"
        " PRIMARY KEY ((stream_id, bucket), comment_id))"
        f" WITH CLUSTERING ORDER BY (comment_id DESC) AND {twcs}",
        "CREATE CUSTOM INDEX IF NOT EXISTS comments_user ON comments (user_id) USING 'StorageAttachedIndex'",
        "CREATE TABLE IF NOT EXISTS comment_buckets (stream_id text, bucket bigint, PRIMARY KEY (stream_id, bucket))"
        f" WITH CLUSTERING ORDER BY (bucket DESC) AND default_time_to_live = {ttl_s}",
        "CREATE TABLE IF NOT EXISTS comment_positions (stream_id text, epoch text, block bigint, offset bigint,"
        f" comment_id bigint, PRIMARY KEY ((stream_id, epoch, block), offset)) WITH {twcs}",
        "CREATE TABLE IF NOT EXISTS position_blocks (stream_id text, epoch text, block bigint,"
        f" PRIMARY KEY ((stream_id, epoch), block)) WITH default_time_to_live = {ttl_s}",
        "CREATE TABLE IF NOT EXISTS moderation_actions (stream_id text, seq bigint, action text, stage text,"
        " comment_id bigint, user_id text, score double, reason text, actor text, created_at bigint,"
        " PRIMARY KEY ((stream_id), seq, action, stage)) WITH CLUSTERING ORDER BY (seq DESC, action ASC, stage ASC)",
        "CREATE TABLE IF NOT EXISTS offences (user_id text, seq bigint, stream_id text, comment_id bigint,"
        " reason text, created_at bigint, PRIMARY KEY ((user_id), seq, stream_id))"
        " WITH CLUSTERING ORDER BY (seq DESC, stream_id ASC)",
        "CREATE TABLE IF NOT EXISTS review_queue (stream_id text, comment_id bigint, user_id text, user_name text,"
        " message text, stage text, score double, reason text, created_at bigint, resolution text,"
        " resolved_by text, resolved_at bigint, evidence text, PRIMARY KEY ((stream_id), comment_id))",
        "CREATE TABLE IF NOT EXISTS reviews_open (shard int, stream_id text, comment_id bigint,"
        " PRIMARY KEY ((shard), stream_id, comment_id))",
        "CREATE TABLE IF NOT EXISTS sanctions (shard int, stream_id text, user_id text, until_ms bigint,"
        " reason text, created_at bigint, PRIMARY KEY ((shard), stream_id, user_id))",
        "CREATE TABLE IF NOT EXISTS pins (stream_id text PRIMARY KEY, comment text, pinned_at bigint)",
    ]


_COMMENT_COLUMNS = "comment_id, user_id, user_name, badges, message, created_at, offset"
# Every prepared statement, by name. ``?`` markers bind positionally.
STATEMENTS = {
    "insert_comment": "INSERT INTO comments (stream_id, bucket, comment_id, user_id, user_name, badges, message,"
                      " created_at, epoch, offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
    "insert_shadowed": "INSERT INTO comments (stream_id, bucket, comment_id, user_id, user_name, badges, message,"
                       " created_at, epoch, offset, is_shadow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, true)"
                       " USING TIMESTAMP ?",
    "insert_bucket": "INSERT INTO comment_buckets (stream_id, bucket) VALUES (?, ?)",
    "insert_position": "INSERT INTO comment_positions (stream_id, epoch, block, offset, comment_id)"
                       " VALUES (?, ?, ?, ?, ?)",
    "insert_block": "INSERT INTO position_blocks (stream_id, epoch, block) VALUES (?, ?, ?)",
    "buckets_before": "SELECT bucket FROM comment_buckets WHERE stream_id = ? AND bucket <= ? LIMIT ?",
    "page": f"SELECT {_COMMENT_COLUMNS}, is_deleted, is_shadow, delete_code, delete_reason FROM comments"
            " WHERE stream_id = ? AND bucket = ? AND comment_id < ? LIMIT ?",
    "id_range": f"SELECT {_COMMENT_COLUMNS}, is_deleted, is_shadow FROM comments"
                " WHERE stream_id = ? AND bucket = ? AND comment_id >= ? AND comment_id <= ?",
    "one": f"SELECT {_COMMENT_COLUMNS}, is_deleted, is_shadow, delete_code FROM comments"
           " WHERE stream_id = ? AND bucket = ? AND comment_id = ?",
    "newest_epochs": "SELECT epoch FROM comments WHERE stream_id = ? AND bucket = ? LIMIT 100",
    "blocks_from": "SELECT block FROM position_blocks WHERE stream_id = ? AND epoch = ? AND block >= ?",
    "last_block": "SELECT block FROM position_blocks WHERE stream_id = ? AND epoch = ? ORDER BY block DESC LIMIT 1",
    "positions_from": "SELECT offset, comment_id FROM comment_positions"
                      " WHERE stream_id = ? AND epoch = ? AND block = ? AND offset >= ? LIMIT ?",
    "last_offset": "SELECT offset FROM comment_positions WHERE stream_id = ? AND epoch = ? AND block = ?"
                   " ORDER BY offset DESC LIMIT 1",
    "of_user": "SELECT comment_id, is_deleted, created_at FROM comments"
               " WHERE stream_id = ? AND bucket = ? AND user_id = ?",
    "set_deleted": "UPDATE comments SET is_deleted = true, delete_code = ?, delete_reason = ?"
                   " WHERE stream_id = ? AND bucket = ? AND comment_id = ?",
    "set_restored": "UPDATE comments SET is_deleted = false, delete_code = '', delete_reason = ''"
                    " WHERE stream_id = ? AND bucket = ? AND comment_id = ?",
    "set_shadow": "UPDATE comments SET is_shadow = true WHERE stream_id = ? AND bucket = ? AND comment_id = ?",
    "count": "SELECT COUNT(*) FROM comments WHERE stream_id = ? AND bucket = ?",
    "insert_action": "INSERT INTO moderation_actions (stream_id, seq, action, stage, comment_id, user_id, score,"
                     " reason, actor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "insert_offence": "INSERT INTO offences (user_id, seq, stream_id, comment_id, reason, created_at)"
                      " VALUES (?, ?, ?, ?, ?, ?)",
    "actions": "SELECT stream_id, action, stage, comment_id, user_id, score, reason, actor, created_at"
               " FROM moderation_actions WHERE stream_id = ? LIMIT ?",
    "offences": "SELECT stream_id, comment_id, reason FROM offences WHERE user_id = ? AND seq >= ? LIMIT ?",
    "insert_review": "INSERT INTO review_queue (stream_id, comment_id, user_id, user_name, message, stage, score,"
                     " reason, created_at, evidence, resolution, resolved_by)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
    "insert_open": "INSERT INTO reviews_open (shard, stream_id, comment_id) VALUES (?, ?, ?)",
    "delete_open": "DELETE FROM reviews_open WHERE shard = ? AND stream_id = ? AND comment_id = ?",
    "open_ids": "SELECT comment_id FROM reviews_open WHERE shard = ? AND stream_id = ? LIMIT ?",
    "open_count": "SELECT COUNT(*) FROM reviews_open WHERE shard = ?",
    "open_count_stream": "SELECT COUNT(*) FROM reviews_open WHERE shard = ? AND stream_id = ?",
    "reviews": "SELECT stream_id, comment_id, user_id, user_name, message, stage, score, reason, created_at,"
               " resolution, resolved_by, evidence FROM review_queue WHERE stream_id = ?",
    "review": "SELECT stream_id, comment_id, user_id, user_name, message, stage, score, reason, created_at,"
              " resolution, resolved_by, evidence FROM review_queue WHERE stream_id = ? AND comment_id = ?",
    "resolve_open": "UPDATE review_queue SET resolution = ?, resolved_by = ?, resolved_at = ?"
                    " WHERE stream_id = ? AND comment_id = ? IF resolution = ''",
    "resolve_any": "UPDATE review_queue SET resolution = ?, resolved_by = ?, resolved_at = ?"
                   " WHERE stream_id = ? AND comment_id = ? IF EXISTS",
    "insert_sanction": "INSERT INTO sanctions (shard, stream_id, user_id, until_ms, reason, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
    "delete_sanction": "DELETE FROM sanctions WHERE shard = ? AND stream_id = ? AND user_id = ?",
    "sanctions": "SELECT stream_id, user_id, until_ms FROM sanctions WHERE shard = ?",
    "insert_pin": "INSERT INTO pins (stream_id, comment, pinned_at) VALUES (?, ?, ?)",
    "delete_pin": "DELETE FROM pins WHERE stream_id = ?",
    "pin": "SELECT comment FROM pins WHERE stream_id = ?",
}
# Statements that are safe to send twice (the driver may retry them or run them speculatively).
NOT_IDEMPOTENT = {"insert_review", "resolve_open", "resolve_any"}
PAGE_ROWS = 500  # rows per page of a query read in full (review queues, sanctions)


TABLES = ("comments", "comment_buckets", "comment_positions", "position_blocks", "moderation_actions", "offences",
          "review_queue", "reviews_open", "sanctions", "pins")
_TABLE_REF = re.compile(r"\b(FROM|INTO|UPDATE|EXISTS|ON) (" + "|".join(TABLES) + r")\b")


def _qualified(cql: str, keyspace: str) -> str:
    """``cql`` with its table names prefixed by ``keyspace``."""
    return _TABLE_REF.sub(lambda m: f"{m.group(1)} {keyspace}.{m.group(2)}", cql)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _id_ms(comment_id: int) -> int:
    """The Unix millisecond a comment id was made in."""
    return (comment_id >> ID_SHIFT) + EPOCH_MS


def _time_seq(ms: int) -> int:
    """An id-shaped number for ``ms`` (random low bits): sorts with comment ids by time."""
    return ((ms - EPOCH_MS) << ID_SHIFT) | int.from_bytes(os.urandom(3), "big") >> 2


class _Seen:
    """Index rows this process wrote already (a bounded LRU; writing one again is harmless)."""

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()

    def fresh(self, key: tuple[Any, ...]) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        return True

    def add(self, keys: Iterable[tuple[Any, ...]]) -> None:
        for key in keys:
            self._keys[key] = None
        while len(self._keys) > SEEN_MAX:
            self._keys.popitem(last=False)


class CassandraStore:
    """Thread-safe and lock-free for callers: every request goes to the driver's own loop."""

    def __init__(self, settings: CassandraSettings) -> None:
        import acsylla

        self._acsylla = acsylla
        self.settings = settings
        self.bucket_ms = settings.bucket_s * 1000
        self._timeout_s = settings.timeout_ms / 1000
        self._seen = _Seen()
        self._loop = _driver_loop()
        self._closed = False
        self._session, self._prepared = self._run(self._connect(), timeout=max(60.0, 3 * self._timeout_s))

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coro`` on the driver's loop and wait for it; driver errors become StoreUnavailable."""
        future = asyncio.run_coroutine_threadsafe(_wrapped(coro), self._loop)
        try:
            return future.result(timeout if timeout is not None else self._timeout_s * 3)
        except TimeoutError as exc:
            future.cancel()
            raise StoreUnavailable("the Cassandra store did not answer in time") from exc

    async def _connect(self) -> tuple[Any, dict[str, Any]]:
        acsylla, s = self._acsylla, self.settings
        hosts = [p.rsplit(":", 1)[0] if p.count(":") == 1 else p for p in s.contact_points]
        ports = {int(p.rsplit(":", 1)[1]) for p in s.contact_points if p.count(":") == 1}
        consistency = getattr(acsylla.Consistency, s.consistency)
        cluster = acsylla.create_cluster(
            hosts, port=ports.pop() if len(ports) == 1 else s.port, consistency=consistency,
            serial_consistency=acsylla.Consistency.LOCAL_SERIAL, token_aware_routing=True,
            request_timeout=self._timeout_s, connect_timeout=min(self._timeout_s, 5.0),
            constant_reconnect_delay_ms=500, log_level="warn", logging_callback=_driver_log,
            application_name="chorus",
        )  # fmt: skip
        session = await cluster.create_session()
        await session.execute(acsylla.create_statement(
            f"CREATE KEYSPACE IF NOT EXISTS {s.keyspace} WITH replication = {s.replication}", timeout=60.0))
        # table names qualified with the keyspace: a session on a keyspace (USE) with prepared
        # statements is ambiguous, and Cassandra 5 warns about every such statement
        for ddl in _tables(s.ttl_s):
            await session.execute(acsylla.create_statement(_qualified(ddl, s.keyspace), timeout=60.0))
        prepared = {name: await session.create_prepared(_qualified(cql, s.keyspace))
                    for name, cql in STATEMENTS.items()}
        return session, prepared

    def _bind(self, name: str, values: Sequence[Any], page_size: int | None = None) -> Any:
        statement = self._prepared[name].bind(list(values), page_size=page_size)
        if name not in NOT_IDEMPOTENT:
            statement.set_is_idempotent(True)
        return statement

    async def _rows(self, name: str, *values: Any) -> list[list[Any]]:
        result = await self._session.execute(self._bind(name, values))
        return [row.as_list() for row in result]

    async def _all_rows(self, name: str, *values: Any) -> list[list[Any]]:
        """Every row of a query, page by page (for partitions that may hold more than a page)."""
        statement = self._bind(name, values, page_size=PAGE_ROWS)
        rows: list[list[Any]] = []
        while True:
            result = await self._session.execute(statement)
            rows.extend(row.as_list() for row in result)
            if not result.has_more_pages():
                return rows
            statement = self._bind(name, values, page_size=PAGE_ROWS)
            statement.set_page_state(result.page_state())

    async def _exec(self, name: str, *values: Any) -> bool:
        """Run a write; for a conditional one whether it was applied."""
        result = await self._session.execute(self._bind(name, values))
        row = result.first()
        return bool(row.as_list()[0]) if row is not None and name in NOT_IDEMPOTENT else True

    async def _gather(self, writes: Iterable[Awaitable[Any]]) -> None:
        """Await ``writes`` with at most INFLIGHT_MAX in flight."""
        gate = asyncio.Semaphore(INFLIGHT_MAX)

        async def one(w: Awaitable[Any]) -> None:
            async with gate:
                await w

        await asyncio.gather(*(one(w) for w in writes))

    def _bucket(self, comment_id: int) -> int:
        return _id_ms(comment_id) // self.bucket_ms

    # -- comments -------------------------------------------------------------------------

    def write_comments(self, comments: Sequence[Comment]) -> int:
        """Write the comments (again, if the log replays them: the same cells, the same timestamp).
        Returns how many were written; Cassandra does not say which were new."""
        if comments:
            self._run(self._write_comments(comments))
        return len(comments)

    async def _write_comments(self, comments: Sequence[Comment]) -> None:
        by_partition: dict[tuple[str, int], list[Comment]] = defaultdict(list)
        by_block: dict[tuple[str, str, int], list[Comment]] = defaultdict(list)
        for c in comments:
            by_partition[(c.stream, self._bucket(int(c.id)))].append(c)
            if c.epoch and c.offset >= 0:
                by_block[(c.stream, c.epoch, c.offset >> BLOCK_BITS)].append(c)
        writes: list[Awaitable[Any]] = []
        for (stream, bucket), rows in by_partition.items():
            writes.extend(self._session.execute_batch(b) for b in self._comment_batches(stream, bucket, rows))
        for (stream, epoch, block), rows in by_block.items():
            writes.extend(self._session.execute_batch(b) for b in self._position_batches(stream, epoch, block, rows))
        buckets = [k for k in by_partition if self._seen.fresh(("b", *k))]
        blocks = [k for k in by_block if self._seen.fresh(("p", *k))]
        writes.extend(self._session.execute(self._bind("insert_bucket", k)) for k in buckets)
        writes.extend(self._session.execute(self._bind("insert_block", k)) for k in blocks)
        await self._gather(writes)
        self._seen.add([("b", *k) for k in buckets] + [("p", *k) for k in blocks])

    def _batches(self, statements: Iterable[tuple[Any, int]]) -> list[Any]:
        """Unlogged batches of (statement, size in bytes), each under the batch limits."""
        batches: list[Any] = []
        batch, rows, size = None, 0, 0
        for statement, nbytes in statements:
            if batch is None or rows >= BATCH_MAX_ROWS or size + nbytes > BATCH_MAX_BYTES:
                batch, rows, size = self._acsylla.create_batch_unlogged(), 0, 0
                batch.set_is_idempotent(True)
                batches.append(batch)
            batch.add_statement(statement)
            rows, size = rows + 1, size + nbytes
        return batches

    def _comment_batches(self, stream: str, bucket: int, comments: list[Comment]) -> list[Any]:
        def statements() -> Iterable[tuple[Any, int]]:
            for c in comments:
                cid = int(c.id)
                badges = json.dumps(list(c.badges))
                values = (stream, bucket, cid, c.user_id, c.user_name, badges, c.text, c.ts, c.epoch, c.offset,
                          _id_ms(cid) * 1000)  # microseconds, Cassandra's write timestamp unit
                name = "insert_shadowed" if c.shadow else "insert_comment"
                yield self._prepared[name].bind(list(values)), 64 + len(c.text.encode()) + len(c.user_name)
        return self._batches(statements())

    def _position_batches(self, stream: str, epoch: str, block: int, comments: list[Comment]) -> list[Any]:
        return self._batches((self._prepared["insert_position"].bind([stream, epoch, block, c.offset, int(c.id)]),
                              48) for c in comments)

    async def _buckets(self, stream: str, at_most: int, limit: int) -> list[int]:
        rows = await self._rows("buckets_before", stream, at_most, limit)
        return [r[0] for r in rows]

    def page(self, stream: str, before: int | None, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` live comments older than id ``before``, newest first (as SqliteStore.page)."""
        return self._run(self._page(stream, before, limit, viewer))

    async def _page(self, stream: str, before: int | None, limit: int, viewer: str | None) -> list[dict[str, Any]]:
        before = before if before is not None else 2**63 - 1
        bucket = self._bucket(before) if before < 2**63 - 1 else 2**63 - 1
        out: list[dict[str, Any]] = []
        while len(out) < limit:
            buckets = await self._buckets(stream, bucket, 16)
            if not buckets:
                break
            # the first rows of the next buckets together: a quiet stream has a few in each
            want = limit - len(out)
            firsts = await asyncio.gather(*(self._rows("page", stream, b, before, want) for b in buckets))
            for b, rows in zip(buckets, firsts, strict=True):
                await self._take_page(out, limit, stream, b, rows, want, viewer)
                if len(out) >= limit:
                    break
            bucket = buckets[-1] - 1
        return out[:limit]

    async def _take_page(self, out: list[dict[str, Any]], limit: int, stream: str, bucket: int,
                         rows: list[list[Any]], fetched: int, viewer: str | None) -> None:
        """Add a bucket's rows shown to ``viewer``; read further into the bucket while hidden rows
        (deleted, shadowed) left the page short."""
        while True:
            out.extend(_visible(stream, r, viewer) for r in rows if _shown(r, viewer))
            if len(out) >= limit or len(rows) < fetched:
                return
            fetched = max(limit - len(out), 50)
            rows = await self._rows("page", stream, bucket, rows[-1][0], fetched)

    def since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        """Up to ``limit`` comments from ``offset`` on in ``epoch``, tombstones and shadowed ones
        marked deleted, in offset order."""
        return self._run(self._since(stream, epoch, offset, limit))

    async def _since(self, stream: str, epoch: str, offset: int, limit: int) -> list[StoredComment]:
        positions: list[tuple[int, int]] = []
        for (block,) in await self._rows("blocks_from", stream, epoch, offset >> BLOCK_BITS):
            rows = await self._rows("positions_from", stream, epoch, block, offset, limit - len(positions))
            positions.extend((r[0], r[1]) for r in rows)
            if len(positions) >= limit:
                break
        if not positions:
            return []
        found = await self._comments_by_id(stream, [cid for _o, cid in positions])
        out = []
        for off, cid in positions:
            row = found.get(cid)
            if row is not None:  # a position whose comment expired first is skipped
                out.append(StoredComment(off, bool(row[7]) or bool(row[8]), event_shape(stream, *row[:7])))
        return out

    async def _comments_by_id(self, stream: str, ids: list[int]) -> dict[int, list[Any]]:
        """The rows of ``ids``, read as one id range per bucket (recovery's ids are consecutive)."""
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for cid in ids:
            by_bucket[self._bucket(cid)].append(cid)
        results = await asyncio.gather(*(self._all_rows("id_range", stream, b, min(v), max(v))
                                         for b, v in by_bucket.items()))
        wanted = set(ids)
        return {r[0]: r for rows in results for r in rows if r[0] in wanted and r[4] is not None}

    def last_position(self, stream: str) -> tuple[str, int] | None:
        """(epoch, offset) of the newest comment with a position, or None (as SqliteStore)."""
        return self._run(self._last_position(stream))

    async def _last_position(self, stream: str) -> tuple[str, int] | None:
        epoch = ""
        for bucket in await self._buckets(stream, 2**63 - 1, 8):
            epoch = next((r[0] for r in await self._rows("newest_epochs", stream, bucket) if r[0]), "")
            if epoch:
                break
        if not epoch:
            return None
        blocks = await self._rows("last_block", stream, epoch)
        if not blocks:
            return None
        rows = await self._rows("last_offset", stream, epoch, blocks[0][0])
        return (epoch, int(rows[0][0])) if rows else None

    async def _one(self, stream: str, comment_id: int) -> list[Any] | None:
        rows = await self._rows("one", stream, self._bucket(comment_id), comment_id)
        return rows[0] if rows and rows[0][4] is not None else None

    def count(self, stream: str) -> int:
        async def count() -> int:
            buckets = await self._buckets(stream, 2**63 - 1, 1_000_000)
            counts = await asyncio.gather(*(self._rows("count", stream, b) for b in buckets))
            return sum(int(c[0][0]) for c in counts)
        return self._run(count())

    # -- moderation of comments -----------------------------------------------------------

    def delete_comments(self, stream: str, ids: Sequence[str], code: str = "", reason: str = "") -> int:
        """Tombstone the comments ``ids``; how many were live before."""
        return self._run(self._set_flag(stream, ids, lambda row: row[7] is not True, "set_deleted", code, reason))

    def restore_comments(self, stream: str, ids: Sequence[str]) -> int:
        """Lift the tombstones of ``ids``; how many were deleted before."""
        return self._run(self._set_flag(stream, ids, lambda row: row[7] is True, "set_restored"))

    def shadow_comments(self, stream: str, ids: Sequence[str]) -> int:
        """Hide the comments ``ids`` from everyone but their authors."""
        return self._run(self._set_flag(stream, ids, lambda row: row[8] is not True, "set_shadow"))

    async def _set_flag(self, stream: str, ids: Sequence[str], applies: Any, statement: str, *args: Any) -> int:
        """Update the stored comments among ``ids`` for which ``applies(row)``; how many. Read first:
        an update of a comment that is not stored would make a row of it."""
        changed = 0
        for cid in (int(i) for i in ids):
            row = await self._one(stream, cid)
            if row is not None and applies(row):
                await self._exec(statement, *args, stream, self._bucket(cid), cid)
                changed += 1
        return changed

    def deleted_comment(self, stream: str, comment_id: str) -> dict[str, Any] | None:
        """A tombstoned (not shadowed) comment in wire shape C, or None."""
        row = self._run(self._one(stream, int(comment_id)))
        return event_shape(stream, *row[:7]) if row is not None and row[7] is True and row[8] is not True else None

    def comment(self, stream: str, comment_id: str) -> tuple[dict[str, Any], bool] | None:
        """A stored comment in wire shape C and whether it is a tombstone (or shadowed), or None."""
        row = self._run(self._one(stream, int(comment_id)))
        return (event_shape(stream, *row[:7]), row[7] is True or row[8] is True) if row is not None else None

    def deleted_automatically(self, stream: str, comment_id: str) -> bool:
        row = self._run(self._one(stream, int(comment_id)))
        return row is not None and row[7] is True and (row[9] or "") in ("", "moderated")

    def recent_of_user(self, stream: str, user: str, since_ms: int, limit: int) -> list[str]:
        """Ids of ``user``'s live comments on ``stream`` since ``since_ms``, newest first."""
        return self._run(self._recent_of_user(stream, user, since_ms, limit))

    async def _recent_of_user(self, stream: str, user: str, since_ms: int, limit: int) -> list[str]:
        first = since_ms // self.bucket_ms
        ids: list[int] = []
        bucket = 2**63 - 1
        while len(ids) < limit:
            buckets = [b for b in await self._buckets(stream, bucket, 16) if b >= first]
            if not buckets:
                break
            results = await asyncio.gather(*(self._all_rows("of_user", stream, b, user) for b in buckets))
            for rows in results:
                ids.extend(r[0] for r in rows if r[1] is not True and r[2] is not None and r[2] >= since_ms)
            bucket = buckets[-1] - 1
        return [str(i) for i in sorted(ids, reverse=True)[:limit]]

    # -- moderation records ---------------------------------------------------------------

    def record_actions(self, actions: Sequence[ModerationAction]) -> int:
        """Write decisions; one about a comment (same action and stage) is one row however often."""
        self._run(self._gather(self._action_writes(actions)))
        return len(actions)

    def _action_writes(self, actions: Sequence[ModerationAction]) -> Iterable[Awaitable[Any]]:
        now = _now_ms()
        for a in actions:
            at = a.created_at or now
            cid = int(a.comment_id) if a.comment_id else None
            seq = cid if cid is not None else _time_seq(at)
            yield self._exec("insert_action", a.stream, seq, a.action, a.stage, cid, a.user_id, a.score, a.reason,
                             a.actor, at)
            if a.action == "delete" and cid is not None and a.user_id:
                yield self._exec("insert_offence", a.user_id, seq, a.stream, cid, a.reason, at)

    def actions(self, stream: str, limit: int = 100) -> list[ModerationAction]:
        """The stream's newest decisions first (ordered by the comment's time when they name one)."""
        rows = self._run(self._rows("actions", stream, limit))
        return [ModerationAction(r[0], r[1], r[2], str(r[3]) if r[3] is not None else None, r[4], r[5], r[6] or "",
                                 r[7] or "", r[8]) for r in rows]

    def offences_of(self, user: str, since_ms: int, limit: int) -> list[dict[str, Any]]:
        """``user``'s deleted comments since ``since_ms``, newest first: {"stream", "id", "text", "reason"}."""
        async def offences() -> list[dict[str, Any]]:
            rows = await self._rows("offences", user, _time_seq(since_ms) & ~((1 << ID_SHIFT) - 1), limit)
            texts = await asyncio.gather(*(self._one(r[0], r[1]) for r in rows))
            return [{"stream": r[0], "id": str(r[1]), "text": t[4] if t is not None else "", "reason": r[2] or ""}
                    for r, t in zip(rows, texts, strict=True)]
        return self._run(offences())

    def queue_for_review(self, items: Sequence[ReviewItem]) -> int:
        """Add flagged comments and automatic shadow-bans (a replay, or one resolved already, is ignored)."""
        async def queue() -> int:
            added = 0
            for i in items:
                if await self._exec("insert_review", i.stream, int(i.comment_id), i.user_id, i.user_name, i.text,
                                    i.stage, i.score, i.reason, i.created_at,
                                    json.dumps(list(i.evidence), ensure_ascii=False), i.resolution, i.resolved_by):
                    added += 1
                    if not i.resolution:
                        await self._exec("insert_open", SHARD, i.stream, int(i.comment_id))
            return added
        return self._run(queue())

    def review_queue(self, stream: str, limit: int, resolved: bool = False) -> list[ReviewItem]:
        """Open (or resolved) review items of ``stream``, oldest first."""
        async def queue() -> list[ReviewItem]:
            if not resolved:
                ids = [r[0] for r in await self._rows("open_ids", SHARD, stream, limit)]
                rows = await asyncio.gather(*(self._rows("review", stream, cid) for cid in ids))
                return [_review_item(r[0]) for r in rows if r and not r[0][9]]
            rows = await self._all_rows("reviews", stream)
            return [_review_item(r) for r in rows if r[9]][:limit]
        return self._run(queue())

    def review_item(self, stream: str, comment_id: str) -> ReviewItem | None:
        """The open review item of a comment, or None."""
        rows = self._run(self._rows("review", stream, int(comment_id)))
        return _review_item(rows[0]) if rows and not rows[0][9] else None

    def open_reviews(self, stream: str | None = None) -> int:
        """How many flagged comments wait for review (on ``stream``, or on every stream)."""
        if stream is None:
            rows = self._run(self._rows("open_count", SHARD))
        else:
            rows = self._run(self._rows("open_count_stream", SHARD, stream))
        return int(rows[0][0])

    def resolve_review(self, stream: str, comment_id: str, resolution: str, by: str,
                       resolved_too: bool = False) -> bool:
        """Close an open review item, or with ``resolved_too`` one already closed; False if none was."""
        async def resolve() -> bool:
            cid = int(comment_id)
            done = await self._exec("resolve_any" if resolved_too else "resolve_open", resolution, by, _now_ms(),
                                    stream, cid)
            if done:
                await self._exec("delete_open", SHARD, stream, cid)
            return done
        return self._run(resolve())

    # -- sanctions and pins ---------------------------------------------------------------

    def record_sanction(self, stream: str, user: str, until_ms: int | None, reason: str = "") -> None:
        self._run(self._exec("insert_sanction", SHARD, stream, user, until_ms, reason, _now_ms()))

    def lift_sanction(self, stream: str, user: str) -> None:
        self._run(self._exec("delete_sanction", SHARD, stream, user))

    def sanctions_in_force(self, now_ms: int) -> list[tuple[str, str, int | None]]:
        """(stream, user, until ms or None for a ban) of every ban and unexpired time-out."""
        rows = self._run(self._all_rows("sanctions", SHARD))
        return [(r[0], r[1], r[2]) for r in rows if r[2] is None or r[2] > now_ms]

    def set_pin(self, stream: str, comment: dict[str, Any] | None) -> None:
        if comment is None:
            self._run(self._exec("delete_pin", stream))
        else:
            self._run(self._exec("insert_pin", stream, json.dumps(comment, ensure_ascii=False), _now_ms()))

    def pin(self, stream: str) -> dict[str, Any] | None:
        rows = self._run(self._rows("pin", stream))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._session.close(), timeout=10.0)
        except StoreUnavailable:
            log.warning("the Cassandra session did not close in time")


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _driver_loop() -> asyncio.AbstractEventLoop:
    """The process's one loop for the driver, in a daemon thread. Shared by every store: acsylla
    keeps a wake-up socket pair per loop that it never closes, so a loop per store would leak."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="cassandra-driver", daemon=True).start()
        return _loop


def _driver_log(message: Any) -> None:
    """The C++ driver's log lines into ours. Its note that Cassandra has no Scylla shards is noise."""
    level = logging.DEBUG if "sharding info" in message.message else {
        "critical": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING}.get(
        str(message.log_level).lower(), logging.INFO)
    log.log(level, "cassandra driver: %s", message.message)


async def _wrapped(coro: Awaitable[T]) -> T:
    """``coro``, its driver errors as StoreUnavailable (the archiver retries those)."""
    from acsylla.errors import CassException

    try:
        return await coro
    except CassException as exc:
        raise StoreUnavailable(f"Cassandra: {type(exc).__name__}: {exc}") from exc


def _shown(row: list[Any], viewer: str | None) -> bool:
    """Whether a page row is on ``viewer``'s page: live and not shadowed, or theirs."""
    if row[4] is None:  # only moderation cells left (the comment's own cells expired)
        return False
    return (row[7] is not True and row[8] is not True) or (viewer is not None and row[1] == viewer)


def _visible(stream: str, row: list[Any], viewer: str | None) -> dict[str, Any]:
    event = event_shape(stream, *row[:7])
    return event | deleted_shape(row[9] or "", row[10] or "") if row[7] is True else event


def _review_item(r: Sequence[Any]) -> ReviewItem:
    """A review_queue row (columns in the order of the "review" statement)."""
    return ReviewItem(r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7] or "", r[8], r[9] or "", r[10] or "",
                      tuple(json.loads(r[11] or "[]")))
