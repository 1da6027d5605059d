"""Where each stream stands: the last published position and the recent cache.

Part of the per-stream state beside the broker (``chorus/broker.py``'s ``StreamState`` adds
the stream's modes to it).

The coordinator writes it after numbering nothing: a comment's (epoch, offset) is its log
position (``ingest/log.py``), so replaying a batch after a crash yields the same numbers and
every write here is idempotent on the offset.

- **Position**: the (epoch, offset) of the last comment the coordinator published for the
  stream; ("", -1) for a stream with none yet. It only moves forward (``max``); a different
  epoch (a recreated topic, a restarted in-process log) replaces it.
- **Recent cache**: the newest ``keep`` comments in wire shape ``C`` (each with its
  ``offset``), in offset order, never twice the same offset. Welcome messages show its tail;
  ``resume`` replays from it. Its **floor** says how far back it can vouch: it holds every
  comment of the epoch with an offset above the floor. The floor is the newest offset trimmed
  out, or one below the first offset it was given, because a cache that starts late (a new
  Redis, a flushed one) cannot know what came before. ``recent_after`` answers None when
  the floor is above the asked offset, and recovery falls through to the history store.

- **Keep ratios**: when the coordinator samples a hot stream (``ingest/sampling.py``), the
  cache holds only what was broadcast, and each change of the keep ratio is recorded with the
  first offset it applies to, so recovery from the history store (which has every comment)
  can rebuild exactly the broadcast. The newest ``KEEP_RATIOS_KEPT`` changes are kept.

- **Tombstones**: a deleted or shadowed comment leaves the recent cache (``remove``), so
  welcome messages and resumes served from the cache never carry it; the history store keeps
  the tombstone for resumes served from there. A moderator's restore puts it back
  (``restore``) if its offset is still within what the cache vouches for.
- **Pin**: the stream's pinned comment (wire shape ``C``) or none, for the welcome message.

Each has an in-process implementation (embedded default, tests) and a Redis one: a hash
``<prefix>meta:<stream>`` (epoch, offset, floor) and a sorted set ``<prefix>recent:<stream>``
scored by offset, updated by one Lua script so readers never see half an update; the keep
ratios in a sorted set ``<prefix>sampling:<stream>`` of ``epoch|offset|ratio``, scored by offset;
the pin in a string ``<prefix>pin:<stream>`` (JSON).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from chorus.protocol import json_compact
from chorus.redisconn import tag

__all__ = ["KEEP_RATIOS_KEPT", "NO_EPOCH", "MemoryPositions", "RedisPositions", "StreamPositions"]

NO_EPOCH = ""  # the epoch of a stream nothing was published to yet (its offset is -1)
KEEP_RATIOS_KEPT = 256  # keep-ratio changes remembered per stream (older offsets count as unsampled)

Event = dict[str, Any]


class StreamPositions(Protocol):
    async def advance(self, stream: str, epoch: str, comments: list[Event], keep: int) -> None:
        """Record published ``comments`` (ascending offsets): cache them, move the position."""
        ...

    async def position(self, stream: str) -> tuple[str, int]:
        """(epoch, offset) of the last comment published, or (NO_EPOCH, -1)."""
        ...

    async def recent(self, stream: str, count: int) -> list[Event]:
        """The newest ``count`` cached comments, oldest first."""
        ...

    async def recent_after(self, stream: str, epoch: str, offset: int) -> list[Event] | None:
        """Every comment of ``epoch`` after ``offset``, or None if the cache can't vouch for it."""
        ...

    async def note_keep_ratio(self, stream: str, epoch: str, offset: int, keep_ratio: float) -> None:
        """From ``offset`` on, the stream broadcasts ``keep_ratio`` of its comments (1.0: all)."""
        ...

    async def keep_ratios(self, stream: str, epoch: str) -> list[tuple[int, float]]:
        """The recorded (first offset, keep ratio) changes of ``epoch``, ascending."""
        ...

    async def remove(self, stream: str, ids: list[str]) -> int:
        """Take the comments ``ids`` (tombstones) out of the recent cache; how many were there."""
        ...

    async def restore(self, stream: str, comment: Event) -> bool:
        """Put a restored comment back in its place, if its offset is above the floor and not
        past the position (else the cache never held it, or trimmed it since); whether it did."""
        ...

    async def get_pin(self, stream: str) -> Event | None:
        """The stream's pinned comment (wire shape C), or None."""
        ...

    async def set_pin(self, stream: str, comment: Event | None) -> None:
        """Pin ``comment`` (None unpins)."""
        ...


@dataclass(slots=True)
class _Cached:
    epoch: str
    offset: int
    floor: int
    comments: deque[Event] = field(default_factory=deque)


