"""Engagement in the gateway: reactions counted locally, viewer counts reported, and the
``reactions`` and ``viewers`` events sent to this gateway's viewers.

Reactions never cost a call of their own. A viewer's ``react`` is checked (the configured
set, a per-viewer GCRA limit) and counted in a dict in :class:`ReactionAggregator`; every
``flush_interval_ms`` (500) the counts go to the store (chorus/counters.py: one pipelined
``HINCRBY`` per stream and emoji with Redis), and every ``broadcast_interval_ms`` (1000) the
same round trip reads the totals of the streams this gateway has viewers of, which go to
them as a ``reactions`` control event if they changed. Streams in high-traffic mode do both
every ``high_traffic_interval_ms`` (100).

Why each gateway reads the totals itself rather than one publisher per stream sending them
on the stream's channel: the read is one ``HGETALL`` per local stream per second inside a
round trip the gateway makes anyway, it needs no election of a publisher (and no failover
when that process dies), and a gateway only pays for streams it serves. Every gateway reads
the same hash, so viewers on different gateways see the same totals within a second.

Viewer counts work the same way on their own timer (``viewers.interval_ms``): the gateway
reports its live viewers of each local stream, with an expiry, and the viewer keys that
joined since the last report (for unique viewers), and gets back each stream's count over
every gateway, which goes out as a ``viewers`` event when it changed.

If the store fails, what a tick had to write is kept for the next one (reaction counts are
merged back, joins are kept up to a bound), so an outage delays totals but loses no
counted reaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chorus.codes import ErrorCode
from chorus.config import Config
from chorus.counters import Counters, MemoryCounters, RedisCounters, SqliteReactionTotals, ViewerCount
from chorus.protocol import error_event, json_compact

__all__ = ["Engagement", "ReactionAggregator", "open_counters", "viewer_key"]

log = logging.getLogger("chorus.engagement")

US_PER_S = 1_000_000
MAX_PENDING_JOINS = 100_000  # viewer keys kept for the next report while the store is down
WELCOME_WAIT_S = 1.0  # a welcome waits this long for a stream's counts, then goes without them
NORMAL, HOT = "normal", "hot"


def open_counters(config: Config) -> Counters:
    """Redis when the deployment has it (shared by every gateway), else this process's memory."""
    v, keep = config.viewers, config.reactions.retention_s
    if config.redis.url:
        return RedisCounters(config.redis.url, config.redis.channel_prefix, ttl_ms=v.ttl_ms,
                             exact_max=v.exact_unique_max, retention_s=v.retention_s, reactions_retention_s=keep)
    # The embedded default keeps reaction totals in its history file, so they survive a restart.
    return MemoryCounters(v.ttl_ms, v.exact_unique_max, v.retention_s, keep,
                          persist=SqliteReactionTotals(config.history_path))


def viewer_key(user_id: str | None, ip: str) -> str:
    """What unique viewers and the reaction limit count: the user, else the address."""
    return f"u:{user_id}" if user_id is not None else f"ip:{ip}"


