"""Admission limits (ingest/limits.py): GCRA math, the in-memory limiter with a fake clock,
sanctions, the admission order, and the Redis script against the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from chorus import cli
from chorus.auth import Identity
from chorus.broker import MemoryStreamState, RedisStreamState, StreamMode
from chorus.codes import ErrorCode
from chorus.config import ConfigError, LimitsConfig, load_config
from chorus.ids import IdGenerator
from chorus.ingest.admission import Admission, Refused
from chorus.ingest.limits import (
    ALL_STREAMS,
    AdmissionLimits,
    BackendUnavailable,
    Limit,
    MemoryRateLimiter,
    MemorySanctions,
    Poster,
    RedisRateLimiter,
    RedisSanctions,
    Refusal,
    gcra,
    limits_from_config,
    redis_client,
)
from chorus.ingest.log import LogUnavailable, LogUnconfirmed, MemoryLog

S = 1_000_000  # µs


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_gcra_lets_a_burst_through_then_one_per_interval() -> None:
    lim = Limit("user", 10, 60)
    assert (lim.emission_us, lim.window_us) == (6 * S, 60 * S)
    tat, now = None, 0
    for _ in range(10):
        tat, wait = gcra(tat, now, lim.emission_us, lim.window_us)
        assert wait == 0
    assert tat == 60 * S
    _, wait = gcra(tat, now, lim.emission_us, lim.window_us)
    assert wait == 6 * S  # the 11th may come when the first cell is back
    _, wait = gcra(tat, 6 * S, lim.emission_us, lim.window_us)
    assert wait == 0
    _, wait = gcra(tat, 61 * S, lim.emission_us, lim.window_us)  # the whole budget is back
    assert wait == 0
    assert Limit("global", 100_000, 1).emission_us == 10  # 10 µs: integer microseconds suffice


def test_limits_from_config_skip_zeros() -> None:
    scopes = [lim.scope for lim in limits_from_config(LimitsConfig(ip_per_minute=0))]
    assert scopes == ["user", "stream", "global"]


def limiter(clock: Clock, *limits: Limit, modes: Any = None, max_keys: int = 1000) -> MemoryRateLimiter:
    return MemoryRateLimiter(limits, modes, max_keys=max_keys, clock=clock)


async def test_memory_limiter_refuses_with_the_time_to_wait() -> None:
    clock = Clock()
    lim = limiter(clock, Limit("user", 10, 60))
    alice = Poster("s1", "alice", "10.0.0.1")
    assert [await lim.acquire(alice) for _ in range(10)] == [None] * 10
    refusal = await lim.acquire(alice)
    assert refusal is not None and refusal.code == ErrorCode.RATE_LIMITED
    assert refusal.retry_after_ms == 6000 and "10 comments per minute" in refusal.reason
    assert await lim.acquire(Poster("s1", "bob")) is None  # another user has a budget of their own
    clock.advance(5.999)
    assert (await lim.acquire(alice)) is not None
    clock.advance(0.001)
    assert await lim.acquire(alice) is None


async def test_memory_limiter_is_all_or_nothing_and_names_the_longest_wait() -> None:
    clock = Clock()
    lim = limiter(clock, Limit("user", 2, 60), Limit("ip", 100, 60), Limit("stream", 3, 1))
    u1 = Poster("s1", "u1", "1.1.1.1")
    assert await lim.acquire(u1) is None and await lim.acquire(u1) is None
    refusal = await lim.acquire(u1)  # refused by the user limit: the stream's budget is untouched
    assert refusal is not None and "2 comments per minute" in refusal.reason
    assert await lim.acquire(Poster("s1", "u2", "1.1.1.2")) is None
    refusal = await lim.acquire(Poster("s1", "u3", "1.1.1.3"))
    assert refusal is not None and "stream" in refusal.reason and refusal.retry_after_ms == 334
    assert await lim.acquire(Poster("s2", "u3", "1.1.1.3")) is None  # another stream
    assert await lim.acquire(Poster("s1", "u4", "")) is not None  # no address: the others still count


async def test_slow_mode_in_memory_is_per_user_per_stream_and_spares_moderators() -> None:
    clock = Clock()
    state = MemoryStreamState()
    await state.set_mode("s1", StreamMode(slow_mode_seconds=30))
    lim = limiter(clock, Limit("user", 100, 60), modes=state)
    alice = Poster("s1", "alice")
    assert await lim.acquire(alice) is None
    clock.advance(10)
    refusal = await lim.acquire(alice)
    assert refusal == Refusal(ErrorCode.SLOW_MODE, refusal.reason if refusal else "", 20_000)
    assert "one comment every 30 s" in refusal.reason
    assert await lim.acquire(Poster("s2", "alice")) is None  # slow mode is per stream
    assert await lim.acquire(Poster("s1", "bob")) is None  # and per user
    mod = Poster("s1", "mod", slow_mode_exempt=True)
    assert await lim.acquire(mod) is None and await lim.acquire(mod) is None
    clock.advance(20)
    assert await lim.acquire(alice) is None


async def test_memory_limiter_stays_bounded() -> None:
    clock = Clock()
    lim = limiter(clock, Limit("user", 10, 60), Limit("ip", 100, 60), max_keys=100)
    for i in range(2000):
        await lim.acquire(Poster("s", f"u{i}", f"ip{i}"))
    assert len(lim) <= 200
    clock.advance(61)  # every key idle: each call drops up to two
    for _ in range(120):
        await lim.acquire(Poster("s", "again", "ip-again"))
    assert len(lim) <= 4


async def test_memory_sanctions_ban_time_out_everywhere_and_lift() -> None:
    clock = Clock()
    sanctions = MemorySanctions(clock)
    assert await sanctions.check("s1", "u") is None
    await sanctions.ban("s1", "u", seconds=90)
    refusal = await sanctions.check("s1", "u")
    assert refusal is not None and refusal.code == ErrorCode.TIMED_OUT and refusal.retry_after_ms == 90_000
    assert await sanctions.check("s2", "u") is None
    await sanctions.ban(ALL_STREAMS, "u")
    refusal = await sanctions.check("s2", "u")
    assert refusal is not None and refusal.code == ErrorCode.BANNED and refusal.retry_after_ms is None
    assert "every stream" in refusal.reason
    assert (await sanctions.check("s1", "u")).code == ErrorCode.BANNED  # type: ignore[union-attr]  # ban beats time-out
    await sanctions.unban(ALL_STREAMS, "u")
    clock.advance(90)
    assert await sanctions.check("s1", "u") is None


# -- the admission order, with fakes that record what they were asked --------------------------


class RecordingSanctions(MemorySanctions):
    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    async def check(self, stream: str, user: str) -> Refusal | None:
        self.checks += 1
        return await super().check(stream, user)


class DownLimiter:
    """A shared limiter whose store is down."""

    def __init__(self) -> None:
        self.calls = 0

    async def acquire(self, poster: Poster) -> Refusal | None:
        self.calls += 1
        raise BackendUnavailable("redis did not answer (test)")


def writer(user: str, role: str = "viewer") -> Identity:
    return Identity(user, user.title(), frozenset({"write:comments"}), role)


async def test_banned_users_cost_no_budget_and_are_remembered_briefly() -> None:
    clock = Clock()
    sanctions = RecordingSanctions()
    limits = AdmissionLimits(limiter(clock, Limit("user", 10, 60)), sanctions,
                             precheck=limiter(clock, Limit("user", 10, 60)), sanction_memo_s=2.0)
    admission = Admission(MemoryLog(), IdGenerator(1), limits, clock=clock)
    await sanctions.ban("s1", "troll")
    for _ in range(50):
        with pytest.raises(Refused) as info:
            await admission.post(writer("troll"), "s1", "spam", "9.9.9.9")
        assert info.value.code == ErrorCode.BANNED
    assert sanctions.checks == 1  # the rest were refused from this gateway's memory
    await sanctions.unban("s1", "troll")
    clock.advance(2)
    assert (await admission.post(writer("troll"), "s1", "sorry", "9.9.9.9")).text == "sorry"


async def test_admission_fails_open_on_local_limits_when_redis_is_down() -> None:
    clock = Clock()
    down = DownLimiter()
    limits = AdmissionLimits(down, MemorySanctions(clock), precheck=limiter(clock, Limit("user", 3, 60)))
    admission = Admission(MemoryLog(), IdGenerator(1), limits, clock=clock)
    for i in range(3):
        await admission.post(writer("ann"), "s1", f"c{i}")
    with pytest.raises(Refused) as info:
        await admission.post(writer("ann"), "s1", "too many")
    assert info.value.code == ErrorCode.RATE_LIMITED
    assert (down.calls, admission.fail_open) == (3, 3)


async def test_write_scope_still_posts_and_read_only_does_not() -> None:
    admission = Admission(MemoryLog(), IdGenerator(1))
    assert await admission.post(Identity("a", "A", frozenset({"write"})), "s", "old scope")
    with pytest.raises(Refused) as info:
        await admission.post(Identity("b", "B", frozenset({"read"})), "s", "nope")
    assert info.value.code == ErrorCode.MISSING_SCOPE


# -- the real Redis -----------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = redis_client(redis_url, 2000)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def test_redis_limiter_burst_then_refusal(redis: Any, prefix: str) -> None:
    lim = RedisRateLimiter(redis, prefix, [Limit("user", 10, 60), Limit("stream", 1000, 1)])
    alice = Poster("s1", "alice", "127.0.0.1")
    assert [await lim.acquire(alice) for _ in range(10)] == [None] * 10
    refusal = await lim.acquire(alice)
    assert refusal is not None and refusal.code == ErrorCode.RATE_LIMITED
    assert refusal.retry_after_ms is not None and 5000 < refusal.retry_after_ms <= 6000
    assert "10 comments per minute" in refusal.reason
    ttl = await redis.pttl(f"{prefix}rl:user:alice")
    assert 59_000 < ttl <= 60_000  # the TAT expires when it has passed
    assert lim.round_trips == 12  # SCRIPT LOAD once, then one EVALSHA per post


async def test_redis_limiter_is_all_or_nothing(redis: Any, prefix: str) -> None:
    lim = RedisRateLimiter(redis, prefix, [Limit("user", 2, 60), Limit("stream", 3, 1)])
    u1 = Poster("s1", "u1")
    assert await lim.acquire(u1) is None and await lim.acquire(u1) is None
    assert await lim.acquire(u1) is not None  # refused by the user limit: no stream cell taken
    assert await lim.acquire(Poster("s1", "u2")) is None
    refusal = await lim.acquire(Poster("s1", "u3"))
    assert refusal is not None and "stream" in refusal.reason and 0 < (refusal.retry_after_ms or 0) <= 334


async def test_redis_slow_mode_reads_the_stream_mode(redis: Any, redis_url: str, prefix: str) -> None:
    state = RedisStreamState(redis_url, prefix)
    try:
        await state.set_mode("s1", StreamMode(slow_mode_seconds=30))
        assert await state.get_mode("s1") == StreamMode(30)
        assert await state.get_mode("never-set") == StreamMode(0)
    finally:
        await state.close()
    lim = RedisRateLimiter(redis, prefix, [Limit("user", 100, 60)])
    alice = Poster("s1", "alice")
    assert await lim.acquire(alice) is None
    refusal = await lim.acquire(alice)
    assert refusal is not None and refusal.code == ErrorCode.SLOW_MODE
    assert 29_000 < (refusal.retry_after_ms or 0) <= 30_000 and "every 30 s" in refusal.reason
    assert await lim.acquire(Poster("s2", "alice")) is None
    mod = Poster("s1", "mod", slow_mode_exempt=True)
    assert await lim.acquire(mod) is None and await lim.acquire(mod) is None


async def test_redis_limiter_reloads_its_script_after_a_flush(redis: Any, prefix: str) -> None:
    lim = RedisRateLimiter(redis, prefix, [Limit("user", 10, 60)])
    assert await lim.acquire(Poster("s", "a")) is None
    await redis.script_flush()
    assert await lim.acquire(Poster("s", "a")) is None  # NOSCRIPT: loaded again, then run
    assert lim.round_trips == 2 + 3


async def test_redis_down_is_backend_unavailable() -> None:
    from services import free_port

    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", 200)
    try:
        with pytest.raises(BackendUnavailable):
            await RedisRateLimiter(client, "x:", [Limit("user", 1, 60)]).acquire(Poster("s", "u"))
        with pytest.raises(BackendUnavailable):
            await RedisSanctions(client, "x:").check("s", "u")
    finally:
        await client.aclose()


async def test_redis_sanctions(redis: Any, prefix: str) -> None:
    sanctions = RedisSanctions(redis, prefix)
    assert await sanctions.check("s1", "u") is None
    await sanctions.ban("s1", "u", seconds=60)
    refusal = await sanctions.check("s1", "u")
    assert refusal is not None and refusal.code == ErrorCode.TIMED_OUT
    assert 59_000 < (refusal.retry_after_ms or 0) <= 60_000
    await sanctions.ban("s1", "u")  # a ban replaces the time-out (no expiry)
    assert await redis.pttl(sanctions.key("s1", "u")) == -1
    assert (await sanctions.check("s1", "u")).code == ErrorCode.BANNED  # type: ignore[union-attr]
    assert await sanctions.check("s2", "u") is None
    await sanctions.ban(ALL_STREAMS, "u", seconds=5)
    refusal = await sanctions.check("s2", "u")
    assert refusal is not None and refusal.code == ErrorCode.TIMED_OUT and "every stream" in refusal.reason
    await sanctions.unban("s1", "u")
    await sanctions.unban(ALL_STREAMS, "u")
    assert await sanctions.check("s1", "u") is None
    assert isinstance(redis, aioredis.Redis)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("limits__user_per_minute", -1, "limits.user_per_minute: must be 0-1000000"),
        ("limits__stream_per_second", 2_000_000, "limits.stream_per_second: must be 0-1000000"),
        ("limits__local_max_keys", 5, "limits.local_max_keys: must be >= 100"),
        ("limits__redis_timeout_ms", 0, "limits.redis_timeout_ms: must be 10-10000"),
    ],
)
def test_limits_config_is_checked(key: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {}, **{key: value})


def test_operator_commands_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mode", "s1", "--slow-mode-seconds", "5"]) == 2
    assert "redis.url" in capsys.readouterr().err
    assert cli.main(["mode", "s1", "--slow-mode-seconds", "99999"]) == 2
    assert "--slow-mode-seconds must be 0-3600" in capsys.readouterr().err
    assert cli.main(["ban", "s1", "u", "--seconds", "-1"]) == 2


async def test_redis_batch_calls_give_the_same_verdicts_in_one_round_trip(redis: Any, prefix: str) -> None:
    lim = RedisRateLimiter(redis, prefix, [Limit("user", 2, 60), Limit("stream", 1000, 1)])
    a, b = Poster("s1", "a"), Poster("s1", "b")
    verdicts = await lim.acquire_many([a, a, a, b])
    assert verdicts[:2] == [None, None] and verdicts[3] is None
    assert verdicts[2] is not None and verdicts[2].code == ErrorCode.RATE_LIMITED
    assert lim.round_trips == 2  # SCRIPT LOAD, then one EVALSHA for the four posts
    await redis.script_flush()
    assert (await lim.acquire_many([Poster("s1", "c")]))[0] is None  # NOSCRIPT: loaded again, then run
    sanctions = RedisSanctions(redis, prefix)
    await sanctions.ban("s1", "troll")
    await sanctions.ban(ALL_STREAMS, "meanie", seconds=60)
    trips = lim.round_trips
    found = await lim.decide_many([Poster("s1", "troll"), Poster("s1", "a"), Poster("s2", "meanie")],
                                  sanctions.key_prefix)
    assert [d.sanction.code if d.sanction else None for d in found] == [ErrorCode.BANNED, None, ErrorCode.TIMED_OUT]
    assert lim.round_trips == trips + 1  # the three posts' bans in one EVALSHA


class UnsureLog(MemoryLog):
    """A log that takes the record but never confirms it in time (what a stalled Kafka does)."""

    async def append(self, key: bytes, value: bytes) -> None:
        await super().append(key, value)
        raise LogUnconfirmed("kafka did not confirm the record in time (timeout)")


class DownLog(MemoryLog):
    async def append(self, key: bytes, value: bytes) -> None:
        raise LogUnavailable("kafka at test:9092 is unreachable")


async def test_a_comment_the_log_did_not_confirm_is_unconfirmed_with_its_id() -> None:
    log_ = UnsureLog()
    admission = Admission(log_, IdGenerator(1))
    with pytest.raises(Refused) as info:
        await admission.post(writer("ann"), "s1", "maybe")
    assert info.value.code == ErrorCode.UNCONFIRMED and "may still appear" in info.value.reason
    record = log_.consumer("g")._take(10)[0]  # it did reach the log, under the id the client was told
    assert info.value.comment_id is not None and info.value.comment_id.encode() in record.value
    with pytest.raises(Refused) as info:
        await Admission(DownLog(), IdGenerator(1)).post(writer("ann"), "s1", "lost")
    assert info.value.code == ErrorCode.NOT_ACCEPTED and "not posted" in info.value.reason
    assert info.value.comment_id is None


async def test_post_many_matches_posting_one_by_one() -> None:
    clock = Clock()
    sanctions = RecordingSanctions()
    limits = AdmissionLimits(limiter(clock, Limit("user", 2, 60)), sanctions)
    admission = Admission(MemoryLog(), IdGenerator(1), limits, clock=clock)
    await sanctions.ban("s1", "troll")
    got = await admission.post_many([(writer("ann"), "s1", "one", ""), (writer("ann"), "s1", "two", ""),
                                     (writer("ann"), "s1", "three", ""), (writer("troll"), "s1", "x", ""),
                                     (writer("bob"), "s1", "   ", ""), (None, "s1", "anon", "")])
    codes = [r.code if isinstance(r, Refused) else r.text for r in got]
    assert codes == ["one", "two", ErrorCode.RATE_LIMITED, ErrorCode.BANNED, ErrorCode.EMPTY_COMMENT,
                     ErrorCode.UNAUTHORIZED]
    assert (admission.accepted, admission.refused) == (2, 4)
    got = await Admission(UnsureLog(), IdGenerator(1)).post_many([(writer("ann"), "s1", "a", "")])
    assert isinstance(got[0], Refused) and got[0].code == ErrorCode.UNCONFIRMED and got[0].comment_id


async def test_one_call_decides_sanctions_shadow_bans_and_limits(redis: Any, prefix: str) -> None:
    from chorus.ingest.reputation import RedisReputation, shadow_key

    lim = RedisRateLimiter(redis, prefix, [Limit("user", 2, 60), Limit("stream", 1000, 1)])
    sanctions = RedisSanctions(redis, prefix)
    await sanctions.ban("s1", "troll")
    await sanctions.ban(ALL_STREAMS, "quiet", seconds=30)
    await RedisReputation(redis, prefix, 3600).shadow_ban(["sly"], 600)
    posters = [Poster("s1", "troll"), Poster("s1", "quiet"), Poster("s1", "sly"), Poster("s1", "sly"),
               Poster("s1", "sly")]
    got = await lim.decide_many(posters, sanctions.key_prefix, shadow_key(prefix, ""))
    assert [d.sanction.code if d.sanction else None for d in got] == [
        ErrorCode.BANNED, ErrorCode.TIMED_OUT, None, None, None]
    assert 29_000 < (got[1].sanction.retry_after_ms or 0) <= 30_000  # type: ignore[union-attr]
    assert [d.limit is None for d in got] == [True, True, True, True, False]  # sly's third is over 2/min
    assert [d.shadowed for d in got] == [False, False, True, True, True]
    assert await redis.get(f"{prefix}rl:user:troll") is None  # a sanctioned post takes no budget
    assert lim.round_trips == 2  # SCRIPT LOAD, then one EVALSHA for everything
    plain = await lim.decide_many([Poster("s1", "troll")])  # no prefixes: limits only
    assert plain[0].sanction is None and plain[0].limit is None and not plain[0].shadowed
