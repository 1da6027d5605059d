"""End to end, in-process: the whole path on the embedded default and on real Redis + Kafka.

Each test starts an :class:`App` (every role) on a free port and drives it with clients we
did not write: the `websockets` library and picows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from clients import PicowsClient, ViewerClient, WebsocketsClient, aget_json
from waiting import scaled

from chorus.app import App
from chorus.auth import mint_token
from chorus.config import Config, load_config

TEST_KEY = "test-signing-key-0123456789abcdef0123456789"


def make_config(tmp_path: Path, backend: str, request: pytest.FixtureRequest, **extra: Any) -> Config:
    overrides: dict[str, Any] = {"gateway__port": 0, "data_dir": str(tmp_path), "auth__key": TEST_KEY}
    if backend == "services":
        overrides["redis__url"] = request.getfixturevalue("redis_url")
        overrides["kafka__bootstrap"] = request.getfixturevalue("kafka_bootstrap")
        overrides["redis__channel_prefix"] = f"t{uuid.uuid4().hex[:8]}:"
    overrides.update(extra)
    return load_config(env={}, **overrides)


async def started_app(config: Config) -> App:
    app = await App.build(config)
    await app.start()
    return app


class Env:
    """A running app and what a test needs to reach it."""

    def __init__(self, app: App) -> None:
        self.app = app
        assert app.gateway is not None
        self.port = app.gateway.port
        self.base = f"http://127.0.0.1:{self.port}"

    def ws_url(self, stream: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?stream={stream}"

    def token(self, user: str, scopes: tuple[str, ...] = ("read", "write")) -> str:
        return mint_token(self.app.config.auth, user, user.title(), list(scopes))

    async def viewer(self, stream: str, token: str | None = None, kind: str = "websockets") -> ViewerClient:
        client: ViewerClient
        if kind == "picows":
            client = await PicowsClient.connect(self.ws_url(stream), token)
        else:
            client = await WebsocketsClient.connect(self.ws_url(stream), token)
        await client.wait_for(lambda e: e["t"] == "welcome")
        return client

    async def warm_up(self) -> None:
        """Wait until the coordinator delivers (a Kafka consumer group takes a moment to join)."""
        stream = f"warm-{uuid.uuid4().hex[:6]}"
        poster = await self.viewer(stream, self.token("warm"))
        await poster.send_json({"t": "comment", "text": "warm up", "nonce": "w"})
        await poster.wait_for(lambda e: e["t"] == "batch", timeout=30)
        await poster.close()


@pytest.fixture(params=["embedded", pytest.param("services", marks=pytest.mark.services)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, request.param, request))
    e = Env(app)
    await e.warm_up()
    yield e
    await app.stop()


async def test_comment_reaches_every_viewer_of_its_stream_only(env: Env) -> None:
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    viewers_a = [await env.viewer(a) for _ in range(3)] + [await env.viewer(a, kind="picows") for _ in range(2)]
    viewers_b = [await env.viewer(b), await env.viewer(b, kind="picows")]
    poster = await env.viewer(a, env.token("alice"))

    sent = time.monotonic()
    await poster.send_json({"t": "comment", "text": "hello A", "nonce": "n1"})
    ack = await poster.wait_for(lambda e: e["t"] == "ack")
    assert ack["nonce"] == "n1" and ack["id"].isdigit()

    for v in viewers_a:
        batch = await v.wait_for(lambda e: e["t"] == "batch", timeout=2)
        latency = time.monotonic() - sent
        assert latency < 0.5, f"delivered after {latency * 1000:.0f} ms"
        (c,) = batch["comments"]
        assert (c["id"], c["text"], c["user"]["name"], c["stream"]) == (ack["id"], "hello A", "Alice", a)
        assert isinstance(c["offset"], int) and batch["offset"] == c["offset"]
    await asyncio.sleep(0.3)  # what stream B's viewers would get by now, had A's comment leaked
    for v in viewers_b:  # counts of their own stream's viewers may come; comments of A must not
        got = [v.events.get_nowait() for _ in range(v.events.qsize())]
        assert not [e for e in got if e["t"] == "batch"], f"a viewer of stream B got a comment of stream A: {got}"

    status, page = await _wait_history(env, a, 1)
    assert status == 200
    assert [c["id"] for c in page["comments"]] == [ack["id"]]
    for v in [*viewers_a, *viewers_b, poster]:
        await v.close()


async def _wait_history(env: Env, stream: str, n: int, timeout: float = 10) -> tuple[int, Any]:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        status, page = await aget_json(f"{env.base}/streams/{stream}/comments")
        if status != 200 or len(page["comments"]) >= n or time.monotonic() > deadline:
            return status, page
        await asyncio.sleep(0.05)


async def test_history_pages_newest_first(env: Env) -> None:
    stream = f"h-{uuid.uuid4().hex[:6]}"
    poster = await env.viewer(stream, env.token("bob"))
    ids = []
    for i in range(7):
        await poster.send_json({"t": "comment", "text": f"c{i}", "nonce": str(i)})
        ids.append((await poster.wait_for(lambda e: e["t"] == "ack"))["id"])
    await _wait_history(env, stream, 7)
    status, first = await aget_json(f"{env.base}/streams/{stream}/comments?limit=3")
    assert status == 200 and [c["id"] for c in first["comments"]] == ids[::-1][:3]
    status, second = await aget_json(f"{env.base}/streams/{stream}/comments?limit=3&before={first['next_before']}")
    assert [c["id"] for c in second["comments"]] == ids[::-1][3:6]
    status, bad = await aget_json(f"{env.base}/streams/{stream}/comments?limit=0")
    assert status == 400 and bad["error"] == "bad_request" and "limit" in bad["reason"]
    await poster.close()


async def test_welcome_carries_recent_comments_and_position(env: Env) -> None:
    stream = f"w-{uuid.uuid4().hex[:6]}"
    poster = await env.viewer(stream, env.token("carol"))
    await poster.send_json({"t": "comment", "text": "first!", "nonce": "1"})
    batch = await poster.wait_for(lambda e: e["t"] == "batch")
    late = await WebsocketsClient.connect(env.ws_url(stream))
    welcome = await late.wait_for(lambda e: e["t"] == "welcome")
    assert [c["text"] for c in welcome["recent"]] == ["first!"]
    assert welcome["offset"] == batch["offset"] and welcome["epoch"] == batch["epoch"]
    await late.send_json({"t": "resume", "epoch": welcome["epoch"], "offset": welcome["offset"] - 1})
    replay = await late.wait_for(lambda e: e["t"] == "batch")
    assert [c["text"] for c in replay["comments"]] == ["first!"]
    assert (await late.wait_for(lambda e: e["t"] == "resumed"))["recovered"] is True
    await late.send_json({"t": "resume", "epoch": "another-epoch", "offset": 1})
    assert (await late.wait_for(lambda e: e["t"] == "resumed"))["recovered"] is False
    for c in (poster, late):
        await c.close()


async def test_a_verified_token_badges_its_comments(env: Env) -> None:
    stream = f"v-{uuid.uuid4().hex[:6]}"
    verified = mint_token(env.app.config.auth, "vera", "Vera", ["read", "write:comments"], verified=True)
    poster = await env.viewer(stream, verified)
    plain = await env.viewer(stream, env.token("paul"))
    await poster.send_json({"t": "comment", "text": "checked", "nonce": "v"})
    await plain.send_json({"t": "comment", "text": "unchecked", "nonce": "p"})
    seen: dict[str, list[str]] = {}
    while len(seen) < 2:
        batch = await plain.wait_for(lambda e: e["t"] == "batch")
        seen.update({c["text"]: c["user"]["badges"] for c in batch["comments"]})
    assert seen == {"checked": ["verified"], "unchecked": []}
    for c in (poster, plain):
        await c.close()


async def test_msgpack_viewers_get_the_same_maps(env: Env) -> None:
    stream = f"m-{uuid.uuid4().hex[:6]}"
    mp = await WebsocketsClient.connect(env.ws_url(stream), env.token("dave"), wire="msgpack")
    await mp.wait_for(lambda e: e["t"] == "welcome")
    await mp.send_json({"t": "comment", "text": "binary hello", "nonce": "m"})
    assert (await mp.wait_for(lambda e: e["t"] == "ack"))["nonce"] == "m"
    batch = await mp.wait_for(lambda e: e["t"] == "batch")
    assert batch["comments"][0]["text"] == "binary hello"
    await mp.close()


async def test_deflate_viewers_get_compressed_batches(env: Env) -> None:
    stream = f"z-{uuid.uuid4().hex[:6]}"
    plain = await env.viewer(stream, env.token("pat"))
    packed = await WebsocketsClient.connect(env.ws_url(stream), compression="deflate")
    assert packed.conn.response is not None  # set once the handshake is done
    extensions = packed.conn.response.headers["Sec-WebSocket-Extensions"]
    assert "permessage-deflate" in extensions and "server_no_context_takeover" in extensions
    await packed.wait_for(lambda e: e["t"] == "welcome")
    text = "compress me " * 40
    await plain.send_json({"t": "comment", "text": text, "nonce": "z"})
    for client in (plain, packed):
        batch = await client.wait_for(lambda e: e["t"] == "batch")
        assert batch["comments"][0]["text"] == text.strip()
    # The compressed viewer can post too: its message arrives deflated and is inflated.
    poster = await WebsocketsClient.connect(env.ws_url(stream), env.token("quinn"), compression="deflate")
    await poster.wait_for(lambda e: e["t"] == "welcome")
    await poster.send_json({"t": "comment", "text": "deflated hello " * 20, "nonce": "d"})
    assert (await poster.wait_for(lambda e: e["t"] == "ack"))["nonce"] == "d"
    for client in (plain, packed, poster):
        await client.close()


async def test_a_stream_whose_only_viewers_use_deflate_gets_batches(env: Env) -> None:
    stream = f"zz-{uuid.uuid4().hex[:6]}"
    json_viewer = await WebsocketsClient.connect(env.ws_url(stream), compression="deflate")
    mp_viewer = await WebsocketsClient.connect(env.ws_url(stream), env.token("rae"), wire="msgpack",
                                               compression="deflate")
    for client in (json_viewer, mp_viewer):
        await client.wait_for(lambda e: e["t"] == "welcome")
    await mp_viewer.send_json({"t": "comment", "text": "only compressed viewers here", "nonce": "c"})
    for client in (json_viewer, mp_viewer):
        batch = await client.wait_for(lambda e: e["t"] == "batch")
        assert batch["comments"][0]["text"] == "only compressed viewers here"
    for client in (json_viewer, mp_viewer):
        await client.close()
