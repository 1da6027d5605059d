"""Node ids for comment ids (chorus/ids.py): a lease in Redis per live gateway.

Two live gateways with one node id can make the same comment id, and a second comment with
an id the history already has is dropped (``INSERT OR IGNORE``, every client's
de-duplication). A counter modulo 1,024 gave that after 1,024 starts, so a gateway leases
its id instead::

    take     INCR node-seq, then from there SET node:<id> <owner> NX PX ttl over the 1,024 ids:
             the first free one is ours; an id held by nobody is free
    renew    every ttl/3: PEXPIRE while the key is still ours; a key that expired meanwhile
             (Redis was unreachable) is taken back if nobody else took it
    release  on stop: DEL if still ours

The gateway makes ids only while its lease is certainly alive: until ``LEASE_SAFETY`` of
the ttl after the last renewal it *sent* (Redis counts the ttl from when it received it),
so by the time another gateway can take the id this one has stopped using it. A gateway that
cannot renew in time, or finds its id taken, refuses posts (``not_accepted``) and says why
in the log; one that finds no free id at start refuses to start.

Each holder also writes ``node-floor:<id>``, the millisecond its ids may have reached (on
renewal: the newest id's plus the ttl it may still mint for; on release: the newest id's),
and the next holder makes ids only after it (IdGenerator ``floor_ms``): a new holder whose
clock is behind, or a restart after the clock stepped back, cannot repeat an id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chorus.config import ConfigError
from chorus.errors import Unavailable
from chorus.ids import MAX_NODE, IdGenerator
from chorus.redisconn import is_cluster

__all__ = ["FixedNode", "NodeIdUnavailable", "NodeLease", "fixed_node", "lease_node_id"]

log = logging.getLogger("chorus.nodeid")

FLOOR_WRITE_S = 1.0  # how often a fixed node's floor file is brought up to date (if ids were made)
LEASE_SAFETY = 0.8  # share of the ttl after a renewal was sent during which ids are made
RETRY_AFTER_FAILURE_S = 1.0  # a renewal that failed (Redis down) is tried again this soon
STOP_WAIT_S = 3.0  # how long stopping waits for a renewal in flight (its Redis timeout is 2 s)

# ARGV: prefix, owner, ttl (ms), how many ids. Returns {id, floor} ({-1, '0'}: none free).
TAKE_SCRIPT = """
local prefix, owner, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local start = redis.call('INCR', prefix .. 'node-seq')
for i = 0, n - 1 do
  local id = (start + i) % n
  if redis.call('SET', prefix .. 'node:' .. id, owner, 'NX', 'PX', ttl) then
    return {id, redis.call('GET', prefix .. 'node-floor:' .. id) or '0'}
  end
