"""Reactions and viewer counts end to end: on the embedded default and on the real Redis and
Kafka, through gateways in this process and as separate `chorus gateway` processes (one of
them killed by its PID: its viewers drop out of the count)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient
from test_e2e import Env, make_config, started_app
from test_processes import KEY, Proc, wait_http

from chorus.auth import mint_token
from chorus.config import load_config
from chorus.counters import RedisCounters, ViewerCount
from chorus.gateway.registry import ConnectionRegistry
from chorus.ingest.limits import redis_client
from services import Service, free_port, start_redis

# Short intervals keep the tests quick; the defaults (500 / 1000 / 1000 ms) behave the same.
FAST = {"reactions__flush_interval_ms": 100, "reactions__broadcast_interval_ms": 200,
        "viewers__interval_ms": 200, "viewers__ttl_ms": 1000}


@pytest.fixture(params=["embedded", pytest.param("services", marks=pytest.mark.services)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, request.param, request, **FAST))
    yield Env(app)
    await app.stop()


async def test_reactions_reach_every_viewer_as_totals(env: Env) -> None:
    stream = f"r-{uuid.uuid4().hex[:6]}"
    alice = await env.viewer(stream, env.token("alice"))
    bob = await env.viewer(stream, env.token("bob"))
    watcher = await env.viewer(stream)
    for _ in range(3):
        await alice.send_json({"t": "react", "emoji": "fire"})
    await bob.send_json({"t": "react", "emoji": "heart"})
    want = {"heart": 1, "fire": 3, "laugh": 0, "wow": 0, "clap": 0, "sad": 0}
    for v in (alice, bob, watcher):
        event = await v.wait_for(lambda e: e["t"] == "reactions" and e["totals"] == want, timeout=5)
        assert list(event["totals"]) == ["heart", "fire", "laugh", "wow", "clap", "sad"]  # the configured order
    late = await WebsocketsClient.connect(env.ws_url(stream))
    welcome = await late.wait_for(lambda e: e["t"] == "welcome")
    assert welcome["reactions"] == want
    assert welcome["viewers"]["now"] == 4
    # A msgpack viewer reacts through the full parser and gets the totals in msgpack.
    packed = await WebsocketsClient.connect(env.ws_url(stream), env.token("mia"), wire="msgpack")
    await packed.wait_for(lambda e: e["t"] == "welcome")
    await packed.send_json({"t": "react", "emoji": "clap"})
    await packed.wait_for(lambda e: e["t"] == "reactions" and e["totals"]["clap"] == 1, timeout=5)
    await watcher.wait_for(lambda e: e["t"] == "reactions" and e["totals"]["clap"] == 1, timeout=5)
    for v in (alice, bob, watcher, late, packed):
        await v.close()


async def test_bad_reactions_get_clear_errors(env: Env) -> None:
    stream = f"rb-{uuid.uuid4().hex[:6]}"
    anonymous = await env.viewer(stream)
    await anonymous.send_json({"t": "react", "emoji": "fire"})
    err = await anonymous.wait_for(lambda e: e["t"] == "error")
    assert err["code"] == "unauthorized" and "token" in err["reason"]
    carol = await env.viewer(stream, env.token("carol"))
    await carol.send_json({"t": "react", "emoji": "poop"})
    err = await carol.wait_for(lambda e: e["t"] == "error")
    assert err["code"] == "unknown_reaction" and "heart, fire" in err["reason"]
    await carol.send_json({"t": "react", "emoji": 7})
    assert (await carol.wait_for(lambda e: e["t"] == "error"))["code"] == "bad_message"
    for _ in range(25):  # a burst of 10 per second is allowed, then one error and silence
        await carol.send_json({"t": "react", "emoji": "wow"})
    err = await carol.wait_for(lambda e: e["t"] == "error")
    assert err["code"] == "rate_limited" and 0 < err["retry_after_ms"] <= 1000
    totals = await carol.wait_for(lambda e: e["t"] == "reactions" and e["totals"]["wow"] > 0)
    assert 10 <= totals["totals"]["wow"] <= 12  # the burst (and a cell or two refilled meanwhile)
    await asyncio.sleep(0.3)  # nothing more comes: a burst costs one error, then silence
    assert not any(e["t"] == "error" for e in _queued(carol)), "more than one rate_limited error"
    for v in (anonymous, carol):
        await v.close()


def _queued(client: Any) -> list[dict[str, Any]]:
    out = []
    while not client.events.empty():
        out.append(client.events.get_nowait())
    return out


async def test_viewer_counts_follow_joins_and_leaves(env: Env) -> None:
    stream = f"v-{uuid.uuid4().hex[:6]}"
    first = await env.viewer(stream, env.token("dana"))
    others = [await env.viewer(stream, env.token(f"u{i}")) for i in range(3)]
    again = await env.viewer(stream, env.token("dana"))  # the same user twice: one unique viewer
    event = await first.wait_for(lambda e: e["t"] == "viewers" and e["now"] == 5, timeout=5)
    assert event["unique"] == 4
    for v in (*others, again):
        await v.close()
    event = await first.wait_for(lambda e: e["t"] == "viewers" and e["now"] == 1, timeout=5)
    assert event["unique"] == 4  # unique viewers since the stream began
    await first.close()


# -- Redis directly: the stored shapes and expiry on Redis's clock --

@pytest.fixture
def counters_prefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}:"


async def test_redis_counters_flush_with_hincrby_and_read_totals(redis_url: str, counters_prefix: str) -> None:
    import redis.asyncio as aioredis

    c = RedisCounters(redis_url, counters_prefix)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        assert await c.add_reactions({"s": {"fire": 3, "wow": 1}}, ["s", "t"]) == {"s": {"fire": 3, "wow": 1}, "t": {}}
        assert await c.add_reactions({"s": {"fire": 2}, "t": {"heart": 5}}, ["s"]) == {"s": {"fire": 5, "wow": 1}}
        assert await raw.hgetall(f"{counters_prefix}react:s") == {b"fire": b"5", b"wow": b"1"}
        assert 0 < await raw.ttl(f"{counters_prefix}react:s") <= 7 * 86400
    finally:
        await raw.aclose()
        await c.close()


async def test_redis_viewer_counts_expire_a_silent_gateway(redis_url: str, counters_prefix: str) -> None:
    c = RedisCounters(redis_url, counters_prefix, ttl_ms=400, exact_max=100)
    try:
        await c.report_viewers("gw1", {"s": 3}, {"s": {"u:1", "u:2", "ip:10.0.0.1"}})
        found = await c.report_viewers("gw2", {"s": 2}, {"s": {"u:2", "u:3"}})
        assert found == {"s": ViewerCount(5, 4)}
        await asyncio.sleep(0.25)
        await c.report_viewers("gw2", {"s": 2}, {})
        await asyncio.sleep(0.25)  # gw1 last reported 500 ms ago, gw2 250 ms ago
        assert (await c.snapshot("s"))[1] == ViewerCount(2, 4)
        assert (await c.report_viewers("gw2", {"s": 0}, {}))["s"] == ViewerCount(0, 4)
    finally:
        await c.close()


async def test_redis_unique_viewers_switch_from_exact_to_hyperloglog(redis_url: str, counters_prefix: str) -> None:
    import redis.asyncio as aioredis

    c = RedisCounters(redis_url, counters_prefix, exact_max=100)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        found = await c.report_viewers("gw", {"s": 1}, {"s": {f"u:{i}" for i in range(100)}})
        assert found["s"] == ViewerCount(1, 100)  # exact up to the bound
        found = await c.report_viewers("gw", {"s": 1}, {"s": {f"u:{i}" for i in range(50, 5000)}})
        assert abs(found["s"].unique - 5000) / 5000 < 0.03
        _live, exact, hll = c.viewer_keys("s")
        assert await raw.smembers(exact) == {b"!overflow"} and await raw.exists(hll)
    finally:
        await raw.aclose()
        await c.close()


async def test_counts_kept_while_redis_is_down_are_flushed_after(tmp_path: Path) -> None:
    """A private Redis, stopped and started again: reactions counted meanwhile are not lost."""
    from chorus.gateway.engagement import Engagement

    redis = start_redis(tmp_path / "redis")
    try:
        config = load_config(env={}, redis__url=redis.url, kafka__bootstrap="127.0.0.1:1", auth__key=KEY,
                             reactions__emoji=["fire"], reactions__user_per_second=0)
        sent: list[bytes] = []
        counters = RedisCounters(redis.url, "down:", timeout_ms=300)
        t = [100.0]
        e = Engagement(config, counters, lambda: {"s": 1}, lambda s, ev: sent.append(ev), clock=lambda: t[0])
        assert await counters.add_reactions({}, ["s"]) == {"s": {}}  # up (its data goes with it: no persistence)
        redis.stop()
        for _ in range(3):
            e.react("s", "1", "", "fire")
        t[0] += 0.5
        await e.reaction_tick()  # fails: the 3 stay pending
        assert e.aggregator.pending == {"s": {"fire": 3}}
        redis.restart()
        t[0] += 0.5
        await e.reaction_tick()
        t[0] += 0.5
        await e.reaction_tick()
        assert sent[-1] == b'{"t":"reactions","totals":{"fire":3}}'
        await counters.close()
    finally:
        redis.stop()


# -- separate gateway processes --



def _config_file(tmp_path: Path, redis_url: str, kafka_bootstrap: str) -> Path:
    cfg = tmp_path / "chorus.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\n[auth]\nkey = "{KEY}"\n[kafka]\nbootstrap = "{kafka_bootstrap}"\n'
        f'[redis]\nurl = "{redis_url}"\nchannel_prefix = "g{uuid.uuid4().hex[:6]}:"\n'
        "[reactions]\nflush_interval_ms = 100\nbroadcast_interval_ms = 200\n"
        "[viewers]\ninterval_ms = 200\nttl_ms = 1500\n[gateway]\nregistry_ttl_s = 1.5\n"
    )
    return cfg


async def test_killed_gateway_drops_out_of_the_counts(tmp_path: Path, procs: list[Proc], redis_url: str,
                                                     kafka_bootstrap: str, redis_service: Service) -> None:
    cfg = _config_file(tmp_path, redis_url, kafka_bootstrap)
    ports = [free_port(), free_port()]
    gateways = [Proc(["gateway", "--config", str(cfg), "--port", str(p)], tmp_path / f"gw{p}.log") for p in ports]
    procs += gateways
    for port, gw in zip(ports, gateways, strict=True):
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", gw)
    auth = load_config(cfg, env={}).auth
    stream = f"k-{uuid.uuid4().hex[:6]}"
    url = "ws://127.0.0.1:{}/ws?stream=" + stream
    stays = await WebsocketsClient.connect(url.format(ports[0]), mint_token(auth, "1", "stays", ["read"]))
    doomed = [await WebsocketsClient.connect(url.format(ports[1]), mint_token(auth, str(i), f"v{i}", ["read"]))
              for i in (2, 3, 4)]
    for c in (stays, *doomed):
        await c.wait_for(lambda e: e["t"] == "welcome")
    await stays.wait_for(lambda e: e["t"] == "viewers" and e["now"] == 4, timeout=5)

    # Reactions cross gateways: a viewer of the second gateway reacts, the first one's viewer sees it.
    await doomed[0].send_json({"t": "react", "emoji": "clap"})
    await stays.wait_for(lambda e: e["t"] == "reactions" and e["totals"]["clap"] == 1, timeout=5)

    # One user on both gateways: the connection registry names both.
    both = [await WebsocketsClient.connect(url.format(p), mint_token(auth, "both", "Both", ["read"])) for p in ports]
    for c in both:
        await c.wait_for(lambda e: e["t"] == "welcome")
    config = load_config(cfg, env={})
    client = redis_client(redis_url, 2000)
    registry = ConnectionRegistry("probe", client, config.redis.channel_prefix)
    async with asyncio.timeout(5):
        while len(await registry.gateways("both")) < 2:
            await asyncio.sleep(0.05)

    os.kill(gateways[1].popen.pid, signal.SIGKILL)  # no goodbye: its report must expire
    killed = time.monotonic()
    event = await stays.wait_for(lambda e: e["t"] == "viewers" and e["now"] == 2, timeout=10)
    assert event["unique"] == 5
    assert time.monotonic() - killed < 1.5 + 1.0  # ttl_ms, plus a report interval or two of slack
    # The dead gateway's registry entry expires too, although the live one keeps the user's key fresh.
    async with asyncio.timeout(1.5 + 2.0):
        while len(await registry.gateways("both")) != 1:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # past another TTL: the live gateway's entry stays (it refreshes it)
    assert len(await registry.gateways("both")) == 1
    await client.aclose()
    for c in (stays, *doomed, *both):
        await c.close()
    assert gateways[0].stop() == 0, gateways[0].output()


async def test_page_routes_and_the_live_stream_list(env: Env) -> None:
    from clients import aget_json, http_get

    stream = f"p-{uuid.uuid4().hex[:6]}"
    viewers = [await env.viewer(stream) for _ in range(2)]
    for path in ("/", f"/streams/{stream}", f"/streams/{stream}/"):
        status, page = await asyncio.to_thread(http_get, env.base + path)
        assert status == 200 and b'id="viewer"' in page and b'id="picker"' in page, path
    status, listing = await aget_json(f"{env.base}/streams")
    assert status == 200 and {"id": stream, "viewers": 2} in listing["streams"]
    status, _ = await asyncio.to_thread(http_get, f"{env.base}/streams/{stream}/nope")
    assert status == 404
    for v in viewers:
        await v.close()
