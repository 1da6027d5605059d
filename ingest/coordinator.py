"""The broadcast coordinator: comments log to each stream's Pub/Sub channel.

It reads the log in a consumer group (one coordinator owns a partition at a time), keeps
each stream's recent cache and position, and publishes one ``batch`` event per stream per
flush, encoded once as JSON: gateways forward those bytes to their viewers as they are.

It numbers nothing: a comment's (epoch, offset) is its log position (``ingest/log.py``), so
a coordinator that crashes after publishing and before committing replays the same
comments with the same numbers. The cache and position ignore what they already have, and
viewers drop the re-published comments by id.

:func:`group_by_stream` and :func:`batch_message` are pure, so anything else that reads the
log (a gateway consuming Kafka itself while Redis is down, gateway/fallback.py) builds the
very same channel messages, numbered the same way.

Control records (ingest/records.py: delete, shadow, pin, unpin) come in the stream's order
with its comments; :func:`split_by_stream` keeps that order and the coordinator applies each
between the batches before and after it: a delete takes the comment out of the recent cache
(and unpins it if it was pinned) and sends ``{"t":"delete","id":...}``; a shadow only takes it
out of the cache (its author keeps seeing it); a pin or unpin is stored for welcome messages
and sent. Control events go out as they are, never sampled or skipped. Comments marked
``shadow`` (a shadow-banned author) are never broadcast: the author's gateway shows them to
the author.

Adaptive sampling (``ingest/sampling.py``) decides what of a hot stream's batch is broadcast;
the rest is only stored (the archiver reads the log). The recent cache gets what was
broadcast, so a resume replays exactly what the viewer missed of the broadcast; each change
of a stream's keep ratio is recorded (``note_keep_ratio``) before the ``throttle`` event that
announces it, so a resume served from the history store filters it the same way. A small
ticker ends sampling (``throttle`` 1.0) for a stream that went quiet, since no batch comes to
do it, and sets or lifts automatic slow mode through the stream's mode API.

Failover. With an ``instance_id`` the coordinator is a static member of its consumer group,
so one restarted after a crash takes its partitions back at once instead of waiting for the
dead member's session to expire. With a ``lease`` too (ingest/lease.py: Redis, one per
instance id) several processes may run with the same id: the lease holder consumes, the
others stand by and the first to take a lapsed lease joins with that id, taking the crashed
holder's partitions within about ``lease_ms``. A holder that loses its lease stops consuming
and stands by again. Different instance ids share the topic's partitions as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

from chorus.broker import Broker, StreamState, set_stream_mode
from chorus.config import SamplingConfig
from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.lease import Lease
from chorus.ingest.log import CommentLog, LogConsumer, LogRecord, group_consumer
from chorus.ingest.records import Comment, Control, RecordError, decode_any
from chorus.ingest.sampling import Plan, RateWindow, Sampler, throttle_event
from chorus.protocol import JSON, encode_event, pack_channel_message

__all__ = ["Coordinator", "batch_message", "control_message", "group_by_stream", "split_by_stream"]

log = logging.getLogger("chorus.coordinator")

GROUP = "chorus-coordinator"
MAX_GATHER = 5000  # log records one step handles at most

# Sets (True) or lifts (False) a stream's automatic slow mode.
SlowModeSetter = Callable[[str, bool], Awaitable[None]]


def split_by_stream(records: Sequence[LogRecord]) -> tuple[dict[tuple[str, str], list[Comment | Control]], int]:
    """Decode records into lists per (stream, epoch), in log order, each comment and control
    record at its log position; returns them and the count skipped.

    A stream has one epoch unless it changed partition (the topic was recreated or got more
    partitions): then its records of each epoch stay apart.
    """
    streams: dict[tuple[str, str], list[Comment | Control]] = defaultdict(list)
    bad = 0
    for r in records:
        try:
            c = decode_any(r.value, r.epoch, r.offset)
        except RecordError as exc:
            bad += 1
            log.warning("skipping record %d@%d: %s", r.offset, r.partition, exc)
            continue
        streams[c.stream, r.epoch].append(c)
    return streams, bad


def group_by_stream(records: Sequence[LogRecord]) -> tuple[dict[tuple[str, str], list[Comment]], int]:
    """The comments to broadcast per (stream, epoch), in log order: control records and
    shadowed comments left out; returns them and the count of undecodable records."""
    streams, bad = split_by_stream(records)
    out: dict[tuple[str, str], list[Comment]] = {}
    for key, items in streams.items():
        comments = [c for c in items if isinstance(c, Comment) and not c.shadow]
        if comments:
            out[key] = comments
    return out, bad


def control_message(control: Control) -> bytes | None:
    """The Pub/Sub channel message of a control record's event (None: it has none)."""
    event = control.to_event()
    return None if event is None else pack_channel_message(encode_event(event, JSON))


