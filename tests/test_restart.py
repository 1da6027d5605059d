"""After a restart, or a Redis that comes back empty, the page still shows the stream.

- `chorus run` (a real process) takes 12 comments and some reactions, is SIGKILLed by its
  PID and started again on the same data dir: the welcome carries the 12 comments, their
  position and the reaction totals; a resume from that position is answered; once the new
  process publishes (a new epoch of its in-process log) a resume from the old epoch says it
  cannot be filled.
- On real Redis + Kafka: the app stops, the Redis cache is emptied, the app starts again: the
  welcome comes from the history store with the same position, and a resume from inside it
  is filled from the store.
- A private Redis is SIGKILLed while viewers join and restarted empty on the same port:
  while it is down, joins to a stream the gateway serves are welcomed from history (a stream
  new to the gateway needs Redis for its channel: close 1013, "try again"); every join after
  it is back gets a welcome with the recent comments from history.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from clients import WebsocketsClient, aget_json, reply_to
from test_e2e import Env, make_config, started_app
from test_processes import Proc, wait_http
from test_recovery import resume
from waiting import eventually

from chorus.codes import CloseCode
from services import Service, free_port, start_redis

COMMENTS = 12


async def post_comments(posters: list[WebsocketsClient], count: int, prefix: str = "comment") -> list[str]:
    """``count`` comments spread over the posters (each stays under its per-user limit); their ids."""
    ids = []
    for i in range(count):
        poster = posters[i % len(posters)]
        await poster.send_json({"t": "comment", "text": f"{prefix} {i}", "nonce": f"n{i}"})
        ack = await poster.wait_for(reply_to(f"n{i}"), timeout=30)
        assert ack["t"] == "ack", ack
        ids.append(ack["id"])
    return ids


async def history(base: str, stream: str) -> list[dict[str, Any]]:
    status, page = await aget_json(f"{base}/streams/{stream}/comments?limit=100")
    assert status == 200
    return list(page["comments"])


def start_run(port: int, data: Path, log: Path) -> Proc:
    return Proc(["run", "--port", str(port), "--data-dir", str(data)], log)


async def test_chorus_run_killed_keeps_its_page(tmp_path: Path, procs: list[Proc]) -> None:
    data, stream = tmp_path / "data", "pg"
    port = free_port()
    base, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws?stream={stream}"
    first = start_run(port, data, tmp_path / "run1.log")
    procs.append(first)
    await asyncio.to_thread(wait_http, f"{base}/healthz", first)
    tokens = [(await aget_json(f"{base}/dev/token?name=Poster{i}"))[1]["token"] for i in range(2)]
    posters = [await WebsocketsClient.connect(ws, t) for t in tokens]
    for p in posters:
        await p.wait_for(lambda e: e["t"] == "welcome")
    await post_comments(posters, COMMENTS)
    for emoji, n, poster in (("fire", 3, posters[0]), ("heart", 2, posters[1])):
        for _ in range(n):
            await poster.send_json({"t": "react", "emoji": emoji})
    # A `reactions` event is sent after the flush that stored these counts.
    await posters[0].wait_for(lambda e: e["t"] == "reactions" and e["totals"]["fire"] == 3
                              and e["totals"]["heart"] == 2, timeout=10)
    stored = await eventually(lambda: _when(history(base, stream), lambda h: len(h) == COMMENTS), timeout=20,
                              what="archived")
    first.popen.kill()  # SIGKILL by its own PID: no drain, no final flush
    first.popen.wait(10)
    for p in posters:
        await p.wait_closed(10)

    port = free_port()
    base, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws?stream={stream}"
    second = start_run(port, data, tmp_path / "run2.log")
    procs.append(second)
    await asyncio.to_thread(wait_http, f"{base}/healthz", second)
    viewer = await WebsocketsClient.connect(ws)
    welcome = await viewer.wait_for(lambda e: e["t"] == "welcome", timeout=10)
    assert [c["text"] for c in welcome["recent"]] == [f"comment {i}" for i in range(COMMENTS)]
    assert welcome["epoch"].startswith("memory:") and welcome["offset"] == stored[0]["offset"]
    assert welcome["reactions"]["fire"] == 3 and welcome["reactions"]["heart"] == 2
    # From the welcome's position nothing is missing; from nothing, everything stored.
    assert await resume(viewer, welcome["epoch"], welcome["offset"]) == ([], True)
    replayed, recovered = await resume(viewer, "", -1)
    assert recovered and [c["text"] for c in replayed] == [f"comment {i}" for i in range(COMMENTS)]
    # The new process's log is a new epoch: a resume from the old one cannot be filled, and says so.
    token = (await aget_json(f"{base}/dev/token?name=After"))[1]["token"]
    poster = await WebsocketsClient.connect(ws, token)
    await poster.wait_for(lambda e: e["t"] == "welcome")
    await post_comments([poster], 1, "after the restart")
    batch = await viewer.wait_for(lambda e: e["t"] == "batch", timeout=10)
    assert batch["epoch"] != welcome["epoch"]
    assert await resume(viewer, welcome["epoch"], welcome["offset"]) == ([], False)
    for c in (viewer, poster):
        await c.close()
    assert second.stop() == 0, second.output()


async def _when(read: Any, ok: Any) -> Any:
    got = await read
    return got if ok(got) else None


async def delete_prefix(redis_url: str, prefix: str) -> int:
    """Empty this test's part of the session's Redis (what a FLUSHALL does to it; the session's
    other tests keep theirs)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


