"""The node: keeps a stream's broker channel subscribed while the gateway has viewers of it.

The first local viewer of a stream subscribes (and waits for it, so the welcome it reads is
not older than the live feed); if that fails the viewer is refused and nothing is left
half-subscribed. The last viewer leaving starts a short delay, re-checked before the
unsubscribe, so a viewer who reloads the page does not cost a subscribe/unsubscribe pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

from chorus.broker import Broker
from chorus.protocol import ChannelMessage, unpack_channel_message

__all__ = ["Node"]

log = logging.getLogger("chorus.node")


class Node:
    def __init__(self, broker: Broker, unsubscribe_delay_ms: int = 2000) -> None:
        self.broker = broker
        # Where a stream's events go: the gateway sets this to its hub feeder.
        self.deliver: Callable[[str, ChannelMessage], None] = lambda stream, message: None
        self.unsubscribe_delay_s = unsubscribe_delay_ms / 1000
        self._refs: dict[str, int] = {}
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._unsub_timers: dict[str, asyncio.TimerHandle] = {}
        self.bad_messages = 0
        self.failed_deliveries = 0
        # Hook of the Redis-down fallback (gateway/fallback.py), which feeds on_message too: the
        # newest batch offset delivered per stream (where it may skip to), and events by path.
        self.last_offsets: dict[str, int] = {}
        self.received: Counter[str] = Counter()

    async def start(self) -> None:
        await self.broker.start(self.on_message)

    async def stop(self) -> None:
        for timer in self._unsub_timers.values():
            timer.cancel()
        await self.broker.stop()

    def on_message(self, stream: str, data: bytes, via: str = "pubsub") -> None:
        try:
            message = unpack_channel_message(data)
        except ValueError:
            self.bad_messages += 1
            return
        self.received[via] += 1
        if message.offset is not None and message.offset > self.last_offsets.get(stream, -1):
            self.last_offsets[stream] = message.offset
        try:
            self.deliver(stream, message)
        except Exception:
            # One stream's bad event must not stop the broker's reader for every other stream.
            self.failed_deliveries += 1
            log.exception("delivering an event of stream %s failed", stream)

    async def acquire(self, stream: str) -> None:
        """Count one more local viewer of ``stream``; subscribe if it is the first."""
        self._refs[stream] = self._refs.get(stream, 0) + 1
        timer = self._unsub_timers.pop(stream, None)
        if timer is not None:
            timer.cancel()
        fut = self._subscribed.get(stream)
        if fut is None:
            fut = self._subscribed[stream] = asyncio.ensure_future(self.broker.subscribe(stream))
        try:
            await asyncio.shield(fut)
        except Exception:
            # Roll back: the next viewer tries afresh.
            if self._subscribed.get(stream) is fut:
                del self._subscribed[stream]
            self._drop_ref(stream)
            raise

    def release(self, stream: str) -> None:
        """One local viewer fewer; unsubscribe after the delay if none came back."""
        if self._drop_ref(stream) == 0 and stream in self._subscribed:
            loop = asyncio.get_running_loop()
            self._unsub_timers[stream] = loop.call_later(self.unsubscribe_delay_s, self._maybe_unsubscribe, stream)

    def _drop_ref(self, stream: str) -> int:
        left = self._refs.get(stream, 0) - 1
        if left <= 0:
            self._refs.pop(stream, None)
            return 0
        self._refs[stream] = left
        return left

    def _maybe_unsubscribe(self, stream: str) -> None:
        self._unsub_timers.pop(stream, None)
        if self._refs.get(stream):
            return
        self._subscribed.pop(stream, None)
        self.last_offsets.pop(stream, None)
        task = asyncio.ensure_future(self.broker.unsubscribe(stream))
        task.add_done_callback(_log_failure)

    def subscribed_streams(self) -> list[str]:
        return [s for s, f in self._subscribed.items() if f.done() and not f.exception()]


def _log_failure(task: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        if exc is not None:
            log.warning("unsubscribe failed: %s", exc)
