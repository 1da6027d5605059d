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
from dataclasses import dataclass, field
from typing import Any, Protocol

from chorus.broker import StreamState
from chorus.codes import ErrorCode
from chorus.config import Config, LimitsConfig
from chorus.errors import Unavailable
from chorus.redisconn import SlotScript, group_by_slot, is_cluster, is_cluster_url, open_redis

__all__ = [
    "ADMIT_MANY_SCRIPT",
    "ADMIT_PART_SCRIPT",
    "ALL_STREAMS",
    "AdmissionLimits",
    "BackendUnavailable",
    "ClusterRateLimiter",
    "Decision",
    "GlobalBudget",
    "Limit",
    "MemoryRateLimiter",
    "MemorySanctions",
    "NonceKeys",
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


class BackendUnavailable(Unavailable):
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
    nonce: str = ""  # the post's retry key (ingest/admission.py), "" without a nonce

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

# Admission of a batch of posts in one EVALSHA, one post after the other (each sees what the
# ones before it took), all on one reading of Redis's clock: per post its sanctions (bans and
# time-outs), whether its author is shadow-banned, and the rate limits and slow mode. The
# script builds every key from the posts' fields, so a post costs the client four short
# arguments to pack; and a batch costs one call, where three (sanctions, shadow-bans, limits)
# had been most of a busy gateway's Redis cost. Redis Cluster: a post's keys live in
# different hash slots (the user's, the address's, the stream's, the global one) and are not
# declared, so limits need a single-node Redis (or one shard set aside for them).
#
# The same call remembers each post's retry key (its nonce, ingest/admission.py): a key already
# there is a repeat, which takes no limit and gets back what the key holds ("<id> <state>"); a
# new post that passes sets it (SET PX window, state "p": in flight), so a retry is idempotent
# for the price of one GET and one SET in a call the post makes anyway.
#
# ARGV[1]: the key prefix of limits and modes; ARGV[2]: the prefix of ban keys ("" checks no
# sanctions); ARGV[3]: the prefix of shadow-ban keys ("" checks none); ARGV[4]: L configured
# limits, then per limit its scope ("user", "ip", "stream", "global"), emission interval and
# window (µs); then the prefix of retry keys ("" remembers none) and their window (ms); then
# m posts, then per post its user, address ("" skips the address limit), stream, "1" if slow
# mode applies to it, its retry key ("" none) and the id it gets if admitted.
# Keys: <ban prefix><stream>:<user> and <ban prefix>*:<user> (PTTL: -2 none, -1 a ban, else
# the ms left of a time-out), <shadow prefix><user>, <prefix>rl:<scope>:<id> (GCRA),
# <prefix>mode:<stream> (slow_mode_seconds), <prefix>slow:<stream>:<user> (the slot),
# <nonce prefix><retry key>.
# Returns 7 values per post: the two PTTLs, the limit verdict {i, wait_us, s} ({0, 0, s}
# when taken; i in 1..L names the limit, L+1 slow mode; s the stream's slow mode in seconds;
# a sanctioned post or a repeat takes nothing and its verdict is {0, 0, 0}), 1 if
# shadow-banned, and what its retry key held ("" for a new post).
ADMIT_MANY_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local prefix, banp, shadowp = ARGV[1], ARGV[2], ARGV[3]
local nlim = tonumber(ARGV[4])
local scopes, emission, window = {}, {}, {}
for i = 1, nlim do
  scopes[i] = ARGV[3 * i + 2]
  emission[i] = tonumber(ARGV[3 * i + 3])
  window[i] = tonumber(ARGV[3 * i + 4])
end
-- A key's TAT is read once per call and written once at the end: the posts of a batch share
-- their stream's, the global and often an address's key (the same result as GET/SET each time).
local tats, dirty = {}, {}
local function tat_of(key)
  local v = tats[key]
  if v == nil then
    v = tonumber(redis.call('GET', key) or 0) or 0
    tats[key] = v
  end
  return v
end
local modes = {}
local function slow_mode_of(stream)
  local v = modes[stream]
  if v == nil then
    v = math.floor(tonumber(redis.call('HGET', prefix .. 'mode:' .. stream, 'slow_mode_seconds') or 0) or 0)
    modes[stream] = v
  end
  return v
end
local a = 3 * nlim + 5
local noncep, nonce_ms = ARGV[a], ARGV[a + 1]
a = a + 2
local out = {}
for _ = 1, tonumber(ARGV[a]) do
  local user, ip, stream, slow = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local nkey, cid = ARGV[a + 5], ARGV[a + 6]
  a = a + 6
  local seen = ''
  if noncep ~= '' and nkey ~= '' then nkey = noncep .. nkey else nkey = nil end
  local here, everywhere, shadow = -2, -2, 0
  if banp ~= '' or shadowp ~= '' then
    local keys = {}
    if banp ~= '' then keys = {banp .. stream .. ':' .. user, banp .. '*:' .. user} end
    if shadowp ~= '' then keys[#keys + 1] = shadowp .. user end
    local got = redis.call('MGET', unpack(keys))
    if banp ~= '' then
      if got[1] then here = redis.call('PTTL', keys[1]) end
      if got[2] then everywhere = redis.call('PTTL', keys[2]) end
    end
    if shadowp ~= '' and got[#keys] then shadow = 1 end
  end
  local worst, worst_wait, slow_s = 0, 0, 0
  if nkey and here == -2 and everywhere == -2 then seen = redis.call('GET', nkey) or '' end
  if here == -2 and everywhere == -2 and seen == '' then
    local keys, new = {}, {}
    for i = 1, nlim do
      local id = nil
      if scopes[i] == 'user' then id = user
      elseif scopes[i] == 'ip' then if ip ~= '' then id = ip end
      elseif scopes[i] == 'stream' then id = stream
      else id = '' end
      if id ~= nil then
        local key = prefix .. 'rl:' .. scopes[i] .. ':' .. id
        local tat = tat_of(key)
        if tat < now then tat = now end
        tat = tat + emission[i]
        local wait = tat - window[i] - now
        if wait > worst_wait then worst, worst_wait = i, wait end
        keys[#keys + 1] = key
        new[#new + 1] = tat
      end
    end
    local slot = prefix .. 'slow:' .. stream .. ':' .. user
    if slow == '1' then
      slow_s = slow_mode_of(stream)
      if slow_s > 0 then
        local left_us = redis.call('PTTL', slot) * 1000
        if left_us > 0 and left_us >= worst_wait then worst, worst_wait = nlim + 1, left_us end
      end
    end
    if worst == 0 then
      for j = 1, #keys do
        tats[keys[j]] = new[j]
        dirty[keys[j]] = true
      end
      if slow_s > 0 then redis.call('SET', slot, '1', 'NX', 'PX', slow_s * 1000) end
      if nkey then redis.call('SET', nkey, cid .. ' p', 'PX', nonce_ms) end
    end
  end
  out[#out + 1] = here
  out[#out + 1] = everywhere
  out[#out + 1] = worst
  out[#out + 1] = worst_wait
  out[#out + 1] = slow_s
  out[#out + 1] = shadow
  out[#out + 1] = seen
end
for key in pairs(dirty) do
  redis.call('SET', key, string.format('%.0f', tats[key]), 'PX', math.ceil((tats[key] - now) / 1000))
end
return out
"""

# What became of posts whose retry keys ADMIT_MANY_SCRIPT set: ARGV[1] the window (ms), then
# per post its key, id and outcome: "a" acked (kept for the window from now), "u" unconfirmed
# (kept, a retry appends the same record again), "x" not taken (the key goes: a retry is a new
# post). "u" and "x" change only a key still in flight with that id, never one acked meanwhile.
NONCE_OUTCOMES_SCRIPT = """
local window = ARGV[1]
for i = 2, #ARGV, 3 do
  local key, cid, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if outcome == 'a' then
    redis.call('SET', key, cid .. ' a', 'PX', window)
  elseif redis.call('GET', key) == cid .. ' p' then
    if outcome == 'u' then redis.call('SET', key, cid .. ' u', 'KEEPTTL') else redis.call('DEL', key) end
  end
end
return 0
"""


_OUTCOMES_PER_SLOT = SlotScript(NONCE_OUTCOMES_SCRIPT)  # a cluster's retry keys, per user slot


class _Script:
    """A Lua script run by its hash (EVALSHA): loaded (SCRIPT LOAD) on first use, and again
    after a Redis restart or SCRIPT FLUSH (the server answers NOSCRIPT). Counts its calls."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None
        self.round_trips = 0

    async def run(self, redis: Any, args: list[Any], keys: Sequence[str] = ()) -> Any:
        """``keys``: on a cluster the call goes to their slot's master (the scripts build the
        rest of their keys, all in that slot, from ``args``)."""
        from redis.exceptions import NoScriptError

        try:
            if self.sha is None:
                await self._load(redis)
            try:
                self.round_trips += 1
                return await redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._load(redis)
                self.round_trips += 1
                return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except _redis_errors() as exc:
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc

    async def _load(self, redis: Any) -> None:
        self.round_trips += 1
        self.sha = await redis.script_load(self.source)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class NonceKeys:
    """Where retry keys live in Redis and how long (``limits.nonce_window_s``)."""

    prefix: str
    window_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Redis's verdict on one post in :meth:`RedisRateLimiter.decide_many`."""

    sanction: Refusal | None  # banned or timed out (then no limit was taken)
    limit: Refusal | None  # over a rate limit or in its slow-mode slot
    shadowed: bool  # the author is shadow-banned (asked only when a shadow prefix is given)
    seen: tuple[str, str] | None = None  # a repeat: (the first post's id, its state "p", "u" or "a")


class RedisRateLimiter:
    """The four limits and slow mode, shared by every gateway: :data:`ADMIT_MANY_SCRIPT`, one
    EVALSHA for a batch of posts (a single post is a batch of one); :meth:`decide_many` also
    checks sanctions and shadow-bans in the same call."""

    def __init__(self, redis: Any, prefix: str, limits: Sequence[Limit]) -> None:
        self._redis = redis
        self._prefix = prefix
        self.limits = tuple(limits)
        self._script = _Script(ADMIT_MANY_SCRIPT)
        # The configured limits, as every call passes them after the three prefixes.
        self._limit_args: list[Any] = [len(self.limits)]
        for lim in self.limits:
            self._limit_args += [lim.scope, lim.emission_us, lim.window_us]

    @property
    def round_trips(self) -> int:
        return self._script.round_trips

    def _verdict(self, which: int, wait_us: int, slow_mode_s: int) -> Refusal | None:
        if which == 0:
            return None
        if which == len(self.limits) + 1:
            return slow_mode_refusal(slow_mode_s, wait_us)
        return rate_refusal(self.limits[which - 1], wait_us)

    async def acquire(self, poster: Poster) -> Refusal | None:
        (verdict,) = await self.acquire_many([poster])
        return verdict

    async def acquire_many(self, posters: Sequence[Poster]) -> list[Refusal | None]:
        """:meth:`acquire` for each poster, in order, in one round trip.

        The same verdicts as one call each: a post refused costs no budget, and each post
        sees what the ones before it took.
        """
        return [d.limit for d in await self.decide_many(posters)]

    async def decide_many(self, posters: Sequence[Poster], ban_prefix: str = "", shadow_prefix: str = "",
                          nonces: NonceKeys | None = None, ids: Sequence[str] = ()) -> list[Decision]:
        """Per poster, in order and in one round trip: its sanctions (keys under ``ban_prefix``,
        :class:`RedisSanctions`; "" checks none), then whether it repeats a post (its ``nonce``
        under ``nonces``, which an admitted post sets to its id from ``ids``), then the limits
        (all or nothing, none taken by a sanctioned post or a repeat), and whether its author is
        shadow-banned (keys under ``shadow_prefix``)."""
        if not posters:
            return []
        args = [self._prefix, ban_prefix, shadow_prefix, *self._limit_args,
                nonces.prefix if nonces else "", nonces.window_ms if nonces else 0, len(posters)]
        for n, p in enumerate(posters):
            args += (p.user, p.ip, p.stream, "0" if p.slow_mode_exempt else "1", p.nonce, ids[n] if ids else "")
        flat = await self._script.run(self._redis, args)
        out = []
        for n, p in enumerate(posters):
            here, everywhere, which, wait_us, slow_s, shadow = (int(x) for x in flat[7 * n : 7 * n + 6])
            found = [(where, None if ms == -1 else ms) for where, ms in ((p.stream, here), (ALL_STREAMS, everywhere))
                     if ms != -2]
            seen = flat[7 * n + 6]
            first = seen.decode().split(" ") if seen else None
            out.append(Decision(_strongest(found), self._verdict(which, wait_us, slow_s), shadow == 1,
                                (first[0], first[1]) if first and len(first) == 2 else None))
        return out


class RedisSanctions:
    """Bans in Redis keys ``<prefix>ban:<stream>:<user>``: no expiry for a ban, PX for a time-out.

    A user id holding ``:`` could make two (stream, user) pairs share a key only with a
    stream id holding ``:`` too; ids from one issuer do not mix so.
    """

    def __init__(self, redis: Any, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._cluster = is_cluster(redis)
        self.round_trips = 0

    @property
    def key_prefix(self) -> str:
        """What every ban key starts with (the admission script builds them from it)."""
        return f"{self._prefix}ban:"

    def key(self, stream: str, user: str) -> str:
        """On a cluster a stream's ban is in the stream's slot and a ban from every stream in
        the user's: where admission checks that stream's and that user's limits."""
        if not self._cluster:
            return f"{self.key_prefix}{stream}:{user}"
        if stream == ALL_STREAMS:
            return f"{self.key_prefix}{ALL_STREAMS}:{{{user}}}"
        return f"{self.key_prefix}{{{stream}}}:{user}"

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

    async def ban(self, stream: str, user: str, seconds: float | None = None) -> None:
        px = None if seconds is None else max(1, int(seconds * 1000))
        await self._redis.set(self.key(stream, user), b"1", px=px)  # a plain SET also clears a time-out's TTL

    async def unban(self, stream: str, user: str) -> None:
        await self._redis.delete(self.key(stream, user))


def redis_client(url: str, timeout_ms: int) -> Any:
    """A client for admission: every wait (pool, connect, reply) bounded by ``timeout_ms``.

    A ``redis+cluster://`` URL gives a cluster client (chorus/redisconn.py): a pool per master,
    each command sent to its key's slot's master."""
    import redis.asyncio as aioredis

    t = timeout_ms / 1000
    if is_cluster_url(url):
        return open_redis(url, timeout_s=t)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=t, socket_timeout=t,
                                                    socket_connect_timeout=t)
    return aioredis.Redis.from_pool(pool)


# -- Redis Cluster ---------------------------------------------------------------------------
#
# On a cluster a post's keys live in three slots: its stream's ({<stream>}: the stream limit,
# slow mode and its slot, the stream's bans), its author's ({<user>}: the user limit, the ban
# from every stream, the shadow-ban, the retry key) and its address's ({<ip>}: the address
# limit). :data:`ADMIT_PART_SCRIPT` does one slot's part of every post of a batch that has a
# part there, in order, on that node's clock; the parts of a batch go in one pipeline, which
# the client sends as one round trip per master, in parallel. The global limit has no slot of
# its own to hit per post: each gateway leases cells of it in chunks (:class:`GlobalBudget`).
#
# All or nothing holds within each slot's part. Across slots a post is taken then given back:
# a post refused, sanctioned or repeated in one part has what its other parts took returned
# by :data:`REFUND_SCRIPT` (a second round trip, only for a batch with such a post). Until
# then another post may see those cells taken: the cluster can refuse a little early, never
# admit past a limit.
#
# ARGV[1]: the retry keys' window (ms); ARGV[2]: m posts; then per post: "1" to take ("0" only
# reads: the post was refused already), its ban key ("" none), shadow-ban key ("" none),
# retry key ("" none), the id it gets, slow-mode slot key and mode key ("" none), n limits,
# then per limit its key, emission interval and window (µs) and its index in the configured
# limits. Returns 7 values per post: the ban key's PTTL (-2 none), the limit verdict
# {i, wait_us} (0 taken; -1 slow mode), the stream's slow mode (s), 1 if shadow-banned, what
# the retry key held ("" new), and 1 if this part took its cells.
ADMIT_PART_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nonce_ms = ARGV[1]
local tats, dirty = {}, {}
local function tat_of(key)
  local v = tats[key]
  if v == nil then
    v = tonumber(redis.call('GET', key) or 0) or 0
    tats[key] = v
  end
  return v
end
local a = 3
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local take, bkey, skey, nkey, cid = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local slot, mkey, n = ARGV[a + 5], ARGV[a + 6], tonumber(ARGV[a + 7])
  a = a + 8
  local ban, shadow, seen, worst, worst_wait, slow_s, taken = -2, 0, '', 0, 0, 0, 0
  if bkey ~= '' and redis.call('EXISTS', bkey) == 1 then ban = redis.call('PTTL', bkey) end
  if skey ~= '' and redis.call('EXISTS', skey) == 1 then shadow = 1 end
  if ban == -2 and nkey ~= '' then seen = redis.call('GET', nkey) or '' end
  local keys, new = {}, {}
  for j = 1, n do
    local key, emission, window, idx = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    a = a + 4
    local tat = tat_of(key)
    if tat < now then tat = now end
    tat = tat + emission
    local wait = tat - window - now
    if wait > worst_wait then worst, worst_wait = idx, wait end
    keys[j] = key
    new[j] = tat
  end
  if ban == -2 and seen == '' and mkey ~= '' then
    slow_s = math.floor(tonumber(redis.call('HGET', mkey, 'slow_mode_seconds') or 0) or 0)
    if slow_s > 0 then
      local left_us = redis.call('PTTL', slot) * 1000
      if left_us > 0 and left_us >= worst_wait then worst, worst_wait = -1, left_us end
    end
  end
  if take == '1' and ban == -2 and seen == '' and worst == 0 then
    for j = 1, #keys do
      tats[keys[j]] = new[j]
      dirty[keys[j]] = true
    end
    if slow_s > 0 then redis.call('SET', slot, '1', 'NX', 'PX', slow_s * 1000) end
    if nkey ~= '' then redis.call('SET', nkey, cid .. ' p', 'PX', nonce_ms) end
    taken = 1
  end
  out[#out + 1] = ban
  out[#out + 1] = worst
  out[#out + 1] = worst_wait
  out[#out + 1] = slow_s
  out[#out + 1] = shadow
  out[#out + 1] = seen
  out[#out + 1] = taken
end
for key in pairs(dirty) do
  redis.call('SET', key, string.format('%.0f', tats[key]), 'PX', math.ceil((tats[key] - now) / 1000))
end
return out
"""

# Give back what a post's part took (one slot): ARGV per item: "t" and a GCRA key and its
# emission interval (the TAT goes back by it; a TAT now past means no key), "s" and a slow-mode
# slot key (deleted: the post had set it), "n", a retry key and the id (deleted if still that
# post's, in flight).
REFUND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #ARGV, 3 do
  local kind, key, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if kind == 't' then
    local tat = (tonumber(redis.call('GET', key) or 0) or 0) - tonumber(value)
    if tat <= now then redis.call('DEL', key)
    else redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000)) end
  elseif kind == 's' then
    redis.call('DEL', key)
  elseif redis.call('GET', key) == value .. ' p' then
    redis.call('DEL', key)
  end
end
return 0
"""

# Lease up to ARGV[1] cells of one GCRA key (KEYS[1]) at once: as many as fit in its window
# now. ARGV[2], ARGV[3]: emission interval and window (µs). Returns {cells, wait_us}: the
# cells leased (0: none fit) and, for 0, how long until one does.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want, emission, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local fit = math.floor((window - (tat - now)) / emission)
if fit < 1 then return {0, tat + emission - window - now} end
local n = math.min(want, fit)
tat = tat + n * emission
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return {n, 0}
"""

GLOBAL_LEASE_S = 1.0  # leased global cells unused after this long are dropped (they were counted)
GLOBAL_LEASE_SHARE = 200  # a lease takes 1/200 of the global limit per second (100,000/s: 500 cells)


class GlobalBudget:
    """A gateway's cells of the global limit, leased from Redis in chunks (:data:`LEASE_SCRIPT`).

    The global limit's key would take every post of the deployment on one master; leased in
    chunks of ``count / GLOBAL_LEASE_SHARE`` it costs one call per chunk per gateway. Cells not
    used within ``GLOBAL_LEASE_S`` are dropped: the deployment then takes somewhat fewer than the
    limit, never more. A post refused later gives its cell back to this gateway.
    """

    def __init__(self, redis: Any, key: str, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self.key = key
        self.limit = limit
        self.chunk = max(1, limit.count // GLOBAL_LEASE_SHARE)
        self._clock = clock
        self._cells = 0
        self._until = 0.0
        self._lock = asyncio.Lock()
        self._script = _Script(LEASE_SCRIPT)
        self.leases = 0

    async def take(self, n: int) -> tuple[int, int]:
        """Up to ``n`` cells: (how many, wait in µs before another is free when fewer than ``n``)."""
        async with self._lock:
            if self._clock() >= self._until:
                self._cells = 0
            wait = 0
            if self._cells < n:
                got, wait = await self._lease(max(self.chunk, n - self._cells))
                self._cells += got
                self._until = self._clock() + GLOBAL_LEASE_S
            given = min(n, self._cells)
            self._cells -= given
            return given, wait

    def give_back(self, n: int) -> None:
        if n > 0 and self._clock() < self._until:
            self._cells += n

    async def _lease(self, want: int) -> tuple[int, int]:
        self.leases += 1
        got, wait = await self._script.run(self._redis, [want, self.limit.emission_us, self.limit.window_us],
                                           keys=[self.key])
        return int(got), int(wait)


@dataclass
class _Part:
    """One post's part in one slot: what the script reads and takes there."""

    post: int
    slot_key: str  # any key of the part: the cluster client routes the call by it
    ban: str = ""
    ban_where: str = ""  # the stream the ban key is about (ALL_STREAMS: every stream)
    shadow: str = ""
    nonce: str = ""
    slow: str = ""
    mode: str = ""
    limits: list[tuple[str, Limit, int]] = field(default_factory=list)  # (key, limit, index 1..L)


class ClusterRateLimiter(RedisRateLimiter):
    """:class:`RedisRateLimiter` on a Redis Cluster: each post split into its stream's, user's
    and address's parts (see the comment above :data:`ADMIT_PART_SCRIPT`), the global limit
    from a :class:`GlobalBudget`."""

    def __init__(self, redis: Any, prefix: str, limits: Sequence[Limit]) -> None:
        super().__init__(redis, prefix, limits)
        self._parts = SlotScript(ADMIT_PART_SCRIPT)
        self._refunds = SlotScript(REFUND_SCRIPT)
        glob = next((lim for lim in self.limits if lim.scope == "global"), None)
        self.budget = GlobalBudget(redis, f"{prefix}rl:global", glob) if glob is not None else None
        self._nonce_users: dict[str, str] = {}  # retry key -> its user, for record_outcomes' slots
        self.refunded = 0  # posts whose other parts were given back

    @property
    def round_trips(self) -> int:
        return self._parts.round_trips + self._refunds.round_trips + (self.budget.leases if self.budget else 0)

    def limit_key(self, scope: str, ident: str) -> str:
        return f"{self._prefix}rl:{scope}:{{{ident}}}"

    def nonce_key(self, nonces: NonceKeys, user: str, key: str) -> str:
        return f"{nonces.prefix}{{{user}}}:{key}"

    def nonce_key_of(self, nonces: NonceKeys, key: str) -> str | None:
        """The retry key's name in Redis, from the user remembered when it was set."""
        user = self._nonce_users.pop(key, None)
        return None if user is None else self.nonce_key(nonces, user, key)

    def _remember_nonce(self, key: str, user: str) -> None:
        self._nonce_users[key] = user
        while len(self._nonce_users) > 100_000:  # outcomes come within seconds; a lost one expires
            del self._nonce_users[next(iter(self._nonce_users))]

    def _parts_of(self, n: int, p: Poster, ban_prefix: str, shadow_prefix: str,
                  nonces: NonceKeys | None) -> list[_Part]:
        p_ = self._prefix
        stream = _Part(n, f"{p_}mode:{{{p.stream}}}")
        user = _Part(n, self.limit_key("user", p.user))
        ip = _Part(n, self.limit_key("ip", p.ip)) if p.ip else None
        if ban_prefix:
            stream.ban, user.ban = f"{ban_prefix}{{{p.stream}}}:{p.user}", f"{ban_prefix}*:{{{p.user}}}"
            stream.ban_where, user.ban_where = p.stream, ALL_STREAMS
        if shadow_prefix:
            user.shadow = f"{shadow_prefix}{{{p.user}}}"
        if nonces is not None and p.nonce:
            user.nonce = self.nonce_key(nonces, p.user, p.nonce)
        if not p.slow_mode_exempt:
            stream.slow, stream.mode = f"{p_}slow:{{{p.stream}}}:{p.user}", f"{p_}mode:{{{p.stream}}}"
        for i, lim in enumerate(self.limits, 1):
            if lim.scope == "stream":
                stream.limits.append((self.limit_key("stream", p.stream), lim, i))
            elif lim.scope == "user":
                user.limits.append((self.limit_key("user", p.user), lim, i))
            elif lim.scope == "ip" and ip is not None:
                ip.limits.append((self.limit_key("ip", p.ip), lim, i))
        return [stream, user] + ([ip] if ip is not None and ip.limits else [])

    @staticmethod
    def _args(part: _Part, take: bool, cid: str) -> list[Any]:
        args: list[Any] = ["1" if take else "0", part.ban, part.shadow, part.nonce, cid, part.slow, part.mode,
                           len(part.limits)]
        for key, lim, i in part.limits:
            args += (key, lim.emission_us, lim.window_us, i)
        return args

    async def decide_many(self, posters: Sequence[Poster], ban_prefix: str = "", shadow_prefix: str = "",
                          nonces: NonceKeys | None = None, ids: Sequence[str] = ()) -> list[Decision]:
        if not posters:
            return []
        granted, global_wait = len(posters), 0
        if self.budget is not None:
            granted, global_wait = await self._take_global(len(posters))
        parts = [part for n, p in enumerate(posters)
                 for part in self._parts_of(n, p, ban_prefix, shadow_prefix, nonces)]
        by_slot = group_by_slot(self._redis, [part.slot_key for part in parts])
        window = nonces.window_ms if nonces else 0
        calls: list[tuple[list[str], list[Any]]] = []
        for indexes in by_slot.values():
            args: list[Any] = [window, len(indexes)]
            for i in indexes:
                args += self._args(parts[i], parts[i].post < granted, ids[parts[i].post] if ids else "")
            calls.append(([parts[indexes[0]].slot_key], args))
        try:
            replies = await self._parts.run_many(self._redis, calls)
        except _redis_errors() as exc:
            if self.budget is not None:
                self.budget.give_back(granted)
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc
        answers: dict[int, list[Any]] = {}
        for indexes, flat in zip(by_slot.values(), replies, strict=True):
            for k, i in enumerate(indexes):
                answers[i] = flat[7 * k : 7 * k + 7]
        decisions = self._combine(posters, parts, answers, granted, global_wait)
        await self._give_back(posters, parts, answers, decisions, granted, ids)
        return decisions

    async def _take_global(self, n: int) -> tuple[int, int]:
        assert self.budget is not None
        try:
            return await self.budget.take(n)
        except BackendUnavailable:
            raise
        except _redis_errors() as exc:
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc

    def _combine(self, posters: Sequence[Poster], parts: list[_Part], answers: dict[int, list[Any]],
                 granted: int, global_wait: int) -> list[Decision]:
        found: list[list[tuple[str, int | None]]] = [[] for _ in posters]
        worst: list[tuple[int, int, int]] = [(0, 0, 0)] * len(posters)  # (wait, which, slow_s)
        shadowed = [False] * len(posters)
        seen: list[tuple[str, str] | None] = [None] * len(posters)
        glob = next((i for i, lim in enumerate(self.limits, 1) if lim.scope == "global"), 0)
        for n in range(granted, len(posters)):
            worst[n] = (max(1, global_wait), glob, 0)
        for i, part in enumerate(parts):
            ban, which, wait, slow_s, shadow, held, _taken = answers[i]
            n, ban, which, wait = part.post, int(ban), int(which), int(wait)
            if ban != -2:
                found[n].append((part.ban_where, None if ban == -1 else ban))
            if which != 0 and (wait > worst[n][0] or (which == -1 and wait >= worst[n][0])):
                worst[n] = (wait, which, int(slow_s))
            shadowed[n] = shadowed[n] or int(shadow) == 1
            if held:
                first = held.decode().split(" ")
                seen[n] = (first[0], first[1]) if len(first) == 2 else None
        out = []
        for n in range(len(posters)):
            wait, which, slow_s = worst[n]
            if found[n] or seen[n] is not None:
                which = 0  # as on one node: a sanctioned post or a repeat has no limit verdict
            verdict = None if which == 0 else (slow_mode_refusal(slow_s, wait) if which == -1
                                              else rate_refusal(self.limits[which - 1], wait))
            out.append(Decision(_strongest(found[n]), verdict, shadowed[n], seen[n]))
        return out

    async def _give_back(self, posters: Sequence[Poster], parts: list[_Part], answers: dict[int, list[Any]],
                         decisions: list[Decision], granted: int, ids: Sequence[str]) -> None:
        """Return what the parts of a post that did not pass took, and its global cell."""
        passed = [d.sanction is None and d.limit is None and d.seen is None for d in decisions]
        if self.budget is not None:
            self.budget.give_back(sum(1 for n in range(granted) if not passed[n]))
        refunds: dict[int, list[Any]] = {}
        by_key: dict[int, str] = {}
        for i, part in enumerate(parts):
            if passed[part.post] or not int(answers[i][6]):
                if passed[part.post] and part.nonce:
                    self._remember_nonce(posters[part.post].nonce, posters[part.post].user)
                continue
            items = refunds.setdefault(i, [])
            items += [x for key, lim, _ in part.limits for x in ("t", key, lim.emission_us)]
            if part.slow and int(answers[i][3]) > 0:
                items += ["s", part.slow, ""]
            if part.nonce:
                items += ["n", part.nonce, ids[part.post] if ids else ""]
            by_key[i] = part.slot_key
        if not refunds:
            return
        self.refunded += len({parts[i].post for i in refunds})
        groups = group_by_slot(self._redis, [by_key[i] for i in refunds])
        order = list(refunds)
        calls = [([by_key[order[g[0]]]], [x for k in g for x in refunds[order[k]]]) for g in groups.values()]
        try:
            await self._refunds.run_many(self._redis, calls)
        except _redis_errors() as exc:  # what was taken expires with its window
            log.warning("could not give back the limits of %d refused posts: %s", len(refunds), exc)

# -- what a gateway uses ----------------------------------------------------------------------


@dataclass
class AdmissionLimits:
    """What admission checks a post against; :func:`open_limits` builds it from the config."""

    limiter: RateLimiter
    sanctions: Sanctions
    precheck: MemoryRateLimiter | None = None  # with Redis: the local user/address pre-check
    sanction_memo_s: float = 0.0  # how long a gateway remembers a ban it was told about
    redis: Any = None  # the client the Redis parts share; closed by close()
    shadow_prefix: str = ""  # with Redis: what shadow-ban keys start with (ingest/reputation.py)
    nonces: NonceKeys | None = None  # with Redis: retry keys shared by every gateway (None: off)
    retry_window_s: float = 600.0  # how long a post with a nonce is remembered for its retries (0: not)
    _outcomes: _Script | None = field(default=None, repr=False)

    @property
    def one_call(self) -> bool:
        """Sanctions, shadow-bans and limits are all in Redis: :meth:`decide_many` asks at once."""
        return isinstance(self.limiter, RedisRateLimiter) and isinstance(self.sanctions, RedisSanctions)

    async def decide_many(self, posters: Sequence[Poster], shadows: bool, ids: Sequence[str] = ()) -> list[Decision]:
        """A batch's sanctions, repeats, limits and (if ``shadows``) shadow-bans in one Redis call;
        only when :attr:`one_call`. ``ids``: per post the id it gets if admitted."""
        assert isinstance(self.limiter, RedisRateLimiter) and isinstance(self.sanctions, RedisSanctions)
        return await self.limiter.decide_many(posters, self.sanctions.key_prefix,
                                              self.shadow_prefix if shadows else "", self.nonces, ids)

    async def record_outcomes(self, outcomes: Sequence[tuple[str, str, str]]) -> None:
        """Per (retry key, id, "a" | "u" | "x"): what became of posts :meth:`decide_many` let in
        (:data:`NONCE_OUTCOMES_SCRIPT`); one call for the lot. Raises :class:`BackendUnavailable`."""
        if not outcomes or self.nonces is None or self.redis is None:
            return
        if isinstance(self.limiter, ClusterRateLimiter):
            await self._record_outcomes_per_slot(self.limiter, self.nonces, outcomes)
            return
        if self._outcomes is None:
            self._outcomes = _Script(NONCE_OUTCOMES_SCRIPT)
        args: list[Any] = [self.nonces.window_ms]
        for key, cid, outcome in outcomes:
            args += (self.nonces.prefix + key, cid, outcome)
        await self._outcomes.run(self.redis, args)

    async def _record_outcomes_per_slot(self, limiter: ClusterRateLimiter, nonces: NonceKeys,
                                        outcomes: Sequence[tuple[str, str, str]]) -> None:
        """On a cluster each retry key is in its user's slot: one call per slot, one pipeline."""
        items = [(name, cid, outcome) for key, cid, outcome in outcomes
                 if (name := limiter.nonce_key_of(nonces, key)) is not None]
        if not items:
            return
        groups = group_by_slot(self.redis, [name for name, _, _ in items]).values()
        calls = [([items[g[0]][0]], [nonces.window_ms, *(x for i in g for x in items[i])]) for g in groups]
        try:
            await _OUTCOMES_PER_SLOT.run_many(self.redis, calls)
        except _redis_errors() as exc:
            raise BackendUnavailable(f"redis did not answer ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def in_memory(cls, cfg: LimitsConfig, modes: StreamState | None,
                  clock: Callable[[], float] = time.monotonic) -> AdmissionLimits:
        limiter = MemoryRateLimiter(limits_from_config(cfg), modes, max_keys=cfg.local_max_keys, clock=clock)
        return cls(limiter, MemorySanctions(clock), retry_window_s=cfg.nonce_window_s)

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
    from chorus.ingest.reputation import shadow_key

    nonces = NonceKeys(f"{prefix}nonce:", int(cfg.nonce_window_s * 1000)) if cfg.nonce_window_s > 0 else None
    limiter = (ClusterRateLimiter if is_cluster(client) else RedisRateLimiter)(client, prefix, limits)
    return AdmissionLimits(limiter, RedisSanctions(client, prefix), local,
                           SANCTION_MEMO_S, client, shadow_key(prefix, ""), nonces, cfg.nonce_window_s)
