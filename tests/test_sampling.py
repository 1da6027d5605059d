"""Adaptive sampling (ingest/sampling.py) with a fake clock, and the coordinator that uses it.

Unit cases: the sliding window, the deterministic per-id choice, tiers with hysteresis,
throttle announcements (made once, again if a publish failed, ended by the clock alone),
priority lanes, automatic slow mode, and the filter recovery uses to rebuild the broadcast
from history. Then the coordinator on the in-process log and broker: what it publishes, what
it caches, which keep ratios it records, and the slow mode it sets through the mode API.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient
from test_e2e import Env, make_config, started_app
from waiting import eventually

from chorus.auth import mint_token
from chorus.broker import MemoryBroker, MemoryStreamState, StreamMode
from chorus.config import ConfigError, SamplingConfig, load_config
from chorus.gateway.recovery import Recovery
from chorus.ids import IdGenerator
from chorus.ingest.coordinator import Coordinator
from chorus.ingest.log import MemoryLog
from chorus.ingest.records import Comment, encode_record
from chorus.ingest.sampling import RateWindow, Sampler, broadcast_filter, keeps, throttle_event
from chorus.ingest.store import SqliteStore
from chorus.protocol import decode_event, unpack_channel_message

E = "comments:0:test"
POLICY = SamplingConfig(tiers=((50, 0.2),), window_ms=1000, bucket_ms=100, hysteresis=0.2)
TIERED = replace(POLICY, tiers=((100, 0.5), (500, 0.1), (2000, 0.05)))


class Feed:
    """Comments of one stream at increasing offsets, fed to a sampler at a steady rate."""

    def __init__(self, sampler: Sampler, stream: str = "s") -> None:
        self.sampler = sampler
        self.stream = stream
        self.offset = 0
        self.now_ms = 1_000_000

    def comments(self, n: int, badges: tuple[str, ...] = ()) -> list[Comment]:
        out = []
        for _ in range(n):
            self.offset += 1
            out.append(Comment(str(7_000_000 + self.offset), self.stream, "u", "U", badges, "x", 0, E, self.offset))
        return out

    def run(self, rate_per_s: int, seconds: float, badges: tuple[str, ...] = ()) -> list[tuple[int, float | None]]:
        """Batches every 10 ms; returns (kept, throttle) of each plan, announcing as a coordinator would."""
        out = []
        per_batch = rate_per_s / 100
        due = 0.0
        for _ in range(int(seconds * 100)):
            self.now_ms += 10
            due += per_batch
            n, due = int(due), due - int(due)
            plan = self.sampler.plan(self.stream, E, self.comments(n, badges), self.now_ms)
            if plan.throttle is not None:
                self.sampler.announced(self.stream, plan.throttle)
            out.append((len(plan.kept), plan.throttle))
        return out


def throttles(plans: list[tuple[int, float | None]]) -> list[float]:
    return [t for _, t in plans if t is not None]


def test_the_window_measures_the_rate_and_forgets_the_past() -> None:
    w = RateWindow(1000, 100)
    for t in range(0, 1000, 10):
        w.add(t, 2)  # 200/s
    assert 190 <= w.rate(999) <= 210
    assert 150 <= w.rate(1200) <= 200  # two buckets slid out
    assert w.rate(2100) == 0
    w.add(5000, 5)
    assert w.rate(5000) == 5 * 1000 / 901  # nine empty buckets and 1 ms of the newest


def test_keeps_is_deterministic_proportional_and_nested() -> None:
    ids = [str(7_261_000_000_000 + i) for i in range(20_000)]
    at_20 = {i for i in ids if keeps(i, 0.2)}
    at_10 = {i for i in ids if keeps(i, 0.1)}
    assert 0.19 < len(at_20) / len(ids) < 0.21 and 0.09 < len(at_10) / len(ids) < 0.11
    assert at_10 <= at_20  # a lower ratio keeps a subset: the broadcast only thins
    assert at_20 == {i for i in ids if keeps(i, 0.2)}  # the same choice every time
    assert all(keeps(i, 1.0) for i in ids[:100])


def test_below_the_threshold_everything_goes_out_without_throttle() -> None:
    feed = Feed(Sampler(POLICY))
    plans = feed.run(40, 3.0)
    assert throttles(plans) == [] and sum(k for k, _ in plans) == feed.offset


def test_a_hot_stream_is_sampled_and_told_once_then_released_by_the_clock() -> None:
    sampler = Sampler(POLICY)
    feed = Feed(sampler)
    plans = feed.run(200, 3.0)
    assert throttles(plans) == [0.2]  # announced once, when it started
    sent_after = sum(k for k, _ in plans[100:])  # the last two seconds, well into sampling
    assert 0.13 < sent_after / 400 < 0.27
    # The stream goes quiet: no more batches, the rate decays and tick() ends the throttle.
    changes = []
    for _ in range(30):
        feed.now_ms += 100
        for stream, epoch, plan in sampler.tick(feed.now_ms):
            changes.append((stream, epoch, plan.throttle, plan.from_offset))
            sampler.announced(stream, plan.throttle or 1.0)
    assert changes == [("s", E, 1.0, feed.offset + 1)]
    assert sampler.keep_ratio("s") == 1.0


def test_an_unconfirmed_announcement_is_made_again() -> None:
    sampler = Sampler(POLICY)
    feed = Feed(sampler)
    for _ in range(100):
        feed.now_ms += 10
        plan = sampler.plan("s", E, feed.comments(2), feed.now_ms)
        if plan.throttle is not None:
            break
    assert plan.throttle == 0.2 and plan.from_offset == feed.offset - 1
    feed.now_ms += 10
    again = sampler.plan("s", E, feed.comments(2), feed.now_ms)  # the publish failed: still pending
    assert again.throttle == 0.2
    sampler.announced("s", 0.2)
    feed.now_ms += 10
    assert sampler.plan("s", E, feed.comments(2), feed.now_ms).throttle is None


def test_hysteresis_keeps_a_stream_at_the_edge_in_its_tier() -> None:
    feed = Feed(Sampler(POLICY))
    assert throttles(feed.run(100, 2.0)) == [0.2]
    assert throttles(feed.run(45, 3.0)) == []  # below 50/s but above 40/s: stays sampled
    assert throttles(feed.run(30, 3.0)) == [1.0]


def test_tiers_escalate_and_step_down() -> None:
    feed = Feed(Sampler(TIERED))
    assert throttles(feed.run(300, 1.5)) == [0.5]
    assert throttles(feed.run(3000, 1.5)) == [0.1, 0.05]
    assert throttles(feed.run(300, 2.0)) == [0.1, 0.5]  # the window's rate passes the middle tier on its way down
    assert throttles(feed.run(10, 2.0)) == [1.0]


def test_priority_lanes_are_never_sampled_out() -> None:
    sampler = Sampler(POLICY)
    feed = Feed(sampler)
    feed.run(500, 2.0)
    assert sampler.keep_ratio("s") == 0.2
    for badge in ("broadcaster", "moderator", "verified"):
        vip = feed.comments(50, (badge,))
        feed.now_ms += 10
        assert sampler.plan("s", E, vip, feed.now_ms).kept == vip


def test_replayed_comments_are_not_counted_twice() -> None:
    sampler = Sampler(POLICY)
    batch = Feed(sampler).comments(40)
    for t in range(0, 1000, 10):
        plan = sampler.plan("s", E, batch, 1_000_000 + t)  # the same 40 again and again
    assert plan.throttle is None and len(plan.kept) == 40


def test_sampling_can_be_turned_off() -> None:
    feed = Feed(Sampler(replace(POLICY, enabled=False)))
    plans = feed.run(1000, 2.0)
    assert throttles(plans) == [] and sum(k for k, _ in plans) == feed.offset


def test_automatic_slow_mode_after_a_sustained_rate() -> None:
    sampler = Sampler(replace(POLICY, slow_mode_above_per_s=100, slow_mode_after_s=2.0))
    feed = Feed(sampler)
    wanted = []
    for rate, seconds in ((300, 3.0), (0, 3.5)):
        for _ in range(int(seconds * 100)):
            feed.now_ms += 10
            plan = sampler.plan("s", E, feed.comments(rate // 100), feed.now_ms)
            if plan.slow_mode is not None:
                wanted.append((plan.slow_mode, round((feed.now_ms - 1_000_000) / 1000, 1)))
                sampler.slow_mode_applied("s", plan.slow_mode)
    # on once above 100/s for 2 s (the window's rate passes 100/s at ~0.35 s); at 3 s the stream
    # stops, its rate falls below 80/s at ~3.75 s, and 2 s later slow mode is lifted
    assert [on for on, _ in wanted] == [True, False]
    assert 2.2 <= wanted[0][1] <= 2.5 and 5.5 <= wanted[1][1] <= 5.9
    assert Sampler(POLICY).plan("s", E, feed.comments(5000), feed.now_ms).slow_mode is None  # off by default


def test_broadcast_filter_rebuilds_the_broadcast() -> None:
    comments = Feed(Sampler(POLICY)).comments(3000)
    comments[1500] = replace(comments[1500], badges=("moderator",))
    ratios = [(1000, 0.2), (2000, 1.0)]
    broadcast = broadcast_filter(ratios)
    kept = [c.offset for c in comments if broadcast(c.to_event())]
    assert [o for o in kept if o < 1000] == list(range(1, 1000))
    assert [o for o in kept if o > 2000] == list(range(2001, 3001))
    middle = [c for c in comments if 1000 <= c.offset <= 2000]
    assert [c.offset for c in middle if broadcast(c.to_event())] == \
        [c.offset for c in middle if keeps(c.id, 0.2) or c.badges]
    assert broadcast_filter([])(comments[0].to_event())


def test_sampling_config_is_validated() -> None:
    cfg = load_config(env={"CHORUS_SAMPLING__TIERS": "[[1000, 0.5], [5000, 0.1], [20000, 0.05]]"})
    assert cfg.sampling.tiers == ((1000, 0.5), (5000, 0.1), (20000, 0.05))
    assert load_config(env={}).sampling.tiers == ((5000, 0.2),)  # the product design's default
    for tiers, why in (("[[5000, 0.2], [1000, 0.1]]", "ascending"), ("[[1000, 0.1], [5000, 0.2]]", "descending"),
                       ("[[1000, 1.5]]", "between 0 and 1"), ("[[1000]]", "expected")):
        with pytest.raises(ConfigError, match=f"sampling.tiers.*{why}"):
            load_config(env={"CHORUS_SAMPLING__TIERS": tiers})
    assert load_config(env={"CHORUS_REDIS__HOT_STREAMS": '{"final": 4}'}).redis.hot_streams == {"final": 4}
    with pytest.raises(ConfigError, match=r"redis\.hot_streams"):
        load_config(env={"CHORUS_REDIS__HOT_STREAMS": '{"final": 0}'})


# -- the coordinator --


class RecordingBroker(MemoryBroker):
    """Keeps every channel message published, decoded, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    async def publish(self, stream: str, payload: bytes) -> None:
        self.events.append(decode_event(unpack_channel_message(payload).event_json))
        await super().publish(stream, payload)


