"""The connection registry: which gateways hold a user's connections, so a ban reaches them all.

Each gateway keeps, in memory, the connections of its signed-in viewers by user
(user -> {connection id: (stream, encoding)}; anonymous viewers cost nothing here), and mirrors how many
each user has into Redis (DESIGN.md 4)::

    <prefix>conn:user:<user>   hash   field: gateway instance id
                                      value: "<open connections>:<expires at, ms on Redis's clock>"

A change marks the user dirty; every ``FLUSH_INTERVAL_S`` the gateway writes its dirty
users in one script call (:data:`WRITE_SCRIPT`: the count with its expiry, and the key's
``PEXPIRE``, or ``HDEL`` at 0), so a burst of joins costs one round trip. The count is
absolute, not a delta, so a lost or repeated write corrects itself. Every third of the TTL
(``gateway.registry_ttl_s``) every user with connections is written again. A killed
gateway's entries expire on their own, each by itself: the key's TTL alone would keep a dead
gateway's field alive for as long as another gateway refreshes the same user's key, so each
field carries its expiry and a lookup (:data:`READ_SCRIPT`) skips and deletes the expired
ones. A stopping gateway removes its fields.

A moderator's ban looks up the user's hash, and tells each gateway named there through its
control channel (gateway/modapi.py) to close that user's connections. The gateway's instance
id is its node id and a random suffix, so a restarted gateway never inherits stale fields.
On the embedded default there is one gateway and no Redis: the lookup names this one.
A Redis that restarted empty lost every gateway's entries: the gateway that notices
(gateway/modapi.py, re-seeding the bans) writes all of its own again at once
(:meth:`ConnectionRegistry.rewrite_all`), not a third of the TTL later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from chorus.redisconn import SlotScript, group_by_slot, is_cluster, tag

__all__ = ["FLUSH_INTERVAL_S", "READ_SCRIPT", "TTL_S", "WRITE_SCRIPT", "ConnectionRegistry"]

log = logging.getLogger("chorus.registry")

FLUSH_INTERVAL_S = 0.1  # how often dirty users are written
TTL_S = 90.0  # default gateway.registry_ttl_s: an entry outlives its last refresh by this much
CHUNK = 1000  # users per script call

# KEYS: users' hashes. ARGV[1]: this gateway's instance id; ARGV[2]: TTL (ms); ARGV[2 + i]: the
# open connections for KEYS[i] (0: remove this gateway's field).
WRITE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS do
  local n = tonumber(ARGV[i + 2])
  if n > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], string.format('%d:%d', n, now + ttl))
    redis.call('PEXPIRE', KEYS[i], ttl)
  else
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return #KEYS
"""

# KEYS[1]: a user's hash. Returns the instances whose entry is live (a count above 0, not
# expired) and deletes the expired entries.
READ_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local n, expires = string.match(all[i + 1], '^(%d+):(%d+)$')
  if n == nil then  -- a bare count (an older gateway's): live while the key lives
    n, expires = tonumber(all[i + 1]) or 0, now
  end
  if tonumber(expires) < now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif tonumber(n) > 0 then
    out[#out + 1] = all[i]
  end
end
return out
"""


class ConnectionRegistry:
    def __init__(self, instance: str, redis: Any = None, prefix: str = "chorus:", ttl_s: float = TTL_S) -> None:
        self.instance = instance
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s
        self._write = redis.register_script(WRITE_SCRIPT) if redis is not None else None
        self._read = redis.register_script(READ_SCRIPT) if redis is not None else None
        # On a cluster a user's hash is in its slot, {<user>}: a chunk is written per slot, all in one pipeline.
        self._cluster = redis is not None and is_cluster(redis)
        self._write_per_slot = SlotScript(WRITE_SCRIPT)
        self._by_user: dict[str, dict[int, tuple[str, bool]]] = {}  # user -> {conn: (stream, msgpack?)}
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # pipelines written
        self.failures = 0

    def key(self, user: str) -> str:
        return f"{self._prefix}conn:user:{tag(user, self._cluster)}"

    # -- this gateway's connections ----------------------------------------------------------
    def add(self, user: str, conn: int, stream: str, msgpack: bool = False) -> None:
        self._by_user.setdefault(user, {})[conn] = (stream, msgpack)
        self._dirty.add(user)

    def remove(self, user: str, conn: int) -> None:
        conns = self._by_user.get(user)
        if conns is None or conns.pop(conn, None) is None:
            return
        if not conns:
            del self._by_user[user]
        self._dirty.add(user)

    def conns(self, user: str, stream: str | None = None) -> list[int]:
        """The user's connections here, on ``stream`` (None or "*": on every stream)."""
        return [c for c, _ in self.conns_with_wire(user, stream)]

    def conns_with_wire(self, user: str, stream: str | None = None) -> list[tuple[int, bool]]:
        """(connection, speaks msgpack) of the user's connections here, on ``stream`` or every one."""
        conns = self._by_user.get(user, {})
        return [(c, binary) for c, (s, binary) in conns.items() if stream in (None, "*", s)]

    def users(self) -> int:
        return len(self._by_user)

    def rewrite_all(self) -> None:
        """Write every user with connections here again on the next flush (Redis came back empty)."""
        self._dirty.update(self._by_user)

    # -- the shared registry ------------------------------------------------------------------
    async def gateways(self, user: str) -> list[str]:
        """The instances holding connections of ``user`` (this one only, without Redis)."""
        if self._read is None:
            return [self.instance] if user in self._by_user else []
        found = await self._read(keys=[self.key(user)])
        return [f.decode() if isinstance(f, bytes) else str(f) for f in found]

    async def flush(self, users: set[str] | None = None) -> None:
        """Write the counts of ``users`` (default: the dirty ones) in pipelines."""
        if self._write is None:
            self._dirty.clear()
            return
        todo = list(users if users is not None else self._dirty)
        if users is None:
            self._dirty.clear()
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i : i + CHUNK]
            try:
                await self._write_chunk(chunk)
                self.writes += 1
            except Exception as exc:  # written again on the next flush
                self.failures += 1
                self._dirty.update(chunk)
                log.warning("connection registry: writing %d users failed: %s", len(chunk), exc)

    async def _write_chunk(self, users: list[str]) -> None:
        assert self._write is not None
        counts = [len(self._by_user.get(user, ())) for user in users]
        keys = [self.key(user) for user in users]
        head = [self.instance, max(1, int(self.ttl_s * 1000))]
        if not self._cluster:
            await self._write(keys=keys, args=[*head, *counts])
            return
        groups = group_by_slot(self._redis, keys).values()
        await self._write_per_slot.run_many(self._redis, [([keys[i] for i in g], [*head, *(counts[i] for i in g)])
                                                          for g in groups])

    async def _run(self) -> None:
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if time.monotonic() - refreshed >= self.ttl_s / 3:
                refreshed = time.monotonic()
                self._dirty.update(self._by_user)
            if self._dirty:
                await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="connection-registry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gone = set(self._by_user) | self._dirty
        self._by_user.clear()
        with contextlib.suppress(Exception):
            await self.flush(gone)  # every field of this instance: HDEL
