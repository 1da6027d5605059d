"""The pure hub with recording viewers: coalescing, encode once, slow-viewer policy."""

import asyncio
import json

import msgpack

from chorus.codes import CloseCode
from chorus.gateway.hub import Hub
from chorus.native import FrameParser
from chorus.protocol import ChannelMessage


class RecordingViewer:
    def __init__(self, wire: str = "json", backlog: int = 0) -> None:
        self.wire = wire
        self.skipped = 0
        self.slow_since = 0.0
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self._backlog = backlog

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def backlog(self) -> int:
        return self._backlog

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def events(self) -> list[dict[str, object]]:
        """Decode what was written, as a client would (frames are unmasked server frames)."""
        parser = FrameParser(max_message_size=1 << 20, require_mask=False)
        out = []
        for opcode, payload in parser.feed(b"".join(self.writes)):
            out.append(json.loads(payload) if opcode == 1 else msgpack.unpackb(payload))
        return out


def batch(offset: int, text: str) -> ChannelMessage:
    event = {"t": "batch", "offset": offset, "comments": [{"id": str(offset), "text": text}]}
    return ChannelMessage(json.dumps(event).encode(), offset, 1)


async def test_one_write_per_viewer_per_flush() -> None:
    hub = Hub(flush_interval_ms=5, flush_max_messages=100)
    viewers = [RecordingViewer() for _ in range(3)] + [RecordingViewer("msgpack")]
    for v in viewers:
        hub.join(v, "a")
    other = RecordingViewer()
    hub.join(other, "b")
    for i in range(1, 6):
        hub.publish("a", batch(i, f"c{i}"))
    assert all(not v.writes for v in viewers)  # nothing before the window closes
    await asyncio.sleep(0.03)
    assert hub.flushes == 1
    for v in viewers:
        assert len(v.writes) == 1
        assert [e["offset"] for e in v.events()] == [1, 2, 3, 4, 5]
    assert viewers[0].writes[0] is viewers[1].writes[0]  # the same bytes object: encoded once
    assert other.writes == []


async def test_flush_early_at_max_messages() -> None:
    hub = Hub(flush_interval_ms=1000, flush_max_messages=3)
    v = RecordingViewer()
    hub.join(v, "a")
    for i in range(1, 4):
        hub.publish("a", batch(i, "x"))
    assert len(v.writes) == 1 and hub.flushes == 1


async def test_slow_viewer_skips_batches_keeps_control_and_gets_marker() -> None:
    hub = Hub(flush_interval_ms=1000, flush_max_messages=1, backlog_limit_bytes=4096, slow_close_after_s=60)
    slow = RecordingViewer(backlog=10_000)
    hub.join(slow, "a")
    hub.publish("a", batch(1, "lost"))
    hub.publish("a", ChannelMessage(b'{"t":"delete","id":"9"}'))
    assert slow.events() == [{"t": "delete", "id": "9"}]
    assert slow.skipped == 1
    slow._backlog = 0  # it drained
    hub.publish("a", batch(2, "kept"))
    events = slow.events()
    assert events[1] == {"t": "skipped", "count": 1}
    assert events[2]["offset"] == 2


async def test_stuck_viewer_is_closed_with_4008() -> None:
    hub = Hub(flush_interval_ms=1000, flush_max_messages=1, backlog_limit_bytes=4096, slow_close_after_s=0.01)
    stuck = RecordingViewer(backlog=10_000)
    hub.join(stuck, "a")
    hub.publish("a", batch(1, "x"))
    await asyncio.sleep(0.02)
    hub.publish("a", batch(2, "y"))
    assert stuck.closed is not None and stuck.closed[0] == CloseCode.SLOW_CONSUMER


async def test_join_replays_batches_past_the_welcome_offset() -> None:
    hub = Hub(flush_interval_ms=1000, flush_max_messages=1)
    first = RecordingViewer()
    hub.join(first, "a")
    for i in range(1, 4):
        hub.publish("a", batch(i, "x"))
    late = RecordingViewer()
    hub.join(late, "a", after_offset=1)
    assert [e["offset"] for e in late.events()] == [2, 3]


async def test_leave_forgets_empty_streams() -> None:
    hub = Hub()
    v = RecordingViewer()
    hub.join(v, "a")
    hub.leave(v, "a")
    assert hub.streams() == [] and hub.viewer_count("a") == 0
    hub.publish("a", batch(1, "x"))  # nobody listens: dropped, no timer left behind
    assert v.writes == []
