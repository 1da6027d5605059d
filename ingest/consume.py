"""The consume loop the coordinator and the archiver share.

Fetch a batch, hand it to the role's ``handle``, and commit only after ``handle`` returned:
a crash between the two replays the batch (at-least-once), which is why every effect is
idempotent on the comment id. A failing ``handle`` (Redis or the history store down: the
downstream is full) is retried with backoff, never skipped, and meanwhile the consumer is
paused: it keeps fetching, which keeps a Kafka consumer in its group (a member that stops
polling for ``max.poll.interval.ms`` is evicted), but gets nothing more until the batch in
hand is done. Anything a rebalance lets through while paused is kept and handled next.

A commit that fails (the group rebalanced under us) is logged and not fatal: whoever owns
the partitions next resumes from the last commit and replays, which the effects absorb.

A loop that was stopped can run again on a fresh consumer (:meth:`ConsumeLoop.renew`): a
coordinator that lost its lease and took it back later (ingest/lease.py) keeps its counters
and settings; what it had fetched but not committed is dropped, for the next owner replays it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from chorus.ingest.log import LogConsumer, LogRecord

__all__ = ["ConsumeLoop"]

log = logging.getLogger("chorus.consume")

Handler = Callable[[Sequence[LogRecord]], Awaitable[None]]


class ConsumeLoop:
    def __init__(self, consumer: LogConsumer, handle: Handler, *, name: str, linger_ms: int = 0,
                 max_records: int = 1000, max_backoff_s: float = 5.0) -> None:
        self.consumer = consumer
        self.handle = handle
        self.name = name
        self.linger_ms = linger_ms
        self.max_records = max_records
        self.max_backoff_s = max_backoff_s
        self.handled = 0
        self.paused = False
        self.pauses = 0  # times the downstream failed and the consumer was paused
        self._carried: list[LogRecord] = []  # fetched while paused, handled next
        self._in_hand: Sequence[LogRecord] = ()  # fetched, being handled, not committed yet
        self._stopping = asyncio.Event()

    async def _gather(self) -> list[LogRecord]:
        """One batch: wait for the first records, then linger up to ``linger_ms`` for more."""
        records, self._carried = self._carried, []
        if not records:
            records = await self.consumer.fetch(timeout_ms=200, max_records=self.max_records)
        if not records or self.linger_ms <= 0:
            return records
        deadline = time.monotonic() + self.linger_ms / 1000
        while len(records) < self.max_records:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            records += await self.consumer.fetch(timeout_ms=left_ms, max_records=self.max_records - len(records))
        return records

    async def _handle_until_done(self, records: Sequence[LogRecord]) -> None:
        backoff = 0.05
        try:
            while True:
                try:
                    await self.handle(records)
                    return
                except Exception as exc:
                    if self._stopping.is_set():
                        raise
                    log.warning("%s: handling %d records failed (%s); paused, retrying in %.2fs",
                                self.name, len(records), exc, backoff)
                await self._wait_paused(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            if self.paused:
                self.consumer.resume()
                self.paused = False

    async def _wait_paused(self, seconds: float) -> None:
        """Sleep ``seconds`` by fetching from a paused consumer (see the module docstring)."""
        if not self.paused:
            self.paused = True
            self.pauses += 1
        # Pause again each time: a rebalance may have assigned partitions since.
        self.consumer.pause()
        self._carried += await self.consumer.fetch(timeout_ms=max(1, int(seconds * 1000)),
                                                   max_records=self.max_records)

    async def _commit(self, records: Sequence[LogRecord]) -> None:
        try:
            await self.consumer.commit(records)
        except Exception as exc:
            log.warning("%s: commit of %d records failed (%s); they may be replayed", self.name, len(records), exc)

    async def run(self) -> None:
        await self.consumer.start()
        try:
            while not self._stopping.is_set():
                records = await self._gather()
                if not records:
                    continue
                self._in_hand = records
                await self._handle_until_done(records)
                await self._commit(records)
                self._in_hand = ()
                self.handled += len(records)
        finally:
            await self.consumer.stop()

    async def lag(self) -> dict[int, int]:
        """Records per assigned partition not handled and committed yet: the log's end minus the
        fetch position, plus what was fetched but is still in hand (chorus_kafka_consumer_lag)."""
        ends = self.consumer.highwaters()
        positions = await self.consumer.positions()
        held = Counter(r.partition for r in (*self._in_hand, *self._carried))
        return {p: max(0, end - positions.get(p, end) + held[p]) for p, end in ends.items()}

    def stop(self) -> None:
        self._stopping.set()

    def renew(self, consumer: LogConsumer) -> None:
        """Run next on ``consumer`` (after :meth:`run` returned), from its group's last commit."""
        self.consumer = consumer
        self._carried, self._in_hand = [], ()
        self.paused = False
        self._stopping = asyncio.Event()
