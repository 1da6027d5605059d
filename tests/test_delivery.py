"""Nothing accepted is lost: the delivery proof, and the fallbacks when a downstream fails.

The proof (Kafka's ``validate_delivery`` oracle, research/reliability-anchors.md 3): gateway,
coordinator and archiver run as separate ``chorus`` processes over the real Redis and Kafka.
Live viewers stay connected while posters post at a steady rate and record every id they
got an ``ack`` for; midway the coordinator is SIGKILLed and started again, later the
archiver. At the end every acknowledged id is in history exactly once, and every viewer
received every acknowledged id (duplicates after a restart are allowed, counted, reported),
at the same (epoch, offset) the history store recorded for it.

The fallbacks: while the history store fails, the archiver pauses, commits nothing and
catches up once the store is back; while Redis is down, the coordinator does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient
from test_processes import KEY, Proc, wait_http
from waiting import eventually

from chorus.auth import mint_token
from chorus.broker import MemoryBroker, MemoryStreamState, RedisBroker, RedisStreamState
from chorus.config import load_config
from chorus.ids import IdGenerator
from chorus.ingest.archiver import Archiver
from chorus.ingest.coordinator import Coordinator
from chorus.ingest.log import CommentLog, KafkaLog, MemoryLog
from chorus.ingest.records import Comment, encode_record
from chorus.ingest.store import SqliteStore, StoreUnavailable
from services import free_port, start_redis

VIEWERS = 12
POSTERS = 4
RATE = 100  # comments/s, all posters together
POST_FOR_S = 8.0
KILL_COORDINATOR_AT_S = 2.0
KILL_ARCHIVER_AT_S = 5.0


async def create_topic(bootstrap: str, partitions: int = 4) -> str:
    """A topic of the test's own: its offsets, epochs and consumer positions start clean."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"comments-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


