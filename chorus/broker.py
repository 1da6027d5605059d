"""The broker seam: per-stream Pub/Sub channels and the small per-stream state beside them.

:class:`Broker` carries encoded stream events from the coordinator to every gateway that
has viewers of the stream. :class:`StreamState` holds each stream's position and recent
comments (``chorus/positions.py``: for the welcome message and recovery) and its mode (slow mode: an operator
sets it with :func:`set_stream_mode`, which also tells live viewers). Each has an in-process
implementation (embedded default, tests) and a Redis one behind the same ``Protocol``.
Redis Pub/Sub is at-most-once; the recent cache and the history store repair gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from chorus.positions import MemoryPositions, RedisPositions, StreamPositions
from chorus.protocol import pack_channel_message, unpack_channel_message
from chorus.redisconn import is_cluster, is_cluster_url, open_redis, parse_cluster_url, tag

__all__ = [
    "Broker",
    "MemoryBroker",
    "MemoryStreamState",
    "MessageHandler",
    "RedisBroker",
    "RedisStreamState",
    "StreamMode",
    "StreamState",
    "mode_key",
    "set_stream_mode",
]

log = logging.getLogger("chorus.broker")

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class StreamMode:
    """A stream's room modes, as the welcome's ``mode`` and the ``mode`` event carry them."""

    slow_mode_seconds: int = 0  # one comment per user every N s; 0 is off (moderators are exempt)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> StreamMode:
        """From stored fields (a Redis hash gives bytes); unknown or unreadable ones are ignored."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name, raw.get(f.name.encode()))
            try:
                values[f.name] = int(value) if value is not None else 0
            except ValueError:
                log.warning("stream mode field %s=%r is not an integer; using 0", f.name, value)
        return cls(**values)


def mode_key(prefix: str, stream: str, cluster: bool = False) -> str:
    """The Redis hash of a stream's mode; ingest/limits.py's admission script builds the same key
    (on a cluster in the stream's slot, ``{<stream>}``, with its other per-stream keys)."""
    return f"{prefix}mode:{tag(stream, cluster)}"


class Broker(Protocol):
    async def start(self, on_message: MessageHandler) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, stream: str, payload: bytes) -> None: ...
    async def subscribe(self, stream: str) -> None: ...
    async def unsubscribe(self, stream: str) -> None: ...


class StreamState(StreamPositions, Protocol):
    async def get_mode(self, stream: str) -> StreamMode:
        """The stream's modes; a stream never set has every mode off."""
        ...

    async def set_mode(self, stream: str, mode: StreamMode) -> None: ...


async def set_stream_mode(state: StreamState, broker: Broker, stream: str, mode: StreamMode) -> None:
    """Store a stream's mode, then tell its live viewers with a ``mode`` control event.

    Admission reads the stored mode on every post; the event (never sampled or skipped, as a
    control event) only updates what viewers show.
    """
    await state.set_mode(stream, mode)
    event = json.dumps({"t": "mode", **mode.to_wire()}, separators=(",", ":")).encode()
    await broker.publish(stream, pack_channel_message(event))


class MemoryBroker:
    """Pub/Sub inside one process: delivers to this process's own subscriptions."""

    def __init__(self) -> None:
        self._handler: MessageHandler | None = None
        self._subscribed: set[str] = set()
        self.published = 0

    async def start(self, on_message: MessageHandler) -> None:
        self._handler = on_message

    async def stop(self) -> None:
        self._handler = None

    async def publish(self, stream: str, payload: bytes) -> None:
        self.published += 1
        if self._handler is not None and stream in self._subscribed:
            self._handler(stream, payload)

    async def subscribe(self, stream: str) -> None:
        self._subscribed.add(stream)

    async def unsubscribe(self, stream: str) -> None:
        self._subscribed.discard(stream)


class MemoryStreamState(MemoryPositions):
    def __init__(self) -> None:
        super().__init__()
        self._modes: dict[str, StreamMode] = {}

    async def get_mode(self, stream: str) -> StreamMode:
        return self._modes.get(stream) or StreamMode()

    async def set_mode(self, stream: str, mode: StreamMode) -> None:
        self._modes[stream] = mode


