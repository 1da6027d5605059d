"""Moderation stage 3: each user's offence score, decaying, and shadow-bans.

A confident offence adds to the author's score (an automatic delete, every one of which a
rule or the model and the context rules together decided, or a moderator's delete: 1 each;
a flag or a shadow adds nothing: ingest/moderator.py decides) and the score halves every
``offence_half_life_s``::

    score(now) = score(then) * 2 ** (-(now - then) / half_life) + added

so a user who offended often lately is a repeat offender (score at or above
``moderation.repeat_offender_at``) and one who stopped becomes an ordinary user again
without anyone resetting anything. A moderator who restores a wrongly deleted comment takes
its offence back (a negative weight; a score never goes below 0). A repeat offender's
borderline comment gets the author
shadow-banned for ``moderation.shadow_ban_s``: a key that admission reads (ingest/limits.py
checks it with the bans, in the same Redis round trip) so later comments are marked
``shadow`` in the log and reach no one but their author.

Two implementations behind :class:`Reputation`: in process memory (the embedded default) and
Redis, where a hash ``<prefix>rep:<user>`` holds (score, updated ms) and one Lua script per
batch reads or updates every user of the batch on Redis's clock; keys expire once their
score has decayed to nothing (16 half-lives), so idle users cost no memory. The shadow-ban
is ``<prefix>shadow:<user>`` with an expiry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from chorus.redisconn import SlotScript, group_by_slot, is_cluster, tag

__all__ = ["MemoryReputation", "RedisReputation", "Reputation", "decayed", "shadow_key"]

FORGET_AFTER_HALF_LIVES = 16  # 2**-16 of a score is nothing: the key may go


def decayed(score: float, elapsed_s: float, half_life_s: float) -> float:
    return score * math.pow(2.0, -max(0.0, elapsed_s) / half_life_s)


def shadow_key(prefix: str, user: str, cluster: bool = False) -> str:
    """The Redis key of a user's shadow-ban, which admission checks (on a cluster in the user's slot)."""
    return f"{prefix}shadow:{tag(user, cluster)}"


class Reputation(Protocol):
    async def scores(self, users: Sequence[str]) -> dict[str, float]:
        """Each user's offence score now (0 for one never seen)."""
        ...

    async def add(self, offences: Sequence[tuple[str, float]]) -> dict[str, float]:
        """Add each (user, weight; negative takes an offence back, never below 0); the users'
        scores afterwards."""
        ...

    async def shadow_ban(self, users: Sequence[str], seconds: int) -> None: ...

    async def lift_shadow_ban(self, user: str) -> None: ...

    async def shadow_banned(self, user: str) -> bool: ...

    async def shadowed_among(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` are shadow-banned now (admission asks once per batch of posts)."""
        ...


class MemoryReputation:
    """In process memory (the embedded default): the same rules as Redis, on this clock."""

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.time) -> None:
        self.half_life_s = half_life_s
        self._clock = clock
        self._scores: dict[str, tuple[float, float]] = {}  # user -> (score, when)
        self._shadow: dict[str, float] = {}  # user -> until

    def _now(self, user: str) -> float:
        score, when = self._scores.get(user, (0.0, 0.0))
        return decayed(score, self._clock() - when, self.half_life_s)

    async def scores(self, users: Sequence[str]) -> dict[str, float]:
        return {u: self._now(u) for u in users}

    async def add(self, offences: Sequence[tuple[str, float]]) -> dict[str, float]:
        now = self._clock()
        for user, weight in offences:
            self._scores[user] = (max(0.0, self._now(user) + weight), now)
        return {u: self._scores[u][0] for u, _ in offences}

    async def shadow_ban(self, users: Sequence[str], seconds: int) -> None:
        until = self._clock() + seconds
        for user in users:
            self._shadow[user] = until

    async def lift_shadow_ban(self, user: str) -> None:
        self._shadow.pop(user, None)

    async def shadow_banned(self, user: str) -> bool:
        until = self._shadow.get(user)
        if until is not None and until <= self._clock():
            del self._shadow[user]
            return False
        return until is not None

    async def shadowed_among(self, users: Sequence[str]) -> set[str]:
        return {u for u in users if await self.shadow_banned(u)}


# KEYS: each user's hash. ARGV[1]: half-life (ms); ARGV[2]: ttl (ms); ARGV[3..]: the weight to
# add per key (0 only reads; negative takes back, never below 0). Returns each score afterwards,
# as a string (Lua numbers become integers in replies).
_UPDATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local half, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], 's', 't')
  local score = tonumber(cur[1] or 0) or 0
  local when = tonumber(cur[2] or now) or now
  local elapsed = now - when
  if elapsed < 0 then elapsed = 0 end
  score = score * math.pow(2, -elapsed / half)
  local add = tonumber(ARGV[i + 2])
  if add ~= 0 then
    score = math.max(0, score + add)
    redis.call('HSET', KEYS[i], 's', string.format('%.6f', score), 't', string.format('%d', now))
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[i] = string.format('%.6f', score)
end
return out
"""


class RedisReputation:
    """Scores and shadow-bans in Redis, shared by every moderator and read by admission."""

    def __init__(self, redis: Any, prefix: str, half_life_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self.half_life_ms = max(1, int(half_life_s * 1000))
        self._script: Any = None
        self._cluster = is_cluster(redis)  # keys in each user's slot; the script runs once per slot
        self._per_slot = SlotScript(_UPDATE)

    def key(self, user: str) -> str:
        return f"{self._prefix}rep:{tag(user, self._cluster)}"

    async def _update(self, pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
        if not pairs:
            return {}
        if self._script is None:
            self._script = self._redis.register_script(_UPDATE)
        ttl_ms = self.half_life_ms * FORGET_AFTER_HALF_LIVES
        if self._cluster:
            got = await self._update_per_slot(pairs, ttl_ms)
        else:
            got = await self._script(keys=[self.key(u) for u, _ in pairs],
                                     args=[self.half_life_ms, ttl_ms, *(repr(float(w)) for _, w in pairs)])
        out: dict[str, float] = {}
        for (user, _), value in zip(pairs, got, strict=True):
            out[user] = float(value)
        return out

    async def _update_per_slot(self, pairs: Sequence[tuple[str, float]], ttl_ms: int) -> list[Any]:
        keys = [self.key(u) for u, _ in pairs]
        groups = list(group_by_slot(self._redis, keys).values())
        calls = [([keys[i] for i in g], [self.half_life_ms, ttl_ms, *(repr(float(pairs[i][1])) for i in g)])
                 for g in groups]
        got: list[Any] = [None] * len(pairs)
        for g, values in zip(groups, await self._per_slot.run_many(self._redis, calls), strict=True):
            for i, value in zip(g, values, strict=True):
                got[i] = value
        return got

    async def scores(self, users: Sequence[str]) -> dict[str, float]:
        return await self._update([(u, 0.0) for u in dict.fromkeys(users)])

    async def add(self, offences: Sequence[tuple[str, float]]) -> dict[str, float]:
        merged: dict[str, float] = {}
        for user, weight in offences:
            merged[user] = merged.get(user, 0.0) + weight
        return await self._update(list(merged.items()))

    async def shadow_ban(self, users: Sequence[str], seconds: int) -> None:
        if not users:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.set(shadow_key(self._prefix, user, self._cluster), b"1", ex=seconds)
            await pipe.execute()

    async def lift_shadow_ban(self, user: str) -> None:
        await self._redis.delete(shadow_key(self._prefix, user, self._cluster))

    async def shadow_banned(self, user: str) -> bool:
        return bool(await self._redis.exists(shadow_key(self._prefix, user, self._cluster)))

    async def shadowed_among(self, users: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(users))
        if not unique:
            return set()
        # One MGET (the keys hold "1"), not a pipeline of EXISTS: redis-py's per-command cost
        # was a visible share of a busy gateway's admission.
        keys = [shadow_key(self._prefix, user, self._cluster) for user in unique]
        found = await (self._redis.mget_nonatomic(keys) if self._cluster else self._redis.mget(keys))
        return {u for u, value in zip(unique, found, strict=True) if value is not None}

    async def close(self) -> None:
        await self._redis.aclose()
