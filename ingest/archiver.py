"""The archiver: comments log to the history store.

It commits log offsets only after the store has the batch, and the store ignores ids it
already has, so a crash or a store outage loses nothing and duplicates nothing: while the
store is down the batch is retried, the consumer is paused (ingest/consume.py) and nothing
past it is committed; once the store is back the archiver catches up from the log. Each row
keeps the comment's log position (epoch, offset), which recovery reads by range.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.coordinator import group_by_stream
from chorus.ingest.log import CommentLog, LogRecord
from chorus.ingest.store import HistoryStore

__all__ = ["Archiver"]

log = logging.getLogger("chorus.archiver")

GROUP = "chorus-archiver"


class Archiver:
    def __init__(self, comment_log: CommentLog, store: HistoryStore) -> None:
        self.store = store
        self.written = 0
        # History may trail live delivery by a moment: fewer, fuller fetches (the broker's CPU).
        self.loop = ConsumeLoop(comment_log.consumer(GROUP, max_wait_ms=100), self.handle, name="archiver",
                                linger_ms=20, max_records=2000)

    async def handle(self, records: Sequence[LogRecord]) -> None:
        streams, _bad = group_by_stream(records)
        comments = [c for batch in streams.values() for c in batch]
        if comments:
            # SQLite blocks; keep the event loop free while it writes.
            self.written += await asyncio.to_thread(self.store.write_comments, comments)

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
