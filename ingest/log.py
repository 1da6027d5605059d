"""The comment log: Kafka in production, an in-process log on the embedded default.

Both implement :class:`CommentLog`. Producers append records keyed by stream id; consumers
read in groups and commit offsets only after their effect is done (at-least-once), so
every downstream write must be idempotent on the comment id.

Each record carries its position: ``offset`` in its partition and the ``epoch`` naming that
partition's offset space (``ingest/kafka_topic.py`` for Kafka; partition and a per-process
boot id for the in-process log, whose records die with the process). A stream lives in one
partition, so its comments' offsets only grow within an epoch, with gaps where other streams'
records sit; every consumer computes the same (epoch, offset) for a record, however often it
reads it. A consumer can be paused (it then returns nothing but keeps its place, and for
Kafka its group membership, as long as the caller keeps fetching).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.partitioner import DefaultPartitioner

from chorus.errors import Unavailable
from chorus.ingest.kafka_topic import partition_epoch, topic_id

__all__ = ["CommentLog", "KafkaLog", "LogConsumer", "LogRecord", "LogUnavailable", "LogUnconfirmed", "MemoryLog",
           "Retention", "append_many", "group_consumer", "open_log"]

log = logging.getLogger("chorus.log")


class LogUnavailable(Unavailable):
    """The log did not take the record; it was not stored and the caller must say so."""


class LogUnconfirmed(LogUnavailable):
    """The record was handed to the log, which did not confirm it in time: it may still be stored."""

# The producer's batch per partition (aiokafka's default is 16 KiB). A full batch makes every
# further send wait for it to drain, each waiter on the same future: at thousands of posts in
# flight that wait alone took most of a gateway's CPU. 512 KiB stays under the broker's default
# message.max.bytes (1 MiB).
PRODUCER_BATCH_BYTES = 512 * 1024
FETCH_MIN_BYTES = 256 * 1024  # a consumer's fetch returns early once this much is there
PARTITION_MEMO_MAX = 100_000  # keys (streams) whose partition a producer remembers


@dataclass(frozen=True, slots=True)
class LogRecord:
    partition: int
    offset: int
    key: bytes
    value: bytes
    epoch: str = ""


class LogConsumer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]: ...
    async def commit(self, records: Sequence[LogRecord]) -> None: ...

    def pause(self) -> None:
        """Fetch nothing more from the partitions assigned now, until :meth:`resume`."""
        ...

    def resume(self) -> None: ...

    def highwaters(self) -> dict[int, int]:
        """Per assigned partition, the offset after its last record as last seen (for lag)."""
        ...

    async def positions(self) -> dict[int, int]:
        """Per assigned partition, the offset of the next record to fetch (for lag)."""
        ...


class CommentLog(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def append(self, key: bytes, value: bytes) -> None: ...
    def consumer(self, group: str, max_wait_ms: int = 10) -> LogConsumer:
        """A member of consumer group ``group``. ``max_wait_ms``: how long the log may hold a
        fetch to fill it (Kafka's fetch.max.wait.ms), the latency a role trades for fewer fetches."""
        ...


async def append_many(comment_log: CommentLog, records: Sequence[tuple[bytes, bytes]]) -> list[Exception | None]:
    """Append ``records`` (key, value) in order; per record None (taken) or the exception.

    A log with its own ``append_many`` (Kafka: one task for the batch) does it; any other
    :class:`CommentLog` gets its ``append`` called for each, concurrently.
    """
    own = getattr(comment_log, "append_many", None)
    if own is not None:
        return list(await own(records))
    results = await asyncio.gather(*(comment_log.append(k, v) for k, v in records), return_exceptions=True)
    out: list[Exception | None] = []
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
        out.append(r if isinstance(r, Exception) else None)
    return out


def _next_offsets(records: Sequence[LogRecord]) -> dict[int, int]:
    """The offset to commit per partition: one past the last record handled."""
    nxt: dict[int, int] = {}
    for r in records:
        nxt[r.partition] = max(nxt.get(r.partition, 0), r.offset + 1)
    return nxt


@dataclass(frozen=True, slots=True)
class Retention:
    """What the in-process log keeps (config ``kafka.log_*``). A record goes once every consumer
    group has committed past it and it is beyond ``records`` per partition or older than
    ``seconds``; past ``max_records`` in a partition the oldest go even unread (a consumer behind
    them skips ahead; counted and logged). 0 turns each bound off; all 0 keeps every record."""

    records: int = 10_000
    seconds: float = 60.0
    max_records: int = 100_000


KEEP_EVERYTHING = Retention(0, 0.0, 0)
COMPACT_AT = 4096  # dropped records a partition's list sheds at once (amortised O(1) per record)


class _Partition:
    """One partition's records from ``base`` (the oldest offset kept) to its end offset.

    ``len()`` is the end offset (the next record's), as for a list that kept everything; records
    sit in a list whose first ``head`` entries are dropped ones, shed in chunks."""

    __slots__ = ("base", "head", "records", "times")

    def __init__(self) -> None:
        self.records: list[LogRecord] = []
        self.times: list[float] = []  # when each record was appended (monotonic s)
        self.head = 0
        self.base = 0

    def __len__(self) -> int:
        return self.base + len(self.records) - self.head

    def kept(self) -> int:
        return len(self.records) - self.head

    def append(self, record: LogRecord, now: float) -> None:
        self.records.append(record)
        self.times.append(now)

    def read(self, offset: int, n: int) -> list[LogRecord]:
        """Up to ``n`` records from ``offset`` (at least :attr:`base`)."""
        i = self.head + offset - self.base
        return self.records[i : i + n]

    def first_younger_than(self, cutoff: float) -> int:
        """The offset of the first record appended at or after ``cutoff``."""
        i = bisect.bisect_left(self.times, cutoff, lo=self.head)
        return self.base + i - self.head

    def drop_to(self, offset: int) -> int:
        """Drop every record before ``offset``; how many went."""
        n = min(offset, len(self)) - self.base
        if n <= 0:
            return 0
        self.head += n
        self.base += n
        if self.head >= COMPACT_AT and self.head * 2 >= len(self.records):
            del self.records[: self.head]
            del self.times[: self.head]
            self.head = 0
        return n


class MemoryLog:
    """An in-process log with partitions and consumer groups, for one process.

    Records live at most as long as the process; that is the embedded default's durability, and
    why the epoch of a partition includes a boot id drawn when the log is made. History lives in
    the SQLite store and recovery reads the recent cache, then that store, so the log keeps only
    what a consumer may still read (:class:`Retention`): memory stays flat however long it runs.
    """

    def __init__(self, partitions: int = 4, retention: Retention = KEEP_EVERYTHING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._parts = [_Partition() for _ in range(partitions)]
        boot = uuid.uuid4().hex[:12]
        self._epochs = [partition_epoch("memory", p, boot) for p in range(partitions)]
        self._committed: dict[str, list[int]] = {}
        self._grew = asyncio.Event()
        self.retention = retention
        self._clock = clock
        self.dropped = 0  # records let go (every group had read them, or the hard cap)
        self.skipped = 0  # records a consumer never read because the hard cap dropped them first

    def retain(self, retention: Retention) -> None:
        self.retention = retention

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def partition_of(self, key: bytes) -> int:
        return zlib.crc32(key) % len(self._parts)

    def bounds(self, partition: int) -> tuple[int, int]:
        """(the oldest offset kept, the end offset) of ``partition``."""
        part = self._parts[partition]
        return part.base, len(part)

    def records_kept(self) -> int:
        return sum(part.kept() for part in self._parts)

    async def append(self, key: bytes, value: bytes) -> None:
        p = self.partition_of(key)
        part = self._parts[p]
        part.append(LogRecord(p, len(part), key, value, self._epochs[p]), self._clock())
        cap = self.retention.max_records
        if cap and part.kept() > cap:
            self.dropped += part.drop_to(len(part) - cap)
        self._grew.set()

    def trim(self) -> None:
        """Drop what every group has committed past and the retention no longer keeps."""
        r = self.retention
        if not (r.records or r.seconds):
            return
        cutoff = self._clock() - r.seconds
        for p, part in enumerate(self._parts):
            read_by_all = min((c[p] for c in self._committed.values()), default=len(part))
            keep_from = max(len(part) - r.records if r.records else part.base,
                            part.first_younger_than(cutoff) if r.seconds else part.base)
            self.dropped += part.drop_to(min(read_by_all, keep_from))

    def consumer(self, group: str, max_wait_ms: int = 10) -> MemoryLogConsumer:
        # A new group starts at the oldest record kept (Kafka's auto.offset.reset=earliest).
        committed = self._committed.setdefault(group, [part.base for part in self._parts])
        return MemoryLogConsumer(self, group, committed)


class MemoryLogConsumer:
    def __init__(self, log_: MemoryLog, group: str, committed: list[int]) -> None:
        self._log = log_
        self.group = group
        self._committed = committed
        self._position = list(committed)
        self.paused = False
        self.skipped = 0  # records dropped before this consumer read them (the log's hard cap)

    async def start(self) -> None:
        self._position = list(self._committed)

    async def stop(self) -> None:
        pass

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def _skip_dropped(self, p: int, part: _Partition) -> None:
        """Behind the oldest record kept: go on from there, and say what was lost."""
        lost = part.base - self._position[p]
        self._position[p] = part.base
        self.skipped += lost
        self._log.skipped += lost
        log.warning("in-process log: consumer group %s lost %d records of partition %d it had not read "
                    "(past kafka.log_max_records = %d); it goes on from offset %d (%d lost so far)",
                    self.group, lost, p, self._log.retention.max_records, part.base, self.skipped)

    def _take(self, max_records: int) -> list[LogRecord]:
        out: list[LogRecord] = []
        for p, part in enumerate(self._log._parts):
            if self._position[p] < part.base:
                self._skip_dropped(p, part)
            chunk = part.read(self._position[p], max_records - len(out))
            self._position[p] += len(chunk)
            out.extend(chunk)
            if len(out) >= max_records:
                break
        return out

    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]:
        if self.paused:
            await asyncio.sleep(timeout_ms / 1000)
            return []
        out = self._take(max_records)
        if out:
            return out
        self._log._grew.clear()
        try:
            await asyncio.wait_for(self._log._grew.wait(), timeout_ms / 1000)
        except TimeoutError:
            return []
        return self._take(max_records)

    async def commit(self, records: Sequence[LogRecord]) -> None:
        for p, off in _next_offsets(records).items():
            self._committed[p] = max(self._committed[p], off)
        self._log.trim()

    def highwaters(self) -> dict[int, int]:
        return {p: len(part) for p, part in enumerate(self._log._parts)}

    async def positions(self) -> dict[int, int]:
        return dict(enumerate(self._position))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _OpenBatch:
    """A producer batch of one partition: filled while the batch before it is handed over."""

    __slots__ = ("builder", "handed")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        # The producer's delivery future once the batch is handed over; LogUnavailable if it never was.
        self.handed: asyncio.Future[asyncio.Future[Any]] = asyncio.get_running_loop().create_future()
        self.handed.add_done_callback(_retrieve)  # its waiters may have given up: no "never retrieved"

    async def confirmed(self) -> None:
        """Returns once Kafka confirmed the batch; raises if it was not handed over or not confirmed."""
        delivery = await asyncio.shield(self.handed)
        await asyncio.shield(delivery)


class _PartitionSender:
    """One partition's records on their way to the producer, in order.

    aiokafka queues one batch per partition and makes a second ``send_batch`` wait until the
    first is drained, so records appended meanwhile go into an open batch that one task
    hands over next: under load batches grow instead of waiters.
    """

    def __init__(self, producer: Any, topic: str, partition: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self._queue: deque[_OpenBatch] = deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, key: bytes, value: bytes) -> _OpenBatch:
        """Append a record to the open batch (a new one when full) and make sure it will be sent."""
        batch = self._queue[-1] if self._queue else None
        if batch is None or batch.builder.append(key=key, value=value, timestamp=None) is None:
            batch = _OpenBatch(self.producer.create_batch())
            if batch.builder.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit a producer batch")
            self._queue.append(batch)
        if self._task is None:
            self._task = asyncio.create_task(self._hand_over(), name=f"kafka-send-{self.partition}")
        return batch

    async def _hand_over(self) -> None:
        from aiokafka.errors import KafkaError

        try:
            while self._queue:
                batch = self._queue.popleft()
                try:
                    fut = await self.producer.send_batch(batch.builder, self.topic, partition=self.partition)
                except (KafkaError, TimeoutError) as exc:
                    # Never handed over: not stored.
                    batch.handed.set_exception(LogUnavailable(f"kafka did not take the record ({type(exc).__name__})"))
                    continue
                except asyncio.CancelledError:
                    batch.handed.set_exception(LogUnconfirmed("the producer stopped while handing it over"))
                    raise
                fut.add_done_callback(_retrieve)
                batch.handed.set_result(fut)
        finally:
            self._task = None
            for batch in self._queue:  # cancelled (stopping): these never left
                batch.handed.set_exception(LogUnavailable("the producer stopped"))
            self._queue.clear()

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class KafkaLog:
    """The ``comments`` topic on a real Kafka cluster.

    The producer is idempotent with acks=all (aiokafka defaults to acks=1 without
    idempotence, so both are set). It starts lazily and again after a failure, so a gateway
    comes up while Kafka is down and refuses posts with a clear error until it is back.
    """

    def __init__(self, bootstrap: str, topic: str, accept_timeout_ms: int = 5000, linger_ms: int = 2, *,
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 1000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.accept_timeout_ms = accept_timeout_ms
        self.linger_ms = linger_ms
        self._producer: object | None = None
        self._starting = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[bytes, int] = {}  # key -> partition, for the count below
        self._partition_count = 0
        self._senders: dict[int, _PartitionSender] = {}

    async def start(self) -> None:
        try:
            await self._ensure_producer()
        except LogUnavailable as exc:
            log.warning("kafka producer not started yet: %s", exc)

    async def stop(self) -> None:
        senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            await sender.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # type: ignore[attr-defined]

    async def _ensure_producer(self) -> object:
        from aiokafka import AIOKafkaProducer

        async with self._starting:
            if self._producer is not None:
                return self._producer
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                enable_idempotence=True,
                acks="all",
                linger_ms=self.linger_ms,
                request_timeout_ms=self.accept_timeout_ms,
                client_id="chorus-gateway",
                max_batch_size=PRODUCER_BATCH_BYTES,
            )
            try:
                await asyncio.wait_for(producer.start(), self.accept_timeout_ms / 1000)
            except Exception as exc:
                await producer.stop()
                raise LogUnavailable(f"kafka at {self.bootstrap} is unreachable ({type(exc).__name__})") from exc
            self._producer = producer
            return producer

    async def append(self, key: bytes, value: bytes) -> None:
        """Raises :class:`LogUnavailable` if the record never left this process for Kafka, and
        :class:`LogUnconfirmed` if it was handed over but not confirmed in time."""
        (failed,) = await self.append_many([(key, value)])
        if failed is not None:
            raise failed

    async def append_many(self, records: Sequence[tuple[bytes, bytes]]) -> list[Exception | None]:
        """Hand every record to the producer, then wait for all their confirmations in this one
        task: None per record Kafka confirmed, else :class:`LogUnavailable` (never left this
        process: not stored) or :class:`LogUnconfirmed` (sent, not confirmed in time: may be stored).

        Records join their partition's open producer batch (:class:`_PartitionSender`), not
        one ``send`` each: a ``send`` costs a future, a metadata check and the accumulator's
        bookkeeping per record (~20 µs of a gateway's CPU, against ~1 µs for a batch append:
        BENCHMARKS.md, Pipeline). The default partitioner's choice (murmur2 of the key) is
        kept, so a stream's records land where any other producer's would, in order.
        """
        from aiokafka.errors import KafkaError

        try:
            producer = await self._ensure_producer()
            async with asyncio.timeout(self.accept_timeout_ms / 1000):
                partitions = sorted(await producer.partitions_for(self.topic))  # type: ignore[attr-defined]
        except LogUnavailable as exc:
            return [exc] * len(records)
        except (KafkaError, TimeoutError) as exc:
            why = f"kafka has no metadata for topic {self.topic} ({type(exc).__name__})"
            return [LogUnavailable(why)] * len(records)
        out: list[Exception | None] = [None] * len(records)
        batches: dict[_OpenBatch, list[int]] = {}
        for i, (key, value) in enumerate(records):
            p = self._partition(key, partitions)
            sender = self._senders.get(p)
            if sender is None:
                sender = self._senders[p] = _PartitionSender(producer, self.topic, p)
            try:
                batches.setdefault(sender.add(key, value), []).append(i)
            except ValueError as exc:
                out[i] = LogUnavailable(str(exc))
        await self._wait_confirmed(batches, out)
        return out

    async def _wait_confirmed(self, batches: dict[_OpenBatch, list[int]], out: list[Exception | None]) -> None:
        """Fill ``out`` for every record of ``batches`` once each batch is confirmed or failed."""
        waits = {asyncio.ensure_future(b.confirmed()): members for b, members in batches.items()}
        if not waits:
            return
        # The producer's own request timeout fails a batch it could not deliver; the outer
        # bound is only a safety net.
        done, pending = await asyncio.wait(waits, timeout=self.accept_timeout_ms / 1000 + 2)
        for fut in pending:
            fut.cancel()
            for i in waits[fut]:
                out[i] = LogUnconfirmed("kafka did not confirm the record in time (timeout)")
        for fut in done:
            error = fut.exception()
            if error is not None:
                for i in waits[fut]:
                    out[i] = error if isinstance(error, LogUnavailable) else LogUnconfirmed(
                        f"kafka did not confirm the record ({type(error).__name__})")

    def _partition(self, key: bytes, partitions: list[int]) -> int:
        """The default partitioner's choice, remembered per key (its murmur2 is pure Python)
        until the topic's partition count changes."""
        if len(partitions) != self._partition_count:
            self._partition_of.clear()
            self._partition_count = len(partitions)
        p = self._partition_of.get(key)
        if p is None:
            if len(self._partition_of) >= PARTITION_MEMO_MAX:
                self._partition_of.clear()
            p = self._partition_of[key] = self._partitioner(key, partitions, partitions)
        return p

    def consumer(self, group: str, max_wait_ms: int = 10, instance_id: str = "") -> KafkaLogConsumer:
        """``instance_id``: a static member (``group.instance.id``, see :class:`KafkaLogConsumer`)."""
        return KafkaLogConsumer(self.bootstrap, self.topic, group, max_wait_ms, instance_id=instance_id,
                                session_timeout_ms=self.session_timeout_ms,
                                heartbeat_interval_ms=self.heartbeat_interval_ms)


class KafkaLogConsumer:
    """A consumer group member that commits only what the caller says it has handled.

    Its records' epoch comes from the topic id, read at start and again whenever partitions
    are assigned (recreating the topic changes its metadata, which rebalances the group).

    With an ``instance_id`` it is a static member (KIP-345): a process that joins with the id
    of a member that crashed takes that member's partitions at once, where a new dynamic
    member waits until the crashed one's session (``session_timeout_ms``) expires. Stopped
    cleanly it leaves the group like a dynamic member (aiokafka would not): otherwise every
    later rebalance of the group, any member's join, waits for it until its session expires.
    """

    def __init__(self, bootstrap: str, topic: str, group: str, max_wait_ms: int = 10, *, instance_id: str = "",
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 1000) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

        # The broker's CPU goes by requests, not records (~1-2 ms per request on this project's
        # machines: BENCHMARKS.md, Pipeline). With aiokafka's fetch.min.bytes of 1 every consumer
        # fetched again as soon as one producer batch landed; letting the broker hold a fetch
        # for up to max_wait_ms until FETCH_MIN_BYTES arrived bounds each member's fetches.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"chorus-{group}",
            fetch_max_wait_ms=max_wait_ms,
            fetch_min_bytes=FETCH_MIN_BYTES,
            group_instance_id=instance_id or None,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self.bootstrap = bootstrap
        self.topic = topic
        self.topic_id = ""
        owner = self

        class RefreshTopicId(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                pass

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await owner._refresh_topic_id()

        self._consumer.subscribe([topic], listener=RefreshTopicId())

    async def _refresh_topic_id(self) -> None:
        try:
            fresh = await topic_id(self.bootstrap, self.topic, timeout_s=10)
        except Exception as exc:  # keep the id we have: the rebalance must go on
            log.warning("could not re-read the id of topic %s: %s", self.topic, exc)
            return
        if fresh != self.topic_id:
            if self.topic_id:
                log.warning("topic %s was recreated (id %s, was %s): a new epoch begins",
                            self.topic, fresh, self.topic_id)
            self.topic_id = fresh

    async def start(self) -> None:
        self.topic_id = await topic_id(self.bootstrap, self.topic)
        await self._consumer.start()

    async def stop(self) -> None:
        # aiokafka sends LeaveGroup only for dynamic members; by member id (LeaveGroup v1) the
        # broker removes a static one just the same. A crashed member never gets here: its
        # identity stays for the next process that joins with it.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and hasattr(coordinator, "_group_instance_id"):
            coordinator._group_instance_id = None
        await self._consumer.stop()

    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out: list[LogRecord] = []
        for tp, msgs in batches.items():
            epoch = partition_epoch(self.topic, tp.partition, self.topic_id)
            out += (LogRecord(tp.partition, m.offset, m.key or b"", m.value or b"", epoch) for m in msgs)
        return out

    def pause(self) -> None:
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    async def commit(self, records: Sequence[LogRecord]) -> None:
        from aiokafka import TopicPartition

        offsets = {TopicPartition(self.topic, p): off for p, off in _next_offsets(records).items()}
        if offsets:
            await self._consumer.commit(offsets)

    def highwaters(self) -> dict[int, int]:
        """From the last fetch responses; a partition not fetched from yet is left out."""
        out = {}
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                out[tp.partition] = int(hw)
        return out

    async def positions(self) -> dict[int, int]:
        return {tp.partition: int(await self._consumer.position(tp)) for tp in self._consumer.assignment()}


def group_consumer(comment_log: CommentLog, group: str, max_wait_ms: int, instance_id: str = "") -> LogConsumer:
    """A member of ``group``; on Kafka a static one when ``instance_id`` is set (the in-process
    log has no membership to keep)."""
    if instance_id and isinstance(comment_log, KafkaLog):
        return comment_log.consumer(group, max_wait_ms, instance_id=instance_id)
    return comment_log.consumer(group, max_wait_ms=max_wait_ms)


def open_log(bootstrap: str, topic: str, partitions: int, accept_timeout_ms: int, linger_ms: int, *,
             session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 1000,
             retention: Retention = KEEP_EVERYTHING) -> CommentLog:
    """Kafka at ``bootstrap``, else the in-process log keeping what ``retention`` says."""
    if not bootstrap:
        return MemoryLog(partitions, retention)
    return KafkaLog(bootstrap, topic, accept_timeout_ms, linger_ms, session_timeout_ms=session_timeout_ms,
                    heartbeat_interval_ms=heartbeat_interval_ms)
