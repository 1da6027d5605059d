"""Delivery while Redis Pub/Sub is down: the gateway reads the comments log from Kafka itself.

Normally batches reach a gateway over Redis Pub/Sub from the coordinator. If Redis stops
answering, the coordinator cannot publish (it pauses and catches up later), so live viewers
would see nothing until Redis is back. A gateway with a :class:`PubSubFallback` probes Redis
(``RedisBroker.ping``: Redis answers *and* the subscriber connection is live) and feeds a
:class:`CircuitBreaker`; while the breaker is open it tails the log itself and builds the
same channel messages the coordinator would (``split_by_stream`` / ``batch_message`` of
ingest/coordinator.py, sampled by its own ``Sampler``: same ids kept at the same ratio; control
records' deletes and pins too, shadowed comments never),
handing them to the node as if they had come over Pub/Sub (``Node.on_message(via="kafka")``).

The breaker, sans-I/O (times are passed in)::

    CLOSED --(``failures`` probes in a row fail or time out)--> OPEN       start the Kafka tail
    OPEN --(``retry_after_s`` later)--> HALF_OPEN: one probe
    HALF_OPEN --(it fails)--> OPEN (the wait starts again)
    HALF_OPEN --(it answers)--> CLOSED                                 drain, stop the tail

Where the tail starts: it has no consumer group (it commits nothing, every gateway reads
every partition it needs, and joining a group would cost seconds of rebalance). Each
partition is read from the offset Kafka finds for a point in time, ``rewind_ms`` before the
last probe that succeeded: the coordinator was at most that far behind, so nothing it had not
yet published is missed. Per stream, what the node already delivered (``Node.last_offsets``)
is skipped; any overlap left is harmless, clients de-duplicate by id.

Going back: once the breaker closes (Pub/Sub subscribed again), the tail notes the log's end
offsets and keeps delivering until it reaches them, then stops. Anything published after
that moment was appended before the coordinator published it, and the subscription was
already live, so it arrives over Pub/Sub; the coordinator's catch-up after the outage
repeats some comments, which clients drop by id.

Limits: only streams the gateway was already subscribed to are served (a new viewer still
needs Redis for its welcome); a topic recreated during the outage is read from its new
offsets but the skip above may hide its first comments until the viewer resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from chorus.config import FallbackConfig, SamplingConfig
from chorus.gateway.node import Node
from chorus.ingest.coordinator import batch_message, control_message, split_by_stream
from chorus.ingest.kafka_topic import partition_epoch, topic_id
from chorus.ingest.log import LogRecord
from chorus.ingest.records import Comment
from chorus.ingest.sampling import Sampler, throttle_event
from chorus.protocol import pack_channel_message

__all__ = ["BreakerState", "CircuitBreaker", "KafkaTail", "LogTail", "PubSubFallback"]

log = logging.getLogger("chorus.fallback")

DRAIN_MAX_S = 5.0  # longest a tail keeps reading to the end offsets after Redis is back
FETCH_MS = 100


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed, open, half-open (see the module docstring). ``now`` is any monotonic clock in s."""

    def __init__(self, failures: int = 3, retry_after_s: float = 3.0) -> None:
        self.threshold = failures
        self.retry_after_s = retry_after_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    @property
    def is_open(self) -> bool:
        """Pub/Sub is not to be trusted: open, or half-open with the probe not answered yet."""
        return self.state is not BreakerState.CLOSED

    def allow(self, now: float) -> bool:
        """May the caller probe now? Open turns half-open once ``retry_after_s`` has passed."""
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.retry_after_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        return True

    def success(self, now: float) -> None:
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED)

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
                self.state is BreakerState.CLOSED and self.failures >= self.threshold):
            self.opened_at = now
            self._move(BreakerState.OPEN)

    def _move(self, to: BreakerState) -> None:
        self.transitions.append((self.state, to))
        self.state = to


class LogTail(Protocol):
    """The comments log read from a point in time, committing nothing."""

    async def start(self, since_ms: int) -> None: ...
    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]: ...
    async def mark_end(self) -> None:
        """Note the log's end offsets now; :meth:`caught_up` compares with them."""
        ...

    async def caught_up(self) -> bool: ...
    async def stop(self) -> None: ...


class KafkaTail:
    """Every partition of the topic, without a consumer group, from a timestamp (ms)."""

    def __init__(self, bootstrap: str, topic: str, client_id: str = "chorus-gateway-fallback") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_id = client_id
        self._consumer: Any = None
        self._topic_id = ""
        self._ends: dict[Any, int] = {}

    async def start(self, since_ms: int) -> None:
        from aiokafka import AIOKafkaConsumer

        # No group: aiokafka then assigns every partition of the subscribed topic itself.
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="latest", client_id=self.client_id)
        await consumer.start()
        try:
            self._topic_id = await topic_id(self.bootstrap, self.topic, timeout_s=10)
            async with asyncio.timeout(10):
                while not consumer.assignment():
                    await asyncio.sleep(0.02)
            parts = sorted(consumer.assignment(), key=lambda tp: tp.partition)
            found = await consumer.offsets_for_times({tp: max(0, since_ms) for tp in parts})
            ends = await consumer.end_offsets(parts)
            for tp in parts:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out: list[LogRecord] = []
        for tp, msgs in batches.items():
            epoch = partition_epoch(self.topic, tp.partition, self._topic_id)
            out += (LogRecord(tp.partition, m.offset, m.key or b"", m.value or b"", epoch) for m in msgs)
        return out

    async def mark_end(self) -> None:
        self._ends = await self._consumer.end_offsets(list(self._consumer.assignment()))

    async def caught_up(self) -> bool:
        for tp, end in self._ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


