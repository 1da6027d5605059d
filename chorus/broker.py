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
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from chorus.positions import MemoryPositions, RedisPositions, StreamPositions
from chorus.protocol import pack_channel_message

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


def mode_key(prefix: str, stream: str) -> str:
    """The Redis hash of a stream's mode; ingest/limits.py reads it inside its admission script."""
    return f"{prefix}mode:{stream}"


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


class RedisStreamState(RedisPositions):
    """Position and recent comments (see ``chorus/positions.py``) and the mode in a hash, per stream."""

    def __init__(self, url: str, prefix: str = "chorus:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url)
        self._prefix = prefix

    async def close(self) -> None:
        await self._redis.aclose()

    async def get_mode(self, stream: str) -> StreamMode:
        return StreamMode.from_fields(await self._redis.hgetall(mode_key(self._prefix, stream)))

    async def set_mode(self, stream: str, mode: StreamMode) -> None:
        await self._redis.hset(mode_key(self._prefix, stream), mapping=mode.to_wire())
