"""The broadcast coordinator: comments log to each stream's Pub/Sub channel.

It is the single writer of a partition's streams, so it numbers each stream's comments
(epoch and offset), keeps the recent cache, and publishes one ``batch`` event per stream per
flush, encoded once as JSON: gateways forward those bytes to their viewers as they are.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.log import CommentLog, LogRecord
from chorus.ingest.records import Comment, RecordError, decode_record

from chorus.broker import Broker, StreamState
from chorus.protocol import JSON, encode_event, pack_channel_message

__all__ = ["Coordinator", "group_by_stream"]

log = logging.getLogger("chorus.coordinator")

GROUP = "chorus-coordinator"


def group_by_stream(records: Sequence[LogRecord]) -> tuple[dict[str, list[Comment]], int]:
    """Decode records into per-stream lists in log order; returns them and the count skipped."""
    streams: dict[str, list[Comment]] = defaultdict(list)
    bad = 0
    for r in records:
        try:
            c = decode_record(r.value)
        except RecordError as exc:
            bad += 1
            log.warning("skipping record %d@%d: %s", r.offset, r.partition, exc)
            continue
        streams[c.stream].append(c)
    return streams, bad


class Coordinator:
    def __init__(self, comment_log: CommentLog, broker: Broker, state: StreamState, *,
                 flush_interval_ms: int = 10, max_batch: int = 100, recent_size: int = 200) -> None:
        self.broker = broker
        self.state = state
        self.recent_size = recent_size
        self.skipped_records = 0
        self.published_batches = 0
        self.loop = ConsumeLoop(comment_log.consumer(GROUP), self.handle, name="coordinator",
                                linger_ms=flush_interval_ms, max_records=max_batch)

    async def handle(self, records: Sequence[LogRecord]) -> None:
        streams, bad = group_by_stream(records)
        self.skipped_records += bad
        for stream, comments in streams.items():
            await self.publish_stream(stream, comments)

    async def publish_stream(self, stream: str, comments: list[Comment]) -> None:
        epoch, first = await self.state.allocate_offsets(stream, len(comments))
        events = [c.to_event(first + i) for i, c in enumerate(comments)]
        last = first + len(events) - 1
        batch = {"t": "batch", "stream": stream, "epoch": epoch, "offset": last, "comments": events}
        await self.state.push_recent(stream, events, self.recent_size)
        await self.broker.publish(stream, pack_channel_message(encode_event(batch, JSON), last, len(events)))
        self.published_batches += 1

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
