"""Admission limits: rate limits (GCRA), slow mode, and sanctions (bans and time-outs).

Rate limits use GCRA, the generic cell rate algorithm (ATM Forum TM 4.0, the algorithm of
redis-cell and throttled). Each key keeps one number, its theoretical arrival time (TAT):
the moment its budget is whole again. A limit of ``count`` per ``period`` has an emission
interval T = period / count and lets a burst of ``count`` through at once::

    new_tat = max(stored TAT, now) + T        (a missing key counts as now)
    allowed if new_tat - now <= period: store new_tat, expiring at new_tat (a key whose
    TAT has passed means the same as no key, so Redis may drop it)
    else refused; retry after new_tat - period - now

A post takes one cell of four limits (user, client address, stream, everyone) and, while
the stream is in slow mode, the user's slot on that stream: all or nothing, so a refused
post costs no budget anywhere. With Redis one Lua script does all of that atomically on
Redis's clock (one round trip per post); each gateway also runs the same GCRA in memory for
the user and address keys first, so a flood from one client is refused locally and never
reaches Redis. On the embedded default the in-memory limiter is the only one.

Times are integer microseconds: 100,000/s is an emission interval of 10 µs.

Sanctions are checked before any limit, so a banned user's attempts cost no budget: a key
``<prefix>ban:<stream>:<user>`` (``*`` as the stream for every stream), without expiry for
a ban and with one for a time-out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chorus.broker import StreamState, mode_key
from chorus.codes import ErrorCode
from chorus.config import Config, LimitsConfig

__all__ = [
    "ADMIT_SCRIPT",
    "ALL_STREAMS",
    "AdmissionLimits",
    "BackendUnavailable",
    "Limit",
    "MemoryRateLimiter",
    "MemorySanctions",
    "Poster",
    "RateLimiter",
    "RedisRateLimiter",
    "RedisSanctions",
    "Refusal",
    "Sanctions",
    "gcra",
    "limits_from_config",
    "open_limits",
    "redis_client",
]

log = logging.getLogger("chorus.limits")

US_PER_S = 1_000_000
ALL_STREAMS = "*"  # the stream of a ban from every stream (not a valid stream id, so no clash)
SANCTION_MEMO_S = 2.0  # with Redis: how long a gateway remembers a ban it was told about


class BackendUnavailable(Exception):
    """The shared store (Redis) did not answer; admission lets the post through (fail open)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a post was refused: the ``error`` event's code, reason and retry delay."""

    code: ErrorCode
    reason: str
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Poster:
    """Who posts where: the keys the limits count a post under."""

    stream: str
    user: str
    ip: str = ""  # empty when unknown: the address limit is skipped
    slow_mode_exempt: bool = False  # moderators and the broadcaster

    def id_for(self, scope: str) -> str | None:
        if scope == "user":
            return self.user
        if scope == "ip":
            return self.ip or None
        if scope == "stream":
            return self.stream
        return ""  # global: one key


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` posts per ``period_s`` for one scope (user, ip, stream or global)."""

    scope: str
    count: int
    period_s: int

    @property
    def emission_us(self) -> int:
        return max(1, self.period_s * US_PER_S // self.count)

    @property
    def window_us(self) -> int:
        """How far the TAT may run ahead of now: a burst of ``count`` cells."""
        return self.emission_us * self.count

    def describe(self) -> str:
        per = "minute" if self.period_s == 60 else "second"
        return {
            "user": f"you are posting too fast: at most {self.count} comments per {per}",
            "ip": f"too many comments from your network address: at most {self.count} per {per}",
            "stream": "this stream is taking too many comments right now",
        }.get(self.scope, "the service is taking too many comments right now")


def limits_from_config(cfg: LimitsConfig) -> list[Limit]:
    """The configured limits, in the order a refusal names them; a count of 0 is no limit."""
    table = [("user", cfg.user_per_minute, 60), ("ip", cfg.ip_per_minute, 60),
             ("stream", cfg.stream_per_second, 1), ("global", cfg.global_per_second, 1)]
    return [Limit(scope, count, period_s) for scope, count, period_s in table if count > 0]


def gcra(tat_us: int | None, now_us: int, emission_us: int, window_us: int) -> tuple[int, int]:
    """One GCRA step: (the TAT to store if allowed, the wait in µs; 0 means allowed)."""
    start = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = start + emission_us
    return new_tat, max(0, new_tat - window_us - now_us)


def _ms(us: int) -> int:
    """Microseconds to whole milliseconds, rounded up: retrying when told must succeed."""
    return max(1, -(-us // 1000))


# Reasons say why; the delay travels in retry_after_ms (clients show it in their own words).
def rate_refusal(limit: Limit, wait_us: int) -> Refusal:
    return Refusal(ErrorCode.RATE_LIMITED, limit.describe(), _ms(wait_us))


def slow_mode_refusal(seconds: int, wait_us: int) -> Refusal:
    return Refusal(ErrorCode.SLOW_MODE, f"slow mode is on: one comment every {seconds} s", _ms(wait_us))


def sanction_refusal(stream: str, left_ms: int | None) -> Refusal:
    """``left_ms`` None is a ban; a number is what is left of a time-out."""
    where = "every stream" if stream == ALL_STREAMS else "this stream"
    if left_ms is None:
        return Refusal(ErrorCode.BANNED, f"you are banned from {where}")
    return Refusal(ErrorCode.TIMED_OUT, f"you are timed out from {where}", max(1, left_ms))


def _strongest(found: Sequence[tuple[str, int | None]]) -> Refusal | None:
    """Of the sanctions found as (stream, ms left or None), a ban beats the longest time-out."""
    if not found:
        return None
    stream, left = max(found, key=lambda f: math.inf if f[1] is None else f[1])
    return sanction_refusal(stream, left)


class RateLimiter(Protocol):
    async def acquire(self, poster: Poster) -> Refusal | None:
        """Take one cell of every limit and, in slow mode, the poster's slot: all or nothing.

        None means taken; a :class:`Refusal` names the limit with the longest wait. Raises
        :class:`BackendUnavailable` if the shared store did not answer.
        """
        ...


class Sanctions(Protocol):
    async def check(self, stream: str, user: str) -> Refusal | None:
        """A refusal if ``user`` is banned or timed out on ``stream`` or on every stream."""
        ...

    async def ban(self, stream: str, user: str, seconds: float | None = None) -> None:
        """Ban ``user`` from ``stream`` (:data:`ALL_STREAMS`: every one); ``seconds`` makes it a time-out."""
        ...

    async def unban(self, stream: str, user: str) -> None: ...


# -- in process memory ---------------------------------------------------------------------


def _touch(table: dict[Any, int], key: Any, value: int) -> None:
    """Store ``value`` at the most recently used end of an insertion-ordered dict."""
    table.pop(key, None)
    table[key] = value


class MemoryRateLimiter:
    """GCRA and slow mode in process memory.

    The embedded default's only limiter; with Redis, each gateway's pre-check for the user and
    address limits (built with ``modes=None``: slow mode is then Redis's alone). Bounded: a
    key whose time has passed holds nothing worth keeping, so each call drops up to two such
    keys from the least recently used end, and past ``max_keys`` the least recently used go
    regardless (they start again with a whole budget: fail open, never unbounded memory).
    """

    def __init__(self, limits: Sequence[Limit], modes: StreamState | None = None, *,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = tuple(limits)
        self._modes = modes
        self._max_keys = max_keys
        self._clock = clock
        self._tats: dict[tuple[str, str], int] = {}  # (scope, id) -> TAT, µs
        self._slots: dict[tuple[str, str], int] = {}  # (stream, user) -> end of the slow-mode slot, µs

    def __len__(self) -> int:
        return len(self._tats) + len(self._slots)

    async def acquire(self, poster: Poster) -> Refusal | None:
        slow_mode_s = 0
        if self._modes is not None and not poster.slow_mode_exempt:
            slow_mode_s = (await self._modes.get_mode(poster.stream)).slow_mode_seconds
        return self.take(poster, slow_mode_s)

    async def acquire_many(self, posters: Sequence[Poster]) -> list[Refusal | None]:
        return [await self.acquire(p) for p in posters]

    def take(self, poster: Poster, slow_mode_s: int = 0) -> Refusal | None:
        """The check and the commit, with no await between them."""
        now = int(self._clock() * US_PER_S)
        self._evict_idle(self._tats, now)
        self._evict_idle(self._slots, now)
        worst_wait, worst_limit = 0, None
        updates: list[tuple[tuple[str, str], int]] = []
        for limit in self.limits:
            ident = poster.id_for(limit.scope)
            if ident is None:
                continue
            key = (limit.scope, ident)
            new_tat, wait = gcra(self._tats.get(key), now, limit.emission_us, limit.window_us)
            if wait > worst_wait:
                worst_wait, worst_limit = wait, limit
            updates.append((key, new_tat))
        slot = (poster.stream, poster.user)
        slot_wait = self._slots.get(slot, now) - now if slow_mode_s > 0 else 0
        if slot_wait > 0 and slot_wait >= worst_wait:
            return slow_mode_refusal(slow_mode_s, slot_wait)
        if worst_limit is not None:
            return rate_refusal(worst_limit, worst_wait)
        for key, tat in updates:
            _touch(self._tats, key, tat)
        if slow_mode_s > 0:
            _touch(self._slots, slot, now + slow_mode_s * US_PER_S)
        self._bound(self._tats)
        self._bound(self._slots)
        return None

    @staticmethod
    def _evict_idle(table: dict[Any, int], now: int) -> None:
        for _ in range(2):
            key = next(iter(table), None)
            if key is None or table[key] > now:
                return
            del table[key]

    def _bound(self, table: dict[Any, int]) -> None:
        while len(table) > self._max_keys:
            del table[next(iter(table))]


class MemorySanctions:
    """Bans and time-outs in process memory (the embedded default)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[tuple[str, str], float] = {}  # (stream, user) -> end (monotonic s); inf for a ban

    async def check(self, stream: str, user: str) -> Refusal | None:
        now = self._clock()
        found: list[tuple[str, int | None]] = []
        for where in (stream, ALL_STREAMS):
            until = self._until.get((where, user))
            if until is None:
                continue
            if until <= now:
                del self._until[(where, user)]
            else:
                found.append((where, None if until == math.inf else math.ceil((until - now) * 1000)))
        return _strongest(found)

    async def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[Refusal | None]:
        return [await self.check(stream, user) for stream, user in pairs]

    async def ban(self, stream: str, user: str, seconds: float | None = None) -> None:
        self._until[(stream, user)] = math.inf if seconds is None else self._clock() + seconds

    async def unban(self, stream: str, user: str) -> None:
        self._until.pop((stream, user), None)


# -- Redis -----------------------------------------------------------------------------------

# One atomic admission step. Redis Cluster: the keys below live in different hash slots (the
# user's, the address's, the stream's, the global one), and a script may only touch keys of
# one slot, so limits need a single-node Redis (or one shard set aside for them).
#
# KEYS[1..n]: GCRA keys; KEYS[n+1]: the stream's mode hash; KEYS[n+2]: the poster's slow-mode slot
# ARGV[1]: n; ARGV[2i], ARGV[2i+1]: emission interval and window of key i (µs);
# ARGV[2n+2]: "1" if slow mode applies to the poster
# Returns {0, 0, s} when taken, else {i, wait_us, s}: i in 1..n names the limit, n+1 slow mode;
# s is the stream's slow mode in seconds.
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local worst, worst_wait = 0, 0
local tats = {}
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0) or 0
  if tat < now then tat = now end
  tats[i] = tat + tonumber(ARGV[2 * i])
  local wait = tats[i] - tonumber(ARGV[2 * i + 1]) - now
  if wait > worst_wait then worst, worst_wait = i, wait end
end
local slow_s = 0
if ARGV[2 * n + 2] == '1' then
  slow_s = math.floor(tonumber(redis.call('HGET', KEYS[n + 1], 'slow_mode_seconds') or 0) or 0)
  if slow_s > 0 then
    local left_us = redis.call('PTTL', KEYS[n + 2]) * 1000
    if left_us > 0 and left_us >= worst_wait then worst, worst_wait = n + 1, left_us end
  end
end
if worst > 0 then return {worst, worst_wait, slow_s} end
for i = 1, n do
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000))
end
if slow_s > 0 then redis.call('SET', KEYS[n + 2], '1', 'NX', 'PX', slow_s * 1000) end
return {0, 0, slow_s}
"""


# ADMIT_SCRIPT for a batch of posts in one EVALSHA, one post after the other (each sees what
# the ones before it took), all on one reading of Redis's clock.
# ARGV[1]: m posts; then per post: n, n pairs (emission, window), the slow-mode flag.
# KEYS: per post its n GCRA keys, its stream's mode hash, its slow-mode slot.
# Returns 3 numbers per post, as ADMIT_SCRIPT.
ADMIT_MANY_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local a, k = 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local worst, worst_wait = 0, 0
  local tats = {}
  for i = 1, n do
    local tat = tonumber(redis.call('GET', KEYS[k + i]) or 0) or 0
    if tat < now then tat = now end
    tats[i] = tat + tonumber(ARGV[a + 2 * i - 1])
    local wait = tats[i] - tonumber(ARGV[a + 2 * i]) - now
    if wait > worst_wait then worst, worst_wait = i, wait end
  end
  local slow_s = 0
  if ARGV[a + 2 * n + 1] == '1' then
    slow_s = math.floor(tonumber(redis.call('HGET', KEYS[k + n + 1], 'slow_mode_seconds') or 0) or 0)
    if slow_s > 0 then
      local left_us = redis.call('PTTL', KEYS[k + n + 2]) * 1000
      if left_us > 0 and left_us >= worst_wait then worst, worst_wait = n + 1, left_us end
    end
  end
  if worst == 0 then
    for i = 1, n do
      redis.call('SET', KEYS[k + i], string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000))
    end
    if slow_s > 0 then redis.call('SET', KEYS[k + n + 2], '1', 'NX', 'PX', slow_s * 1000) end
  end
  out[#out + 1] = worst
  out[#out + 1] = worst_wait
  out[#out + 1] = slow_s
  a = a + 2 * n + 2
  k = k + n + 2
end
return out
"""

# Every key's PTTL, in one call: the sanctions of a batch of posts.
PTTL_SCRIPT = "local out = {} for i = 1, #KEYS do out[i] = redis.call('PTTL', KEYS[i]) end return out"


async def _run_script(redis: Any, shas: dict[str, str], script: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA ``script`` (SCRIPT LOAD first, and again after NOSCRIPT)."""
    from redis.exceptions import NoScriptError

    try:
        sha = shas.get(script) or await redis.script_load(script)
        shas[script] = sha
        try:
            return await redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or ran SCRIPT FLUSH: load it again
            shas[script] = sha = await redis.script_load(script)
            return await redis.evalsha(sha, len(keys), *keys, *args)
    except _redis_errors() as exc:
        raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class RedisRateLimiter:
    """The four limits and slow mode, shared by every gateway: :data:`ADMIT_SCRIPT` per post.

    The script is loaded once (SCRIPT LOAD) and run by its hash (EVALSHA); after a Redis
    restart or SCRIPT FLUSH the server answers NOSCRIPT, and it is loaded again.
    """

    def __init__(self, redis: Any, prefix: str, limits: Sequence[Limit]) -> None:
        self._redis = redis
        self._prefix = prefix
        self.limits = tuple(limits)
        self._sha: str | None = None
        self._loading = asyncio.Lock()
        self._shas: dict[str, str] = {}  # ADMIT_MANY_SCRIPT's hash
        self.round_trips = 0

    def _keys(self, poster: Poster) -> tuple[list[Limit], list[str]]:
        used = [(lim, ident) for lim in self.limits if (ident := poster.id_for(lim.scope)) is not None]
        keys = [f"{self._prefix}rl:{lim.scope}:{ident}" for lim, ident in used]
        keys += [mode_key(self._prefix, poster.stream), f"{self._prefix}slow:{poster.stream}:{poster.user}"]
        return [lim for lim, _ in used], keys

    def _call(self, poster: Poster) -> tuple[list[Limit], list[str], list[int]]:
        limits, keys = self._keys(poster)
        args = [len(limits), *(x for lim in limits for x in (lim.emission_us, lim.window_us))]
        args.append(0 if poster.slow_mode_exempt else 1)
        return limits, keys, args

    @staticmethod
    def _verdict(limits: list[Limit], reply: list[Any]) -> Refusal | None:
        which, wait_us, slow_mode_s = (int(x) for x in reply)
        if which == 0:
            return None
        if which == len(limits) + 1:
            return slow_mode_refusal(slow_mode_s, wait_us)
        return rate_refusal(limits[which - 1], wait_us)

    async def acquire(self, poster: Poster) -> Refusal | None:
        limits, keys, args = self._call(poster)
        return self._verdict(limits, await self._run(keys, args))

    async def acquire_many(self, posters: Sequence[Poster]) -> list[Refusal | None]:
        """:meth:`acquire` for each poster, in order, in one round trip (:data:`ADMIT_MANY_SCRIPT`).

        The same verdicts as one call each: a post refused costs no budget, and each post
        sees what the ones before it took.
        """
        if not posters:
            return []
        calls = [self._call(p) for p in posters]
        keys = [key for _, ks, _ in calls for key in ks]
        args: list[Any] = [len(calls)]
        for _, _, a in calls:
            args += a
        self.round_trips += 1
        flat = await _run_script(self._redis, self._shas, ADMIT_MANY_SCRIPT, keys, args)
        return [self._verdict(limits, flat[3 * n : 3 * n + 3]) for n, (limits, _, _) in enumerate(calls)]

    async def _run(self, keys: list[str], args: list[int]) -> list[Any]:
        from redis.exceptions import NoScriptError

        try:
            sha = self._sha or await self._load(None)
            try:
                self.round_trips += 1
                return await self._redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted or ran SCRIPT FLUSH: load it again
                sha = await self._load(sha)
                self.round_trips += 1
                return await self._redis.evalsha(sha, len(keys), *keys, *args)
        except _redis_errors() as exc:
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc

    async def _load(self, stale: str | None) -> str:
        """SCRIPT LOAD once, however many posts find the script missing at the same time."""
        async with self._loading:
            if self._sha is None or self._sha == stale:
                self.round_trips += 1
                self._sha = await self._redis.script_load(ADMIT_SCRIPT)
            return self._sha


class RedisSanctions:
    """Bans in Redis keys ``<prefix>ban:<stream>:<user>``: no expiry for a ban, PX for a time-out.

    A user id holding ``:`` could make two (stream, user) pairs share a key only with a
    stream id holding ``:`` too; ids from one issuer do not mix so.
    """

    def __init__(self, redis: Any, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._shas: dict[str, str] = {}  # PTTL_SCRIPT's hash
        self.round_trips = 0

    def key(self, stream: str, user: str) -> str:
        return f"{self._prefix}ban:{stream}:{user}"

    async def check(self, stream: str, user: str) -> Refusal | None:
        try:
            self.round_trips += 1
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.pttl(self.key(stream, user))
                pipe.pttl(self.key(ALL_STREAMS, user))
                here, everywhere = await pipe.execute()
        except _redis_errors() as exc:
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc
        # PTTL: -2 no key, -1 a key without expiry (a ban), else the ms left of a time-out
        found = [(where, None if ms == -1 else int(ms)) for where, ms in ((stream, here), (ALL_STREAMS, everywhere))
                 if ms != -2]
        return _strongest(found)

    async def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[Refusal | None]:
        """:meth:`check` for each (stream, user), in one round trip (:data:`PTTL_SCRIPT`)."""
        if not pairs:
            return []
        keys = [key for stream, user in pairs for key in (self.key(stream, user), self.key(ALL_STREAMS, user))]
        self.round_trips += 1
        got = await _run_script(self._redis, self._shas, PTTL_SCRIPT, keys, [])
        out: list[Refusal | None] = []
        for n, (stream, _user) in enumerate(pairs):
            here, everywhere = got[2 * n], got[2 * n + 1]
            out.append(_strongest([(where, None if ms == -1 else int(ms))
                                   for where, ms in ((stream, here), (ALL_STREAMS, everywhere)) if ms != -2]))
        return out

    async def ban(self, stream: str, user: str, seconds: float | None = None) -> None:
        px = None if seconds is None else max(1, int(seconds * 1000))
        await self._redis.set(self.key(stream, user), b"1", px=px)  # a plain SET also clears a time-out's TTL

    async def unban(self, stream: str, user: str) -> None:
        await self._redis.delete(self.key(stream, user))


def redis_client(url: str, timeout_ms: int) -> Any:
    """A client for admission: every wait (pool, connect, reply) bounded by ``timeout_ms``."""
    import redis.asyncio as aioredis

    t = timeout_ms / 1000
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=t, socket_timeout=t,
                                                    socket_connect_timeout=t)
    return aioredis.Redis.from_pool(pool)


# -- what a gateway uses ----------------------------------------------------------------------


@dataclass
class AdmissionLimits:
    """What admission checks a post against; :func:`open_limits` builds it from the config."""

    limiter: RateLimiter
    sanctions: Sanctions
    precheck: MemoryRateLimiter | None = None  # with Redis: the local user/address pre-check
    sanction_memo_s: float = 0.0  # how long a gateway remembers a ban it was told about
    redis: Any = None  # the client the Redis parts share; closed by close()

    @classmethod
    def in_memory(cls, cfg: LimitsConfig, modes: StreamState | None,
                  clock: Callable[[], float] = time.monotonic) -> AdmissionLimits:
        limiter = MemoryRateLimiter(limits_from_config(cfg), modes, max_keys=cfg.local_max_keys, clock=clock)
        return cls(limiter, MemorySanctions(clock))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


def open_limits(config: Config, modes: StreamState) -> AdmissionLimits:
    """In memory on the embedded default; with Redis, shared limits behind a local pre-check."""
    cfg = config.limits
    if not config.redis.url:
        return AdmissionLimits.in_memory(cfg, modes)
    limits = limits_from_config(cfg)
    client = redis_client(config.redis.url, cfg.redis_timeout_ms)
    prefix = config.redis.channel_prefix
    local = MemoryRateLimiter([lim for lim in limits if lim.scope in ("user", "ip")], None,
                              max_keys=cfg.local_max_keys)
    return AdmissionLimits(RedisRateLimiter(client, prefix, limits), RedisSanctions(client, prefix), local,
                           SANCTION_MEMO_S, client)