@pytest.mark.services
async def test_welcome_and_resume_from_history_when_the_redis_cache_is_gone(
        tmp_path: Path, request: pytest.FixtureRequest, redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    config = make_config(tmp_path, "services", request, redis__channel_prefix=prefix)
    stream = f"pg-{uuid.uuid4().hex[:6]}"
    app = await started_app(config)
    try:
        env = Env(app)
        await env.warm_up()
        posters = [await env.viewer(stream, env.token(f"poster{i}")) for i in range(2)]
        await post_comments(posters, COMMENTS)  # type: ignore[arg-type]
        assert app.store is not None
        store = app.store
        await eventually(lambda: store.count(stream) == COMMENTS, timeout=20, what="archived")
        before = await env.viewer(stream)
        cached = next(e for e in before.seen if e["t"] == "welcome")
        assert len(cached["recent"]) == COMMENTS
        for c in (*posters, before):
            await c.close()
    finally:
        await app.stop()
    assert await delete_prefix(redis_url, prefix) > 0

    app = await started_app(config)
    try:
        env = Env(app)
        viewer = await env.viewer(stream)
        welcome = next(e for e in viewer.seen if e["t"] == "welcome")
        assert welcome["recent"] == cached["recent"]
        assert (welcome["epoch"], welcome["offset"]) == (cached["epoch"], cached["offset"])
        middle = cached["recent"][5]
        replayed, recovered = await resume(viewer, cached["epoch"], middle["offset"])
        assert recovered and [c["id"] for c in replayed] == [c["id"] for c in cached["recent"][6:]]
        assert app.gateway is not None and app.gateway.recovery.from_history == 1
        await viewer.close()
    finally:
        await app.stop()


async def join(env: Env, stream: str) -> tuple[str, Any]:
    """("welcome", event) or ("closed", code): a join while Redis may be down."""
    try:
        client = await WebsocketsClient.connect(env.ws_url(stream))
    except Exception as exc:  # refused during the handshake
        return "refused", repr(exc)
    deadline = time.monotonic() + 10
    while client.events.empty() and not client._reader.done():  # a welcome, or the close
        assert time.monotonic() < deadline, "neither a welcome nor a close"
        await asyncio.sleep(0.02)
    if not client.events.empty() and (event := client.events.get_nowait())["t"] == "welcome":
        await client.close()
        return "welcome", event
    return "closed", await client.wait_closed(10)


@pytest.mark.services
async def test_joins_through_a_redis_killed_and_restarted_empty(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    redis: Service = start_redis(tmp_path / "redis")
    try:
        config = make_config(tmp_path, "services", request, redis__url=redis.url,
                             limits__redis_timeout_ms=200)
        stream = f"rk-{uuid.uuid4().hex[:6]}"
        app = await started_app(config)
        try:
            env = Env(app)
            await env.warm_up()
            watcher = await env.viewer(stream)
            posters = [await env.viewer(stream, env.token(f"poster{i}")) for i in range(2)]
            ids = await post_comments(posters, 6)  # type: ignore[arg-type]
            assert app.store is not None
            store = app.store
            await eventually(lambda: store.count(stream) == 6, timeout=20, what="archived")
            kind, cached = await join(env, stream)
            assert kind == "welcome" and [c["id"] for c in cached["recent"]] == ids  # from the cache

            redis.kill()  # SIGKILL by its PID
            # A stream this gateway serves: welcomed from history while Redis is down.
            for _ in range(3):
                kind, what = await join(env, stream)
                assert kind == "welcome" and [c["id"] for c in what["recent"]] == ids, (kind, what)
            assert (what["epoch"], what["offset"]) == (cached["epoch"], cached["offset"])  # the store's newest
            # A stream new to it needs its channel, which needs Redis: "try again".
            assert await join(env, f"new-{uuid.uuid4().hex[:6]}") == ("closed", CloseCode.TRY_AGAIN_LATER)
            await asyncio.to_thread(redis.restart)  # the same port, empty (no persistence)

            async def welcomed() -> Any:
                kind, what = await join(env, stream)
                return what if kind == "welcome" else None

            welcome = await eventually(welcomed, timeout=30, what="a welcome after Redis is back")
            assert [c["id"] for c in welcome["recent"]] == ids  # from history: the cache is gone
            for _ in range(3):  # and every join from then on
                kind, what = await join(env, stream)
                assert kind == "welcome" and [c["id"] for c in what["recent"]] == ids
            # Live delivery once Redis is back is test_fallback.py's subject.
            for c in (watcher, *posters):
                await c.close()
        finally:
            await app.stop()
    finally:
        redis.stop()
