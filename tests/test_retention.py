"""The embedded default's in-process log is bounded (issue 11.8): it keeps what a consumer group
may still read, within kafka.log_retention_records / _s, and never more than kafka.log_max_records
per partition; a consumer behind that cap skips ahead and the loss is counted and logged.
History stays in SQLite, so a long run keeps every comment there with flat memory."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from clients import WebsocketsClient
from test_e2e import make_config

from chorus.app import App
from chorus.auth import mint_token
from chorus.ingest.log import COMPACT_AT, MemoryLog, Retention
from chorus.ingest.records import Comment, encode_record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def comment(i: int, stream: str = "s") -> Comment:
    return Comment(str(10_000 + i), stream, "u", "U", (), f"c{i}", 1_764_000_000_000 + i)


async def fill(log: MemoryLog, start: int, n: int) -> None:
    for i in range(start, start + n):
        await log.append(*encode_record(comment(i)))


async def read_all(consumer: object, commit: bool = True) -> list[int]:
    offsets = []
    while records := await consumer.fetch(1, 1000):  # type: ignore[attr-defined]
        offsets += [r.offset for r in records]
        if commit:
            await consumer.commit(records)  # type: ignore[attr-defined]
    return offsets


async def test_records_go_only_once_every_group_has_read_them() -> None:
    log = MemoryLog(1, Retention(records=100, seconds=0, max_records=10_000))
    fast, slow = log.consumer("coordinator"), log.consumer("archiver")
    await fill(log, 0, 500)
    assert await read_all(fast) == list(range(500))
    assert log.bounds(0) == (0, 500)  # the archiver has read nothing: everything stays
    records = await slow.fetch(1, 200)
    await slow.commit(records)
    assert log.bounds(0) == (200, 500) and log.records_kept() == 300
    await read_all(slow)
    assert log.bounds(0) == (400, 500) and log.records_kept() == 100  # the count bound
    assert log.dropped == 400 and log.skipped == 0


async def test_records_older_than_the_age_bound_go_once_read() -> None:
    clock = Clock()
    log = MemoryLog(1, Retention(records=0, seconds=10, max_records=0), clock=clock)
    group = log.consumer("g")
    await fill(log, 0, 50)
    clock.now += 20
    await fill(log, 50, 50)
    assert await read_all(group) == list(range(100))
    assert log.bounds(0) == (50, 100)  # the first 50 are 20 s old, the rest are new


async def test_a_consumer_behind_the_hard_cap_skips_ahead_and_the_loss_is_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    log = MemoryLog(1, Retention(records=10, seconds=0, max_records=100))
    stuck = log.consumer("stuck")
    await fill(log, 0, 250)
    assert log.records_kept() == 100 and log.bounds(0) == (150, 250)
    with caplog.at_level(logging.WARNING, "chorus.log"):
        got = await read_all(stuck)
    assert got == list(range(150, 250))  # the same offsets as ever, from the oldest kept
    assert stuck.skipped == 150 and log.skipped == 150
    assert any("lost 150 records" in r.message and "stuck" in r.message for r in caplog.records)


async def test_a_new_group_starts_at_the_oldest_record_kept() -> None:
    log = MemoryLog(1, Retention(records=10, seconds=0, max_records=100))
    first = log.consumer("first")
    await fill(log, 0, 50)
    await read_all(first)
    late = log.consumer("late")
    assert await read_all(late) == list(range(40, 50)) and late.skipped == 0


async def test_offsets_stay_exact_across_compaction() -> None:
    log = MemoryLog(2, Retention(records=50, seconds=0, max_records=0))
    group = log.consumer("g")
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in range(6):
        for i in range(COMPACT_AT // 2):
            await log.append(*encode_record(comment(batch * COMPACT_AT + i, f"s{i % 7}")))
        while records := await group.fetch(1, 700):
            for r in records:
                seen[r.partition].append(r.offset)
            await group.commit(records)
    for p in (0, 1):
        base, end = log.bounds(p)
        assert seen[p] == list(range(end)) and end - base == 50
    assert log.records_kept() == 100


def test_retention_keys_are_checked() -> None:
    from chorus.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"kafka\.log_max_records"):
        load_config(env={}, kafka__log_retention_records=1000, kafka__log_max_records=10)


async def test_a_long_run_keeps_the_log_bounded_and_history_whole(request: pytest.FixtureRequest,
                                                                 tmp_path: Path) -> None:
    """The short soak: 50 comments/s through a real gateway for 30 s against a retention of
    3 s; the log never holds much more than 3 s of comments, history has every one."""
    config = make_config(tmp_path, "embedded", request, limits__user_per_minute=0, limits__ip_per_minute=0,
                         kafka__log_retention_records=1000, kafka__log_retention_s=3.0)
    app = await App.build(config)
    await app.start()
    try:
        assert app.gateway is not None and isinstance(app.log, MemoryLog)
        port = app.gateway.port
        token = mint_token(config.auth, "soak", "Soak", ["read", "write"])
        poster = await WebsocketsClient.connect(f"ws://127.0.0.1:{port}/ws?stream=soak", token)
        viewer = await WebsocketsClient.connect(f"ws://127.0.0.1:{port}/ws?stream=soak")
        kept: list[int] = []
        posted, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 30:
            await poster.send_json({"t": "comment", "text": f"soak {posted}", "nonce": f"k{posted}"})
            posted += 1
            kept.append(app.log.records_kept())
            await asyncio.sleep(max(0.0, t0 + posted / 50 - time.monotonic()))
        acks = [await poster.wait_for(lambda e: e["t"] in ("ack", "error"), timeout=10) for _ in range(posted)]
        assert all(a["t"] == "ack" for a in acks)
        store = app.store
        assert store is not None
        deadline = time.monotonic() + 20
        while store.count("soak") < posted and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert store.count("soak") == posted  # history has every comment
        # 3 s at 50/s is 150 records, plus what the consumers had not committed yet; an unbounded
        # log would end at every record posted.
        assert posted >= 1200 and max(kept) <= 400 and app.log.dropped >= posted - 400
        assert app.log.skipped == 0  # nothing dropped before every role had read it
        await poster.close()
        await viewer.close()
    finally:
        await app.stop()
