"""Reactions and viewer counts, sans-I/O: the aggregator, the counters in memory, HyperLogLog,
and the gateway's engagement timers on an injected clock (no sockets, no Redis)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest

from chorus.codes import ErrorCode
from chorus.config import ConfigError, load_config
from chorus.counters import HyperLogLog, MemoryCounters, SqliteReactionTotals, UniqueCounter, ViewerCount
from chorus.gateway.engagement import Engagement, ReactionAggregator, viewer_key
from chorus.protocol import BadMessage, React, fast_react, parse_client_message


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# -- the wire --

@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"t":"react","emoji":"fire"}', React("fire")),
    (b'{"t":"react","emoji":"thumbs_up_2"}', React("thumbs_up_2")),
    (b'{"t":"react"}', BadMessage(ErrorCode.BAD_MESSAGE, "react needs an emoji name of 1-32 characters a-z 0-9 _")),
    (b'{"t":"react","emoji":5}', BadMessage(ErrorCode.BAD_MESSAGE,
                                            "react needs an emoji name of 1-32 characters a-z 0-9 _")),
    (b'{"t":"react","emoji":"Fire"}', BadMessage(ErrorCode.BAD_MESSAGE,
                                                 "react needs an emoji name of 1-32 characters a-z 0-9 _")),
    (b'{"t":"react","emoji":"x' + b"x" * 40 + b'"}',
     BadMessage(ErrorCode.BAD_MESSAGE, "react needs an emoji name of 1-32 characters a-z 0-9 _")),
])
def test_react_message_is_parsed_or_refused(raw: bytes, expected: object) -> None:
    assert parse_client_message(raw, "json") == expected


def test_react_message_in_msgpack() -> None:
    assert parse_client_message(msgpack.packb({"t": "react", "emoji": "heart"}), "msgpack") == React("heart")


def test_config_refuses_bad_reaction_names_and_short_viewer_ttl() -> None:
    with pytest.raises(ConfigError, match=r"reactions\.emoji"):
        load_config(env={}, reactions__emoji=["fire", "Fire!"])
    with pytest.raises(ConfigError, match=r"reactions\.emoji"):
        load_config(env={}, reactions__emoji=["fire", "fire"])
    with pytest.raises(ConfigError, match=r"viewers\.ttl_ms"):
        load_config(env={}, viewers__interval_ms=2000, viewers__ttl_ms=3000)
    cfg = load_config(env={"CHORUS_REACTIONS__EMOJI": "fire,heart", "CHORUS_REACTIONS__HIGH_TRAFFIC_STREAMS": "*"})
    assert cfg.reactions.emoji == ("fire", "heart") and cfg.reactions.high_traffic_streams == ("*",)


# -- the aggregator --

def test_aggregator_counts_per_stream_and_emoji_and_take_clears() -> None:
    agg = ReactionAggregator(["fire", "heart"], 0)
    for stream, emoji in [("a", "fire"), ("a", "fire"), ("a", "heart"), ("b", "fire")]:
        assert agg.add(stream, "u:1", emoji) is None
    assert agg.take(lambda s: s == "a") == {"a": {"fire": 2, "heart": 1}}
    assert agg.pending == {"b": {"fire": 1}}
    assert agg.take() == {"b": {"fire": 1}}
    assert agg.take() == {} and agg.accepted == 4


def test_aggregator_refuses_an_unknown_reaction_by_name() -> None:
    agg = ReactionAggregator(["fire", "heart"], 0)
    err = agg.add("a", "u:1", "poop")
    assert err is not None and err["code"] == "unknown_reaction"
    assert "fire, heart" in err["reason"]
    assert agg.pending == {} and agg.unknown == 1


def test_aggregator_limits_each_viewer_and_says_so_once_per_wait() -> None:
    clock = Clock()
    agg = ReactionAggregator(["fire"], 5, clock=clock)
    assert [agg.add("s", "u:1", "fire") for _ in range(5)] == [None] * 5  # a burst of 5
    first = agg.add("s", "u:1", "fire")
    assert first is not None and first["code"] == "rate_limited"
    assert first["retry_after_ms"] == 200 and "5 per second" in first["reason"]
    assert agg.add("s", "u:1", "fire") is None  # dropped quietly: the viewer was told
    assert agg.add("s", "u:2", "fire") is None  # another viewer has a budget of its own
    assert agg.pending == {"s": {"fire": 6}} and agg.limited == 2
    clock.advance(0.2)
    assert agg.add("s", "u:1", "fire") is None  # one more cell after 1/5 s
    again = agg.add("s", "u:1", "fire")
    assert again is not None and again["code"] == "rate_limited"  # a new wait: told again
    assert agg.pending == {"s": {"fire": 7}}


def test_aggregator_forgets_idle_viewers_and_give_back_merges() -> None:
    clock = Clock()
    agg = ReactionAggregator(["fire", "wow"], 10, clock=clock)
    for i in range(100):
        agg.add("s", f"u:{i}", "fire")
    assert len(agg) == 100
    taken = agg.take()
    agg.add("s", "u:0", "wow")
    agg.give_back(taken)
    assert agg.pending == {"s": {"fire": 100, "wow": 1}}
    clock.advance(2.0)
    agg.take()
    assert len(agg) == 0  # every limit key's time has passed: nothing held


# -- unique viewers --

def test_hyperloglog_estimates_within_a_few_percent() -> None:
    hll = HyperLogLog()
    for i in range(50_000):
        hll.add(f"u:{i}")
    assert abs(hll.count() - 50_000) / 50_000 < 0.03
    small = HyperLogLog()
    for i in range(100):
        small.add(f"ip:10.0.0.{i}")
        small.add(f"ip:10.0.0.{i}")  # twice: counted once
    assert abs(small.count() - 100) <= 2


def test_unique_counter_is_exact_until_its_bound_then_estimates() -> None:
    u = UniqueCounter(exact_max=1000)
    for i in range(1000):
        u.add(f"u:{i}")
        u.add(f"u:{i}")
    assert u.count() == 1000 and u.hll is None
    for i in range(1000, 20_000):
        u.add(f"u:{i}")
    assert u.exact is None and abs(u.count() - 20_000) / 20_000 < 0.03


# -- counters in memory --

async def test_memory_counters_sum_gateways_and_drop_one_that_stops_reporting() -> None:
    clock = Clock()
    c = MemoryCounters(ttl_ms=5000, exact_max=100, clock=clock)
    await c.report_viewers("gw1", {"s": 3}, {"s": {"u:1", "u:2", "ip:1.2.3.4"}})
    found = await c.report_viewers("gw2", {"s": 2}, {"s": {"u:1", "u:9"}})
    assert found == {"s": ViewerCount(5, 4)}
    clock.advance(4.0)
    assert (await c.report_viewers("gw2", {"s": 2}, {}))["s"] == ViewerCount(5, 4)
    clock.advance(1.5)  # gw1's report is now 5.5 s old: gone; gw2's is 1.5 s old
    assert (await c.snapshot("s"))[1] == ViewerCount(2, 4)
    assert (await c.report_viewers("gw2", {"s": 0}, {}))["s"] == ViewerCount(0, 4)  # withdrawn


async def test_memory_counters_add_reactions_and_read_in_one_call() -> None:
    c = MemoryCounters()
    assert await c.add_reactions({"s": {"fire": 3}}, ["s", "t"]) == {"s": {"fire": 3}, "t": {}}
    assert await c.add_reactions({"s": {"fire": 2, "wow": 1}, "t": {"wow": 4}}, ["s"]) == {"s": {"fire": 5, "wow": 1}}
    assert (await c.snapshot("t"))[0] == {"wow": 4}


async def test_memory_counters_forget_idle_streams_after_retention() -> None:
    clock = Clock()
    c = MemoryCounters(retention_s=100, reactions_retention_s=100, clock=clock)
    await c.add_reactions({"old": {"fire": 1}})
    await c.report_viewers("gw", {}, {"old": {"u:1"}})
    clock.advance(101)
    await c.add_reactions({"new": {"fire": 1}})
    await c.report_viewers("gw", {}, {"new": {"u:1"}})
    assert await c.snapshot("old") == ({}, ViewerCount(0, 0))
    assert await c.snapshot("new") == ({"fire": 1}, ViewerCount(0, 1))


async def test_reaction_totals_on_disk_survive_a_restart_and_expire(tmp_path: Path) -> None:
    """The embedded default's totals: each flush goes to a table in the history file first;
    a new process reads them back; a stream idle past the retention is gone on the next start."""
    clock, wall = Clock(), Clock(1_764_000_000.0)
    path = tmp_path / "history.sqlite3"
    c = MemoryCounters(reactions_retention_s=100, clock=clock, persist=SqliteReactionTotals(path), wall=wall)
    await c.add_reactions({"s": {"fire": 3}, "old": {"wow": 1}})
    wall.advance(60)
    await c.add_reactions({"s": {"fire": 2, "heart": 1}})
    # No close: a crash. A new process on the same file.
    wall.advance(50)  # "old" was last updated 110 s ago, "s" 50 s ago
    again = MemoryCounters(reactions_retention_s=100, clock=Clock(5.0), persist=SqliteReactionTotals(path), wall=wall)
    assert (await again.snapshot("s"))[0] == {"fire": 5, "heart": 1}
    assert (await again.snapshot("old"))[0] == {}
    assert await again.add_reactions({"s": {"fire": 1}}, ["s"]) == {"s": {"fire": 6, "heart": 1}}
    await again.close()
    await c.close()
    third = MemoryCounters(persist=SqliteReactionTotals(path), wall=wall)
    assert (await third.snapshot("s"))[0] == {"fire": 6, "heart": 1}
    await third.close()


async def test_a_flush_that_fails_on_disk_counts_nothing(tmp_path: Path) -> None:
    persist = SqliteReactionTotals(tmp_path / "h.sqlite3")
    c = MemoryCounters(persist=persist)
    persist.close()  # writes fail from now on
    with pytest.raises(sqlite3.ProgrammingError):
        await c.add_reactions({"s": {"fire": 1}}, ["s"])
    assert (await c.snapshot("s"))[0] == {}  # the caller gives the counts back for the next flush


# -- the gateway's engagement timers --

class Sent:
    """What the engagement asked the gateway to deliver, decoded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, stream: str, event: bytes) -> None:
        self.events.append((stream, json.loads(event)))

    def of(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        return [(s, e) for s, e in self.events if e["t"] == kind]


def engagement(clock: Clock, local: dict[str, int], sent: Sent, **cfg: Any) -> Engagement:
    config = load_config(env={}, reactions__emoji=["fire", "heart"], **cfg)
    counters = MemoryCounters(clock=clock)
    return Engagement(config, counters, lambda: local, sent, clock=clock)


async def test_reactions_flush_every_500ms_and_totals_go_out_once_a_second() -> None:
    clock, sent, local = Clock(), Sent(), {"s": 2}
    e = engagement(clock, local, sent)
    assert e.react("s", "7", "", "fire") is None
    assert e.next_reaction_tick() == pytest.approx(clock.t + 0.5)
    clock.advance(0.5)
    await e.reaction_tick()  # a flush only: the totals are not due yet
    assert e.aggregator.pending == {} and sent.events == []
    assert await e.counters.add_reactions({}, ["s"]) == {"s": {"fire": 1}}
    e.react("s", "8", "", "heart")
    clock.advance(0.5)
    await e.reaction_tick()
    assert sent.of("reactions") == [("s", {"t": "reactions", "totals": {"fire": 1, "heart": 1}})]
    clock.advance(1.0)
    await e.reaction_tick()  # unchanged totals are not sent again
    assert len(sent.of("reactions")) == 1


async def test_high_traffic_streams_flush_and_broadcast_every_100ms() -> None:
    clock, sent, local = Clock(), Sent(), {"big": 1, "small": 1}
    e = engagement(clock, local, sent, reactions__high_traffic_streams=["big"])
    e.react("big", "1", "", "fire")
    e.react("small", "1", "", "fire")
    assert e.next_reaction_tick() == pytest.approx(clock.t + 0.1)
    clock.advance(0.1)
    await e.reaction_tick()
    assert sent.of("reactions") == [("big", {"t": "reactions", "totals": {"fire": 1, "heart": 0}})]
    assert e.aggregator.pending == {"small": {"fire": 1}}  # flushed at 500 ms, shown at 1 s


async def test_anonymous_viewers_may_not_react_unless_configured() -> None:
    clock, sent = Clock(), Sent()
    refused = engagement(clock, {}, sent).react("s", None, "10.0.0.1", "fire")
    assert refused is not None and refused["code"] == "unauthorized"
    open_to_all = engagement(clock, {}, sent, reactions__anonymous=True)
    assert open_to_all.react("s", None, "10.0.0.1", "fire") is None
    assert open_to_all.aggregator.pending == {"s": {"fire": 1}}


async def test_viewer_counts_report_and_go_out_when_they_change() -> None:
    clock, sent, local = Clock(), Sent(), {"s": 1}
    e = engagement(clock, local, sent)
    e.joined("s", "7", "")
    first = await e.welcome("s")
    assert first == {"reactions": {"fire": 0, "heart": 0}, "viewers": {"now": 1, "unique": 0}}
    await e.viewer_tick()
    assert sent.of("viewers") == [("s", {"t": "viewers", "now": 1, "unique": 1})]
    await e.viewer_tick()
    assert len(sent.of("viewers")) == 1  # nothing changed
    local["s"] = 2
    e.joined("s", None, "10.1.1.1")
    assert (await e.welcome("s"))["viewers"]["now"] == 2  # the newcomer counts at once
    await e.viewer_tick()
    assert sent.of("viewers")[-1] == ("s", {"t": "viewers", "now": 2, "unique": 2})
    del local["s"]
    await e.viewer_tick()  # the last local viewer left: this gateway's count is withdrawn
    assert (await e.counters.snapshot("s"))[1] == ViewerCount(0, 2)
    assert viewer_key(None, "10.1.1.1") == "ip:10.1.1.1" and viewer_key("7", "x") == "u:7"


@pytest.mark.parametrize("raw", [
    b'{"t":"react","emoji":"fire"}', b'{"t": "react", "emoji": "fire"}', b'{"emoji":"fire","t":"react"}',
    b'{"t":"react","emoji":"Fire"}', b'{"t":"react","emoji":"fire","x":1}', b'{"t":"react","emoji":""}',
    b'{"t":"react","emoji":"fire"} ', b'{"t":"react","emoji":"f\\u0069re"}', b'{"t":"comment","text":"fire"}',
])
def test_fast_react_agrees_with_the_full_parser(raw: bytes) -> None:
    """The fast path takes only the canonical form; whatever it takes, the full parser reads the same."""
    fast = fast_react(raw)
    if fast is not None:
        assert parse_client_message(raw, "json") == React(fast)
    assert (fast is not None) == (raw == b'{"t":"react","emoji":"fire"}')