class MemoryPositions:
    def __init__(self) -> None:
        self._streams: dict[str, _Cached] = {}
        self._ratios: dict[str, list[tuple[str, int, float]]] = {}
        self._pins: dict[str, Event] = {}

    async def advance(self, stream: str, epoch: str, comments: list[Event], keep: int) -> None:
        if not comments:
            return
        s = self._streams.get(stream)
        if s is None or s.epoch != epoch:
            first = comments[0]["offset"]
            s = self._streams[stream] = _Cached(epoch, first - 1, first - 1)
        for c in comments:
            if c["offset"] > s.offset:
                s.comments.append(c)
                s.offset = c["offset"]
        while len(s.comments) > keep:
            s.floor = s.comments.popleft()["offset"]

    async def position(self, stream: str) -> tuple[str, int]:
        s = self._streams.get(stream)
        return (s.epoch, s.offset) if s is not None else (NO_EPOCH, -1)

    async def recent(self, stream: str, count: int) -> list[Event]:
        s = self._streams.get(stream)
        if s is None or count <= 0:
            return []
        return list(s.comments)[-count:]

    async def recent_after(self, stream: str, epoch: str, offset: int) -> list[Event] | None:
        s = self._streams.get(stream)
        if s is None or s.epoch != epoch or s.floor > offset:
            return None
        return [c for c in s.comments if c["offset"] > offset]

    async def note_keep_ratio(self, stream: str, epoch: str, offset: int, keep_ratio: float) -> None:
        changes = [c for c in self._ratios.get(stream, []) if c[1] != offset]
        self._ratios[stream] = changes
        changes.append((epoch, offset, keep_ratio))
        changes.sort(key=lambda c: c[1])
        del changes[:-KEEP_RATIOS_KEPT]

    async def keep_ratios(self, stream: str, epoch: str) -> list[tuple[int, float]]:
        return [(o, r) for e, o, r in self._ratios.get(stream, []) if e == epoch]

    async def remove(self, stream: str, ids: list[str]) -> int:
        s = self._streams.get(stream)
        if s is None or not ids:
            return 0
        gone = set(ids)
        kept = deque(c for c in s.comments if c["id"] not in gone)
        removed = len(s.comments) - len(kept)
        s.comments = kept
        return removed

    async def restore(self, stream: str, comment: Event) -> bool:
        s = self._streams.get(stream)
        offset = comment.get("offset", -1)
        if s is None or not s.floor < offset <= s.offset or any(c["id"] == comment["id"] for c in s.comments):
            return False
        s.comments = deque(sorted([*s.comments, comment], key=lambda c: c["offset"]))
        return True

    async def get_pin(self, stream: str) -> Event | None:
        return self._pins.get(stream)

    async def set_pin(self, stream: str, comment: Event | None) -> None:
        if comment is None:
            self._pins.pop(stream, None)
        else:
            self._pins[stream] = comment


# KEYS: meta hash, recent sorted set. ARGV: epoch, keep, then offset and JSON of each comment.
# Returns the stream's offset afterwards. Numbers go back to Redis through '%d': Lua 5.1 would
# print a large one as 1e+15.
_ADVANCE = """
local epoch, keep = ARGV[1], tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local last
if cur[1] == epoch then
  last = tonumber(cur[2])
else
  last = tonumber(ARGV[3]) - 1
  redis.call('DEL', KEYS[2])
  local start = string.format('%d', last)
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', start, 'floor', start)
end
local added = 0
for i = 3, #ARGV, 2 do
  local off = tonumber(ARGV[i])
  if off > last then
    redis.call('ZADD', KEYS[2], off, ARGV[i + 1])
    last = off
    added = added + 1
  end
end
if added > 0 then
  redis.call('HSET', KEYS[1], 'offset', string.format('%d', last))
  local extra = redis.call('ZCARD', KEYS[2]) - keep
  if extra > 0 then
    local gone = redis.call('ZRANGE', KEYS[2], extra - 1, extra - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
    redis.call('HSET', KEYS[1], 'floor', string.format('%d', tonumber(gone[2])))
  end
end
return last
"""


# KEYS: recent sorted set. ARGV: comment ids. Removes the members of those comments (each is
# JSON starting with {"id":"<id>", as the coordinator writes it) in one pass over the cache.
_REMOVE = """
local gone = {}
for i = 1, #ARGV do gone[ARGV[i]] = true end
local removed = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local id = string.match(member, '^{"id":"(%d+)"')
  if id and gone[id] then
    redis.call('ZREM', KEYS[1], member)
    removed = removed + 1
  end
end
return removed
"""


