"""Redis Pub/Sub down: the circuit breaker, the gateway's Kafka fallback, and sharded channels.

Unit: the breaker's states with a fake clock; the fallback's orchestration on the in-process
log (a fake tail that records what it was asked). Integration, real Redis 7 and Kafka:
sharded Pub/Sub and hot-stream shard channels; then a whole app on a private Redis that is
killed mid-stream (viewers keep getting comments, from Kafka) and started again (delivery
goes back to Pub/Sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_e2e import Env, make_config, started_app
from waiting import eventually

from chorus.broker import MemoryBroker, RedisBroker
from chorus.config import FallbackConfig, SamplingConfig
from chorus.gateway.fallback import BreakerState, CircuitBreaker, PubSubFallback
from chorus.gateway.node import Node
from chorus.ingest.log import LogRecord, MemoryLog
from chorus.ingest.records import Comment, encode_record
from chorus.protocol import ChannelMessage, decode_event, pack_channel_message
from services import start_redis

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(failures=3, retry_after_s=2.0)
    for t in (0.0, 0.5):
        b.failure(t)
    b.success(1.0)  # the count starts again
    for t in (1.5, 2.0):
        b.failure(t)
    assert b.state is CLOSED and not b.is_open
    b.failure(2.5)
    assert b.state is OPEN and b.is_open and b.transitions == [(CLOSED, OPEN)]


def test_breaker_half_opens_after_the_wait_and_closes_on_success() -> None:
    b = CircuitBreaker(failures=1, retry_after_s=2.0)
    assert b.allow(0.0)
    b.failure(0.0)
    assert not b.allow(1.9)  # open: no probe yet
    assert b.allow(2.0) and b.state is HALF and b.is_open
    b.failure(2.5)  # the half-open probe failed: open again, the wait starts over
    assert b.state is OPEN and not b.allow(4.25) and b.allow(4.5)
    b.success(4.75)
    assert b.state is CLOSED
    assert b.transitions == [(CLOSED, OPEN), (OPEN, HALF), (HALF, OPEN), (OPEN, HALF), (HALF, CLOSED)]
    assert b.allow(5.0)


class MemoryTail:
    """A tail over the in-process log; records what it was asked (start point, end, stop)."""

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.consumer = log.consumer(f"tail-{uuid.uuid4().hex[:6]}")
        self.since_ms: int | None = None
        self.ends: list[int] = []
        self.stopped = False

    async def start(self, since_ms: int) -> None:
        self.since_ms = since_ms

    async def fetch(self, timeout_ms: int, max_records: int) -> list[LogRecord]:
        return await self.consumer.fetch(timeout_ms, max_records)

    async def mark_end(self) -> None:
        self.ends = [len(p) for p in self.log._parts]

    async def caught_up(self) -> bool:
        return all(pos >= end for pos, end in zip(self.consumer._position, self.ends, strict=True))

    async def stop(self) -> None:
        self.stopped = True


class Probe:
    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("redis is down")


async def test_the_fallback_delivers_from_the_log_while_the_breaker_is_open() -> None:
    log = MemoryLog(partitions=2)
    node = Node(MemoryBroker())
    await node.start()
    got: list[tuple[str, ChannelMessage]] = []
    node.deliver = lambda stream, m: got.append((stream, m))
    await node.acquire("s")
    node.on_message("s", pack_channel_message(b'{"t":"batch"}', 1, 1))  # seen over Pub/Sub: offset 1
    probe, tails = Probe(), []

    def open_tail() -> MemoryTail:
        tails.append(MemoryTail(log))
        return tails[-1]

    cfg = FallbackConfig(failures=2, probe_interval_ms=20, probe_timeout_ms=50, retry_after_s=0.1, rewind_ms=3000)
    fallback = PubSubFallback(node, probe, open_tail, cfg, SamplingConfig(), wall_ms=lambda: 1_000_000)
    task = asyncio.create_task(fallback.run())
    try:
        await eventually(lambda: probe.calls >= 3, 2, "three good probes")
        assert not tails
        probe.up = False
        for i in range(5):  # offsets 0-4 of stream s's partition, then another stream's
            await log.append(*encode_record(Comment(str(100 + i), "s", "u", "U", (), f"c{i}", 0)))
        for i in range(5):
            await log.append(*encode_record(Comment(str(200 + i), "other", "u", "U", (), f"o{i}", 0)))
        await eventually(lambda: fallback.active, 2, "the fallback to start")
        assert tails[0].since_ms == 1_000_000 - 3000  # rewound from the last good probe
        await eventually(lambda: node.received["kafka"] >= 1, 2, "a batch from the log")
        texts = [c["text"] for s, m in got if m.offset is not None and s == "s"
                 for c in decode_event(m.event_json).get("comments", [])]
        assert texts == ["c2", "c3", "c4"]  # offset 1 was delivered already; "other" has no viewers here
        probe.up = True
        await eventually(lambda: tails[0].stopped, 2, "the tail to stop")
        assert fallback.breaker.state is CLOSED and not fallback.active and fallback.activations == 1
    finally:
        fallback.stop()
        await asyncio.wait_for(task, 2)
        await node.stop()


# -- real Redis: sharded Pub/Sub and hot streams --


class Collector:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, stream: str, data: bytes) -> None:
        self.got.append((stream, data))


@pytest.mark.parametrize("sharded", [True, False])
async def test_hot_stream_shards_reach_every_gateway_once(redis_url: str, sharded: bool) -> None:
    prefix = f"h{uuid.uuid4().hex[:6]}:"
    shards = {"hot": 3}
    publisher = RedisBroker(redis_url, prefix, shards=shards, sharded=sharded)
    gateways = [RedisBroker(redis_url, prefix, shards=shards, node=n, sharded=sharded) for n in (0, 1, 4)]
    seen = [Collector() for _ in gateways]
    try:
        for g, c in zip(gateways, seen, strict=True):
            await g.start(c)
            await g.subscribe("hot")
            await g.subscribe("calm")
        assert all(g.sharded is sharded for g in gateways)  # Debian 12's Redis 7.0 has sharded Pub/Sub
        assert gateways[2].subscribe_channels("hot") == [f"{prefix}s:hot", f"{prefix}s:hot/1"]  # node 4 % 3
        client = publisher._redis
        shard_channels = [f"{prefix}s:hot/{i}" for i in range(3)]
        numsub = client.pubsub_shardnumsub if sharded else client.pubsub_numsub
        counts = dict(await numsub(*shard_channels))
        assert [counts[ch.encode()] for ch in shard_channels] == [1, 2, 0]  # nodes 0 | 1 and 4 | none
        other = dict(await (client.pubsub_numsub if sharded else client.pubsub_shardnumsub)(*shard_channels))
        assert set(other.values()) == {0}  # the other kind of channel is not used
        batch = pack_channel_message(b'{"t":"batch"}', 7, 1)
        control = pack_channel_message(b'{"t":"throttle","keep_ratio":0.2}')
        for stream in ("hot", "calm"):
            await publisher.publish(stream, batch)
            await publisher.publish(stream, control)
        await eventually(lambda: all(len(c.got) >= 4 for c in seen), 5, "every message at every gateway")
        await asyncio.sleep(0.1)  # time for a duplicate to arrive, if any would
        for c in seen:  # each exactly once, in order per stream
            assert sorted(c.got) == sorted([("hot", batch), ("hot", control), ("calm", batch), ("calm", control)])
    finally:
        for g in [publisher, *gateways]:
            with contextlib.suppress(Exception):
                await g.stop()


# -- the whole app on a private Redis that dies and comes back --


@pytest.mark.timeout(60)
async def test_viewers_get_comments_from_kafka_while_redis_is_down(
        tmp_path: Path, request: pytest.FixtureRequest, kafka_bootstrap: str) -> None:
    redis = start_redis(tmp_path / "redis")
    config = make_config(tmp_path, "services", request, redis__url=redis.url, limits__user_per_minute=0,
                         limits__ip_per_minute=0, fallback__failures=2, fallback__probe_interval_ms=200,
                         fallback__probe_timeout_ms=300, fallback__retry_after_s=0.5, fallback__rewind_ms=2000)
    app = await started_app(config)
    assert app.fallback is not None and app.gateway is not None and app.coordinator is not None
    fallback = app.fallback  # narrowed for the lambda below
    app.coordinator.loop.max_backoff_s = 0.3
    node = app.gateway.node
    env = Env(app)
    clients = []
    try:
        await env.warm_up()
        stream = f"f-{uuid.uuid4().hex[:6]}"
        viewer = await env.viewer(stream)
        poster = await env.viewer(stream, env.token("paula"))
        clients += [viewer, poster]

        async def post_and_receive(text: str, timeout: float) -> float:
            start = time.monotonic()
            await poster.send_json({"t": "comment", "text": text, "nonce": text})
            answer = await poster.wait_for(lambda e: e.get("nonce") == text and e["t"] in ("ack", "error"), timeout=5)
            assert answer["t"] == "ack", answer
            await viewer.wait_for(lambda e: e["t"] == "batch" and text in [c["text"] for c in e["comments"]],
                                  timeout=timeout)
            return time.monotonic() - start

        await post_and_receive("before", 5)
        assert node.received["kafka"] == 0

        redis.kill()
        killed = time.monotonic()
        during = [await post_and_receive(f"during-{i}", 5) for i in range(3)]
        assert time.monotonic() - killed < 6
        assert during[0] < 3.0, f"the first comment after the kill took {during[0]:.1f}s"
        assert fallback_used(app) and node.received["kafka"] >= 3

        await asyncio.to_thread(redis.restart)
        await eventually(lambda: not fallback.active and fallback.breaker.state is CLOSED, 10, "back to Pub/Sub")
        via_pubsub = node.received["pubsub"]
        await post_and_receive("after", 8)
        assert node.received["pubsub"] > via_pubsub  # delivered over Pub/Sub again
        kafka_after = node.received["kafka"]
        await post_and_receive("after-2", 5)
        assert node.received["kafka"] == kafka_after  # and the Kafka tail is gone
        print(f"\nfallback: first comment after the kill delivered in {during[0]:.2f}s, "
              f"then {during[1]:.2f}s, {during[2]:.2f}s; breaker "
              f"{' '.join(to.value for _, to in app.fallback.breaker.transitions)}")
    finally:
        for c in clients:
            await c.close()
        await app.stop()
        redis.stop()


def fallback_used(app: Any) -> bool:
    return bool(app.fallback.activations) and app.fallback.delivered_batches > 0
