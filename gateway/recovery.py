"""Recovery: what a reconnecting viewer missed, from the recent cache or the history store.

A viewer that lost its connection (or was told ``skipped``) sends
``{"t":"resume","epoch":E,"offset":X}``: the position of the last comment it saw, from a
``batch`` or the ``welcome``. It wants every comment of the stream after X in epoch E, in
offset order, and then ``{"t":"resumed","recovered":true}``. Offsets have gaps (other
streams' records share the partition), so "after X" is a range, never a count.

1. The stream's position (chorus/positions.py) is (E', Y). E' other than E means X counts
   in an offset space that is gone: ``recovered: false``. X >= Y: nothing was missed.
   E = "" is a viewer that joined before the stream's first comment: it missed all of E'.
2. The recent cache, when its floor is at or below X: one read.
3. Otherwise the history store: its rows from X on. X itself must be there (tombstone or
   not), else the store does not reach back that far. Then the cache's comments after the
   last stored one, because the archiver trails the coordinator; if even the cache does not
   reach back to the store's last row (the archiver is further behind than the cache is
   long), look again for up to ``lag_wait_s`` before giving up.
4. Tombstones (``is_deleted``) are never sent. More than ``recover_max`` missed comments is
   ``recovered: false``: the viewer reloads history instead.
5. What is replayed is what was broadcast. The cache holds only that; the store holds every
   comment, so its rows pass through the filter of the keep ratios the coordinator recorded
   while it sampled the stream (ingest/sampling.py). ``recover_max`` counts stored rows, so a
   sampled stream can answer ``recovered: false`` a little early.

6. The cache can be gone while the store is not: Redis restarted empty or flushed, or the
   embedded default restarted (its cache lives in the process). A ``resume`` then falls
   through to the store as in 3 (from an epoch the stream's position no longer names, when
   there is no position at all), and one with no position (``""``) replays the store's newest
   epoch. The **welcome** is filled the same way (:meth:`Recovery.welcome`): when the cache
   holds fewer comments than the welcome shows, the older ones come from the store, and with
   no cached position at all the welcome carries the store's newest (epoch, offset), so a
   later resume from it is answered from the store, or ``recovered: false`` once the stream
   has moved on to another epoch (the embedded default's log starts a new one at each start).

History reads run in a worker thread, at most ``MAX_HISTORY_READS`` at a time per gateway,
so a reconnect storm queues instead of swamping the store; the welcome's reads are shared by
the viewers joining a stream within ``WELCOME_MEMO_S`` (an empty answer only while in flight:
the first comments of a stream must not wait for the memo to expire).

Seam for the Redis-down fallback (gateways consuming Kafka themselves): this module only
needs a ``StreamPositions`` and a ``HistoryStore``; one fed from the gateway's own consumer
plugs in here unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from chorus.ingest.sampling import broadcast_filter
from chorus.ingest.store import HistoryStore, StoredComment, StoreUnavailable
from chorus.positions import NO_EPOCH, StreamPositions

__all__ = ["MAX_HISTORY_READS", "Recovered", "Recovery", "WelcomeView"]

log = logging.getLogger("chorus.recovery")

MAX_HISTORY_READS = 4  # concurrent history queries per gateway
BATCH_COMMENTS = 200  # comments per recovered `batch` event (~50 KB of JSON)
WELCOME_MEMO_S = 1.0  # a stream's welcome fill from the store is shared this long (a join storm: one read)
WELCOME_MEMO_MAX = 10_000  # streams whose fill is remembered at once

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Recovered:
    epoch: str
    comments: list[Event] = field(default_factory=list)  # in offset order
    recovered: bool = True

    def batch_events(self, stream: str, size: int = BATCH_COMMENTS) -> Iterator[Event]:
        """The comments as ``batch`` events of up to ``size``, each at its last offset."""
        for i in range(0, len(self.comments), size):
            chunk = self.comments[i : i + size]
            yield {"t": "batch", "stream": stream, "epoch": self.epoch, "offset": chunk[-1]["offset"],
                   "comments": chunk}


@dataclass(frozen=True, slots=True)
class WelcomeView:
    """What a welcome shows: the stream's position and its newest comments, oldest first."""

    epoch: str
    offset: int
    recent: list[Event]


