"""The archiver: comments log to the history store.

It commits log offsets only after the store has the batch, and the store ignores ids it
already has, so a crash or a store outage loses nothing and duplicates nothing: while the
store is down the batch is retried, the consumer is paused (ingest/consume.py) and nothing
past it is committed; once the store is back the archiver catches up from the log. Each row
keeps the comment's log position (epoch, offset), which recovery reads by range.

Control records apply after the batch's comments, in log order: ``delete`` makes the
comment a tombstone (keeping the delete's code and reason, which its author's history shows),
``restore`` lifts it, ``shadow`` hides it from everyone but its author, ``pin`` and ``unpin``
keep the stream's pin. A control record always follows the comment it names in the log
(same stream, same partition), so the row is there by then; all of them are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.coordinator import split_by_stream
from chorus.ingest.log import CommentLog, LogRecord
from chorus.ingest.records import Comment, Control
from chorus.ingest.store import SqliteStore

__all__ = ["Archiver"]

log = logging.getLogger("chorus.archiver")

GROUP = "chorus-archiver"


class Archiver:
    def __init__(self, comment_log: CommentLog, store: SqliteStore) -> None:
        self.store = store
        self.written = 0
        self.controls = 0
        # History may trail live delivery by a moment: fewer, fuller fetches (the broker's CPU).
        self.loop = ConsumeLoop(comment_log.consumer(GROUP, max_wait_ms=100), self.handle, name="archiver",
                                linger_ms=20, max_records=2000)

    async def handle(self, records: Sequence[LogRecord]) -> None:
        streams, _bad = split_by_stream(records)
        items = [c for batch in streams.values() for c in batch]
        comments = [c for c in items if isinstance(c, Comment)]
        controls = [c for c in items if isinstance(c, Control)]
        if comments:
            # SQLite blocks; keep the event loop free while it writes.
            self.written += await asyncio.to_thread(self.store.write_comments, comments)
        if controls:
            await asyncio.to_thread(self._apply, controls)

    def _apply(self, controls: list[Control]) -> None:
        for c in controls:
            if c.op == "delete":
                self.store.delete_comments(c.stream, [c.id], c.delete_code, c.delete_reason)
                pinned = self.store.pin(c.stream)
                if pinned is not None and pinned.get("id") == c.id:  # as the coordinator: a deleted pin goes
                    self.store.set_pin(c.stream, None)
            elif c.op == "shadow":
                self.store.shadow_comments(c.stream, [c.id])
            elif c.op == "restore":
                self.store.restore_comments(c.stream, [c.id])
            elif c.op == "pin":
                self.store.set_pin(c.stream, c.comment)
            else:
                self.store.set_pin(c.stream, None)
            self.controls += 1

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