class Viewer:
    """A connected viewer that counts every comment it receives, by id."""

    def __init__(self, client: WebsocketsClient) -> None:
        self.client = client
        self.ids: Counter[str] = Counter()
        self.positions: dict[str, tuple[str, int]] = {}
        self.first_seen: dict[str, float] = {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            event = await self.client.events.get()
            if event["t"] == "batch":
                for c in event["comments"]:
                    self.ids[c["id"]] += 1
                    self.first_seen.setdefault(c["id"], time.monotonic())
                    self.positions[c["id"]] = (event["epoch"], c["offset"])

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.close()


class Poster:
    """Posts at a steady rate without waiting for acks; records what was acknowledged."""

    def __init__(self, client: WebsocketsClient, name: str) -> None:
        self.client = client
        self.name = name
        self.sent = 0
        self.acked: list[str] = []
        self.acked_at: dict[str, float] = {}
        self.refused: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            event = await self.client.events.get()
            if event["t"] == "ack":
                self.acked.append(event["id"])
                self.acked_at[event["id"]] = time.monotonic()
            elif event["t"] == "error":
                self.refused.append(event)

    def answered(self) -> int:
        return len(self.acked) + len(self.refused)

    async def post(self, rate: float, duration_s: float) -> None:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration_s:
            await self.client.send_json({"t": "comment", "text": f"{self.name} #{self.sent}",
                                         "nonce": f"{self.name}-{self.sent}"})
            self.sent += 1
            await asyncio.sleep(max(0.0, self.sent / rate - elapsed))

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.client.close()


class Cluster:
    """The three roles as processes, each stopped by its own PID at the end."""

    def __init__(self, tmp_path: Path, config_path: Path, port: int) -> None:
        self.tmp_path = tmp_path
        self.args = {"gateway": ["gateway", "--config", str(config_path), "--port", str(port)],
                     "coordinator": ["coordinator", "--config", str(config_path)],
                     "archiver": ["archiver", "--config", str(config_path)]}
        self.procs: dict[str, Proc] = {}
        self.all: list[tuple[str, Proc]] = []
        self.starts: Counter[str] = Counter()

    def start(self, role: str) -> Proc:
        self.starts[role] += 1
        proc = Proc(self.args[role], self.tmp_path / f"{role}-{self.starts[role]}.log")
        self.procs[role] = proc
        self.all.append((role, proc))
        return proc

    def crash_and_restart(self, role: str) -> None:
        """SIGKILL (no clean shutdown, nothing committed past the last commit), then run it again."""
        old = self.procs[role]
        old.popen.kill()
        old.popen.wait(10)
        self.start(role)

    def stop(self) -> list[tuple[str, int | None]]:
        return [(role, p.stop()) for role, p in self.all]


def history_of(path: Path, stream: str) -> dict[str, tuple[int, tuple[str, int]]]:
    """comment id -> (rows with that id, (epoch, offset)), read straight from the SQLite file."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT comment_id, COUNT(*), MAX(epoch), MAX(offset) FROM comments"
                          " WHERE stream_id = ? GROUP BY comment_id", (stream,)).fetchall()
        elsewhere = db.execute("SELECT COUNT(*) FROM comments WHERE stream_id != ?", (stream,)).fetchone()[0]
    finally:
        db.close()
    assert elsewhere == 0, "comments were stored under another stream"
    return {str(cid): (n, (epoch, offset)) for cid, n, epoch, offset in rows}


@pytest.mark.services
@pytest.mark.timeout(90)
async def test_every_acknowledged_comment_is_delivered_and_stored_once_across_crashes(
        tmp_path: Path, redis_url: str, kafka_bootstrap: str) -> None:
    began = time.monotonic()
    topic = await create_topic(kafka_bootstrap)
    history = tmp_path / "history.sqlite3"
    config_path = tmp_path / "chorus.toml"
    config_path.write_text(
        f'data_dir = "{tmp_path}"\n[auth]\nkey = "{KEY}"\n'
        f'[kafka]\nbootstrap = "{kafka_bootstrap}"\ntopic = "{topic}"\n'
        f'[redis]\nurl = "{redis_url}"\nchannel_prefix = "d{uuid.uuid4().hex[:6]}:"\n'
        f'[history]\npath = "{history}"\n'
        "[limits]\nuser_per_minute = 0\nip_per_minute = 0\n"  # the proof is about delivery, not limits
    )
    port = free_port()
    cluster = Cluster(tmp_path, config_path, port)
    viewers: list[Viewer] = []
    posters: list[Poster] = []
    try:
        for role in ("gateway", "coordinator", "archiver"):
            cluster.start(role)
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", cluster.procs["gateway"])
        auth = load_config(config_path, env={}).auth
        stream = f"live-{uuid.uuid4().hex[:6]}"
        url = f"ws://127.0.0.1:{port}/ws?stream={stream}"
        for _ in range(VIEWERS):
            client = await WebsocketsClient.connect(url)
            await client.wait_for(lambda e: e["t"] == "welcome")
            viewers.append(Viewer(client))
        for n in range(POSTERS):
            client = await WebsocketsClient.connect(url, mint_token(auth, f"poster{n}", f"Poster {n}", ["write"]))
            await client.wait_for(lambda e: e["t"] == "welcome")
            posters.append(Poster(client, f"p{n}"))

        # The coordinator's group may still be joining: wait until a first comment goes round.
        await posters[0].client.send_json({"t": "comment", "text": "warm up", "nonce": "warm"})
        await eventually(lambda: viewers[0].ids, 30, "the warm-up comment at a viewer")
        ready = time.monotonic()

        async def crash(role: str, at_s: float) -> None:
            await asyncio.sleep(at_s)
            await asyncio.to_thread(cluster.crash_and_restart, role)

        await asyncio.gather(*(p.post(RATE / POSTERS, POST_FOR_S) for p in posters),
                             crash("coordinator", KILL_COORDINATOR_AT_S), crash("archiver", KILL_ARCHIVER_AT_S))
        posted = time.monotonic()
        with contextlib.suppress(AssertionError):  # a post left unanswered shows in the count below
            await eventually(lambda: all(p.answered() == p.sent for p in posters), 10, "the last acks")
        acked = {i for p in posters for i in p.acked}
        sent = sum(p.sent for p in posters) + 1  # and the warm-up
        assert len(acked) >= 0.9 * sent, f"only {len(acked)} of {sent} acknowledged: {posters[0].refused[:3]}"

        def everywhere() -> bool:
            return all(acked <= set(v.ids) for v in viewers) and acked <= set(history_of(history, stream))

        with contextlib.suppress(AssertionError):  # the checks below say what is missing where
            await eventually(everywhere, 40, "every acknowledged comment everywhere", interval=0.25)
        delivered = time.monotonic()

        stored = history_of(history, stream)
        missing_history = acked - set(stored)
        assert not missing_history, f"{len(missing_history)} acknowledged comments not in history"
        assert all(n == 1 for i, (n, _) in stored.items() if i in acked)
        for v in viewers:
            missing = acked - set(v.ids)
            assert not missing, f"a viewer never got {len(missing)} acknowledged comments"
            # the coordinator and the archiver numbered each comment the same way, crashes or not
            assert all(v.positions[i] == stored[i][1] for i in acked)
        duplicates = [sum(n - 1 for i, n in v.ids.items() if i in acked) for v in viewers]
        acked_at = {i: t for p in posters for i, t in p.acked_at.items()}
        lag = max(v.first_seen[i] - acked_at[i] for v in viewers for i in acked)
        # A restarted coordinator takes its partitions back at once (static membership): its own
        # start, ~0.5-2 s, is most of the wait (the exit codes below show the crashes happened).
        assert lag > 0.3, "no comment waited for the crashed coordinator: did the crash happen?"
        epochs = {stored[i][1][0] for i in acked}
        assert len(epochs) == 1 and next(iter(epochs)).startswith(f"{topic}:")
        print(f"\ndelivery proof: {len(acked)}/{sent} acknowledged, all {len(acked)} in history once and at "
              f"all {VIEWERS} viewers; duplicates per viewer {min(duplicates)}-{max(duplicates)}; longest ack to "
              f"delivery {lag:.1f}s; "
              f"coordinator started {cluster.starts['coordinator']}x, archiver {cluster.starts['archiver']}x; "
              f"setup {ready - began:.1f}s, posting {posted - ready:.1f}s, "
              f"all delivered {delivered - posted:.1f}s after the last post")
    finally:
        for v in viewers:
            await v.close()
        for p in posters:
            await p.close()
        codes = await asyncio.to_thread(cluster.stop)
    # the crashed ones exited by SIGKILL; the running ones must stop cleanly on SIGTERM
    assert [code for _, code in codes].count(-9) == 2 and all(code in (0, -9) for _, code in codes), codes
    for _, proc in cluster.all:
        out = proc.output()  # aiokafka logs transient broker errors at ERROR; ours must have none
        assert "Traceback" not in out and " ERROR chorus" not in out, out[-3000:]


# -- fallbacks --


class SwitchableStore:
    """The real store behind a switch: while ``down``, every write fails as a dead disk would."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.down = False
        self.failed_writes = 0

    def write_comments(self, comments: Sequence[Comment]) -> int:
        if self.down:
            self.failed_writes += 1
            raise StoreUnavailable("disk I/O error")
        return self.store.write_comments(comments)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def open_test_log(backend: str, request: pytest.FixtureRequest) -> CommentLog:
    if backend == "embedded":
        return MemoryLog(partitions=4)
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    log = KafkaLog(bootstrap, await create_topic(bootstrap))
    await log.start()
    return log


async def append_comments(log: CommentLog, ids: IdGenerator, stream: str, count: int) -> list[str]:
    comments = [Comment(ids.next(), stream, "u", "U", (), f"c{i}", 1_764_000_000_000 + i) for i in range(count)]
    for i in range(0, count, 50):
        await asyncio.gather(*(log.append(*encode_record(c)) for c in comments[i : i + 50]))
    return [c.id for c in comments]


@pytest.mark.parametrize("backend", ["embedded", pytest.param("services", marks=pytest.mark.services)])
async def test_archiver_pauses_while_the_store_is_down_and_catches_up(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    log = await open_test_log(backend, request)
    store = SwitchableStore(SqliteStore(tmp_path / "h.sqlite3"))
    archiver = Archiver(log, store)  # type: ignore[arg-type]
    archiver.loop.max_backoff_s = 0.2
    task = asyncio.create_task(archiver.run())
    ids = IdGenerator(77)
    try:
        before = await append_comments(log, ids, "s", 50)
        await eventually(lambda: store.count("s") == 50, 30, "the first comments in history")

        store.down = True
        during = await append_comments(log, ids, "s", 300)
        await eventually(lambda: store.failed_writes >= 3, 30, "the archiver to retry")
        assert archiver.loop.paused and store.count("s") == 50
        await asyncio.sleep(0.5)  # it keeps polling while paused (a Kafka member stays in its group)
        assert archiver.loop.paused and store.count("s") == 50

        store.down = False
        after = await append_comments(log, ids, "s", 50)
        await eventually(lambda: store.count("s") == 400, 30, "the archiver to catch up")
        assert not archiver.loop.paused and archiver.loop.pauses == 1
        (unplaced,) = store._db.execute("SELECT COUNT(*) FROM comments WHERE epoch = '' OR offset < 0").fetchone()
        assert unplaced == 0  # every row has its log position
        stored = {str(r[0]) for r in store._db.execute("SELECT comment_id FROM comments WHERE stream_id = 's'")}
        assert stored == set(before + during + after)
    finally:
        archiver.stop()
        await asyncio.wait_for(task, 10)
        await log.stop()
        store.close()


class SwitchableBroker(MemoryBroker):
    """An in-process broker whose publish fails while ``down`` (Redis unreachable)."""

    down = False

    async def publish(self, stream: str, payload: bytes) -> None:
        if self.down:
            raise ConnectionError("redis is down")
        await super().publish(stream, payload)


async def test_coordinator_pauses_while_publishing_fails_and_catches_up() -> None:
    log, broker, state = MemoryLog(partitions=2), SwitchableBroker(), MemoryStreamState()
    coordinator = Coordinator(log, broker, state, recent_size=1000)
    coordinator.loop.max_backoff_s = 0.1
    task = asyncio.create_task(coordinator.run())
    ids = IdGenerator(78)
    try:
        await append_comments(log, ids, "s", 20)
        await eventually(lambda: broker.published >= 1 and coordinator.loop.handled == 20, 5, "first batch")
        broker.down = True
        await append_comments(log, ids, "s", 100)
        await eventually(lambda: coordinator.loop.paused, 5, "the coordinator to pause")
        await asyncio.sleep(0.3)  # retries while paused: none may get through
        assert coordinator.loop.handled == 20
        broker.down = False
        await eventually(lambda: coordinator.loop.handled == 120, 5, "the coordinator to catch up")
        cached = await state.recent("s", 1000)
        assert len(cached) == 120 == len({c["id"] for c in cached})  # retried batches cached once
        assert [c["offset"] for c in cached] == sorted(c["offset"] for c in cached)
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.services
async def test_coordinator_rides_out_a_redis_restart(tmp_path: Path, kafka_bootstrap: str) -> None:
    """A private Redis is killed while comments keep coming, then started again (empty)."""
    redis = start_redis(tmp_path / "redis")
    prefix = f"r{uuid.uuid4().hex[:6]}:"
    log = KafkaLog(kafka_bootstrap, await create_topic(kafka_bootstrap))
    await log.start()
    broker, state = RedisBroker(redis.url, prefix), RedisStreamState(redis.url, prefix)
    coordinator = Coordinator(log, broker, state, recent_size=1000)
    coordinator.loop.max_backoff_s = 0.2
    task = asyncio.create_task(coordinator.run())
    ids = IdGenerator(79)
    try:
        await append_comments(log, ids, "s", 10)
        await eventually(lambda: coordinator.loop.handled == 10, 30, "the first comments")
        redis.kill()
        during = await append_comments(log, ids, "s", 40)
        await eventually(lambda: coordinator.loop.paused, 10, "the coordinator to pause")
        redis.restart()
        await eventually(lambda: coordinator.loop.handled == 50, 30, "the coordinator to catch up")
        cached = await state.recent("s", 1000)
        assert {c["id"] for c in cached} >= set(during)  # the new Redis got everything since
        epoch, offset = await state.position("s")
        assert epoch.startswith(log.topic) and offset == cached[-1]["offset"]
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 10)
        await log.stop()
        await state.close()
        await broker.stop()
        redis.stop()