class Recovery:
    def __init__(self, state: StreamPositions, store: HistoryStore | None, recover_max: int,
                 lag_wait_s: float = 1.0) -> None:
        self.state = state
        self.store = store
        self.recover_max = recover_max
        self.lag_wait_s = lag_wait_s
        self._reads = asyncio.Semaphore(MAX_HISTORY_READS)
        self.from_cache = 0
        self.from_history = 0
        self.unrecovered = 0
        self.welcomes_from_history = 0
        self._welcome_fills: dict[tuple[str, str | None, int, bool], tuple[float, asyncio.Future[Any]]] = {}

    async def missed(self, stream: str, epoch: str, offset: int) -> Recovered:
        """Every comment of ``stream`` after (``epoch``, ``offset``), or recovered=False."""
        cur_epoch, cur_offset = await self.state.position(stream)
        if epoch == NO_EPOCH:
            if cur_epoch == NO_EPOCH:  # no cache: the store may still hold the stream's comments
                stored = await self._last_stored_position(stream)
                if stored is None:
                    return Recovered(epoch)
                return await self._from_history(stream, stored[0], -1, cache_alive=False)
            epoch, offset = cur_epoch, -1
        elif cur_epoch not in (epoch, NO_EPOCH):  # NO_EPOCH: the cache is gone, the store may know
            return self._fail(epoch)
        if cur_epoch == epoch and offset >= cur_offset:
            return Recovered(epoch)
        cached = await self.state.recent_after(stream, epoch, offset)
        if cached is not None:
            self.from_cache += 1
            return self._bounded(epoch, cached)
        return await self._from_history(stream, epoch, offset, cache_alive=cur_epoch == epoch)

    async def _from_history(self, stream: str, epoch: str, offset: int, cache_alive: bool) -> Recovered:
        deadline = time.monotonic() + self.lag_wait_s
        while True:
            rows = await self._since(stream, epoch, offset)
            if rows is None or (offset >= 0 and (not rows or rows[0].offset != offset)):
                return self._fail(epoch)  # the store is down, or does not reach back to X
            newer = [r for r in rows if r.offset > offset]
            if len(newer) > self.recover_max:
                return self._fail(epoch)
            last = newer[-1].offset if newer else offset
            tail = await self.state.recent_after(stream, epoch, last) if cache_alive else []
            if tail is not None:
                self.from_history += 1
                broadcast = broadcast_filter(await self.state.keep_ratios(stream, epoch) if newer else [])
                return self._bounded(epoch, [r.event for r in newer if not r.deleted and broadcast(r.event)] + tail)
            if time.monotonic() > deadline:
                log.info("recovery of %s after %d: the archiver is behind the cache", stream, offset)
                return self._fail(epoch)
            await asyncio.sleep(0.05)

    async def welcome(self, stream: str, epoch: str, offset: int, recent: list[Event], count: int) -> WelcomeView:
        """The welcome's position and ``count`` newest comments: the cache's (``epoch``,
        ``offset``, ``recent``), with older comments from the store when the cache holds fewer
        than ``count``, and the store's position when the cache has none."""
        if len(recent) >= count or self.store is None:
            return WelcomeView(epoch, offset, recent)
        before = recent[0]["id"] if recent else None
        older, stored = await self._welcome_fill(stream, before, count - len(recent), epoch == NO_EPOCH)
        if not older and stored is None:
            return WelcomeView(epoch, offset, recent)
        self.welcomes_from_history += 1
        if epoch == NO_EPOCH and stored is not None:
            epoch, offset = stored
        return WelcomeView(epoch, offset, older + recent)

    async def _welcome_fill(self, stream: str, before: str | None, need: int,
                            position: bool) -> tuple[list[Event], tuple[str, int] | None]:
        """Older comments (oldest first) and, if asked, the store's newest position; one read
        per stream and ``before`` within WELCOME_MEMO_S, however many viewers join."""
        key = (stream, before, need, position)
        now = time.monotonic()
        memo = self._welcome_fills.get(key)
        if memo is None or memo[0] < now:
            if len(self._welcome_fills) >= WELCOME_MEMO_MAX:
                self._welcome_fills = {k: v for k, v in self._welcome_fills.items() if v[0] >= now}
            memo = (now + WELCOME_MEMO_S, asyncio.ensure_future(self._read_welcome_fill(stream, before, need,
                                                                                          position)))
            self._welcome_fills[key] = memo
        older, stored = await asyncio.shield(memo[1])
        if not older and stored is None and self._welcome_fills.get(key) is memo:
            del self._welcome_fills[key]  # nothing stored yet: only shared while in flight
        return list(older), stored

    async def _read_welcome_fill(self, stream: str, before: str | None, need: int,
                                 position: bool) -> tuple[list[Event], tuple[str, int] | None]:
        assert self.store is not None
        store = self.store

        def read() -> tuple[list[Event], tuple[str, int] | None]:
            older = store.page(stream, int(before) if before is not None else None, need)
            return older[::-1], store.last_position(stream) if position else None

        async with self._reads:
            try:
                return await asyncio.to_thread(read)
            except Exception as exc:  # the welcome goes without history rather than not at all
                log.warning("history store unavailable for a welcome of %s: %s", stream, exc)
                return [], None

    async def _last_stored_position(self, stream: str) -> tuple[str, int] | None:
        if self.store is None:
            return None
        store = self.store
        async with self._reads:
            try:
                return await asyncio.to_thread(store.last_position, stream)
            except Exception as exc:
                log.warning("history store unavailable for recovery: %s", exc)
                return None

    async def _since(self, stream: str, epoch: str, offset: int) -> list[StoredComment] | None:
        if self.store is None:
            return None
        async with self._reads:
            try:
                # X itself, then up to one more than recover_max: enough to know it is too many.
                return await asyncio.to_thread(self.store.since, stream, epoch, offset, self.recover_max + 2)
            except StoreUnavailable as exc:
                log.warning("history store unavailable for recovery: %s", exc)
                return None

    def _bounded(self, epoch: str, comments: list[Event]) -> Recovered:
        if len(comments) > self.recover_max:
            return self._fail(epoch)
        return Recovered(epoch, comments)

    def _fail(self, epoch: str) -> Recovered:
        self.unrecovered += 1
        return Recovered(epoch, [], False)
