"""The service fixtures really run Redis and Kafka, and crash/restart works by PID."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services import Service, free_port, start_kafka, start_redis

pytestmark = pytest.mark.services


async def test_free_port_is_bindable() -> None:
    port = free_port()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    server.close()
    await server.wait_closed()


async def test_redis_ping_publish_subscribe(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        assert await client.ping()
        channel = f"test:{uuid.uuid4().hex}"
        await pubsub.subscribe(channel)
        # the subscribe confirmation comes first
        msg = await pubsub.get_message(timeout=5)
        assert msg is not None and msg["type"] == "subscribe"
        assert await client.publish(channel, b"hello") == 1  # one subscriber got it
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert msg is not None
        assert msg["channel"] == channel.encode() and msg["data"] == b"hello"
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_kafka_produce_acks_all_then_consume_and_commit(kafka_bootstrap: str) -> None:
    topic = "comments"  # created with 4 partitions by services/kafka/start.sh
    key, value = uuid.uuid4().bytes, b"comment-" + uuid.uuid4().hex.encode()
    # idempotence forces acks=all (aiokafka's default is acks=1 without idempotence)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    assert meta.topic == topic and 0 <= meta.partition < 4 and meta.offset >= 0

    group = f"test-{uuid.uuid4().hex}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        found = None
        async with asyncio.timeout(30):
            while found is None:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    found = next((r for r in records if r.key == key), found)
        assert found.value == value
        assert (found.partition, found.offset) == (meta.partition, meta.offset)
        tp = TopicPartition(topic, found.partition)
        await consumer.commit({tp: found.offset + 1})
        assert await consumer.committed(tp) == found.offset + 1
    finally:
        await consumer.stop()


async def test_redis_kill_and_restart_by_pid(tmp_path: Path) -> None:
    # a private Redis: the session one is shared by other tests
    svc: Service = start_redis(tmp_path / "redis")
    try:
        client = aioredis.from_url(svc.url)
        assert await client.ping()
        await client.aclose()
        old_pid = svc.pid

        svc.kill()
        assert not svc.alive()
        client = aioredis.from_url(svc.url)
        with pytest.raises(aioredis.ConnectionError):
            await client.ping()
        await client.aclose()

        svc.restart()
        assert svc.alive() and svc.pid != old_pid
        client = aioredis.from_url(svc.url)
        assert await client.ping()  # same URL answers again
        await client.aclose()
    finally:
        svc.stop()
    assert not svc.alive()


async def test_kafka_kill_and_restart_keeps_data(tmp_path: Path) -> None:
    # a private broker: killing the session one would disturb other tests
    svc = start_kafka(tmp_path / "kafka")
    try:
        value = uuid.uuid4().bytes
        producer = AIOKafkaProducer(bootstrap_servers=svc.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            meta = await producer.send_and_wait("comments", value)
        finally:
            await producer.stop()

        old_pid, bootstrap = svc.pid, svc.bootstrap
        svc.kill()  # no clean shutdown
        assert not svc.alive()
        svc.restart()  # same ports and data dir, no re-format
        assert svc.alive() and svc.pid != old_pid and svc.bootstrap == bootstrap

        consumer = AIOKafkaConsumer(bootstrap_servers=svc.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition("comments", meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            async with asyncio.timeout(30):
                record = await consumer.getone(tp)
            assert record.value == value  # the acknowledged record survived the crash
        finally:
            await consumer.stop()
    finally:
        svc.stop()
    assert not svc.alive()