class RedisBroker:
    """Redis Pub/Sub: one channel per stream, ``<prefix>s:<stream>``; more for a hot stream.

    **Sharded Pub/Sub** (Redis 7: SPUBLISH/SSUBSCRIBE) when the server has it and ``sharded``
    is on, else PUBLISH/SUBSCRIBE. The server's version is read once, before the first publish
    or subscribe, so every role talking to one deployment picks the same kind (the two kinds
    never see each other's messages). In Redis Cluster a shard channel lives on the node that
    owns its slot, instead of every message crossing the cluster bus to every node.

    **Hot streams** (``shards``: stream -> K > 1) get K shard channels ``<prefix>s:<stream>/0``
    ... ``/K-1``. Each batch is published to all K and each gateway subscribes to one,
    ``node % K`` (its node id: sequential ids spread evenly), so the fan-out of one channel is
    bounded by the gateways on it and K channels spread over K slots. Every viewer still gets
    every batch. The gateway also subscribes to the stream's own channel, which carries the
    control events (throttle, mode, later deletes and pins: rare) from any publisher, including
    ones that know nothing of shards such as ``chorus mode``. A ``/`` never occurs in a stream
    id, so the names cannot collide. On one Redis node the two channels of a stream keep their
    order; across cluster nodes a control event may overtake a batch.

    A reader task hands each message to ``on_message``. The subscriber connection does not
    retry by itself, so a lost connection shows at once: :attr:`healthy` goes false, the reader
    reconnects with backoff and subscribes again to every channel it had, then it is true
    again. :meth:`ping` reports both (the Kafka fallback's probe, gateway/fallback.py).

    **Redis Cluster** (a ``redis+cluster://`` URL): always sharded; publishing goes to the
    master of the channel's slot (the cluster client follows MOVED and failovers), and the
    subscriptions are a :class:`~chorus.clusterpubsub.ClusterShardSubscriber`: one connection
    per master owning any of this gateway's channels, each channel moved to its slot's new
    master when a failover or resharding takes it away, without a restart.
    """

    def __init__(self, url: str, prefix: str = "chorus:", *, shards: Mapping[str, int] | None = None,
                 node: int = 0, sharded: bool = True) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._url = url
        self.cluster = is_cluster_url(url)
        self._redis = open_redis(url)
        # one node: a connection of its own for the subscriptions; a cluster: one per master (start)
        self._sub_redis = None if self.cluster else aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        self._shard_sub: Any = None
        self._prefix = f"{prefix}s:"
        self._shards = dict(shards or {})
        self._node = node
        self._want_sharded = sharded
        self.sharded: bool | None = None  # decided on first use (see the class docstring)
        self._deciding = asyncio.Lock()
        self._pubsub: Any = None
        self._channels: dict[bytes, str] = {}  # subscribed channel -> its stream
        self._reader: asyncio.Task[None] | None = None
        self._handler: MessageHandler | None = None
        self._ready = asyncio.Event()
        self._healthy = True
        self._reconnects = 0

    @property
    def healthy(self) -> bool:
        """False while a subscription is being made again (a lost connection, a moved slot)."""
        return self._shard_sub.healthy if self._shard_sub is not None else self._healthy

    @property
    def reconnects(self) -> int:
        return self._shard_sub.reconnects if self._shard_sub is not None else self._reconnects

    def channel(self, stream: str) -> str:
        return self._prefix + stream

    def shard_channel(self, stream: str, shard: int) -> str:
        return f"{self._prefix}{stream}/{shard}"

    def subscribe_channels(self, stream: str) -> list[str]:
        """The stream's own channel, and for a hot stream this node's shard channel."""
        k = self._shards.get(stream, 1)
        own = [self.channel(stream)]
        return own if k <= 1 else [*own, self.shard_channel(stream, self._node % k)]

    def publish_channels(self, stream: str, payload: bytes) -> list[str]:
        """A hot stream's batches go to every shard channel; everything else to its own."""
        k = self._shards.get(stream, 1)
        if k <= 1 or unpack_channel_message(payload).offset is None:
            return [self.channel(stream)]
        return [self.shard_channel(stream, i) for i in range(k)]

    async def _use_sharded(self) -> bool:
        if self.cluster:
            self.sharded = True  # Redis Cluster has sharded Pub/Sub from 7.0, the oldest it supports here
            return True
        if self.sharded is None:
            async with self._deciding:
                if self.sharded is None:
                    self.sharded = self._want_sharded and await self._server_has_sharded()
        return self.sharded

    async def _server_has_sharded(self) -> bool:
        from redis.exceptions import ResponseError

        try:
            info = await self._redis.info("server")
        except ResponseError as exc:  # INFO renamed away (some managed Redis): assume an old server
            log.warning("cannot read the redis version (%s); using PUBLISH/SUBSCRIBE", exc)
            return False
        version = str(info.get("redis_version", "0"))
        head = version.split(".")[0]
        has = head.isdigit() and int(head) >= 7
        log.info("redis %s: %s pub/sub", version, "sharded" if has else "classic")
        return has

    async def start(self, on_message: MessageHandler) -> None:
        self._handler = on_message
        if self.cluster:
            from chorus.clusterpubsub import ClusterShardSubscriber

            self._shard_sub = ClusterShardSubscriber(self._redis, parse_cluster_url(self._url), self._dispatch)
            return
        assert self._sub_redis is not None
        self._pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
        self._reader = asyncio.create_task(self._read_loop(), name="redis-pubsub-reader")

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        stream = self._channels.get(channel)
        if stream is not None and self._handler is not None:
            self._handler(stream, data)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._shard_sub is not None:
            await self._shard_sub.close()
        if self._sub_redis is not None:
            await self._sub_redis.aclose()
        await self._redis.aclose()

    async def ping(self) -> None:
        """Raises unless Redis answers and this broker's subscriptions are live (on a cluster:
        every master)."""
        if self.cluster:
            await self._redis.ping(target_nodes=self._redis.PRIMARIES)
        else:
            await self._redis.ping()
        if not self.healthy:
            raise ConnectionError("redis pub/sub is subscribing again")

    async def publish(self, stream: str, payload: bytes) -> None:
        sharded = await self._use_sharded()
        channels = self.publish_channels(stream, payload)
        if len(channels) == 1:
            await (self._redis.spublish if sharded else self._redis.publish)(channels[0], payload)
            return
        if self.cluster:  # a hot stream's shard channels are on several masters: in parallel
            await asyncio.gather(*(self._redis.spublish(ch, payload) for ch in channels))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for ch in channels:
                (pipe.spublish if sharded else pipe.publish)(ch, payload)
            await pipe.execute()

    async def _subscribe(self, pubsub: Any, channels: list[str]) -> None:
        if self._shard_sub is not None:
            await self._shard_sub.subscribe(channels)
            return
        if await self._use_sharded():
            for ch in channels:  # one by one: in a cluster each may live on another node
                await pubsub.ssubscribe(ch)
        else:
            await pubsub.subscribe(*channels)

    async def subscribe(self, stream: str) -> None:
        channels = self.subscribe_channels(stream)
        for ch in channels:
            self._channels[ch.encode()] = stream
        try:
            await self._subscribe(self._pubsub, channels)
        except BaseException:
            for ch in channels:
                self._channels.pop(ch.encode(), None)
            raise
        self._ready.set()

    async def unsubscribe(self, stream: str) -> None:
        channels = self.subscribe_channels(stream)
        for ch in channels:
            self._channels.pop(ch.encode(), None)
        if self._shard_sub is not None:
            await self._shard_sub.unsubscribe(channels)
        elif await self._use_sharded():
            await self._pubsub.sunsubscribe(*channels)
        else:
            await self._pubsub.unsubscribe(*channels)

    async def _read_loop(self) -> None:
        while True:
            await self._ready.wait()
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except Exception as exc:  # redis raises its own ConnectionError; cancellation passes
                self._healthy = False
                log.warning("redis pub/sub connection lost (%s); subscribing again", exc)
                await self._resubscribe()
                continue
            if msg is None or msg.get("type") not in ("message", "smessage") or self._handler is None:
                continue
            stream = self._channels.get(msg["channel"])
            if stream is not None:
                self._handler(stream, msg["data"])

    async def _resubscribe(self) -> None:
        """A new connection with every channel we had, retried with backoff until it works."""
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            assert self._sub_redis is not None
            self._pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            channels = sorted({ch.decode() for ch in self._channels})
            try:
                if channels:
                    await self._subscribe(self._pubsub, channels)
                else:
                    self._ready.clear()  # nothing to read until the next subscribe
            except Exception as exc:
                log.debug("redis pub/sub: subscribing again failed (%s)", exc)
                delay = min(delay * 2, 2.0)
                continue
            self._healthy = True
            self._reconnects += 1
            log.info("redis pub/sub: subscribed again to %d channels", len(channels))
            return


class RedisStreamState(RedisPositions):
    """Position and recent comments (see ``chorus/positions.py``) and the mode in a hash, per stream."""

    def __init__(self, url: str, prefix: str = "chorus:") -> None:
        # A blocking pool: a burst of joins (each reads position, recent comments and mode)
        # waits for a connection instead of failing with "Too many connections" past 100.
        # On a cluster the pool is per master (1,000 each), and the keys carry the stream's tag.
        self._redis = open_redis(url, max_connections=None if is_cluster_url(url) else 100, pool_timeout_s=5)
        self._prefix = prefix
        self._cluster = is_cluster(self._redis)

    async def close(self) -> None:
        await self._redis.aclose()

    async def get_mode(self, stream: str) -> StreamMode:
        return StreamMode.from_fields(await self._redis.hgetall(mode_key(self._prefix, stream, self._cluster)))

    async def set_mode(self, stream: str, mode: StreamMode) -> None:
        await self._redis.hset(mode_key(self._prefix, stream, self._cluster), mapping=mode.to_wire())
