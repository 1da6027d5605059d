"""The connection registry: which gateways hold a user's connections, so a ban reaches them all.

Each gateway keeps, in memory, the connections of its signed-in viewers by user
(user -> {connection id: (stream, encoding)}; anonymous viewers cost nothing here), and mirrors how many
each user has into Redis (DESIGN.md 4)::

    <prefix>conn:user:<user>   hash   field: gateway instance id   value: open connections

A change marks the user dirty; every ``FLUSH_INTERVAL_S`` the gateway writes its dirty
users in one pipeline (``HSET`` of the count and ``EXPIRE`` of the key, or ``HDEL`` at 0), so
a burst of joins costs one round trip. The count is absolute, not a delta, so a lost or
repeated write corrects itself. Every ``REFRESH_INTERVAL_S`` every user with connections is
written again, which keeps the keys alive while ``TTL_S`` lets a crashed gateway's entries
vanish on their own. A stopping gateway removes its fields.

A moderator's ban looks up the user's hash, and tells each gateway named there through its
control channel (gateway/modapi.py) to close that user's connections. The gateway's instance
id is its node id and a random suffix, so a restarted gateway never inherits stale fields.
On the embedded default there is one gateway and no Redis: the lookup names this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

__all__ = ["FLUSH_INTERVAL_S", "REFRESH_INTERVAL_S", "TTL_S", "ConnectionRegistry"]

log = logging.getLogger("chorus.registry")

FLUSH_INTERVAL_S = 0.1  # how often dirty users are written
REFRESH_INTERVAL_S = 30.0  # how often every connected user's entry is written again
TTL_S = 90  # a registry key outlives its last refresh by this much
CHUNK = 1000  # users per pipeline


class ConnectionRegistry:
    def __init__(self, instance: str, redis: Any = None, prefix: str = "chorus:") -> None:
        self.instance = instance
        self._redis = redis
        self._prefix = prefix
        self._by_user: dict[str, dict[int, tuple[str, bool]]] = {}  # user -> {conn: (stream, msgpack?)}
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # pipelines written
        self.failures = 0

    def key(self, user: str) -> str:
        return f"{self._prefix}conn:user:{user}"

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

    # -- the shared registry ------------------------------------------------------------------
    async def gateways(self, user: str) -> list[str]:
        """The instances holding connections of ``user`` (this one only, without Redis)."""
        if self._redis is None:
            return [self.instance] if user in self._by_user else []
        found = await self._redis.hgetall(self.key(user))
        out = []
        for field, count in found.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            if int(count) > 0:
                out.append(name)
        return out

    async def flush(self, users: set[str] | None = None) -> None:
        """Write the counts of ``users`` (default: the dirty ones) in pipelines."""
        if self._redis is None:
            self._dirty.clear()
            return
        todo = list(users if users is not None else self._dirty)
        if users is None:
            self._dirty.clear()
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i : i + CHUNK]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user in chunk:
                        count = len(self._by_user.get(user, ()))
                        if count:
                            pipe.hset(self.key(user), self.instance, count)
                            pipe.expire(self.key(user), TTL_S)
                        else:
                            pipe.hdel(self.key(user), self.instance)
                    await pipe.execute()
                self.writes += 1
            except Exception as exc:  # written again on the next flush
                self.failures += 1
                self._dirty.update(chunk)
                log.warning("connection registry: writing %d users failed: %s", len(chunk), exc)

    async def _run(self) -> None:
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if time.monotonic() - refreshed >= REFRESH_INTERVAL_S:
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
