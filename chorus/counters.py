"""Engagement counters: reaction totals and viewer counts, in memory or in Redis.

Each gateway aggregates in its own memory and calls these stores only on a timer
(gateway/engagement.py), so a reaction or a join never costs a round trip of its own:

- **Reactions**: a hash per stream, ``<prefix>react:<stream>``, emoji -> total. A flush adds
  the gateway's counts since the last one with one pipelined ``HINCRBY`` per (stream, emoji)
  and, in the same round trip, reads the totals of the streams it is about to broadcast.
- **Live viewers**: a hash per stream, ``<prefix>live:{<stream>}``, gateway -> ``count:expiry``
  with the expiry (ms) on Redis's clock. Each gateway rewrites its own field every report
  and the reader sums the fields not yet expired, deleting the stale ones, so a gateway that
  was killed drops out of the count ``ttl_ms`` after its last report; one that loses its last
  local viewer deletes its field. (Per-field expiry, ``HEXPIRE``, arrived only in Redis 7.4.)
- **Unique viewers**: exact while small (a set of viewer keys, ``<prefix>uniq:{<stream>}``),
  then HyperLogLog (``<prefix>uniqhll:{<stream>}``, ~0.8% standard error, at most 12 KiB):
  once the set passes ``exact_max`` its members go into the HyperLogLog and the set is left
  holding only an overflow marker. A stream of ten viewers shows exactly ten; one of
  millions costs 12 KiB and O(1) per join.

The viewer keys of a stream share the hash tag ``{<stream>}``, so the script touching them
stays within one Redis Cluster slot. The in-memory twin (embedded default, unit tests) keeps
the same semantics on an injected clock, with its own HyperLogLog. On the embedded default
its reaction totals also go to disk (:class:`SqliteReactionTotals`, a table in the history
file): each flush adds its counts there before memory, and a restart reads them back, so
totals survive a restart or a crash (a crash loses at most the last flush interval). Viewer
counts are live state and start afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Counters",
    "HyperLogLog",
    "MemoryCounters",
    "RedisCounters",
    "SqliteReactionTotals",
    "UniqueCounter",
    "ViewerCount",
]

HLL_BITS = 14  # 2**14 registers, as Redis: standard error 1.04 / sqrt(16384) ~ 0.8%
OVERFLOW = "!overflow"  # the set's only member once a stream counts with HyperLogLog (keys: u:... ip:...)
JOIN_CHUNK = 500  # viewer keys per script call (Lua's unpack() has a stack limit)


@dataclass(frozen=True, slots=True)
class ViewerCount:
    """A stream's viewers: connected now (every gateway) and unique since the stream began."""

    now: int = 0
    unique: int = 0

    def to_wire(self) -> dict[str, int]:
        return {"now": self.now, "unique": self.unique}