async def test_the_coordinator_throttles_caches_the_broadcast_and_records_ratios(tmp_path: Path) -> None:
    log, broker, state = MemoryLog(partitions=1), RecordingBroker(), MemoryStreamState()
    coordinator = Coordinator(log, broker, state, recent_size=10_000, sampling=POLICY)
    task = asyncio.create_task(coordinator.run())
    stream = f"s-{uuid.uuid4().hex[:6]}"
    sent: list[Comment] = []
    try:
        for i in range(300):  # 300 comments over ~1.5 s: 200/s, four times the threshold
            badges = ("verified",) if i % 50 == 0 else ()
            c = Comment(str(8_000_000 + i), stream, f"u{i}", "U", badges, f"c{i}", 0)
            sent.append(c)
            await log.append(*encode_record(c))
            if i % 2:
                await asyncio.sleep(0.01)
        await eventually(lambda: {"t": "throttle", "keep_ratio": 1.0} in broker.events, 5)
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 5)
    throttled = [e["keep_ratio"] for e in broker.events if e["t"] == "throttle"]
    assert throttled == [0.2, 1.0]
    live = [c for e in broker.events if e["t"] == "batch" for c in e["comments"]]
    assert 100 < len(live) < 250 and coordinator.sampled_out == 300 - len(live)
    assert {c["id"] for c in live} >= {c.id for c in sent if c.badges}  # the verified lane
    cached = await state.recent(stream, 10_000)
    assert [c["id"] for c in cached] == [c["id"] for c in live]  # the cache holds the broadcast
    # What recovery rebuilds from the full history with the recorded ratios is the broadcast.
    epoch = str(next(e["epoch"] for e in broker.events if e["t"] == "batch"))
    ratios = await state.keep_ratios(stream, epoch)
    assert [r for _, r in ratios] == [0.2, 1.0]
    only_ratios = MemoryStreamState()  # no cache: recovery must go to the history store
    for offset, ratio in ratios:
        await only_ratios.note_keep_ratio(stream, epoch, offset, ratio)
    store = SqliteStore(tmp_path / "h.sqlite3")
    try:
        store.write_comments([replace(c, epoch=epoch, offset=i) for i, c in enumerate(sent)])
        found = await Recovery(only_ratios, store, 10_000).missed(stream, epoch, 0)
        assert found.recovered
        assert [c["id"] for c in found.comments] == [c["id"] for c in live if c["offset"] > 0]
    finally:
        store.close()