def batch_message(stream: str, epoch: str, comments: Sequence[Comment], published_us: int = 0) -> bytes:
    """The Pub/Sub channel message of one ``batch`` event (JSON, encoded once for every gateway);
    ``published_us`` (wall clock) lets gateways measure Pub/Sub and delivery latency."""
    events = [c.to_event() for c in comments]
    last = comments[-1].offset
    batch = {"t": "batch", "stream": stream, "epoch": epoch, "offset": last, "comments": events}
    return pack_channel_message(encode_event(batch, JSON), last, len(events), published_us)


class Coordinator:
    def __init__(self, comment_log: CommentLog, broker: Broker, state: StreamState, *,
                 flush_interval_ms: int = 10, max_batch: int = 100, recent_size: int = 1000,
                 hot_flush_interval_ms: int = 50, busy_above_per_s: int = 500,
                 sampling: SamplingConfig | None = None, set_slow_mode: SlowModeSetter | None = None,
                 clock: Callable[[], float] = time.monotonic, group: str = GROUP, instance_id: str = "",
                 lease: Lease | None = None) -> None:
        self.comment_log = comment_log
        self.group = group
        self.instance_id = instance_id
        self.lease = lease
        self._stopping = asyncio.Event()
        self.broker = broker
        self.state = state
        self.recent_size = recent_size
        self.flush_interval_ms = flush_interval_ms
        self.hot_flush_interval_ms = max(flush_interval_ms, hot_flush_interval_ms)
        self.max_batch = max_batch
        self.busy_above_per_s = busy_above_per_s
        self._records_rate = RateWindow()  # log records handled per second, every stream together
        self.sampling = sampling or SamplingConfig()
        self.sampler = Sampler(self.sampling)
        self.set_slow_mode = set_slow_mode or self._set_slow_mode
        self.clock = clock
        self.skipped_records = 0
        self.published_batches = 0
        self.sampled_out = 0  # comments stored but not broadcast
        self.throttle_events = 0
        self.control_events = 0  # control records applied (deletes, shadows, pins, unpins)
        self._publishing = asyncio.Lock()  # one stream's throttle events and batches stay in order
        self.loop = ConsumeLoop(self._consumer(), self.handle, name="coordinator",
                                linger_ms=flush_interval_ms, max_records=max_batch)

    def _consumer(self) -> LogConsumer:
        return group_consumer(self.comment_log, self.group, self.flush_interval_ms, self.instance_id)

    async def handle(self, records: Sequence[LogRecord]) -> None:
        self._records_rate.add(self._now_ms(), len(records))
        streams, bad = split_by_stream(records)
        self.skipped_records += bad
        for (stream, epoch), items in streams.items():
            run: list[Comment] = []  # comments since the last control record
            for item in items:
                if isinstance(item, Comment):
                    if not item.shadow:
                        run.append(item)
                    continue
                if run:
                    await self.publish_stream(stream, epoch, run)
                    run = []
                await self.apply_control(item)
            if run:
                await self.publish_stream(stream, epoch, run)
        self._pace_gathering()

    async def apply_control(self, control: Control) -> None:
        """Store the control record's effect, then send its event (see the module docstring)."""
        stream = control.stream
        async with self._publishing:
            if control.op in ("delete", "shadow"):
                await self.state.remove(stream, [control.id])
                pinned = await self.state.get_pin(stream) if control.op == "delete" else None
                if pinned is not None and pinned.get("id") == control.id:
                    await self.state.set_pin(stream, None)
                    await self.broker.publish(stream, pack_channel_message(b'{"t":"unpin"}'))
            elif control.op == "pin":
                await self.state.set_pin(stream, control.comment)
            elif control.op == "unpin":
                await self.state.set_pin(stream, None)
            elif control.op == "restore" and control.comment is not None:
                await self.state.restore(stream, control.comment)
            message = control_message(control)
            if message is not None:
                await self.broker.publish(stream, message)
            self.control_events += 1

    def _pace_gathering(self) -> None:
        """While busy (over ``busy_above_per_s`` records a second) or while a stream is sampled,
        gather the log for ``hot_flush_interval_ms`` and enough records for a full ``max_batch``
        of what is kept; otherwise for ``flush_interval_ms``.

        Every batch published is a frame written to every viewer of its stream. A busy stream
        would otherwise get one per ``flush_interval_ms`` (100/s at 10 ms) holding a few
        comments each, and those writes were the gateways' largest cost (BENCHMARKS.md,
        Pipeline). A quiet stream keeps the short window: its frames are few anyway.
        """
        sampled = self.sampler.sampled()
        if sampled or self._records_rate.rate(self._now_ms()) >= self.busy_above_per_s:
            self.loop.linger_ms = self.hot_flush_interval_ms
            keep = min(sampled.values(), default=1.0)
            self.loop.max_records = min(MAX_GATHER, math.ceil(self.max_batch / keep))
        else:
            self.loop.linger_ms = self.flush_interval_ms
            self.loop.max_records = self.max_batch

    async def publish_stream(self, stream: str, epoch: str, comments: list[Comment]) -> None:
        """Sample, cache, then publish: a viewer resuming right after the batch finds it in the cache."""
        async with self._publishing:
            plan = self.sampler.plan(stream, epoch, comments, self._now_ms())
            await self._apply(stream, epoch, plan)
            if plan.kept:
                await self.state.advance(stream, epoch, [c.to_event() for c in plan.kept], self.recent_size)
                for i in range(0, len(plan.kept), self.max_batch):
                    chunk = plan.kept[i : i + self.max_batch]
                    await self.broker.publish(stream, batch_message(stream, epoch, chunk, time.time_ns() // 1000))
                    self.published_batches += 1
            self.sampled_out += plan.dropped

    async def _apply(self, stream: str, epoch: str, plan: Plan) -> None:
        """Announce a new keep ratio (recorded first, for recovery) and set or lift slow mode."""
        if plan.throttle is not None:
            await self.state.note_keep_ratio(stream, epoch, plan.from_offset, plan.throttle)
            await self.broker.publish(stream, pack_channel_message(throttle_event(plan.throttle)))
            self.sampler.announced(stream, plan.throttle)
            self.throttle_events += 1
            log.info("stream %s: broadcasting %.0f%% of its comments", stream, plan.throttle * 100)
        if plan.slow_mode is not None:
            try:
                await self.set_slow_mode(stream, plan.slow_mode)
            except Exception as exc:  # not applied: the sampler asks again on the next batch or tick
                log.warning("stream %s: automatic slow mode not %s: %s", stream,
                            "set" if plan.slow_mode else "lifted", exc)
                return
            self.sampler.slow_mode_applied(stream, plan.slow_mode)

    async def _set_slow_mode(self, stream: str, on: bool) -> None:
        """Through the mode API, leaving an operator's own setting alone: set only when the stream
        is not already at least as slow, lift only what this set."""
        seconds = self.sampling.slow_mode_seconds
        mode = await self.state.get_mode(stream)
        if on and mode.slow_mode_seconds < seconds:
            await set_stream_mode(self.state, self.broker, stream, dataclasses.replace(mode, slow_mode_seconds=seconds))
        elif not on and mode.slow_mode_seconds == seconds:
            await set_stream_mode(self.state, self.broker, stream, dataclasses.replace(mode, slow_mode_seconds=0))
        log.info("stream %s: automatic slow mode %s", stream, "on" if on else "off")

    async def _tick(self) -> None:
        """Changes that come with time alone: a quiet stream's sampling or slow mode ends."""
        async with self._publishing:
            for stream, epoch, plan in self.sampler.tick(self._now_ms()):
                try:
                    await self._apply(stream, epoch, plan)
                except Exception as exc:  # pending still: tried again on the next tick
                    log.warning("stream %s: throttle event not published: %s", stream, exc)
            self._pace_gathering()

    async def _tick_loop(self) -> None:
        period_s = max(self.sampling.bucket_ms, self.sampling.window_ms // 4) / 1000
        while True:
            await asyncio.sleep(period_s)
            await self._tick()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def run(self) -> None:
        ticker = asyncio.create_task(self._tick_loop(), name="coordinator-sampling-tick")
        try:
            if self.lease is None:
                await self.loop.run()
                return
            while await self._take_lease():
                await self._consume_while_leased(self.lease)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if self.lease is not None:
                await self.lease.close()

    async def _take_lease(self) -> bool:
        """Stand by until the lease is ours (True), or until stopped (False)."""
        assert self.lease is not None
        if self._stopping.is_set():
            return False
        taking = asyncio.ensure_future(self.lease.acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not taking.done():
            taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taking
            return False
        taking.result()
        return not self._stopping.is_set()

    async def _consume_while_leased(self, lease: Lease) -> None:
        """Consume until stopped or until the lease is lost; then the next term needs a fresh
        consumer (a stopped one cannot rejoin)."""
        consuming = asyncio.ensure_future(self.loop.run())
        losing = asyncio.ensure_future(lease.lost())
        await asyncio.wait((consuming, losing), return_when=asyncio.FIRST_COMPLETED)
        losing.cancel()
        if consuming.done():
            await consuming  # stopped, or the role failed: that fails the process, as without a lease
            return
        self.loop.stop()
        try:
            await consuming
        except Exception as exc:  # stopped while retrying a batch (Redis down): its next holder replays it
            log.warning("coordinator stepped down with a batch not handled (%s)", exc)
        if not self._stopping.is_set():
            self.loop.renew(self._consumer())

    def stop(self) -> None:
        self._stopping.set()
        self.loop.stop()
