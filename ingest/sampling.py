"""Adaptive sampling: which comments of a hot stream are broadcast, sans-I/O.

Everything is stored (the archiver reads the log, not this); sampling only thins what goes
out live. The coordinator asks a :class:`Sampler` about each stream's batch and publishes
what it says; a gateway consuming Kafka while Redis is down (gateway/fallback.py) asks its
own. No clock, no I/O here: the caller passes ``now_ms`` (tests use a fake clock).

Per stream, the state machine::

    rate  = comments/s over a sliding window (``window_ms`` in ``bucket_ms`` buckets)
    tier  = the highest tier whose threshold the rate is above; -1 (none) keeps everything.
            Tiers at or below the current one count with threshold x (1 - hysteresis), so a
            stream hovering at a threshold does not flap in and out of it.
    ratio = the tier's keep ratio (1.0 for none)

    announced --(ratio != announced)--> the plan carries ``throttle=ratio``: the caller
        records it (``StreamPositions.note_keep_ratio``), publishes the ``throttle`` event
        before the batch, then calls :meth:`Sampler.announced`. A failed publish leaves the
        announcement pending, so it is made again with the retried batch.

A comment is broadcast when it is in a priority lane (its author has a badge of
:data:`PRIORITY_BADGES`) or when :func:`keeps` says so: a hash of its id against the ratio.
The choice depends only on the id and the ratio, so two coordinators, a replay after a crash
and the Kafka fallback all pick the same comments at the same ratio, and the comments kept at
10% are a subset of those kept at 20%. Control events (deletes, pins, modes, throttle) never
pass through here: they are published as they are.

The ratio in force is recorded from the first offset it applies to, so recovery can rebuild
exactly what was broadcast from the history store, which holds everything
(:func:`broadcast_filter`). The recent cache holds only what was broadcast.

Optional automatic slow mode (``slow_mode_above_per_s`` > 0): a stream above that rate for
``slow_mode_after_s`` is asked to go slow; once below the exit level (hysteresis) for as long,
to go back. The plan says so; the caller sets the stream's mode and calls
:meth:`Sampler.slow_mode_applied`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chorus.config import SamplingConfig
from chorus.ingest.records import Comment

__all__ = [
    "PRIORITY_BADGES",
    "Plan",
    "RateWindow",
    "Sampler",
    "broadcast_filter",
    "is_priority",
    "keeps",
    "throttle_event",
]

# Authors whose comments are never sampled out.
PRIORITY_BADGES = frozenset({"broadcaster", "moderator", "verified"})

_HASH_SPACE = 1 << 64
FORGET_AFTER_MS = 60_000  # a calm stream's state is dropped after this long without comments


def is_priority(badges: Iterable[str]) -> bool:
    return not PRIORITY_BADGES.isdisjoint(badges)


def keeps(comment_id: str, keep_ratio: float) -> bool:
    """Deterministic per id: True for about ``keep_ratio`` of all ids, the same ids every time."""
    if keep_ratio >= 1.0:
        return True
    digest = hashlib.blake2b(comment_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < keep_ratio * _HASH_SPACE


def throttle_event(keep_ratio: float) -> bytes:
    """The ``throttle`` control event's JSON (``1.0``: sampling ended)."""
    return json.dumps({"t": "throttle", "keep_ratio": float(keep_ratio)}, separators=(",", ":")).encode()


def broadcast_filter(ratios: Sequence[tuple[int, float]]) -> Callable[[dict[str, Any]], bool]:
    """Was a comment (wire shape ``C``) broadcast, given the stream's recorded keep ratios?

    ``ratios`` is [(first offset, keep ratio)] ascending by offset; before the first entry
    the stream was not sampled.
    """
    starts = [offset for offset, _ in ratios]

    def broadcast(event: dict[str, Any]) -> bool:
        i = bisect.bisect_right(starts, event["offset"]) - 1
        ratio = ratios[i][1] if i >= 0 else 1.0
        return ratio >= 1.0 or is_priority(event["user"]["badges"]) or keeps(event["id"], ratio)

    return broadcast