async def test_a_sampled_stream_gets_fewer_fuller_batches() -> None:
    """While a stream is sampled the coordinator gathers for hot_flush_interval_ms, so its
    viewers get a frame per hot interval rather than per flush_interval_ms; max_batch still
    bounds every batch."""
    log, broker, state = MemoryLog(partitions=1), RecordingBroker(), MemoryStreamState()
    coordinator = Coordinator(log, broker, state, flush_interval_ms=10, hot_flush_interval_ms=200, max_batch=40,
                              busy_above_per_s=100_000, sampling=replace(POLICY, tiers=((50, 0.5),)))
    task = asyncio.create_task(coordinator.run())
    stream = f"s-{uuid.uuid4().hex[:6]}"
    batches_while_sampled = []
    try:
        for i in range(600):  # ~400/s for ~1.5 s, eight times the threshold
            await log.append(*encode_record(Comment(str(8_100_000 + i), stream, f"u{i}", "U", (), f"c{i}", 0)))
            if i % 4 == 3:
                await asyncio.sleep(0.01)
            if i == 300:
                assert coordinator.loop.linger_ms == 200 and coordinator.loop.max_records == 80
                mark = len(broker.events)
        batches_while_sampled = [e for e in broker.events[mark:] if e["t"] == "batch"]
        await eventually(lambda: {"t": "throttle", "keep_ratio": 1.0} in broker.events, 5)
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 5)
    assert coordinator.loop.linger_ms == 10 and coordinator.loop.max_records == 40  # calm again
    sizes = [len(e["comments"]) for e in batches_while_sampled]
    # ~0.75 s of sampled posting: a batch per 200 ms (or per 80 records gathered), not per 10 ms
    assert 2 <= len(sizes) <= 12 and max(sizes) <= 40, sizes


