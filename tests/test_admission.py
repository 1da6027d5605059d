"""Admission end to end (issue 4): rate limits, slow mode, bans and ``POST /streams/{id}/comments``,
on the embedded default and on the real Redis + Kafka.

On the services backend the apps run the gateway role alone (acks need only Kafka's producer;
slow-mode and ban commands go through the real `chorus` CLI against the test's Redis prefix).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from clients import ViewerClient, WebsocketsClient
from test_e2e import TEST_KEY, Env, make_config

from chorus import cli
from chorus.app import ALL_ROLES, App
from chorus.auth import mint_token
from chorus.broker import StreamMode, set_stream_mode
from chorus.codes import MAX_REQUEST_HEAD_BYTES
from chorus.ingest.limits import ALL_STREAMS, RedisRateLimiter, RedisSanctions
from chorus.ingest.log import LogUnavailable

BACKENDS = ["embedded", pytest.param("services", marks=pytest.mark.services)]
Launch = Callable[..., Awaitable[Env]]


@pytest.fixture
async def launch(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Launch]:
    apps: list[App] = []

    async def go(backend: str, **extra: Any) -> Env:
        data_dir = tmp_path / f"app{len(apps)}"
        config = make_config(data_dir, backend, request, **extra)
        app = await App.build(config, ALL_ROLES if backend == "embedded" else frozenset({"gateway"}))
        apps.append(app)
        await app.start()
        return Env(app)

    yield go
    for app in apps:
        await app.stop()


def sid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def token(env: Env, user: str, scopes: tuple[str, ...] = ("read", "write:comments"), role: str = "viewer") -> str:
    return mint_token(env.app.config.auth, user, user.title(), list(scopes), role)


async def answers(client: ViewerClient, n: int) -> list[dict[str, Any]]:
    """The next ``n`` acks and errors."""
    return [await client.wait_for(lambda e: e["t"] in ("ack", "error")) for _ in range(n)]


async def post_all(client: ViewerClient, texts: list[str]) -> list[dict[str, Any]]:
    for i, text in enumerate(texts):
        await client.send_json({"t": "comment", "text": text, "nonce": f"n{i}"})
    return await answers(client, len(texts))


def operator(env: Env, tmp_path: Path) -> Callable[..., Awaitable[None]]:
    """Run an operator command: the real CLI with Redis, the same calls in-process embedded."""
    config = env.app.config

    async def run(command: str, stream: str, *args: str) -> None:
        if config.embedded:
            sanctions = env.app.gateway.admission.limits.sanctions  # type: ignore[union-attr]
            if command == "mode":
                await set_stream_mode(env.app.state, env.app.broker, stream, StreamMode(int(args[1])))
            elif command == "ban":
                await sanctions.ban(stream, args[0], float(args[2]) if len(args) > 2 else None)
            else:
                await sanctions.unban(stream, args[0])
            return
        path = tmp_path / "operator.toml"
        path.write_text(f'[auth]\nkey = "{TEST_KEY}"\n[kafka]\nbootstrap = "{config.kafka.bootstrap}"\n'
                        f'[redis]\nurl = "{config.redis.url}"\nchannel_prefix = "{config.redis.channel_prefix}"\n')
        assert await asyncio.to_thread(cli.main, [command, stream, *args, "--config", str(path)]) == 0

    return run


# -- rate limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_user_over_ten_a_minute_is_rate_limited(launch: Launch, backend: str) -> None:
    env = await launch(backend)
    poster = await env.viewer(sid("rl"), token(env, f"u-{uuid.uuid4().hex[:6]}"))
    got = await post_all(poster, [f"c{i}" for i in range(11)])
    assert [e["t"] for e in got].count("ack") == 10
    (error,) = [e for e in got if e["t"] == "error"]
    assert error["code"] == "rate_limited" and error["nonce"] == "n10"
    assert 5000 < error["retry_after_ms"] <= 6000 and "10 comments per minute" in error["reason"]
    await poster.close()


@pytest.mark.services
async def test_two_gateways_share_the_user_budget(launch: Launch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    a = await launch("services", redis__channel_prefix=prefix)
    b = await launch("services", redis__channel_prefix=prefix)
    user, stream = f"u-{uuid.uuid4().hex[:6]}", sid("shared")
    on_a = await a.viewer(stream, token(a, user))
    on_b = await b.viewer(stream, token(b, user))
    assert {e["t"] for e in await post_all(on_a, [f"a{i}" for i in range(6)])} == {"ack"}
    assert {e["t"] for e in await post_all(on_b, [f"b{i}" for i in range(4)])} == {"ack"}
    # B's own pre-check has seen 4 posts: the refusal comes from the budget shared in Redis.
    (error,) = await post_all(on_b, ["one too many"])
    assert error["code"] == "rate_limited" and 0 < error["retry_after_ms"] <= 6000
    for c in (on_a, on_b):
        await c.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_address_limit(launch: Launch, backend: str) -> None:
    env = await launch(backend, limits__ip_per_minute=3)
    stream = sid("ip")
    results = []
    for i in range(4):  # four users, one address (127.0.0.1)
        client = await env.viewer(stream, token(env, f"ip{i}-{uuid.uuid4().hex[:4]}"))
        results += await post_all(client, [f"from user {i}"])
        await client.close()
    assert [e["t"] for e in results] == ["ack", "ack", "ack", "error"]
    assert results[3]["code"] == "rate_limited" and "network address" in results[3]["reason"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stream_limit(launch: Launch, backend: str) -> None:
    env = await launch(backend, limits__stream_per_second=2)
    busy, quiet = sid("busy"), sid("quiet")
    clients = [await env.viewer(busy, token(env, f"s{i}-{uuid.uuid4().hex[:4]}")) for i in range(3)]
    got = [(await post_all(c, ["hi"]))[0] for c in clients]
    assert [e["t"] for e in got] == ["ack", "ack", "error"]
    assert got[2]["code"] == "rate_limited" and "stream" in got[2]["reason"]
    assert 0 < got[2]["retry_after_ms"] <= 500
    other = await env.viewer(quiet, token(env, f"q-{uuid.uuid4().hex[:4]}"))
    assert (await post_all(other, ["elsewhere"]))[0]["t"] == "ack"
    for c in [*clients, other]:
        await c.close()


@pytest.mark.services
async def test_a_flood_from_one_user_stays_off_redis(launch: Launch, redis_url: str) -> None:
    env = await launch("services")
    assert env.app.gateway is not None
    limits = env.app.gateway.admission.limits
    assert isinstance(limits.limiter, RedisRateLimiter) and isinstance(limits.sanctions, RedisSanctions)
    client = aioredis.from_url(redis_url)
    before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    poster = await env.viewer(sid("flood"), token(env, f"f-{uuid.uuid4().hex[:6]}"))
    got = await post_all(poster, [f"spam {i}" for i in range(1000)])
    after = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    await client.aclose()
    assert [e["t"] for e in got].count("ack") == 10
    assert {e["code"] for e in got if e["t"] == "error"} == {"rate_limited"}
    # Only the 10 posts the local pre-check let through asked Redis: a ban check and the script each.
    trips = limits.limiter.round_trips + limits.sanctions.round_trips
    assert trips <= 21, trips
    assert after - before <= 11
    await poster.close()


# -- slow mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_slow_mode_set_by_the_operator(launch: Launch, backend: str, tmp_path: Path) -> None:
    env = await launch(backend)
    run = operator(env, tmp_path)
    stream = sid("slow")
    watcher = await env.viewer(stream)
    poster = await env.viewer(stream, token(env, f"p-{uuid.uuid4().hex[:6]}"))
    mod = await env.viewer(stream, token(env, f"m-{uuid.uuid4().hex[:6]}", role="moderator"))

    await run("mode", stream, "--slow-mode-seconds", "30")
    event = await watcher.wait_for(lambda e: e["t"] == "mode")
    assert event == {"t": "mode", "slow_mode_seconds": 30}
    late = await WebsocketsClient.connect(env.ws_url(stream))
    welcome = await late.wait_for(lambda e: e["t"] == "welcome")
    assert welcome["mode"] == {"slow_mode_seconds": 30}

    (first,) = await post_all(poster, ["first"])
    (second,) = await post_all(poster, ["second"])
    assert first["t"] == "ack"
    assert second["code"] == "slow_mode" and 29_000 < second["retry_after_ms"] <= 30_000
    assert "every 30 s" in second["reason"]
    assert {e["t"] for e in await post_all(mod, ["mods", "are exempt"])} == {"ack"}

    await run("mode", stream, "--slow-mode-seconds", "0")
    assert (await late.wait_for(lambda e: e["t"] == "mode"))["slow_mode_seconds"] == 0
    assert (await post_all(poster, ["free again"]))[0]["t"] == "ack"
    for c in (watcher, poster, mod, late):
        await c.close()


# -- bans and time-outs -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_banned_and_timed_out_users_are_refused(launch: Launch, backend: str, tmp_path: Path) -> None:
    env = await launch(backend)
    run = operator(env, tmp_path)
    stream, other = sid("ban"), sid("other")
    tag = uuid.uuid4().hex[:6]
    banned, timed, everywhere, forgiven = (f"{n}-{tag}" for n in ("banned", "timed", "global", "forgiven"))
    await run("ban", stream, banned)
    await run("ban", stream, timed, "--seconds", "60")
    await run("ban", ALL_STREAMS, everywhere)
    await run("ban", stream, forgiven)
    await run("unban", stream, forgiven)

    async def attempt(user: str, where: str = stream) -> dict[str, Any]:
        """Post over HTTP: a banned user's WebSocket is closed right after the upgrade."""
        status, _, body = await http_exchange(env, request(f"/streams/{where}/comments", text_body("let me in"),
                                                           token(env, user)))
        return {"t": "ack"} if status == 201 else {"t": "error", "code": body["error"], **body}

    async def close_code(user: str, where: str = stream) -> int | None:
        client = await WebsocketsClient.connect(env.ws_url(where), token(env, user))
        return await client.wait_closed()

    assert await close_code(banned) == 4503 and await close_code(timed) == 4504
    assert await close_code(everywhere, other) == 4503
    answer = await attempt(banned)
    assert answer["code"] == "banned" and "retry_after_ms" not in answer and "this stream" in answer["reason"]
    assert (await attempt(banned, other))["t"] == "ack"  # a stream ban holds on that stream only
    answer = await attempt(timed)
    assert answer["code"] == "timed_out" and 59_000 < answer["retry_after_ms"] <= 60_000
    answer = await attempt(everywhere, other)
    assert answer["code"] == "banned" and "every stream" in answer["reason"]
    assert (await attempt(forgiven))["t"] == "ack"


