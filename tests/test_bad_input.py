"""Bad input gets a clear answer and breaks nothing else (issue 2, item 5)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets
from clients import WebsocketsClient, http_get
from test_e2e import Env, make_config, started_app

from chorus.codes import CloseCode
from chorus.native import OP_TEXT, encode_frame


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request, gateway__max_message_bytes=4096))
    yield Env(app)
    await app.stop()


def stream() -> str:
    return f"bad-{uuid.uuid4().hex[:6]}"


async def connected(env: Env, token: str | None = None) -> WebsocketsClient:
    client = await WebsocketsClient.connect(env.ws_url(stream()), token)
    await client.wait_for(lambda e: e["t"] == "welcome")
    return client


async def test_frame_over_the_size_limit_closes_with_1009(env: Env) -> None:
    client = await connected(env, env.token("big"))
    await client.send_raw("x" * 5000)
    assert await client.wait_closed() == CloseCode.TOO_BIG


async def test_fragmented_message_over_the_limit_closes_with_1009(env: Env) -> None:
    client = await connected(env)
    await client.conn.send(iter(["x" * 3000, "y" * 3000]))  # two frames, each under the limit
    assert await client.wait_closed() == CloseCode.TOO_BIG


async def test_invalid_utf8_text_closes_with_1007(env: Env) -> None:
    client = await connected(env)
    # A text frame whose payload is not UTF-8: written by hand, since clients refuse to.
    transport = client.conn.transport
    mask = b"\x01\x02\x03\x04"
    payload = b'{"t":"comment","text":"\xff\xfe"}'
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    transport.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    assert await client.wait_closed() == CloseCode.INVALID_TEXT


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json at all", "bad_message"),
        ('{"t":"teleport"}', "unknown_type"),
        ('{"no_type":1}', "bad_message"),
        ('{"t":"comment","text":"","nonce":"e1"}', "empty_comment"),
        ('{"t":"comment","text":"' + "x" * 501 + '","nonce":"e2"}', "comment_too_long"),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays_open(env: Env, raw: str, code: str) -> None:
    client = await connected(env, env.token("erin"))
    await client.send_raw(raw)
    error = await client.wait_for(lambda e: e["t"] == "error")
    assert error["code"] == code and error["reason"]
    await client.send_json({"t": "comment", "text": "still here", "nonce": "ok"})
    assert (await client.wait_for(lambda e: e["t"] == "ack"))["nonce"] == "ok"
    await client.close()


async def test_posting_without_a_token_is_refused_but_reading_works(env: Env) -> None:
    client = await connected(env)
    await client.send_json({"t": "comment", "text": "hi", "nonce": "anon"})
    error = await client.wait_for(lambda e: e["t"] == "error")
    assert (error["code"], error["nonce"]) == ("unauthorized", "anon")
    read_only = env.token("rita", scopes=("read",))
    client2 = await connected(env, read_only)
    await client2.send_json({"t": "comment", "text": "hi"})
    assert (await client2.wait_for(lambda e: e["t"] == "error"))["code"] == "missing_scope"
    for c in (client, client2):
        await c.close()


async def test_bad_token_is_refused_with_401_before_the_upgrade(env: Env) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(env.ws_url("s1"), additional_headers={"Authorization": "Bearer nope"})
    assert info.value.response.status_code == 401
    status, body = await asyncio.to_thread(http_get, f"{env.base}/ws?stream=s1&access_token=x.y.z",
                                           {"Connection": "Upgrade", "Upgrade": "websocket"})
    assert status == 401 and b"invalid token" in body


async def test_no_token_is_refused_when_anonymous_reading_is_off(request: pytest.FixtureRequest,
                                                                 tmp_path: Path) -> None:
    app = await started_app(make_config(tmp_path, "embedded", request, auth__anonymous_read=False))
    try:
        env = Env(app)
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(env.ws_url("s1"))
        assert info.value.response.status_code == 401
        ok = await connected(env, env.token("tom", ("read",)))
        await ok.close()
    finally:
        await app.stop()


async def test_foreign_origin_is_refused_with_403(env: Env) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(env.ws_url("s1"), origin="https://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    same = await WebsocketsClient.connect(env.ws_url("s1"), origin=f"http://127.0.0.1:{env.port}")
    await same.wait_for(lambda e: e["t"] == "welcome")
    await same.close()


async def test_bad_stream_id_is_refused_with_400(env: Env) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{env.port}/ws?stream=a/b")
    assert info.value.response.status_code == 400


async def test_unmasked_client_frame_closes_with_1002(env: Env) -> None:
    client = await connected(env)
    client.conn.transport.write(encode_frame(OP_TEXT, b'{"t":"comment"}'))  # servers' frames are unmasked
    assert await client.wait_closed() == CloseCode.PROTOCOL_ERROR


@pytest.mark.services
async def test_kafka_unreachable_refuses_the_comment(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from services import free_port

    config = make_config(tmp_path, "services", request, kafka__bootstrap=f"127.0.0.1:{free_port()}",
                         kafka__accept_timeout_ms=1000)
    app = await started_app(config)
    try:
        env = Env(app)
        client = await connected(env, env.token("kim"))
        await client.send_json({"t": "comment", "text": "into the void", "nonce": "k1"})
        error = await client.wait_for(lambda e: e["t"] in ("error", "ack"), timeout=10)
        assert error["t"] == "error" and error["code"] == "not_accepted" and error["nonce"] == "k1"
        assert "not accepted" in error["reason"] and "kafka" in error["reason"]
        await client.close()
    finally:
        await app.stop()