async def test_a_busy_coordinator_batches_longer_and_a_quiet_one_at_once() -> None:
    """Past busy_above_per_s (every stream together) batches gather for hot_flush_interval_ms;
    once the rate has fallen, the short window again: a lone comment goes out in ~10 ms."""
    log, broker, state = MemoryLog(partitions=1), RecordingBroker(), MemoryStreamState()
    coordinator = Coordinator(log, broker, state, flush_interval_ms=10, hot_flush_interval_ms=200, max_batch=100,
                              busy_above_per_s=200, sampling=replace(POLICY, enabled=False))
    task = asyncio.create_task(coordinator.run())
    stream = f"s-{uuid.uuid4().hex[:6]}"
    mark: int | None = None  # batches published before the coordinator found itself busy
    try:
        for i in range(600):  # ~400/s for ~1.5 s
            await log.append(*encode_record(Comment(str(8_200_000 + i), stream, f"u{i}", "U", (), f"c{i}", 0)))
            if i % 4 == 3:
                await asyncio.sleep(0.01)
            if mark is None and coordinator.loop.linger_ms == 200:
                mark, busy_from = len(broker.events), i
        assert mark is not None and busy_from < 400 and coordinator.loop.max_records == 100
        await eventually(lambda: sum(len(e["comments"]) for e in broker.events if e["t"] == "batch") == 600)
        busy_batches = len(broker.events) - mark
        # (600 - busy_from) comments at ~400/s, a batch per 200 ms or 100 comments, not per 10 ms
        assert busy_batches <= (600 - busy_from) / 400 / 0.2 + 3, (busy_batches, busy_from)
        busy_batches = len(broker.events)
        await asyncio.sleep(1.5)  # the rate window empties; the ticker re-paces
        assert coordinator.loop.linger_ms == 10
        await log.append(*encode_record(Comment("8300000", stream, "u", "U", (), "alone", 0)))
        await eventually(lambda: len(broker.events) > busy_batches, 0.5)
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 5)