# -- POST /streams/{id}/comments ---------------------------------------------------------------


async def http_exchange(env: Env, *chunks: bytes, pause: float = 0.0) -> tuple[int, dict[str, str], Any]:
    """Send raw request bytes (in pieces), read the answer to EOF: status, headers, JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    while data.startswith(b"HTTP/1.1 100 "):
        data = data.split(b"\r\n\r\n", 1)[1]
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    parsed = json.loads(body) if headers.get("Content-Type", "").startswith("application/json") else body
    return int(lines[0].split()[1]), headers, parsed


def request(path: str, body: bytes, token_: str | None = None, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             "Content-Type: application/json"]
    if token_:
        lines.append(f"Authorization: Bearer {token_}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode() + body


def text_body(text: Any) -> bytes:
    return json.dumps({"text": text}).encode()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_post_happy_path(launch: Launch, backend: str) -> None:
    env = await launch(backend)
    stream = sid("post")
    watcher = await env.viewer(stream)
    status, headers, body = await http_exchange(
        env, request(f"/streams/{stream}/comments", text_body("  over plain HTTP  "), token(env, "poster")))
    assert status == 201 and headers["Connection"] == "close" and body["id"].isdigit()
    if backend == "embedded":  # the services apps run no coordinator
        batch = await watcher.wait_for(lambda e: e["t"] == "batch")
        assert [(c["id"], c["text"]) for c in batch["comments"]] == [(body["id"], "over plain HTTP")]
    await watcher.close()


@pytest.fixture
async def post_env(launch: Launch) -> Env:
    return await launch("embedded", gateway__handshake_timeout_s=0.5)


def too_long() -> bytes:
    return text_body("x" * 501)


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda t, s: request(f"/streams/{s}/comments", text_body("hi")), 401, "unauthorized"),
        (lambda t, s: request(f"/streams/{s}/comments", text_body("hi"), "not.a.token"), 401, "unauthorized"),
        (lambda t, s: request(f"/streams/{s}/comments", text_body("hi"), t("reader", ("read",))), 403,
         "missing_scope"),
        (lambda t, s: request(f"/streams/{s}/comments", text_body("   "), t("u")), 400, "empty_comment"),
        (lambda t, s: request(f"/streams/{s}/comments", too_long(), t("u")), 400, "comment_too_long"),
        (lambda t, s: request(f"/streams/{s}/comments", b"not json", t("u")), 400, "bad_message"),
        (lambda t, s: request(f"/streams/{s}/comments", text_body(42), t("u")), 400, "bad_message"),
        (lambda t, s: request("/streams/a%2Fb/comments", text_body("hi"), t("u")), 400, "bad_request"),
        (lambda t, s: request("/elsewhere", text_body("hi"), t("u")), 404, "not_found"),
        (lambda t, s: request(f"/streams/{s}/comments", text_body("hi"), t("u"), "Origin: https://evil.example"),
         403, "forbidden"),
        (lambda t, s: request(f"/streams/{s}/comments", b"", t("u"), "Transfer-Encoding: chunked")
         .replace(b"Content-Length: 0\r\n", b""), 411, "length_required"),
        (lambda t, s: request(f"/streams/{s}/comments", b"", t("u")).replace(b"Content-Length: 0\r\n", b""), 400,
         "bad_message"),  # no Content-Length, no Transfer-Encoding: an empty body (RFC 9112 6.3)
        (lambda t, s: request(f"/streams/{s}/comments", b"x" * 20000, t("u")), 413, "body_too_large"),
        (lambda t, s: request(f"/streams/{s}/comments", b"{}", t("u"), "X-Pad: " + "p" * (MAX_REQUEST_HEAD_BYTES + 1)),
         431, "headers_too_large"),
        (lambda t, s: b"POST /streams/x/comments HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 505,
         "version_not_supported"),
        (lambda t, s: b"POST \x00\x01garbage\r\n\r\n", 400, "bad_request"),
    ],
)
async def test_post_errors(post_env: Env, make: Callable[..., bytes], status: int, code: str) -> None:
    raw = make(lambda user, scopes=("write:comments",): token(post_env, f"{user}-{uuid.uuid4().hex[:4]}", scopes),
               sid("perr"))
    got_status, _headers, body = await http_exchange(post_env, raw)
    assert (got_status, body["error"]) == (status, code)
    assert body["reason"]


async def test_post_that_never_completes_times_out(post_env: Env) -> None:
    status, _, body = await http_exchange(post_env, b"POST /streams/s/comments HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
    assert (status, body["error"]) == (408, "request_timeout")


async def test_post_refusals_carry_retry_after(post_env: Env, tmp_path: Path) -> None:
    env = post_env
    stream, user = sid("pr"), f"r-{uuid.uuid4().hex[:4]}"
    tok = token(env, user)
    path = f"/streams/{stream}/comments"
    for i in range(10):
        assert (await http_exchange(env, request(path, text_body(f"c{i}"), tok)))[0] == 201
    status, headers, body = await http_exchange(env, request(path, text_body("again"), tok))
    assert (status, body["error"]) == (429, "rate_limited")
    assert 5000 < body["retry_after_ms"] <= 6000 and headers["Retry-After"] == "6"

    run = operator(env, tmp_path)
    await run("mode", stream, "--slow-mode-seconds", "5")
    slow_tok = token(env, f"s-{uuid.uuid4().hex[:4]}")
    assert (await http_exchange(env, request(path, text_body("one"), slow_tok)))[0] == 201
    status, headers, body = await http_exchange(env, request(path, text_body("two"), slow_tok))
    assert (status, body["error"], headers["Retry-After"]) == (429, "slow_mode", "5")

    await run("ban", stream, "b-user")
    status, headers, body = await http_exchange(env, request(path, text_body("x"), token(env, "b-user")))
    assert (status, body["error"], "Retry-After" in headers) == (403, "banned", False)
    await run("ban", stream, "t-user", "--seconds", "90")
    status, headers, body = await http_exchange(env, request(path, text_body("x"), token(env, "t-user")))
    assert (status, body["error"], headers["Retry-After"]) == (403, "timed_out", "90")


async def test_post_not_taken_by_the_log_is_503(post_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(key: bytes, value: bytes) -> None:
        raise LogUnavailable("kafka at test:9092 is unreachable")

    monkeypatch.setattr(post_env.app.log, "append", refuse)
    raw = request(f"/streams/{sid('down')}/comments", text_body("hi"), token(post_env, "k"))
    status, headers, body = await http_exchange(post_env, raw)
    assert (status, body["error"], headers["Retry-After"]) == (503, "not_accepted", "2")


async def test_post_split_anywhere_and_expect_continue(post_env: Env) -> None:
    env = post_env
    raw = request(f"/streams/{sid('split')}/comments", text_body("bit by bit"), token(env, "slow-typist"))
    status, _, body = await http_exchange(env, *(raw[i : i + 1] for i in range(12)), raw[12:], pause=0.005)
    assert status == 201 and body["id"]
    head, _, payload = request(f"/streams/{sid('cont')}/comments", text_body("after 100"), token(env, "c"),
                               "Expect: 100-continue").partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(head + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(payload)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 201 Created\r\n")
    writer.close()


async def test_a_request_arriving_in_pieces_is_read_whole(post_env: Env) -> None:
    """'P' then 'UT ...': the hand-off reads the whole head before anything answers it."""
    status, headers, body = await http_exchange(post_env, b"P", b"UT /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                                                pause=0.02)
    assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "GET, HEAD")
    status, _, body = await http_exchange(post_env, b"GE", b"T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", pause=0.02)
    assert (status, body) == (200, b"ok")


@pytest.mark.services
async def test_post_kafka_takes_but_does_not_confirm_is_504_unconfirmed_with_its_id(
        launch: Launch, kafka_service: Any) -> None:
    """A real stalled broker (SIGSTOP for a moment): the record left the gateway but no
    confirmation came within kafka.accept_timeout_ms, so the answer is ``unconfirmed`` with the
    comment's id (it may still appear), not ``not_accepted``."""
    if kafka_service.external:
        pytest.skip("the broker is not ours to pause")
    env = await launch("services", kafka__accept_timeout_ms=1000)
    path, tok = f"/streams/{sid('stall')}/comments", token(env, "patient")
    assert (await http_exchange(env, request(path, text_body("the producer is connected"), tok)))[0] == 201
    os.kill(kafka_service.pid, signal.SIGSTOP)
    try:
        status, headers, body = await http_exchange(env, request(path, text_body("into a stalled broker"), tok))
    finally:
        os.kill(kafka_service.pid, signal.SIGCONT)
    assert (status, body["error"], headers["Retry-After"]) == (504, "unconfirmed", "2")
    assert body["id"].isdigit() and "may still appear" in body["reason"]