class Counters(Protocol):
    async def add_reactions(self, deltas: Mapping[str, Mapping[str, int]],
                            read: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        """Add ``deltas`` (stream -> emoji -> count) to the totals, then return the totals of
        each stream in ``read`` (one round trip for both)."""
        ...

    async def report_viewers(self, gateway: str, counts: Mapping[str, int],
                             joined: Mapping[str, Collection[str]]) -> dict[str, ViewerCount]:
        """Store this gateway's live viewers per stream (0 withdraws it), count ``joined``
        viewer keys as seen, and return every reported stream's count over all gateways."""
        ...

    async def snapshot(self, stream: str) -> tuple[dict[str, int], ViewerCount]:
        """A stream's reaction totals and viewer count, for a welcome (read only)."""
        ...

    async def close(self) -> None: ...


# -- in process memory ---------------------------------------------------------------------


class HyperLogLog:
    """HyperLogLog (Flajolet et al. 2007) over 64-bit BLAKE2b hashes, 2**14 one-byte registers."""

    def __init__(self) -> None:
        self.registers = bytearray(1 << HLL_BITS)

    def add(self, item: str) -> None:
        h = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")
        index = h >> (64 - HLL_BITS)
        rest = h & ((1 << (64 - HLL_BITS)) - 1)
        rank = (64 - HLL_BITS) - rest.bit_length() + 1  # position of the first 1 bit
        if rank > self.registers[index]:
            self.registers[index] = rank

    def count(self) -> int:
        m = len(self.registers)
        estimate = (0.7213 / (1 + 1.079 / m)) * m * m / sum(2.0 ** -r for r in self.registers)
        zeros = self.registers.count(0)
        if estimate <= 2.5 * m and zeros:  # small range: linear counting is the better estimate
            estimate = m * math.log(m / zeros)
        return round(estimate)


class UniqueCounter:
    """Exact (a set) up to ``exact_max`` keys, then a HyperLogLog holding every key seen."""

    def __init__(self, exact_max: int) -> None:
        self.exact_max = exact_max
        self.exact: set[str] | None = set()
        self.hll: HyperLogLog | None = None

    def add(self, key: str) -> None:
        if self.exact is not None:
            self.exact.add(key)
            if len(self.exact) <= self.exact_max:
                return
            self.hll = HyperLogLog()
            for k in self.exact:
                self.hll.add(k)
            self.exact = None
            return
        assert self.hll is not None
        self.hll.add(key)

    def count(self) -> int:
        if self.exact is not None:
            return len(self.exact)
        assert self.hll is not None
        return self.hll.count()


class SqliteReactionTotals:
    """Reaction totals on disk for the embedded default: ``reaction_totals`` in the history file
    (its own connection; WAL lets it share the file with the history store)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS reaction_totals (stream_id TEXT NOT NULL, emoji TEXT NOT NULL,"
              " total INTEGER NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (stream_id, emoji)) WITHOUT ROWID")

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(self.SCHEMA)

    def load(self, since_ms: int) -> dict[str, tuple[dict[str, int], int]]:
        """stream -> (totals, last update in ms since the Unix epoch), for streams updated since
        ``since_ms``; older ones are deleted (as Redis expires an idle stream's hash)."""
        out: dict[str, tuple[dict[str, int], int]] = {}
        with self._lock:
            self._db.execute("DELETE FROM reaction_totals WHERE stream_id IN (SELECT stream_id FROM reaction_totals"
                             " GROUP BY stream_id HAVING MAX(updated_at) < ?)", (since_ms,))
            rows = self._db.execute("SELECT stream_id, emoji, total, updated_at FROM reaction_totals").fetchall()
        for stream, emoji, total, updated in rows:
            totals, last = out.get(stream, ({}, 0))
            totals[emoji] = int(total)
            out[stream] = (totals, max(last, int(updated)))
        return out

    def add(self, deltas: Mapping[str, Mapping[str, int]], now_ms: int) -> None:
        """Add a flush's counts in one transaction."""
        rows = [(stream, emoji, n, now_ms) for stream, counts in deltas.items() for emoji, n in counts.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO reaction_totals VALUES (?, ?, ?, ?) ON CONFLICT (stream_id, emoji)"
                                     " DO UPDATE SET total = total + excluded.total, updated_at = excluded.updated_at",
                                     rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryCounters:
    """The embedded default's store (one process, so one gateway), and the reference in tests.

    With ``persist`` the reaction totals are read from it at start and every flush is written
    to it before it counts in memory (a write that fails raises, and the caller retries the
    whole flush, so nothing is counted twice)."""

    def __init__(self, ttl_ms: int = 5000, exact_max: int = 1000, retention_s: float = 7 * 86400,
                 reactions_retention_s: float = 7 * 86400, clock: Callable[[], float] = time.monotonic,
                 persist: SqliteReactionTotals | None = None, wall: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_ms / 1000
        self.exact_max = exact_max
        self.retention_s = retention_s
        self.reactions_retention_s = reactions_retention_s
        self._clock = clock
        self._wall = wall
        self._persist = persist
        self._reactions: dict[str, dict[str, int]] = {}
        self._live: dict[str, dict[str, tuple[int, float]]] = {}  # stream -> gateway -> (count, expiry)
        self._unique: dict[str, UniqueCounter] = {}
        # stream -> last reaction / join (monotonic s); insertion order is age order
        self._reacted: dict[str, float] = {}
        self._seen: dict[str, float] = {}
        if persist is not None:
            self._load_reactions(persist)

    def _load_reactions(self, persist: SqliteReactionTotals) -> None:
        """The totals kept on disk, each stream as old as its last update (oldest first)."""
        now, wall_ms = self._clock(), int(self._wall() * 1000)
        stored = persist.load(wall_ms - int(self.reactions_retention_s * 1000))
        for stream, (totals, updated_ms) in sorted(stored.items(), key=lambda kv: kv[1][1]):
            self._reactions[stream] = totals
            self._reacted[stream] = now - max(0.0, (wall_ms - updated_ms) / 1000)

    async def add_reactions(self, deltas: Mapping[str, Mapping[str, int]],
                            read: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        if deltas and self._persist is not None:
            await asyncio.to_thread(self._persist.add, deltas, int(self._wall() * 1000))
        now = self._clock()
        for stream, counts in deltas.items():
            totals = self._reactions.setdefault(stream, {})
            for emoji, n in counts.items():
                totals[emoji] = totals.get(emoji, 0) + n
            _touch(self._reacted, stream, now)
        _expire(self._reacted, self._reactions, now - self.reactions_retention_s)
        return {s: dict(self._reactions.get(s, {})) for s in read}

    async def report_viewers(self, gateway: str, counts: Mapping[str, int],
                             joined: Mapping[str, Collection[str]]) -> dict[str, ViewerCount]:
        now = self._clock()
        for stream, keys in joined.items():
            unique = self._unique.get(stream)
            if unique is None:
                unique = self._unique[stream] = UniqueCounter(self.exact_max)
            for key in keys:
                unique.add(key)
            _touch(self._seen, stream, now)
        _expire(self._seen, self._unique, now - self.retention_s)
        for stream, n in counts.items():
            live = self._live.setdefault(stream, {})
            if n > 0:
                live[gateway] = (n, now + self.ttl_s)
            else:
                live.pop(gateway, None)
        return {stream: self._count(stream, now) for stream in counts}

    async def snapshot(self, stream: str) -> tuple[dict[str, int], ViewerCount]:
        return dict(self._reactions.get(stream, {})), self._count(stream, self._clock())

    async def close(self) -> None:
        if self._persist is not None:
            self._persist.close()

    def _count(self, stream: str, now: float) -> ViewerCount:
        live = self._live.get(stream, {})
        for gateway in [g for g, (_, expiry) in live.items() if expiry <= now]:
            del live[gateway]
        if not live:
            self._live.pop(stream, None)
        unique = self._unique.get(stream)
        return ViewerCount(sum(n for n, _ in live.values()), unique.count() if unique else 0)


def _touch(ages: dict[str, float], stream: str, now: float) -> None:
    ages.pop(stream, None)
    ages[stream] = now  # re-inserted: the dict stays ordered oldest first


def _expire(ages: dict[str, float], table: dict[str, Any], before: float) -> None:
    """Forget streams idle since ``before`` (Redis expires its keys the same way)."""
    while ages:
        stream = next(iter(ages))
        if ages[stream] > before:
            return
        del ages[stream]
        table.pop(stream, None)


# -- Redis -----------------------------------------------------------------------------------

# Report one gateway's live viewers of one stream, add joiners, read the stream's counts.
# KEYS[1]: live hash, KEYS[2]: exact set, KEYS[3]: HyperLogLog (one hash tag: one slot)
# ARGV: gateway, count (0 withdraws), ttl_ms, exact_max, retention_s, viewer keys...
# Returns {viewers now over live gateways, unique viewers}.
VIEWERS_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[1] ~= '' then
  if tonumber(ARGV[2]) > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
local overflowed = redis.call('SISMEMBER', KEYS[2], '!overflow') == 1
if #ARGV > 5 then
  local keys = {}
  for i = 6, #ARGV do keys[#keys + 1] = ARGV[i] end
  if overflowed then
    redis.call('PFADD', KEYS[3], unpack(keys))
  else
    redis.call('SADD', KEYS[2], unpack(keys))
    if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[4]) then
      local members = redis.call('SMEMBERS', KEYS[2])
      for i = 1, #members, 500 do
        redis.call('PFADD', KEYS[3], unpack(members, i, math.min(i + 499, #members)))
      end
      redis.call('DEL', KEYS[2])
      redis.call('SADD', KEYS[2], '!overflow')
      overflowed = true
    end
  end
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  if overflowed then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
end
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local sep = string.find(fields[i + 1], ':', 1, true)
  local expiry = sep and tonumber(string.sub(fields[i + 1], sep + 1)) or 0
  if expiry <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    total = total + tonumber(string.sub(fields[i + 1], 1, sep - 1))
  end
end
local unique
if overflowed then unique = redis.call('PFCOUNT', KEYS[3]) else unique = redis.call('SCARD', KEYS[2]) end
return {total, unique}
"""


class RedisCounters:
    """Reaction totals and viewer counts shared by every gateway (see the module docstring).

    Every wait on Redis is bounded by ``timeout_ms``: a tick that fails raises, and the
    caller keeps what it had to send for the next one.
    """

    def __init__(self, url: str, prefix: str = "chorus:", *, ttl_ms: int = 5000, exact_max: int = 1000,
                 retention_s: int = 7 * 86400, reactions_retention_s: int = 7 * 86400,
                 timeout_ms: int = 1000) -> None:
        from chorus.redisconn import open_redis

        self._redis = open_redis(url, timeout_s=timeout_ms / 1000)  # one node or a cluster (chorus/redisconn.py)
        self._prefix = prefix
        self.ttl_ms = ttl_ms
        self.exact_max = exact_max
        self.retention_s = retention_s
        self.reactions_retention_s = reactions_retention_s
        self._sha: str | None = None

    def reactions_key(self, stream: str) -> str:
        return f"{self._prefix}react:{stream}"

    def viewer_keys(self, stream: str) -> list[str]:
        tag = "{" + stream + "}"
        return [f"{self._prefix}live:{tag}", f"{self._prefix}uniq:{tag}", f"{self._prefix}uniqhll:{tag}"]

    async def close(self) -> None:
        await self._redis.aclose()

    async def add_reactions(self, deltas: Mapping[str, Mapping[str, int]],
                            read: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        streams = list(read)
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, counts in deltas.items():
                key = self.reactions_key(stream)
                for emoji, n in counts.items():
                    pipe.hincrby(key, emoji, n)
                pipe.expire(key, self.reactions_retention_s)
            for stream in streams:
                pipe.hgetall(self.reactions_key(stream))
            results = await pipe.execute()
        return {s: _int_map(raw) for s, raw in zip(streams, results[len(results) - len(streams):], strict=True)}

    async def report_viewers(self, gateway: str, counts: Mapping[str, int],
                             joined: Mapping[str, Collection[str]]) -> dict[str, ViewerCount]:
        calls: list[tuple[str, list[Any]]] = []
        for stream in {*counts, *joined}:
            keys = list(joined.get(stream, ()))
            # A stream with joiners but no count to report adds its joiners only ('' gateway).
            who = gateway if stream in counts else ""
            head = [who, counts.get(stream, 0), self.ttl_ms, self.exact_max, self.retention_s]
            for i in range(0, max(len(keys), 1), JOIN_CHUNK):
                calls.append((stream, [*head, *keys[i : i + JOIN_CHUNK]]))
        results = await self._run_viewer_scripts(calls)
        found: dict[str, ViewerCount] = {}
        for (stream, _), (now, unique) in zip(calls, results, strict=True):
            if stream in counts:
                found[stream] = ViewerCount(int(now), int(unique))
        return found

    async def snapshot(self, stream: str) -> tuple[dict[str, int], ViewerCount]:
        head: list[Any] = ["", 0, self.ttl_ms, self.exact_max, self.retention_s]
        totals = await self.add_reactions({}, [stream])
        (now, unique), = await self._run_viewer_scripts([(stream, head)])
        return totals[stream], ViewerCount(int(now), int(unique))

    async def _run_viewer_scripts(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """One pipeline of EVALSHA calls; the script is loaded first, and again after NOSCRIPT
        (a Redis restart or SCRIPT FLUSH). Every call is idempotent, so a retry is safe."""
        from redis.exceptions import NoScriptError

        if not calls:
            return []
        for attempt in (1, 2):
            if self._sha is None:
                self._sha = await self._redis.script_load(VIEWERS_SCRIPT)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for stream, args in calls:
                        pipe.evalsha(self._sha, 3, *self.viewer_keys(stream), *args)
                    return list(await pipe.execute())
            except NoScriptError:
                self._sha = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def _int_map(raw: Mapping[Any, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in raw.items():
        try:
            out[k.decode() if isinstance(k, bytes) else str(k)] = int(v)
        except ValueError:
            continue  # not a counter: someone else's field
    return out
