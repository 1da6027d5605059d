"""Sharded Pub/Sub on a Redis Cluster: each shard channel subscribed on the master owning its slot.

In Redis Cluster a shard channel (SSUBSCRIBE/SPUBLISH, Redis 7) lives on the node that owns
its hash slot: a message never crosses the cluster bus, so fan-out grows with the masters.
A gateway therefore needs one subscriber connection per master that owns any of its channels.
redis-py's own cluster Pub/Sub multiplexes every node's connection through one reader; this
module keeps the part Chorus needs, small enough to reason about under failure:

- **Placement.** A channel goes to the master of its slot in the client's slot map, on a
  connection of that node's own (:class:`_NodeSubscriber`, created on first use), with a reader
  task that hands each ``smessage`` to the callback.
- **Repair.** A channel becomes *orphaned* when its node's connection fails (the master was
  killed or is unreachable), when the server says its slot moved (a MOVED reply to SSUBSCRIBE),
  or when the server unsubscribes it by itself (Redis 7 sends ``sunsubscribe`` to a shard
  channel's subscribers when the slot leaves the node: a resharding, or a master demoted to
  replica). One repair task then reads the slot map again (CLUSTER SLOTS through the cluster
  client) and places every orphan on its slot's current master, with backoff while the
  failover is still under way (the map names the dead master until its replica is promoted).
- :attr:`healthy` is false while any channel is orphaned: messages published to it meanwhile
  are lost (Pub/Sub is at-most-once; the recent cache and ``resume`` repair the gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from chorus.redisconn import ClusterUrl

__all__ = ["ClusterShardSubscriber"]

log = logging.getLogger("chorus.clusterpubsub")

REPAIR_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # then 0.8 s between tries until it works
READ_TIMEOUT_S = 1.0  # one reader's wait for a message before it checks for cancellation


class _NodeSubscriber:
    """One master's subscriber connection and its reader task."""

    def __init__(self, name: str, client: Any) -> None:
        self.name = name
        self.client = client
        self.pubsub = client.pubsub(ignore_subscribe_messages=False)  # sunsubscribe tells of a slot moved away
        self.channels: set[bytes] = set()
        self.reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ClusterShardSubscriber:
    """Shard channels over a cluster's masters (see the module docstring).

    ``cluster`` is the ``RedisCluster`` client whose slot map places channels; ``seeds`` gives
    the credentials and TLS of the per-node connections; ``on_message(channel, data)`` gets
    every message, in order per channel.
    """

    def __init__(self, cluster: Any, seeds: ClusterUrl, on_message: Callable[[bytes, bytes], None]) -> None:
        self._cluster = cluster
        self._seeds = seeds
        self._on_message = on_message
        self._wanted: set[bytes] = set()
        self._nodes: dict[str, _NodeSubscriber] = {}
        self._orphans: set[bytes] = set()
        self._lock = asyncio.Lock()  # placement and repair, one at a time
        self._repair: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0  # repairs that placed every orphan again
        self.moves = 0  # channels placed again on another node

    @property
    def healthy(self) -> bool:
        return not self._orphans

    def node_of(self, channel: str) -> str | None:
        """The node a channel is subscribed on now (None while orphaned or not wanted)."""
        raw = channel.encode()
        return next((n.name for n in self._nodes.values() if raw in n.channels), None)

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe each channel on its slot's master; raises if a node cannot be reached now
        (the channels are then not wanted: the caller's subscribe failed)."""
        raw = [c.encode() for c in channels]
        async with self._lock:
            await self._ensure_map()
            placed: list[bytes] = []
            try:
                for ch in raw:
                    if ch in self._wanted:
                        continue
                    await self._place(ch)
                    self._wanted.add(ch)
                    placed.append(ch)
            except BaseException:
                for ch in placed:
                    self._wanted.discard(ch)
                    await self._unplace(ch)
                raise

    async def unsubscribe(self, channels: list[str]) -> None:
        async with self._lock:
            for ch in (c.encode() for c in channels):
                self._wanted.discard(ch)
                self._orphans.discard(ch)
                await self._unplace(ch)

    async def close(self) -> None:
        self._closed = True
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repair
        for node in list(self._nodes.values()):
            await node.close()
        self._nodes.clear()

    # -- placement ----------------------------------------------------------------------------

    async def _ensure_map(self) -> None:
        if not self._cluster.nodes_manager.slots_cache:
            await self._cluster.initialize()

    def _owner(self, channel: bytes) -> Any:
        return self._cluster.get_node_from_key(channel)

    async def _place(self, channel: bytes) -> None:
        owner = self._owner(channel)
        node = self._nodes.get(owner.name)
        if node is None:
            node = self._nodes[owner.name] = _NodeSubscriber(owner.name, self._node_client(owner.host, owner.port))
        await node.pubsub.ssubscribe(channel)  # the reply (or a MOVED) comes to the reader
        node.channels.add(channel)
        if node.reader is None:
            node.reader = asyncio.create_task(self._read(node), name=f"redis-shard-reader-{node.name}")

    async def _unplace(self, channel: bytes) -> None:
        for node in list(self._nodes.values()):
            if channel in node.channels:
                node.channels.discard(channel)
                with contextlib.suppress(Exception):
                    await node.pubsub.sunsubscribe(channel)
                if not node.channels:
                    del self._nodes[node.name]
                    await node.close()

    def _node_client(self, host: str, port: int) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        s = self._seeds
        # No retries of its own: a lost connection must show at once so the channel is repaired.
        return aioredis.Redis(host=host, port=port, username=s.username, password=s.password, ssl=s.tls,
                              retry=Retry(NoBackoff(), 0), socket_connect_timeout=2.0)

    # -- reading and repair ------------------------------------------------------------------

    async def _read(self, node: _NodeSubscriber) -> None:
        while True:
            try:
                msg = await node.pubsub.get_message(timeout=READ_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the node died, or the server refused (MOVED): place its channels again
                log.warning("redis cluster pub/sub: node %s lost (%s: %s); placing its %d channels again",
                            node.name, type(exc).__name__, exc, len(node.channels))
                self._orphan_node(node)
                return
            if msg is None:
                continue
            kind = msg.get("type")
            if kind == "smessage":
                self._on_message(msg["channel"], msg["data"])
            elif kind == "sunsubscribe" and msg["channel"] in node.channels:
                # not asked for (ours leave node.channels first): the slot left this node
                node.channels.discard(msg["channel"])
                self._orphan(msg["channel"])

    def _orphan_node(self, node: _NodeSubscriber) -> None:
        if self._nodes.get(node.name) is node:
            del self._nodes[node.name]
        for ch in node.channels:
            self._orphan(ch)
        node.channels = set()
        closing = asyncio.ensure_future(node.close())
        closing.add_done_callback(lambda _t: None)

    def _orphan(self, channel: bytes) -> None:
        if channel not in self._wanted or self._closed:
            return
        self._orphans.add(channel)
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._repair_loop(), name="redis-shard-repair")

    async def _repair_loop(self) -> None:
        attempt = 0
        while self._orphans and not self._closed:
            await asyncio.sleep(REPAIR_BACKOFF_S[min(attempt, len(REPAIR_BACKOFF_S) - 1)])
            attempt += 1
            async with self._lock:
                try:
                    await self._cluster.nodes_manager.initialize()  # the slot map as the cluster sees it now
                except Exception as exc:
                    log.debug("redis cluster pub/sub: reading the slot map failed (%s)", exc)
                    continue
                for ch in sorted(self._orphans):
                    try:
                        await self._place(ch)
                    except Exception as exc:  # its slot's master is still the dead one: try again
                        log.debug("redis cluster pub/sub: placing %r failed (%s)", ch, exc)
                        self._drop_node_of(ch)
                        continue
                    self._orphans.discard(ch)
                    self.moves += 1
        if not self._closed:
            self.reconnects += 1
            log.info("redis cluster pub/sub: every channel placed again (%d nodes)", len(self._nodes))

    def _drop_node_of(self, channel: bytes) -> None:
        """After a failed placement, forget the node's connection if it never worked."""
        owner = self._owner(channel)
        node = self._nodes.get(owner.name)
        if node is not None and not node.channels:
            del self._nodes[owner.name]
            closing = asyncio.ensure_future(node.close())
            closing.add_done_callback(lambda _t: None)