class RateWindow:
    """Events per second over the last ``window_ms``, counted in ``bucket_ms`` buckets (a ring)."""

    def __init__(self, window_ms: int = 1000, bucket_ms: int = 100) -> None:
        self.bucket_ms = bucket_ms
        self._counts = [0] * max(1, window_ms // bucket_ms)
        self._head = -1  # bucket number (now_ms // bucket_ms) of the newest bucket

    def _advance(self, now_ms: int) -> None:
        bucket = now_ms // self.bucket_ms
        if bucket <= self._head:
            return
        n = len(self._counts)
        for b in range(max(self._head + 1, bucket - n + 1), bucket + 1):
            self._counts[b % n] = 0
        self._head = bucket

    def add(self, now_ms: int, count: int = 1) -> None:
        self._advance(now_ms)
        self._counts[self._head % len(self._counts)] += count

    def rate(self, now_ms: int) -> float:
        """Per second over the full buckets plus the elapsed part of the newest one."""
        self._advance(now_ms)
        span_ms = (len(self._counts) - 1) * self.bucket_ms + (now_ms % self.bucket_ms) + 1
        return sum(self._counts) * 1000 / span_ms


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one batch of a stream (or, from :meth:`Sampler.tick`, without one)."""

    kept: list[Comment]
    keep_ratio: float
    throttle: float | None = None  # announce this ratio first (record it from ``from_offset``)
    from_offset: int = -1
    slow_mode: bool | None = None  # set (True) or lift (False) automatic slow mode
    dropped: int = 0


@dataclass(slots=True)
class _Stream:
    window: RateWindow
    epoch: str = ""
    last_offset: int = -1  # newest offset counted (a replayed comment is not counted twice)
    last_seen_ms: int = 0
    tier: int = -1
    announced: float = 1.0
    hot: bool = False  # automatic slow mode wanted
    slow_applied: bool = False
    edge_since_ms: int | None = None  # since when the rate has been past the slow-mode edge


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._thresholds = [t[0] for t in config.tiers]
        self._ratios = [t[1] for t in config.tiers]
        self._streams: dict[str, _Stream] = {}

    def plan(self, stream: str, epoch: str, comments: Sequence[Comment], now_ms: int) -> Plan:
        """Count the batch's new comments into the stream's rate and pick what goes out."""
        if not self.config.enabled:
            return Plan(list(comments), 1.0)
        s = self._streams.get(stream)
        if s is None:
            s = self._streams[stream] = _Stream(RateWindow(self.config.window_ms, self.config.bucket_ms))
        if s.epoch != epoch:
            s.epoch, s.last_offset = epoch, -1
        new = [c for c in comments if c.offset > s.last_offset]
        if new:
            s.window.add(now_ms, len(new))
            s.last_offset = new[-1].offset
            s.last_seen_ms = now_ms
        ratio = self._update(s, now_ms)
        kept = [c for c in comments if ratio >= 1.0 or is_priority(c.badges) or keeps(c.id, ratio)]
        first = new[0].offset if new else s.last_offset + 1
        return Plan(kept, ratio, *self._pending(s, first), dropped=len(comments) - len(kept))

    def tick(self, now_ms: int) -> list[tuple[str, str, Plan]]:
        """(stream, epoch, plan) of streams whose state changed without comments (the rate
        decayed: sampling or slow mode ends); calm streams long without comments are forgotten."""
        out = []
        for name, s in list(self._streams.items()):
            self._update(s, now_ms)
            throttle, first, slow = self._pending(s, s.last_offset + 1)
            if throttle is not None or slow is not None:
                out.append((name, s.epoch, Plan([], s.announced if throttle is None else throttle,
                                                throttle, first, slow)))
            elif (s.tier < 0 and s.announced >= 1.0 and not s.slow_applied and not s.hot
                  and now_ms - s.last_seen_ms > FORGET_AFTER_MS):
                del self._streams[name]
        return out

    def announced(self, stream: str, keep_ratio: float) -> None:
        """The ``throttle`` event for ``keep_ratio`` went out."""
        s = self._streams.get(stream)
        if s is not None:
            s.announced = keep_ratio

    def slow_mode_applied(self, stream: str, on: bool) -> None:
        s = self._streams.get(stream)
        if s is not None:
            s.slow_applied = on

    def keep_ratio(self, stream: str) -> float:
        """The ratio announced for the stream (1.0: not sampled)."""
        s = self._streams.get(stream)
        return s.announced if s is not None else 1.0

    def sampled(self) -> dict[str, float]:
        """The announced ratio of every stream being sampled (ratio < 1; the metrics read it)."""
        return {name: s.announced for name, s in self._streams.items() if s.announced < 1.0}

    def _update(self, s: _Stream, now_ms: int) -> float:
        rate = s.window.rate(now_ms)
        s.tier = self._tier(rate, s.tier)
        self._update_slow_mode(s, rate, now_ms)
        return self._ratios[s.tier] if s.tier >= 0 else 1.0

    def _tier(self, rate: float, current: int) -> int:
        keep_margin = 1.0 - self.config.hysteresis
        tier = -1
        for i, threshold in enumerate(self._thresholds):
            if rate > threshold * (keep_margin if i <= current else 1.0):
                tier = i
        return tier

    def _update_slow_mode(self, s: _Stream, rate: float, now_ms: int) -> None:
        above = self.config.slow_mode_above_per_s
        if above <= 0:
            return
        past_edge = rate <= above * (1.0 - self.config.hysteresis) if s.hot else rate > above
        if not past_edge:
            s.edge_since_ms = None
            return
        if s.edge_since_ms is None:
            s.edge_since_ms = now_ms
        if now_ms - s.edge_since_ms >= self.config.slow_mode_after_s * 1000:
            s.hot, s.edge_since_ms = not s.hot, None

    def _pending(self, s: _Stream, first_offset: int) -> tuple[float | None, int, bool | None]:
        ratio = self._ratios[s.tier] if s.tier >= 0 else 1.0
        throttle = ratio if ratio != s.announced else None
        slow = s.hot if s.hot != s.slow_applied else None
        return throttle, first_offset, slow