async def test_automatic_slow_mode_goes_through_the_mode_api() -> None:
    log, broker, state = MemoryLog(partitions=1), RecordingBroker(), MemoryStreamState()
    policy = replace(POLICY, slow_mode_above_per_s=50, slow_mode_after_s=0.3, slow_mode_seconds=7)
    coordinator = Coordinator(log, broker, state, sampling=policy)
    task = asyncio.create_task(coordinator.run())
    try:
        for i in range(200):
            await log.append(*encode_record(Comment(str(9_100_000 + i), "hot", "u", "U", (), "x", 0)))
            await asyncio.sleep(0.004)
        await eventually(lambda: {"t": "mode", "slow_mode_seconds": 7} in broker.events)
        assert await state.get_mode("hot") == StreamMode(slow_mode_seconds=7)
        await eventually(lambda: {"t": "mode", "slow_mode_seconds": 0} in broker.events, 5)  # calm again: lifted
        assert await state.get_mode("hot") == StreamMode(slow_mode_seconds=0)
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 5)


def test_the_throttle_event_is_a_control_event() -> None:
    assert json.loads(throttle_event(0.2)) == {"t": "throttle", "keep_ratio": 0.2}
    assert json.loads(throttle_event(1)) == {"t": "throttle", "keep_ratio": 1.0}


# -- end to end, real Redis and Kafka --


@pytest.mark.timeout(60)
async def test_a_hot_stream_is_throttled_end_to_end(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """200 comments/s against a 50/s threshold: viewers are told, get a sample with every
    priority comment in it, history has everything, and a resume served from history (the
    cache is kept short) replays exactly the broadcast."""
    config = make_config(tmp_path, "services", request, limits__user_per_minute=0, limits__ip_per_minute=0,
                         sampling__tiers=[[50, 0.2]], coordinator__recent_size=20)
    app = await started_app(config)
    env = Env(app)
    clients: list[WebsocketsClient] = []
    try:
        await env.warm_up()
        stream = f"hot-{uuid.uuid4().hex[:6]}"
        viewer = await env.viewer(stream)
        fan = await env.viewer(stream, env.token("fan"))
        vips = [await env.viewer(stream, mint_token(app.config.auth, role, role.title(), ["write"], role=role))
                for role in ("broadcaster", "moderator")]
        clients += [viewer, fan, *vips]  # type: ignore[list-item]
        ids = IdGenerator(321)
        verified = [Comment(ids.next(), stream, "v", "Vera", ("verified",), f"verified {i}", 0) for i in range(5)]
        joined_while_sampled: list[float] = []
        for i in range(400):  # 2 s at 200/s
            await fan.send_json({"t": "comment", "text": f"fan {i}"})
            if i == 300:  # ~1.5 s in, the stream is sampled: a viewer joining now is told in its welcome
                mid = await env.viewer(stream)
                clients.append(mid)  # type: ignore[arg-type]
                joined_while_sampled.append(next(e for e in mid.seen if e["t"] == "welcome")["keep_ratio"])
            if i % 40 == 0:
                for vip in vips:
                    await vip.send_json({"t": "comment", "text": f"vip {i}"})
                if i % 80 == 0:
                    await app.log.append(*encode_record(verified[i // 80]))
            await asyncio.sleep(0.005)
        await viewer.wait_for(lambda e: e == {"t": "throttle", "keep_ratio": 1.0}, timeout=10)
        await asyncio.sleep(0.3)  # what was published before the last throttle still arrives: count it all
        while not viewer.events.empty():
            viewer.seen.append(viewer.events.get_nowait())
        throttled = [e["keep_ratio"] for e in viewer.seen if e["t"] == "throttle"]
        live = [c for e in viewer.seen if e["t"] == "batch" for c in e["comments"]]
        total = 400 + 2 * 10 + 5
        assert throttled == [0.2, 1.0] and joined_while_sampled == [0.2]
        assert len(live) < total / 2, f"{len(live)} of {total} broadcast"
        priority = [c for c in live if c["user"]["badges"]]
        assert len(priority) == 2 * 10 + 5  # every broadcaster, moderator and verified comment
        assert app.store is not None
        store = app.store
        await eventually(lambda: store.count(stream) == total, 10)
        late = await env.viewer(stream)
        clients.append(late)  # type: ignore[arg-type]
        await late.send_json({"t": "resume", "epoch": "", "offset": -1})
        done = await late.wait_for(lambda e: e["t"] == "resumed", timeout=10)
        assert done["recovered"] is True
        assert app.gateway is not None and app.gateway.recovery.from_history == 1  # not the (short) cache
        replayed = [c for e in late.seen if e["t"] == "batch" for c in e["comments"]]
        assert [c["id"] for c in replayed] == [c["id"] for c in live]
        print(f"\nsampling: {len(live)} of {total} broadcast, throttle {throttled}, resume from history "
              f"replayed the same {len(replayed)}")
    finally:
        for c in clients:
            await c.close()
        await app.stop()
