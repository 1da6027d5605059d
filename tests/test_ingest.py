"""Ingest: log positions (epoch, offset), the consume loop's pause and retry, and a
coordinator that crashes between publishing and committing.

In-process log for the loop's logic; the real Kafka for what only Kafka can show (topic ids,
a recreated topic).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

import pytest

from chorus.broker import MemoryBroker, MemoryStreamState
from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.coordinator import Coordinator, group_by_stream
from chorus.ingest.kafka_topic import partition_epoch, topic_id
from chorus.ingest.log import KafkaLog, LogRecord, MemoryLog
from chorus.ingest.records import Comment, decode_record, encode_record
from chorus.protocol import decode_event, unpack_channel_message


def make_comment(i: int, stream: str = "s") -> Comment:
    return Comment(str(9000 + i), stream, "u", "U", (), f"c{i}", 1_764_000_000_000 + i)


async def append(log: MemoryLog | KafkaLog, *comments: Comment) -> None:
    for c in comments:
        await log.append(*encode_record(c))


def test_a_comment_is_placed_at_its_log_position() -> None:
    c = make_comment(1)
    assert "offset" not in c.to_event()
    placed = decode_record(encode_record(c)[1], "comments:2:abc", 41)
    assert (placed.epoch, placed.offset) == ("comments:2:abc", 41)
    assert placed.to_event()["offset"] == 41
    assert placed.to_event()["id"] == c.id


async def test_memory_log_epochs_name_partition_and_boot() -> None:
    a, b = MemoryLog(partitions=2), MemoryLog(partitions=2)
    await append(a, *(make_comment(i, f"s{i}") for i in range(6)))
    await append(b, make_comment(0, "s0"))
    records = await a.consumer("g").fetch(10, 100)
    assert {r.epoch for r in records} == {a._epochs[0], a._epochs[1]}
    assert all(r.epoch == a._epochs[r.partition] for r in records)
    (other,) = await b.consumer("g").fetch(10, 100)
    assert other.epoch != a._epochs[other.partition]  # a restarted in-process log is a new epoch
    assert a._epochs[0].startswith("memory:0:")


async def test_replayed_records_get_the_same_positions() -> None:
    log = MemoryLog(partitions=1)
    await append(log, *(make_comment(i) for i in range(3)))
    first = await log.consumer("g").fetch(10, 100)
    again = await log.consumer("g").fetch(10, 100)  # nothing committed: a restart reads them again
    assert [(r.epoch, r.offset) for r in first] == [(r.epoch, r.offset) for r in again] != []
    streams, bad = group_by_stream(first)
    assert bad == 0 and [c.offset for c in streams["s", first[0].epoch]] == [0, 1, 2]


class FlakyHandler:
    """Fails while ``down`` is set; records what it was handed (a recording fake)."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0
        self.handled: list[LogRecord] = []

    async def __call__(self, records: Sequence[LogRecord]) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("downstream is down")
        self.handled += records


async def test_the_loop_pauses_while_downstream_fails_and_loses_nothing() -> None:
    log = MemoryLog(partitions=2)
    handler = FlakyHandler()
    consumer = log.consumer("g")
    loop = ConsumeLoop(consumer, handler, name="test", max_records=5, max_backoff_s=0.05)
    task = asyncio.create_task(loop.run())
    await append(log, *(make_comment(i, f"s{i % 3}") for i in range(4)))
    async with asyncio.timeout(5):
        while handler.calls < 3:
            await asyncio.sleep(0.01)
    assert loop.paused and consumer.paused and loop.pauses == 1
    assert log._committed["g"] == [0, 0]  # nothing committed while the batch is not done
    await append(log, *(make_comment(i, f"s{i % 3}") for i in range(4, 20)))  # arrives during the outage
    handler.down = False
    async with asyncio.timeout(5):
        while len(handler.handled) < 20:
            await asyncio.sleep(0.01)
    assert not loop.paused and not consumer.paused
    assert sorted(int(decode_record(r.value).id) for r in handler.handled) == list(range(9000, 9020))
    async with asyncio.timeout(5):
        while sum(log._committed["g"]) < 20:
            await asyncio.sleep(0.01)
    loop.stop()
    await task