class PubSubFallback:
    """Probes Redis, drives the breaker, and runs a :class:`LogTail` while it is open."""

    def __init__(self, node: Node, probe: Callable[[], Awaitable[object]], open_tail: Callable[[], LogTail],
                 config: FallbackConfig, sampling: SamplingConfig, *, max_batch: int = 100,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.node = node
        self.probe = probe
        self.open_tail = open_tail
        self.config = config
        self.sampler = Sampler(dataclasses.replace(sampling, slow_mode_above_per_s=0))  # modes: the coordinator's
        self.max_batch = max_batch
        self.clock = clock
        self.wall_ms = wall_ms
        self.breaker = CircuitBreaker(config.failures, config.retry_after_s)
        self.active = False  # the tail is delivering
        self.activations = 0
        self.delivered_batches = 0
        self._last_ok_ms = wall_ms()
        self._tail_task: asyncio.Task[None] | None = None
        self._switch_back = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                await self._probe_if_due()
                self._follow_breaker()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.config.probe_interval_ms / 1000)
        finally:
            if self._tail_task is not None:
                self._tail_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._tail_task

    def stop(self) -> None:
        self._stopping.set()

    async def _probe_if_due(self) -> None:
        if not self.breaker.allow(self.clock()):
            return
        try:
            await asyncio.wait_for(self.probe(), self.config.probe_timeout_ms / 1000)
        except Exception as exc:  # a timeout too
            was_open = self.breaker.is_open
            self.breaker.failure(self.clock())
            if self.breaker.is_open and not was_open:
                log.warning("redis pub/sub failed %d probes (%s): delivering from kafka",
                            self.breaker.failures, type(exc).__name__)
            return
        self._last_ok_ms = self.wall_ms()
        if self.breaker.is_open:
            log.info("redis pub/sub answers again: back to it once the kafka tail caught up")
        self.breaker.success(self.clock())

    def _follow_breaker(self) -> None:
        task = self._tail_task
        if task is not None and task.done():
            if not task.cancelled() and task.exception() is not None:
                log.error("the kafka fallback failed", exc_info=task.exception())
            self._tail_task = task = None
        if self.breaker.is_open and task is None:
            self._switch_back.clear()
            since_ms = self._last_ok_ms - self.config.rewind_ms
            self._tail_task = asyncio.create_task(self._consume(since_ms), name="kafka-fallback")
        elif not self.breaker.is_open and task is not None:
            self._switch_back.set()

    async def _consume(self, since_ms: int) -> None:
        tail = self.open_tail()
        self.activations += 1
        try:
            if not await self._start(tail, since_ms):
                return
            self.active = True
            drain_until: float | None = None
            while True:
                if self._switch_back.is_set():
                    if drain_until is None:
                        await tail.mark_end()
                        drain_until = self.clock() + DRAIN_MAX_S
                    if await tail.caught_up() or self.clock() > drain_until:
                        return
                self.deliver(await tail.fetch(FETCH_MS, 1000))
                self._tick()
        finally:
            self.active = False
            with contextlib.suppress(Exception):
                await tail.stop()
            log.info("kafka fallback stopped after %d batches", self.delivered_batches)

    async def _start(self, tail: LogTail, since_ms: int) -> bool:
        """Start the tail, retrying while the breaker stays open; False if Redis came back first."""
        delay = 0.2
        while not self._switch_back.is_set():
            try:
                await tail.start(since_ms)
                return True
            except Exception as exc:
                log.warning("kafka fallback cannot start (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    def deliver(self, records: Sequence[LogRecord]) -> None:
        """The coordinator's channel messages for the streams this node serves, via the node."""
        if not records:
            return
        streams, _bad = split_by_stream(records)
        wanted = set(self.node.subscribed_streams())
        now_ms = int(self.clock() * 1000)
        for (stream, epoch), items in streams.items():
            seen = self.node.last_offsets.get(stream, -1)
            fresh = [c for c in items if c.offset > seen] if stream in wanted else []
            comments = [c for c in fresh if isinstance(c, Comment) and not c.shadow]  # shadowed: the author's only
            if comments:
                plan = self.sampler.plan(stream, epoch, comments, now_ms)
                if plan.throttle is not None:
                    self._announce(stream, plan.throttle)
                for i in range(0, len(plan.kept), self.max_batch):
                    self.node.on_message(stream, batch_message(stream, epoch, plan.kept[i : i + self.max_batch]),
                                         "kafka")
                    self.delivered_batches += 1
            for control in (c for c in fresh if not isinstance(c, Comment)):  # deletes and pins, after the batch
                message = control_message(control)
                if message is not None:
                    self.node.on_message(stream, message, "kafka")

    def _tick(self) -> None:
        for stream, _epoch, plan in self.sampler.tick(int(self.clock() * 1000)):
            if plan.throttle is not None:
                self._announce(stream, plan.throttle)

    def _announce(self, stream: str, keep_ratio: float) -> None:
        self.node.on_message(stream, pack_channel_message(throttle_event(keep_ratio)), "kafka")
        self.sampler.announced(stream, keep_ratio)
