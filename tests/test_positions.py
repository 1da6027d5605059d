"""Stream positions and the recent cache (chorus/positions.py), in memory and in real Redis.

The same cases run against both: replays change nothing (idempotent on offset), the position
only moves forward, a new epoch starts afresh, and the floor says exactly how far back the
cache can vouch.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chorus.broker import MemoryStreamState, RedisStreamState, StreamState
from chorus.positions import KEEP_RATIOS_KEPT, NO_EPOCH


def comments(*offsets: int) -> list[dict[str, Any]]:
    return [{"id": str(1000 + o), "stream": "s", "offset": o, "text": f"c{o}"} for o in offsets]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[StreamState]:
    if request.param == "memory":
        yield MemoryStreamState()
        return
    redis_state = RedisStreamState(request.getfixturevalue("redis_url"), f"t{uuid.uuid4().hex[:8]}:")
    yield redis_state
    await redis_state.close()


def offsets(events: list[dict[str, Any]] | None) -> list[int] | None:
    return None if events is None else [c["offset"] for c in events]


async def test_a_stream_without_comments_has_no_epoch(state: StreamState) -> None:
    assert await state.position("s") == (NO_EPOCH, -1)
    assert await state.recent("s", 10) == []
    assert await state.recent_after("s", "e", -1) is None


async def test_advance_caches_in_offset_order_and_moves_the_position(state: StreamState) -> None:
    await state.advance("s", "e", comments(3, 7, 8), keep=10)
    await state.advance("s", "e", comments(12), keep=10)
    assert await state.position("s") == ("e", 12)
    assert offsets(await state.recent("s", 10)) == [3, 7, 8, 12]
    assert offsets(await state.recent("s", 2)) == [8, 12]
    assert offsets(await state.recent_after("s", "e", 7)) == [8, 12]
    assert offsets(await state.recent_after("s", "e", 12)) == []
    assert (await state.recent("s", 1))[0]["text"] == "c12"


async def test_replayed_batches_change_nothing(state: StreamState) -> None:
    """A coordinator that crashed before committing publishes the same comments again."""
    await state.advance("s", "e", comments(3, 7, 8), keep=10)
    await state.advance("s", "e", comments(3, 7, 8), keep=10)
    await state.advance("s", "e", comments(7, 8, 9), keep=10)
    await state.advance("s", "e", comments(2), keep=10)  # older than the position: ignored
    assert await state.position("s") == ("e", 9)
    assert offsets(await state.recent("s", 10)) == [3, 7, 8, 9]


async def test_the_floor_is_the_newest_trimmed_offset(state: StreamState) -> None:
    await state.advance("s", "e", comments(10, 20, 30), keep=3)
    # the cache began at 10: it cannot vouch for anything before (10 - 1 is its floor)
    assert offsets(await state.recent_after("s", "e", 9)) == [10, 20, 30]
    assert await state.recent_after("s", "e", 8) is None
    await state.advance("s", "e", comments(40, 50), keep=3)
    assert offsets(await state.recent("s", 10)) == [30, 40, 50]
    assert await state.recent_after("s", "e", 10) is None  # 20 was trimmed: 10's successor is gone
    assert offsets(await state.recent_after("s", "e", 20)) == [30, 40, 50]
    assert offsets(await state.recent_after("s", "e", 35)) == [40, 50]


async def test_a_new_epoch_starts_afresh(state: StreamState) -> None:
    await state.advance("s", "old", comments(100, 101), keep=10)
    await state.advance("s", "new", comments(4, 5), keep=10)
    assert await state.position("s") == ("new", 5)
    assert offsets(await state.recent("s", 10)) == [4, 5]
    assert await state.recent_after("s", "old", 100) is None
    assert offsets(await state.recent_after("s", "new", 3)) == [4, 5]


async def test_streams_are_apart(state: StreamState) -> None:
    await state.advance("a", "e", comments(1, 2), keep=10)
    await state.advance("b", "e", comments(3), keep=10)
    assert await state.position("a") == ("e", 2)
    assert offsets(await state.recent("b", 10)) == [3]


@pytest.mark.services
async def test_redis_keeps_large_offsets_exact(redis_url: str) -> None:
    """Lua prints big numbers as 1e+15 unless told otherwise; offsets must survive exactly."""
    state = RedisStreamState(redis_url, f"t{uuid.uuid4().hex[:8]}:")
    try:
        big = 10**15 + 7
        await state.advance("s", "e", comments(big, big + 1, big + 2), keep=2)
        assert await state.position("s") == ("e", big + 2)
        assert await state.recent_after("s", "e", big - 1) is None
        assert offsets(await state.recent_after("s", "e", big)) == [big + 1, big + 2]
    finally:
        await state.close()


async def test_keep_ratios_are_recorded_per_epoch_and_bounded(state: StreamState) -> None:
    """The coordinator records each change of a sampled stream's keep ratio (ingest/sampling.py)."""
    assert await state.keep_ratios("s", "e") == []
    await state.note_keep_ratio("s", "e", 10, 0.2)
    await state.note_keep_ratio("s", "e", 50, 1.0)
    await state.note_keep_ratio("s", "e", 50, 0.1)  # a retried batch announced another ratio: it wins
    await state.note_keep_ratio("s", "old", 5, 0.5)
    assert await state.keep_ratios("s", "e") == [(10, 0.2), (50, 0.1)]
    assert await state.keep_ratios("s", "old") == [(5, 0.5)]
    for i in range(KEEP_RATIOS_KEPT + 5):
        await state.note_keep_ratio("t", "e", 100 + i, 0.5 if i % 2 else 1.0)
    kept = await state.keep_ratios("t", "e")
    assert len(kept) == KEEP_RATIOS_KEPT and kept[-1][0] == 100 + KEEP_RATIOS_KEPT + 4