class ReactionAggregator:
    """Sans-I/O: each stream's reaction counts since the last flush, and a per-viewer limit.

    :meth:`add` is the hot path: a set lookup, one GCRA step and two dict updates, no I/O. A
    viewer over the limit gets one ``rate_limited`` error saying how long to wait; reactions
    it sends during that wait are dropped without another error (each would cost a write to
    a client that is already flooding). Limit state lives only while it holds anything: a
    key whose time has passed is the same as no key and goes at the next :meth:`take`.
    """

    def __init__(self, emoji: Sequence[str], per_second: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = frozenset(emoji)
        self._names = ", ".join(emoji)
        self._clock = clock
        self._per_second = per_second
        self._emission_us = US_PER_S // per_second if per_second else 0
        self._window_us = self._emission_us * per_second
        self.pending: dict[str, dict[str, int]] = {}
        self._tats: dict[str, int] = {}  # viewer key -> GCRA theoretical arrival time, µs
        self._told: dict[str, int] = {}  # viewer key -> end of the wait it was told about, µs
        self.accepted = 0
        self.limited = 0
        self.unknown = 0

    def add(self, stream: str, who: str, emoji: str) -> dict[str, Any] | None:
        """Count one reaction; returns the ``error`` event to send back, if any."""
        if emoji not in self.allowed:
            self.unknown += 1
            return error_event(ErrorCode.UNKNOWN_REACTION, f"unknown reaction {emoji!r}; this stream takes "
                                                           f"{self._names}")
        if self._emission_us:  # gcra() of ingest/limits.py, inlined: this runs ~100k times a second
            now = int(self._clock() * US_PER_S)
            tat = self._tats.get(who, now)
            tat = (now if tat < now else tat) + self._emission_us
            wait = tat - self._window_us - now
            if wait > 0:
                self.limited += 1
                if self._told.get(who, 0) > now:
                    return None
                self._told[who] = now + wait
                return error_event(ErrorCode.RATE_LIMITED, f"too many reactions: at most {self._per_second} "
                                                           "per second", None, -(-wait // 1000))
            self._tats[who] = tat
        counts = self.pending.get(stream)
        if counts is None:
            counts = self.pending[stream] = {}
        counts[emoji] = counts.get(emoji, 0) + 1
        self.accepted += 1
        return None

    def take(self, due: Callable[[str], bool] = lambda stream: True) -> dict[str, dict[str, int]]:
        """The counts of the streams ``due`` says to flush, removed from pending."""
        taken = {s: c for s, c in self.pending.items() if due(s)}
        for s in taken:
            del self.pending[s]
        self._forget_idle()
        return taken

    def give_back(self, deltas: Mapping[str, Mapping[str, int]]) -> None:
        """A flush failed: its counts go back into pending, for the next one."""
        for stream, counts in deltas.items():
            mine = self.pending.setdefault(stream, {})
            for emoji, n in counts.items():
                mine[emoji] = mine.get(emoji, 0) + n

    def _forget_idle(self) -> None:
        now = int(self._clock() * US_PER_S)
        for table in (self._tats, self._told):
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]

    def __len__(self) -> int:
        """Viewer keys holding limit state (bounded by the viewers active within about a second)."""
        return len(self._tats) + len(self._told)


class _Timer:
    """When a mode's next flush and broadcast are due (monotonic s)."""

    def __init__(self, flush_s: float, broadcast_s: float, now: float) -> None:
        self.flush_s, self.broadcast_s = flush_s, broadcast_s
        self.next_flush, self.next_broadcast = now + flush_s, now + broadcast_s

    def due(self, now: float) -> tuple[bool, bool]:
        flush, broadcast = now >= self.next_flush, now >= self.next_broadcast
        if flush:  # a late tick does not make up for the ticks it missed
            self.next_flush = max(self.next_flush + self.flush_s, now)
        if broadcast:
            self.next_broadcast = max(self.next_broadcast + self.broadcast_s, now)
        return flush, broadcast


class Engagement:
    """One per gateway: the reaction and viewer-count timers and what they last sent.

    ``local`` gives the live viewer count of every stream this gateway has viewers of;
    ``send`` delivers an encoded event to a stream's local viewers as a control event (never
    skipped for a slow viewer, never sampled).
    """

    def __init__(self, config: Config, counters: Counters, local: Callable[[], Mapping[str, int]],
                 send: Callable[[str, bytes], None], *, clock: Callable[[], float] = time.monotonic) -> None:
        r, v = config.reactions, config.viewers
        self.counters = counters
        self.emoji = r.emoji
        self.anonymous_react = r.anonymous
        self.aggregator = ReactionAggregator(r.emoji, r.user_per_second, clock=clock)
        self.gateway_id = uuid.uuid4().hex[:12]
        self._local = local
        self._send = send
        self._clock = clock
        self._hot_all = "*" in r.high_traffic_streams
        self._hot = frozenset(r.high_traffic_streams)
        now = clock()
        self._timers = {NORMAL: _Timer(r.flush_interval_ms / 1000, r.broadcast_interval_ms / 1000, now)}
        if self._hot:  # no 100 ms timer unless some stream needs it
            hot_s = r.high_traffic_interval_ms / 1000
            self._timers[HOT] = _Timer(hot_s, hot_s, now)
        self.viewers_interval_s = v.interval_ms / 1000
        self._totals: dict[str, dict[str, int]] = {}  # stream -> totals last sent (or welcomed with)
        self._viewers: dict[str, ViewerCount] = {}  # stream -> count last sent (or fetched)
        self._reported: dict[str, int] = {}  # stream -> live viewers this gateway last reported
        self._joined: dict[str, set[str]] = {}  # stream -> viewer keys since the last report
        self._joins_pending = 0  # viewer keys in _joined
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = {"reactions": False, "viewers": False}

    # -- lifecycle --
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reaction_loop(), name="reactions"),
                       asyncio.create_task(self._viewer_loop(), name="viewer-counts")]

    async def stop(self) -> None:
        """Stop the timers, then one last flush and a report withdrawing this gateway's viewers."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._final_report(), 2.0)
        await self.counters.close()

    async def _final_report(self) -> None:
        deltas = self.aggregator.take()
        if deltas:
            await self.counters.add_reactions(deltas)
        gone = {stream: 0 for stream in self._reported}
        if gone or self._joined:
            await self.counters.report_viewers(self.gateway_id, gone, self._joined)

    # -- what viewers do --
    def react(self, stream: str, user_id: str | None, ip: str, emoji: str) -> dict[str, Any] | None:
        """A viewer's ``react``: counted, or the error event to send back."""
        if user_id is not None:
            return self.aggregator.add(stream, "u:" + user_id, emoji)  # viewer_key(), inlined
        if not self.anonymous_react:
            return error_event(ErrorCode.UNAUTHORIZED, "reacting needs a token: sign in first")
        return self.aggregator.add(stream, "ip:" + ip, emoji)

    def joined(self, stream: str, user_id: str | None, ip: str) -> None:
        """A viewer joined: counted among the stream's unique viewers at the next report."""
        if self._joins_pending < MAX_PENDING_JOINS:
            keys = self._joined.setdefault(stream, set())
            before = len(keys)
            keys.add(viewer_key(user_id, ip))
            self._joins_pending += len(keys) - before

    async def welcome(self, stream: str) -> dict[str, Any]:
        """The welcome's ``reactions`` and ``viewers`` fields for a viewer joining ``stream``."""
        if stream not in self._totals:
            await self._fetch(stream)
        totals = self._totals.get(stream) or self._complete({})
        counted = self._viewers.get(stream, ViewerCount())
        local = self._local().get(stream, 0)
        # The stored count holds what this gateway last reported; swap in its count of now.
        now = max(counted.now - self._reported.get(stream, 0) + local, local)
        return {"reactions": totals, "viewers": {"now": now, "unique": counted.unique}}

    async def _fetch(self, stream: str) -> None:
        """A stream new to this gateway: read its counts once, however many viewers join at once."""
        fut = self._fetching.get(stream)
        if fut is None:
            fut = self._fetching[stream] = asyncio.ensure_future(self._read_snapshot(stream))
            fut.add_done_callback(lambda _: self._fetching.pop(stream, None))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fut), WELCOME_WAIT_S)

    async def _read_snapshot(self, stream: str) -> None:
        try:
            totals, counted = await self.counters.snapshot(stream)
        except Exception as exc:
            log.warning("reading the counts of stream %s failed: %s", stream, exc)
            return
        self._totals[stream] = self._complete(totals)
        self._viewers.setdefault(stream, counted)

    def live_streams(self, limit: int = 100) -> list[dict[str, Any]]:
        """The streams this gateway has viewers of, busiest first (the page's stream picker)."""
        counts = [(max(n, self._viewers.get(stream, ViewerCount()).now), stream)
                  for stream, n in self._local().items() if n > 0]
        counts.sort(key=lambda c: (-c[0], c[1]))
        return [{"id": stream, "viewers": n} for n, stream in counts[:limit]]

    # -- reactions --
    def mode(self, stream: str) -> str:
        return HOT if self._hot_all or stream in self._hot else NORMAL

    def next_reaction_tick(self) -> float:
        return min(min(t.next_flush, t.next_broadcast) for t in self._timers.values())

    async def reaction_tick(self) -> None:
        """Flush the streams whose flush is due and broadcast those whose broadcast is due."""
        now = self._clock()
        flush, broadcast = set(), set()
        for mode, timer in self._timers.items():
            f, b = timer.due(now)
            if f:
                flush.add(mode)
            if b:
                broadcast.add(mode)
        deltas = self.aggregator.take(lambda s: self.mode(s) in flush) if flush else {}
        read = [s for s in self._local() if self.mode(s) in broadcast]
        if not deltas and not read:
            return
        try:
            totals = await self.counters.add_reactions(deltas, read)
        except Exception as exc:
            self.aggregator.give_back(deltas)
            self._note_failure("reactions", exc)
            return
        self._note_failure("reactions", None)
        for stream, raw in totals.items():
            self._broadcast_totals(stream, self._complete(raw))

    def _complete(self, raw: Mapping[str, int]) -> dict[str, int]:
        """Every configured reaction, in the configured order (0 if none yet): the page's buttons."""
        return {e: raw.get(e, 0) for e in self.emoji}

    def _broadcast_totals(self, stream: str, totals: dict[str, int]) -> None:
        if self._totals.get(stream) == totals:
            return
        self._totals[stream] = totals
        self._send(stream, _encode({"t": "reactions", "totals": totals}))

    async def _reaction_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.next_reaction_tick() - self._clock()))
            await self.reaction_tick()

    # -- viewer counts --
    async def viewer_tick(self) -> None:
        """Report this gateway's viewers (0 for streams it no longer has) and send the counts."""
        local = dict(self._local())
        counts = {**{s: 0 for s in self._reported if s not in local}, **local}
        joined, self._joined, self._joins_pending = self._joined, {}, 0
        if not counts and not joined:
            return
        try:
            found = await self.counters.report_viewers(self.gateway_id, counts, joined)
        except Exception as exc:
            self._restore_joins(joined)
            self._note_failure("viewers", exc)
            return
        self._note_failure("viewers", None)
        self._reported = {s: n for s, n in counts.items() if n > 0}
        for stream in [s for s in {*self._viewers, *self._totals} if s not in local]:
            self._viewers.pop(stream, None)  # no local viewers left: nothing to keep in step
            self._totals.pop(stream, None)
        for stream, counted in found.items():
            if stream in local and self._viewers.get(stream) != counted:
                self._viewers[stream] = counted
                self._send(stream, _encode({"t": "viewers", **counted.to_wire()}))

    def _restore_joins(self, joined: Mapping[str, set[str]]) -> None:
        """A report failed: its joins wait for the next one, within MAX_PENDING_JOINS."""
        for stream, keys in joined.items():
            for key in keys:
                if self._joins_pending >= MAX_PENDING_JOINS:
                    return
                mine = self._joined.setdefault(stream, set())
                if key not in mine:
                    mine.add(key)
                    self._joins_pending += 1

    async def _viewer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.viewers_interval_s)
            await self.viewer_tick()

    def _note_failure(self, what: str, exc: Exception | None) -> None:
        """Log the first failure of a streak and the recovery, not every tick."""
        if exc is not None and not self._failing[what]:
            log.warning("%s: the counter store failed (%s); keeping counts for the next tick", what, exc)
        elif exc is None and self._failing[what]:
            log.info("%s: the counter store answers again", what)
        self._failing[what] = exc is not None

    def stats(self) -> dict[str, int]:
        a = self.aggregator
        return {"reactions_accepted": a.accepted, "reactions_limited": a.limited, "reactions_unknown": a.unknown,
                "reactions_pending_streams": len(a.pending), "viewer_streams": len(self._reported)}


def _encode(event: dict[str, Any]) -> bytes:
    return json_compact(event).encode()
