"""The broker seam: per-stream Pub/Sub channels and the small per-stream state beside them.

:class:`Broker` carries encoded stream events from the coordinator to every gateway that
has viewers of the stream. :class:`StreamState` holds each stream's epoch, offset counter and
recent comments (for the welcome message and, later, recovery). Each has an in-process
implementation (embedded default, tests) and a Redis one behind the same ``Protocol``.
Redis Pub/Sub is at-most-once; the recent cache and the history store repair gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "Broker",
    "MemoryBroker",
    "MemoryStreamState",
    "MessageHandler",
    "RedisBroker",
    "RedisStreamState",
    "StreamState",
]

log = logging.getLogger("chorus.broker")

MessageHandler = Callable[[str, bytes], None]


class Broker(Protocol):
    async def start(self, on_message: MessageHandler) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, stream: str, payload: bytes) -> None: ...
    async def subscribe(self, stream: str) -> None: ...
    async def unsubscribe(self, stream: str) -> None: ...


class StreamState(Protocol):
    async def allocate_offsets(self, stream: str, count: int) -> tuple[str, int]:
        """Reserve ``count`` offsets; returns (epoch, first offset). Single writer: the coordinator."""
        ...

    async def position(self, stream: str) -> tuple[str, int]:
        """(epoch, last offset) of the stream; a stream never written gets a fresh epoch."""
        ...

    async def push_recent(self, stream: str, comments: list[dict[str, Any]], keep: int) -> None: ...
    async def recent(self, stream: str, count: int) -> list[dict[str, Any]]: ...


def _new_epoch() -> str:
    return uuid.uuid4().hex[:12]


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


class MemoryStreamState:
    def __init__(self) -> None:
        self._pos: dict[str, tuple[str, int]] = {}
        self._recent: dict[str, deque[dict[str, Any]]] = {}

    async def allocate_offsets(self, stream: str, count: int) -> tuple[str, int]:
        epoch, last = self._pos.get(stream) or (_new_epoch(), 0)
        self._pos[stream] = (epoch, last + count)
        return epoch, last + 1

    async def position(self, stream: str) -> tuple[str, int]:
        if stream not in self._pos:
            self._pos[stream] = (_new_epoch(), 0)
        return self._pos[stream]

    async def push_recent(self, stream: str, comments: list[dict[str, Any]], keep: int) -> None:
        ring = self._recent.get(stream)
        if ring is None or ring.maxlen != keep:
            ring = self._recent[stream] = deque(ring or (), maxlen=keep)
        ring.extend(comments)

    async def recent(self, stream: str, count: int) -> list[dict[str, Any]]:
        ring = self._recent.get(stream, ())
        return list(ring)[-count:] if count > 0 else []


class RedisBroker:
    """Redis Pub/Sub: one channel per stream, ``<prefix>s:<stream>``.

    A reader task hands each message to ``on_message``. If the connection drops it
    reconnects and subscribes again to every stream it had.
    """

    def __init__(self, url: str, prefix: str = "chorus:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url)
        self._prefix = f"{prefix}s:"
        self._pubsub: Any = None
        self._streams: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self._handler: MessageHandler | None = None
        self._ready = asyncio.Event()

    def channel(self, stream: str) -> str:
        return self._prefix + stream

    async def start(self, on_message: MessageHandler) -> None:
        self._handler = on_message
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._reader = asyncio.create_task(self._read_loop(), name="redis-pubsub-reader")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._redis.aclose()

    async def publish(self, stream: str, payload: bytes) -> None:
        await self._redis.publish(self.channel(stream), payload)

    async def subscribe(self, stream: str) -> None:
        self._streams.add(stream)
        await self._pubsub.subscribe(self.channel(stream))
        self._ready.set()

    async def unsubscribe(self, stream: str) -> None:
        self._streams.discard(stream)
        await self._pubsub.unsubscribe(self.channel(stream))

    async def _read_loop(self) -> None:
        cut = len(self._prefix)
        while True:
            await self._ready.wait()
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except (ConnectionError, OSError, Exception) as exc:  # redis raises its own ConnectionError
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.warning("redis pub/sub connection lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
                await self._resubscribe()
                continue
            if msg is None or msg.get("type") != "message" or self._handler is None:
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            self._handler(channel[cut:], msg["data"])

    async def _resubscribe(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        with contextlib.suppress(Exception):
            if self._streams:
                await self._pubsub.subscribe(*(self.channel(s) for s in self._streams))


class RedisStreamState:
    """Epoch and offset in a hash, recent comments in a capped list, per stream."""

    def __init__(self, url: str, prefix: str = "chorus:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url)
        self._prefix = prefix

    async def close(self) -> None:
        await self._redis.aclose()

    def _meta(self, stream: str) -> str:
        return f"{self._prefix}meta:{stream}"

    def _recent_key(self, stream: str) -> str:
        return f"{self._prefix}recent:{stream}"

    async def _epoch(self, stream: str) -> str:
        key = self._meta(stream)
        await self._redis.hsetnx(key, "epoch", _new_epoch())
        epoch = await self._redis.hget(key, "epoch")
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def allocate_offsets(self, stream: str, count: int) -> tuple[str, int]:
        epoch = await self._epoch(stream)
        last = await self._redis.hincrby(self._meta(stream), "offset", count)
        return epoch, int(last) - count + 1

    async def position(self, stream: str) -> tuple[str, int]:
        epoch = await self._epoch(stream)
        offset = await self._redis.hget(self._meta(stream), "offset")
        return epoch, int(offset or 0)

    async def push_recent(self, stream: str, comments: list[dict[str, Any]], keep: int) -> None:
        key = self._recent_key(stream)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *(json.dumps(c, separators=(",", ":")) for c in comments))
            pipe.ltrim(key, -keep, -1)
            await pipe.execute()

    async def recent(self, stream: str, count: int) -> list[dict[str, Any]]:
        if count <= 0:
            return []
        raw = await self._redis.lrange(self._recent_key(stream), -count, -1)
        return [json.loads(item) for item in raw]