# KEYS: meta hash, recent sorted set. ARGV: the comment's offset and JSON. Adds it if the
# offset is above the floor and not past the position; returns 1 if it did.
_RESTORE = """
local cur = redis.call('HMGET', KEYS[1], 'floor', 'offset')
local off = tonumber(ARGV[1])
if cur[1] and cur[2] and off > tonumber(cur[1]) and off <= tonumber(cur[2]) then
  redis.call('ZADD', KEYS[2], off, ARGV[2])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPositions:
    """The positions in Redis, shared by every coordinator and gateway (see the module docstring).

    A mixin: the class using it sets ``_redis`` (a ``redis.asyncio.Redis``) and ``_prefix``, and
    ``_cluster`` for a ``RedisCluster``: a stream's keys then share its hash tag, ``{<stream>}``,
    so each script and transaction here stays in the stream's slot.
    """

    _redis: Any
    _prefix: str
    _cluster: bool = False
    _advance_script: Any = None
    _remove_script: Any = None
    _restore_script: Any = None

    def _meta(self, stream: str) -> str:
        return f"{self._prefix}meta:{tag(stream, self._cluster)}"

    def _recent_key(self, stream: str) -> str:
        return f"{self._prefix}recent:{tag(stream, self._cluster)}"

    def _ratios_key(self, stream: str) -> str:
        return f"{self._prefix}sampling:{tag(stream, self._cluster)}"

    def _pin_key(self, stream: str) -> str:
        return f"{self._prefix}pin:{tag(stream, self._cluster)}"

    async def advance(self, stream: str, epoch: str, comments: list[Event], keep: int) -> None:
        if not comments:
            return
        args: list[Any] = [epoch, keep]
        for c in comments:
            args += [c["offset"], json_compact(c)]
        if self._advance_script is None:
            self._advance_script = self._redis.register_script(_ADVANCE)
        await self._advance_script(keys=[self._meta(stream), self._recent_key(stream)], args=args)

    async def position(self, stream: str) -> tuple[str, int]:
        epoch, offset = await self._redis.hmget(self._meta(stream), ["epoch", "offset"])
        if epoch is None or offset is None:
            return NO_EPOCH, -1
        return _text(epoch), int(offset)

    async def recent(self, stream: str, count: int) -> list[Event]:
        if count <= 0:
            return []
        raw = await self._redis.zrange(self._recent_key(stream), -count, -1)
        return [json.loads(item) for item in raw]

    async def recent_after(self, stream: str, epoch: str, offset: int) -> list[Event] | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self._meta(stream), ["epoch", "floor"])
            pipe.zrangebyscore(self._recent_key(stream), f"({offset}", "+inf")
            (cached_epoch, floor), raw = await pipe.execute()
        if cached_epoch is None or floor is None or _text(cached_epoch) != epoch or int(floor) > offset:
            return None
        return [json.loads(item) for item in raw]

    async def note_keep_ratio(self, stream: str, epoch: str, offset: int, keep_ratio: float) -> None:
        key = self._ratios_key(stream)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, offset, offset)  # a retried batch may record another ratio
            pipe.zadd(key, {f"{epoch}|{offset}|{keep_ratio!r}": offset})
            pipe.zremrangebyrank(key, 0, -KEEP_RATIOS_KEPT - 1)
            await pipe.execute()

    async def keep_ratios(self, stream: str, epoch: str) -> list[tuple[int, float]]:
        out = []
        for item in await self._redis.zrange(self._ratios_key(stream), 0, -1):
            item_epoch, offset, ratio = _text(item).rsplit("|", 2)
            if item_epoch == epoch:
                out.append((int(offset), float(ratio)))
        return out

    async def remove(self, stream: str, ids: list[str]) -> int:
        if not ids:
            return 0
        if self._remove_script is None:
            self._remove_script = self._redis.register_script(_REMOVE)
        return int(await self._remove_script(keys=[self._recent_key(stream)], args=list(ids)))

    async def restore(self, stream: str, comment: Event) -> bool:
        if self._restore_script is None:
            self._restore_script = self._redis.register_script(_RESTORE)
        keys = [self._meta(stream), self._recent_key(stream)]
        return bool(await self._restore_script(keys=keys, args=[comment.get("offset", -1), json_compact(comment)]))

    async def get_pin(self, stream: str) -> Event | None:
        raw = await self._redis.get(self._pin_key(stream))
        return json.loads(raw) if raw else None

    async def set_pin(self, stream: str, comment: Event | None) -> None:
        key = self._pin_key(stream)
        if comment is None:
            await self._redis.delete(key)
        else:
            await self._redis.set(key, json.dumps(comment, ensure_ascii=False, separators=(",", ":")))