async def test_a_coordinator_crash_before_commit_republishes_the_same_offsets() -> None:
    log, broker, state = MemoryLog(partitions=1), MemoryBroker(), MemoryStreamState()
    seen: list[dict[str, object]] = []
    await broker.start(lambda stream, data: seen.append(decode_event(unpack_channel_message(data).event_json)))
    await broker.subscribe("s")
    await append(log, *(make_comment(i) for i in range(5)))

    crashed = Coordinator(log, broker, state, recent_size=100)
    await crashed.handle(await log.consumer("chorus-coordinator").fetch(10, 100))  # published, never committed
    fresh = Coordinator(log, broker, state, recent_size=100)
    task = asyncio.create_task(fresh.run())
    async with asyncio.timeout(5):
        while fresh.loop.handled < 5:
            await asyncio.sleep(0.01)
    fresh.stop()
    await task

    first, again = seen[0], seen[-1]
    assert first["comments"] == again["comments"]  # same ids, same offsets: viewers drop it by id
    assert (first["epoch"], first["offset"]) == (again["epoch"], again["offset"]) == (log._epochs[0], 4)
    assert [c["offset"] for c in await state.recent("s", 100)] == [0, 1, 2, 3, 4]  # no duplicates
    assert await state.position("s") == (log._epochs[0], 4)


@pytest.mark.services
async def test_kafka_records_carry_the_topic_id_and_a_recreated_topic_is_a_new_epoch(
        kafka_bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"epoch-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
        first_id = await topic_id(kafka_bootstrap, topic)
        assert len(first_id) == 22 and first_id == await topic_id(kafka_bootstrap, topic)

        log = KafkaLog(kafka_bootstrap, topic)
        await log.start()
        await append(log, make_comment(1))
        consumer = log.consumer(f"g-{uuid.uuid4().hex[:6]}")
        await consumer.start()
        try:
            records: list[LogRecord] = []
            async with asyncio.timeout(30):
                while not records:
                    records = await consumer.fetch(500, 10)
        finally:
            await consumer.stop()
            await log.stop()
        (r,) = records
        assert r.epoch == partition_epoch(topic, r.partition, first_id) == f"{topic}:{r.partition}:{first_id}"

        await admin.delete_topics([topic])
        second_id = first_id
        async with asyncio.timeout(30):
            while second_id == first_id:  # deletion is asynchronous: create until it takes
                with contextlib.suppress(Exception):
                    await admin.create_topics([NewTopic(topic, 2, 1)])
                with contextlib.suppress(TimeoutError):
                    second_id = await topic_id(kafka_bootstrap, topic, timeout_s=2)
                await asyncio.sleep(0.1)
        assert len(second_id) == 22  # same name, new incarnation: every epoch of it differs
        await admin.delete_topics([topic])
    finally:
        await admin.close()


@pytest.mark.services
async def test_kafka_appends_from_many_tasks_land_once_on_the_default_partition_in_order(kafka_bootstrap: str) -> None:
    """append_many from many tasks at once: every record confirmed once, on the partition the
    default partitioner picks (the same as a plain producer's), each call's records in order."""
    from aiokafka import AIOKafkaProducer
    from test_delivery import create_topic

    topic = await create_topic(kafka_bootstrap, partitions=3)
    log = KafkaLog(kafka_bootstrap, topic)
    await log.start()
    keys = [f"stream-{k}".encode() for k in range(5)]
    calls = [[(keys[(c + n) % 5], f"{c}:{n}".encode()) for n in range(30)] for c in range(40)]
    try:
        results = await asyncio.gather(*(log.append_many(call) for call in calls))
    finally:
        await log.stop()
    assert all(r is None for call in results for r in call)
    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)  # where a plain producer puts each key
    await plain.start()
    try:
        expected = {k: (await (await plain.send(topic, b"probe", key=k))).partition for k in keys}
    finally:
        await plain.stop()
    consumer = log.consumer(f"g-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    got: list[LogRecord] = []
    try:
        async with asyncio.timeout(30):
            while len([r for r in got if r.value != b"probe"]) < 40 * 30:
                got += await consumer.fetch(500, 2000)
    finally:
        await consumer.stop()
    records = [r for r in got if r.value != b"probe"]
    assert sorted(r.value for r in records) == sorted(v for call in calls for _, v in call)  # each once
    assert all(r.partition == expected[r.key] for r in records)
    for c in range(40):
        for key in keys:
            mine = [r for r in sorted(records, key=lambda r: r.offset) if r.key == key
                    and r.value.startswith(f"{c}:".encode())]
            assert [int(r.value.split(b":")[1]) for r in mine] == sorted(int(r.value.split(b":")[1]) for r in mine)