end
return {-1, '0'}
"""

# ARGV: lease key, floor key, owner, ttl (ms), floor (ms). Returns {status, floor before}:
# 1 renewed, 2 taken back (it had expired and nobody held it), 0 someone else holds it.
RENEW_SCRIPT = """
local key, fkey, owner, ttl, floor = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cur = redis.call('GET', key)
local status = 1
if cur == owner then redis.call('PEXPIRE', key, ttl)
elseif not cur then redis.call('SET', key, owner, 'PX', ttl); status = 2
else return {0, '0'} end
local old = redis.call('GET', fkey) or '0'
if tonumber(floor) > tonumber(old) then redis.call('SET', fkey, floor) end
return {status, old}
"""

# ARGV: lease key, floor key, owner, floor (ms). Returns 1 if released, 0 if it was not ours.
RELEASE_SCRIPT = """
if redis.call('GET', ARGV[1]) ~= ARGV[3] then return 0 end
redis.call('SET', ARGV[2], ARGV[4])
redis.call('DEL', ARGV[1])
return 1
"""


class NodeIdUnavailable(ConfigError, Unavailable):
    """No node id is free at start-up (or Redis did not answer the lease): the role does not start."""


@dataclass
class FixedNode:
    """A node id that needs no lease: set in the config, or 0 on the embedded default.

    With ``floor_file`` (the embedded default's data dir) it keeps how far its ids went there,
    every ``FLOOR_WRITE_S`` and on stop, and starts past it: a restart whose clock stepped back
    does not make ids the history already has (which ``INSERT OR IGNORE`` would drop).
    """

    id: int
    floor_ms: int = 0
    floor_file: Path | None = None
    _ids: IdGenerator | None = None
    _task: asyncio.Task[None] | None = None
    _written: int = -1

    def held(self) -> bool:
        return True

    def why_not(self) -> str:
        return ""

    def attach(self, ids: IdGenerator) -> None:
        self._ids = ids
        if self.floor_file is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_writing(), name="ids-floor")

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(FLOOR_WRITE_S)
            self._write_floor()

    def _write_floor(self) -> None:
        if self.floor_file is None or self._ids is None or self._ids.last_ms == self._written:
            return
        try:
            tmp = self.floor_file.with_suffix(".tmp")
            tmp.write_text(str(self._ids.last_ms))
            os.replace(tmp, self.floor_file)
            self._written = self._ids.last_ms
        except OSError as exc:
            log.warning("could not write %s (%s): a restart with the clock set back may repeat ids",
                        self.floor_file, exc)

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._write_floor()


def fixed_node(node_id: int, floor_file: Path | None = None) -> FixedNode:
    """A :class:`FixedNode` starting past the floor kept in ``floor_file`` (if there is one)."""
    floor = 0
    if floor_file is not None:
        try:
            floor = int(floor_file.read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s)", floor_file, exc)
    return FixedNode(node_id, floor, floor_file)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class NodeLease:
    """One gateway's lease on a node id in Redis (see the module docstring)."""

    def __init__(self, redis: Any, prefix: str, ttl_s: float, *, owner: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        # On a cluster every node-id key shares one hash tag: the take script walks them all.
        self._cluster = is_cluster(redis)
        self._prefix = prefix + "{node-ids}" if self._cluster else prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._take = redis.register_script(TAKE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self.id = -1
        self.floor_ms = 0  # the previous holder's reach when this lease was taken
        self._valid_until = 0.0  # monotonic: ids may be made until then
        self._lost = ""  # why the lease is gone for good ("" while it is ours)
        self._lapse_logged = False
        self._ids: IdGenerator | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def _route(self, key: str) -> list[str]:
        """The scripts build their keys from ARGV; a cluster client routes them by this one."""
        return [key] if self._cluster else []

    @property
    def key(self) -> str:
        return f"{self._prefix}node:{self.id}"

    @property
    def floor_key(self) -> str:
        return f"{self._prefix}node-floor:{self.id}"

    async def take(self) -> int:
        """Lease a free node id, or raise :class:`NodeIdUnavailable`."""
        sent = self._clock()
        try:
            got_id, floor = await self._take(keys=self._route(f"{self._prefix}node-seq"),
                                             args=[self._prefix, self.owner, self.ttl_ms, MAX_NODE + 1])
        except Exception as exc:
            raise NodeIdUnavailable(f"could not lease a node id from Redis ({type(exc).__name__}: {exc}); "
                                    "set gateway.node_id to run without one") from exc
        if int(got_id) < 0:
            raise NodeIdUnavailable(f"every node id 0-{MAX_NODE} is leased under the prefix {self._prefix!r} "
                                    "(1,024 gateways live?): stop one or wait for a stopped one's lease to expire")
        self.id, self.floor_ms = int(got_id), int(floor)
        self._valid_until = sent + self.ttl_ms / 1000 * LEASE_SAFETY
        log.info("node id %d leased (ttl %d ms, owner %s)", self.id, self.ttl_ms, self.owner)
        return self.id

    def attach(self, ids: IdGenerator) -> None:
        """The generator this lease guards: renewals record how far its ids went."""
        self._ids = ids

    def held(self) -> bool:
        return not self._lost and self._clock() < self._valid_until

    def why_not(self) -> str:
        if self._lost:
            return self._lost
        return f"this gateway could not renew its comment-id lease (node {self.id}) in time"

    def _reach_ms(self, extra_ms: int) -> int:
        """How far this holder's ids may go: the newest id's millisecond (or now) plus ``extra_ms``."""
        newest = self._ids.last_ms if self._ids is not None else 0
        return max(newest, _wall_ms()) + extra_ms

    async def renew(self) -> bool:
        """Renew once; False if the lease is gone for good (another gateway holds the id)."""
        sent = self._clock()
        status, before = await self._renew(keys=self._route(self.key), args=[self.key, self.floor_key, self.owner,
                                                                             self.ttl_ms, self._reach_ms(self.ttl_ms)])
        status = int(status)
        if status == 0:
            self._lost = f"node id {self.id} was taken by another gateway after this one's lease lapsed"
            log.error("%s: this gateway refuses posts from now on (restart it to lease another)", self._lost)
            return False
        if status == 2:
            if self._ids is not None:
                self._ids.raise_floor(int(before))
            log.warning("node id %d: the lease had expired in Redis; taken back (nobody held it)", self.id)
        self._valid_until = sent + self.ttl_ms / 1000 * LEASE_SAFETY
        if self._lapse_logged:
            log.warning("node id %d: lease renewed; posting again", self.id)
            self._lapse_logged = False
        return True

    async def keep_renewing(self) -> None:
        """Renew every third of the ttl until stopped or lost; a failed renewal is retried soon."""
        interval = self.ttl_ms / 3000
        delay = interval
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                if not await self.renew():
                    return
                delay = interval
            except Exception as exc:
                if not self.held() and not self._lapse_logged:
                    self._lapse_logged = True
                    log.error("node id %d: lease lapsed (Redis: %s); refusing posts until it is renewed",
                              self.id, exc)
                else:
                    log.warning("node id %d: renewing the lease failed (%s); retrying", self.id, exc)
                delay = min(interval, RETRY_AFTER_FAILURE_S)

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self.keep_renewing(), name=f"node-lease-{self.id}")

    async def stop_renewing(self) -> None:
        """Stop between renewals (a command cancelled half-way can leave the client's pool waiting)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await asyncio.wait([task], timeout=STOP_WAIT_S)
        if not task.done():
            task.cancel()

    async def release(self) -> None:
        """Stop renewing and give the id back (with how far its ids went); closes the client."""
        await self.stop_renewing()
        try:
            if self.id >= 0 and not self._lost:
                await self._release(keys=self._route(self.key),
                                    args=[self.key, self.floor_key, self.owner, self._reach_ms(0)])
        except Exception as exc:  # it expires on its own
            log.warning("node id %d: could not release the lease (%s); it expires in %d ms", self.id, exc,
                        self.ttl_ms)
        finally:
            self._valid_until = 0.0
            await self._redis.aclose()


async def lease_node_id(url: str, prefix: str, ttl_s: float) -> NodeLease:
    """Lease a node id on the Redis at ``url`` and keep renewing it in the background."""
    from chorus.ingest.limits import redis_client

    lease = NodeLease(redis_client(url, 2000), prefix, ttl_s)
    try:
        await lease.take()
    except BaseException:
        await lease._redis.aclose()
        raise
    lease.start()
    return lease
