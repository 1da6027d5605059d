"""Who of several coordinators with the same ``coordinator.instance_id`` is the active one.

Coordinators that share an instance id share one static Kafka group identity
(``group.instance.id``): whichever joins with it takes that member's partitions at once, with
no rebalance and no wait for the dead member's session to expire. Two of them must never use it
together (each join fences the other), so they take turns through a lease in Redis: the holder
renews it every ``lease_ms / 4``; the others are hot standbys that try to take it every
``lease_ms / 10`` and start consuming as soon as they hold it. A holder SIGKILLed stops renewing
and its lease lapses after ``lease_ms``; one stopped cleanly releases it at once.

A holder that could not renew for ``lease_ms`` (Redis unreachable, or its own event loop
stalled) counts the lease as lost and steps down: a standby may hold it by then. Stepping down
costs nothing a restart would not (the next holder replays from the last commit; viewers drop
repeats by id), and while Redis is down no coordinator could publish anyway.

The lease is the key ``<prefix>coordinator-lease:<instance id>``, holding a random token of
its holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Protocol

__all__ = ["Lease", "RedisLease", "lease_key"]

log = logging.getLogger("chorus.lease")

# Renew our own lease, or take it if it lapsed meanwhile (Redis restarted empty): 1 if ours now.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}coordinator-lease:{instance_id}"


class Lease(Protocol):
    async def acquire(self) -> None:
        """Return once this process holds the lease (waiting as a standby meanwhile)."""
        ...

    async def lost(self) -> None:
        """Return once the lease held is lost (not renewed in time, or taken)."""
        ...

    async def close(self) -> None:
        """Give the lease up if held (a standby takes it at once) and let go of Redis."""
        ...


class RedisLease:
    def __init__(self, url: str, key: str, lease_ms: int = 1000) -> None:
        from chorus.redisconn import is_cluster_url, open_redis

        timeout_s = max(0.05, lease_ms / 4000)  # one renewal must not outlast its own period
        # one key: on a cluster it lives on its slot's master, and moves to the replica promoted;
        # no retries of the client's own, a renewal must not outlast its period either
        self._redis: Any = open_redis(url, timeout_s=timeout_s, retries=0 if is_cluster_url(url) else None)
        self.key = key
        self.lease_ms = lease_ms
        self.token = uuid.uuid4().hex
        self._renewed_at = 0.0  # monotonic time of the last renewal Redis confirmed
        self._renewer: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.terms = 0  # times this process took the lease

    async def acquire(self) -> None:
        poll_s = self.lease_ms / 10000
        said = ""  # what was logged last: each state once, not every poll
        while True:
            asked_at = time.monotonic()
            try:
                if await self._redis.set(self.key, self.token, nx=True, px=self.lease_ms):
                    break
                if said != "held":
                    log.info("lease %s is held by another coordinator: standing by", self.key)
                    said = "held"
            except Exception as exc:  # Redis down: nobody can take it; keep trying
                if said != "down":
                    log.warning("lease %s: redis unreachable (%s); retrying", self.key, type(exc).__name__)
                    said = "down"
            await asyncio.sleep(poll_s)
        self._renewed_at = asked_at
        self._lost.clear()
        self.terms += 1
        self._renewer = asyncio.create_task(self._renew_loop(), name="coordinator-lease")
        log.info("lease %s taken (term %d)", self.key, self.terms)

    async def _renew_loop(self) -> None:
        period_s = self.lease_ms / 4000
        while True:
            await asyncio.sleep(period_s)
            asked_at = time.monotonic()
            try:
                ours = await self._redis.eval(_RENEW, 1, self.key, self.token, self.lease_ms)
            except Exception as exc:
                ours = None
                log.warning("lease %s not renewed (%s)", self.key, type(exc).__name__)
            if ours == 1:
                self._renewed_at = asked_at
            elif ours == 0:
                self._step_down("another coordinator holds it")
                return
            # Counted from when the last confirmed renewal was asked: the key expires no earlier.
            if time.monotonic() - self._renewed_at >= self.lease_ms / 1000:
                self._step_down(f"not renewed for {self.lease_ms} ms")
                return

    def _step_down(self, why: str) -> None:
        log.warning("lease %s lost: %s; stepping down", self.key, why)
        self._lost.set()

    async def lost(self) -> None:
        await self._lost.wait()

    async def release(self) -> None:
        """Stop renewing and give the lease up (if still ours), so a standby takes it at once."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if not self._lost.is_set() and self.terms:
            try:
                await self._redis.eval(_RELEASE, 1, self.key, self.token)
            except Exception as exc:  # it lapses by itself after lease_ms
                log.warning("lease %s not released (%s)", self.key, type(exc).__name__)
        self._lost.set()

    async def close(self) -> None:
        await self.release()
        await self._redis.aclose()
