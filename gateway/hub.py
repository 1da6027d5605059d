"""The pure-Python hub: per-stream viewer sets, coalesced flushes, encode once, write many.

This is the reference implementation of the hub contract (DESIGN.md 2); the native hub of
``chorus.native`` implements the same behaviour for production scale.

Per stream, published events wait at most ``flush_interval_ms`` (or until
``flush_max_messages`` are pending); a flush turns them into one run of WebSocket frames per
encoding variant, built once, and gives every viewer of the stream one write.

Slow viewers: a viewer whose unsent bytes exceed ``backlog_limit_bytes`` stops receiving
comment batches (control events still go out) and, once it has drained, first gets a
``{"t":"skipped","count":N}`` marker. One that stays over the limit for
``slow_close_after_s`` is closed with 4008 (reconnect and resume).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from chorus.codes import CloseCode
from chorus.native import OP_BINARY, OP_TEXT, encode_frames
from chorus.protocol import JSON, ChannelMessage, Wire

__all__ = ["Hub", "Viewer"]


class Viewer(Protocol):
    wire: Wire
    skipped: int  # comments not sent while over the backlog limit
    slow_since: float  # monotonic time it went over the limit; 0.0 when it is not

    def write(self, data: bytes) -> None: ...
    def backlog(self) -> int: ...
    def close(self, code: int, reason: str) -> None: ...


@dataclass(slots=True)
class _Stream:
    viewers: set[Viewer] = field(default_factory=set)
    pending: list[ChannelMessage] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    replay: deque[ChannelMessage] = field(default_factory=lambda: deque(maxlen=32))


class _Variants:
    """The frames of one flush, built on first use for each encoding and kind."""

    def __init__(self, messages: list[ChannelMessage]) -> None:
        self.messages = messages
        self._cache: dict[tuple[Wire, bool], bytes] = {}

    def get(self, wire: Wire, control_only: bool) -> bytes:
        key = (wire, control_only)
        frames = self._cache.get(key)
        if frames is None:
            chosen = [m.event_json for m in self.messages if not control_only or m.offset is None]
            if wire == JSON:
                frames = encode_frames(OP_TEXT, chosen)
            else:
                frames = encode_frames(OP_BINARY, [msgpack.packb(json.loads(p)) for p in chosen])
            self._cache[key] = frames
        return frames


def _skipped_frame(viewer: Viewer) -> bytes:
    event = {"t": "skipped", "count": viewer.skipped}
    if viewer.wire == JSON:
        return encode_frames(OP_TEXT, [json.dumps(event, separators=(",", ":")).encode()])
    return encode_frames(OP_BINARY, [msgpack.packb(event)])


class Hub:
    def __init__(self, *, flush_interval_ms: int = 10, flush_max_messages: int = 100,
                 backlog_limit_bytes: int = 65536, slow_close_after_s: float = 10.0) -> None:
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_max_messages = flush_max_messages
        self.backlog_limit_bytes = backlog_limit_bytes
        self.slow_close_after_s = slow_close_after_s
        self._streams: dict[str, _Stream] = {}
        self.flushes = 0
        self.writes = 0

    def viewer_count(self, stream: str) -> int:
        s = self._streams.get(stream)
        return len(s.viewers) if s else 0

    def streams(self) -> list[str]:
        return [name for name, s in self._streams.items() if s.viewers]

    def join(self, viewer: Viewer, stream: str, after_offset: int | None = None) -> None:
        """Add a viewer; it first gets any recent batch past ``after_offset`` the hub still has."""
        s = self._streams.setdefault(stream, _Stream())
        s.viewers.add(viewer)
        if after_offset is not None:
            missed = [m for m in s.replay if m.offset is not None and m.offset > after_offset]
            if missed:
                viewer.write(_Variants(missed).get(viewer.wire, False))

    def leave(self, viewer: Viewer, stream: str) -> None:
        s = self._streams.get(stream)
        if s is None:
            return
        s.viewers.discard(viewer)
        if not s.viewers and not s.pending:
            if s.timer is not None:
                s.timer.cancel()
            del self._streams[stream]

    def publish(self, stream: str, message: ChannelMessage) -> None:
        """Queue an event for the stream's viewers; it goes out at the next flush."""
        s = self._streams.get(stream)
        if s is None:
            return  # no local viewer: nothing to do
        if message.offset is not None:
            s.replay.append(message)
        s.pending.append(message)
        if len(s.pending) >= self.flush_max_messages:
            self.flush(stream)
        elif s.timer is None:
            s.timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self.flush, stream)

    def flush(self, stream: str) -> None:
        s = self._streams.get(stream)
        if s is None:
            return
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        messages, s.pending = s.pending, []
        if not messages:
            return
        self.flushes += 1
        variants = _Variants(messages)
        comments = sum(m.count for m in messages)
        now = time.monotonic()
        for viewer in list(s.viewers):
            self._deliver(viewer, variants, comments, now)
        if not s.viewers:
            del self._streams[stream]

    def _deliver(self, viewer: Viewer, variants: _Variants, comments: int, now: float) -> None:
        if viewer.backlog() > self.backlog_limit_bytes:
            if not viewer.slow_since:
                viewer.slow_since = now
            elif now - viewer.slow_since > self.slow_close_after_s:
                viewer.close(CloseCode.SLOW_CONSUMER, "too slow: reconnect and resume")
                return
            viewer.skipped += comments
            control = variants.get(viewer.wire, True)
            if control:
                viewer.write(control)
                self.writes += 1
            return
        data = variants.get(viewer.wire, False)
        if viewer.skipped:
            data = _skipped_frame(viewer) + data
            viewer.skipped = 0
        viewer.slow_since = 0.0
        viewer.write(data)
        self.writes += 1
