"""The broadcast coordinator: comments log to each stream's Pub/Sub channel.

It reads the log in a consumer group (one coordinator owns a partition at a time), keeps
each stream's recent cache and position, and publishes one ``batch`` event per stream per
flush, encoded once as JSON: gateways forward those bytes to their viewers as they are.

It numbers nothing: a comment's (epoch, offset) is its log position (``ingest/log.py``), so
a coordinator that crashes after publishing and before committing replays the same
comments with the same numbers. The cache and position ignore what they already have, and
viewers drop the re-published comments by id.

:func:`group_by_stream` and :func:`batch_message` are pure, so anything else that reads the
log (a gateway consuming Kafka itself while Redis is down, say) builds the very same channel
messages, numbered the same way.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from chorus.broker import Broker, StreamState
from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.log import CommentLog, LogRecord
from chorus.ingest.records import Comment, RecordError, decode_record
from chorus.protocol import JSON, encode_event, pack_channel_message

__all__ = ["Coordinator", "batch_message", "group_by_stream"]

log = logging.getLogger("chorus.coordinator")

GROUP = "chorus-coordinator"


def group_by_stream(records: Sequence[LogRecord]) -> tuple[dict[tuple[str, str], list[Comment]], int]:
    """Decode records into lists per (stream, epoch), in log order, each comment at its log
    position; returns them and the count skipped.

    A stream has one epoch unless it changed partition (the topic was recreated or got more
    partitions): then its comments of each epoch stay apart.
    """
    streams: dict[tuple[str, str], list[Comment]] = defaultdict(list)
    bad = 0
    for r in records:
        try:
            c = decode_record(r.value, r.epoch, r.offset)
        except RecordError as exc:
            bad += 1
            log.warning("skipping record %d@%d: %s", r.offset, r.partition, exc)
            continue
        streams[c.stream, c.epoch].append(c)
    return streams, bad


def batch_message(stream: str, epoch: str, comments: Sequence[Comment]) -> bytes:
    """The Pub/Sub channel message of one ``batch`` event (JSON, encoded once for every gateway)."""
    events = [c.to_event() for c in comments]
    last = comments[-1].offset
    batch = {"t": "batch", "stream": stream, "epoch": epoch, "offset": last, "comments": events}
    return pack_channel_message(encode_event(batch, JSON), last, len(events))


class Coordinator:
    def __init__(self, comment_log: CommentLog, broker: Broker, state: StreamState, *,
                 flush_interval_ms: int = 10, max_batch: int = 100, recent_size: int = 1000) -> None:
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
        for (stream, epoch), comments in streams.items():
            await self.publish_stream(stream, epoch, comments)

    async def publish_stream(self, stream: str, epoch: str, comments: list[Comment]) -> None:
        """Cache, then publish: a viewer resuming right after the batch finds it in the cache."""
        await self.state.advance(stream, epoch, [c.to_event() for c in comments], self.recent_size)
        await self.broker.publish(stream, batch_message(stream, epoch, comments))
        self.published_batches += 1

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
