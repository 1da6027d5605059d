"""The gateway's HTTP surface on a real gateway over loopback (issue 11 items 3 and 9, issue 17
items 5 and 6): every error a JSON ``{"error", "reason"}``, integers and nesting bounded, HEAD
wherever GET works, 405 with ``Allow``, 431 for oversize heads, what a refused post says, and
dev sign-in names that cannot collide."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import websockets
from clients import WebsocketsClient
from test_e2e import Env, make_config, started_app

from chorus.auth import mint_token, verify_token
from chorus.codes import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEAD_BYTES


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request))
    yield Env(app)
    await app.stop()


class Answer:
    """One HTTP answer read to the end of the connection."""

    def __init__(self, raw: bytes) -> None:
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete answer: {raw[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)

    def error(self) -> tuple[int, str]:
        """(status, code) of an error answer, checking its shape."""
        body = self.json()
        assert set(body) >= {"error", "reason"} and isinstance(body["reason"], str) and body["reason"]
        assert "b'" not in body["reason"] and 'b"' not in body["reason"]  # no Python byte reprs
        return self.status, body["error"]


async def exchange(env: Env, raw: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(raw)
        await writer.drain()
        return Answer(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()


def request(method: str, target: str, *headers: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def stream() -> str:
    return f"hs-{uuid.uuid4().hex[:6]}"


# -- 11.3: integers and nesting ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["before", "limit"])
@pytest.mark.parametrize("value", [str(2**63), str(10**30), str(-(10**30)), "0", "-1", "1_0", "%2B5", "%205", "5x",
                                   "", "%D9%A1"])  # the last: an Arabic-Indic 1, which int() takes
async def test_history_integers_out_of_range_are_400(env: Env, caplog: pytest.LogCaptureFixture, name: str,
                                                     value: str) -> None:
    caplog.set_level(logging.INFO)
    answer = await exchange(env, request("GET", f"/streams/{stream()}/comments?{name}={value}"))
    assert answer.error() == (400, "bad_request")
    assert name in answer.json()["reason"]
    logged = [r for r in caplog.records if r.name.startswith(("chorus.gateway", "chorus.picows")) and r.exc_info]
    assert not logged, "a refused argument logged a traceback"


async def test_history_takes_exactly_the_comment_id_range(env: Env) -> None:
    s, page_max = stream(), env.app.config.history.page_max
    for query in (f"before={2**63 - 1}", "before=1", f"limit={page_max}", "limit=1"):
        answer = await exchange(env, request("GET", f"/streams/{s}/comments?{query}"))
        assert answer.status == 200 and answer.json()["comments"] == []
    for query in (f"before={2**63}", f"limit={page_max + 1}"):
        assert (await exchange(env, request("GET", f"/streams/{s}/comments?{query}"))).error() == (400, "bad_request")


async def test_deeply_nested_bodies_are_refused_not_500(env: Env) -> None:
    path = f"/streams/{stream()}/comments"
    token = env.token("nester")
    for depth in (1000, MAX_REQUEST_BODY_BYTES - 10):  # 1,000 is past json.loads' recursion limit
        answer = await exchange(env, request("POST", path, bearer(token), body=b"[" * depth))
        assert answer.error() == (400, "bad_message") and "nests" in answer.json()["reason"]
        nested = b'{"text":"x","more":' + b"[" * depth + b"]" * depth + b"}"
        assert (await exchange(env, request("POST", path, bearer(token), body=nested[:MAX_REQUEST_BODY_BYTES])))\
            .error() == (400, "bad_message")
    too_big = await exchange(env, request("POST", path, bearer(token), body=b"[" * 100_000))
    assert too_big.error() == (413, "body_too_large")
    # Brackets inside a string are text, not nesting.
    text = "[{" * 100 + ' \\" ' + "]}" * 50
    answer = await exchange(env, request("POST", path, bearer(token), body=json.dumps({"text": text}).encode()))
    assert answer.status == 201 and answer.json()["id"].isdigit()


# -- 11.9 / 17.5: methods, HEAD, heads over the limit ------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "BREW"])
async def test_other_methods_get_405_with_allow(env: Env, method: str) -> None:
    answer = await exchange(env, request(method, "/healthz", body=b""))
    assert answer.error() == (405, "method_not_allowed") and answer.headers["allow"] == "GET, HEAD"
    assert method in answer.json()["reason"]
    answer = await exchange(env, request(method, f"/streams/{stream()}/comments", body=b"{}"))
    assert answer.error() == (405, "method_not_allowed") and answer.headers["allow"] == "GET, HEAD, POST"
    answer = await exchange(env, request(method, "/no/such/thing"))
    assert answer.error() == (404, "not_found")


async def test_post_to_a_get_only_path_is_405(env: Env) -> None:
    answer = await exchange(env, request("POST", "/healthz", body=b""))
    assert answer.error() == (405, "method_not_allowed") and answer.headers["allow"] == "GET, HEAD"
    assert (await exchange(env, request("POST", "/elsewhere", body=b""))).error() == (404, "not_found")


@pytest.mark.parametrize("target", ["/healthz", "/readyz", "/", "/static/app.js", "/streams",
                                    "/streams/s1/comments?limit=5", "/dev/token?name=Hal", "/no/such/thing",
                                    "/streams/s1/comments?limit=0"])
async def test_head_answers_like_get_without_the_body(env: Env, target: str) -> None:
    got = await exchange(env, request("GET", target))
    head = await exchange(env, request("HEAD", target))
    assert head.status == got.status and head.body == b""
    assert head.headers.get("content-length") == got.headers.get("content-length")
    assert head.headers["content-type"] == got.headers["content-type"]
    if target != "/dev/token?name=Hal":  # a fresh token each time: same length, other bytes
        assert got.headers.get("content-length") == str(len(got.body))


async def test_a_get_that_never_completes_is_answered_408(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    app = await started_app(make_config(tmp_path, "embedded", request, gateway__handshake_timeout_s=0.5))
    try:
        env = Env(app)
        slow = await exchange(env, b"GET /ws?stream=s1 HTTP/1.1\r\nUpgrade: websocket\r\n")  # no end of head
        assert slow.error() == (408, "request_timeout")
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        writer.write_eof()  # half-closed: it still reads the answer
        cut = Answer(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        assert cut.error() == (400, "bad_request") and "ended" in cut.json()["reason"]
    finally:
        await app.stop()


async def test_http_1_0_get_is_served(env: Env) -> None:
    answer = await exchange(env, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (answer.status, answer.body) == (200, b"ok")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_oversize_get_heads_get_431(env: Env, method: str) -> None:
    pad = "X-Pad: " + "p" * MAX_REQUEST_HEAD_BYTES
    answer = await exchange(env, request(method, "/healthz", pad))
    assert answer.status == 431
    if method == "GET":
        assert answer.error() == (431, "headers_too_large")
    upgrade = await exchange(env, request("GET", "/ws?stream=s1", "Connection: Upgrade", "Upgrade: websocket",
                                          "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                          "Cookie: " + "c" * 20_000))  # over picows' own 16 KiB too
    assert upgrade.error() == (431, "headers_too_large")


async def test_upgrades_picows_would_refuse_with_byte_reprs_get_json(env: Env) -> None:
    ws = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    answer = await exchange(env, request("GET", "/ws?stream=s1", *ws, body=b"hello"))
    assert answer.error() == (400, "bad_request")
    answer = await exchange(env, b"GET /ws?stream=s1 HTTP/1.0\r\n" + "\r\n".join(ws).encode() + b"\r\n\r\n")
    assert answer.error() == (400, "bad_request") and "HTTP/1.1" in answer.json()["reason"]
    plain = await exchange(env, request("GET", "/ws?stream=s1"))
    assert plain.error() == (426, "upgrade_required") and plain.headers["upgrade"] == "websocket"


@pytest.mark.parametrize(("swap", "status", "code"), [
    (("Connection: Upgrade", "Connection: close"), 400, "bad_request"),
    (("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426, "upgrade_required"),
    (("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Key: c2hvcnQ="), 400, "bad_request"),
    (("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Key: not base64!"), 400, "bad_request"),
])
async def test_malformed_upgrades_get_json_refusals(env: Env, swap: tuple[str, str], status: int, code: str) -> None:
    ws = [h if h != swap[0] else swap[1] for h in ("Connection: Upgrade", "Upgrade: websocket",
                                                 "Sec-WebSocket-Version: 13",
                                                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")]
    answer = await exchange(env, request("GET", "/ws?stream=s1", *ws))
    assert answer.error() == (status, code)
    if status == 426:
        assert answer.headers["sec-websocket-version"] == "13"  # RFC 6455 4.4


async def test_a_browser_connection_list_upgrades(env: Env) -> None:
    """Firefox sends ``Connection: keep-alive, Upgrade``; RFC 6455 4.2.1 asks only that it include Upgrade."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(request("GET", f"/ws?stream={stream()}", "Connection: keep-alive, Upgrade",
                             "Upgrade: WebSocket", "Sec-WebSocket-Version: 13",
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455 1.3's example
        frame = await asyncio.wait_for(reader.read(4096), 10)
        assert frame[0] == 0x81 and b'"t":"welcome"' in frame
    finally:
        writer.close()


# -- 17.5: one error format, stream ids, bodies without Content-Length -------------------------

@pytest.mark.parametrize(("target", "status", "code"), [
    ("/no/such/thing", 404, "not_found"),
    ("/static/nope.txt", 404, "not_found"),
    ("/streams/a%2Fb/comments", 400, "bad_request"),
    ("/streams/./comments", 400, "bad_request"),
    ("/streams/../comments", 400, "bad_request"),
    ("/ws?stream=..", 400, "bad_request"),
    ("/ws?stream=.", 400, "bad_request"),
    ("/ws?stream=abc%0A", 400, "bad_request"),
    ("/ws?stream=s1&access_token=x.y.z", 401, "unauthorized"),
])
async def test_every_error_is_json_with_a_code(env: Env, target: str, status: int, code: str) -> None:
    ws = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    answer = await exchange(env, request("GET", target, *(ws if target.startswith("/ws") else ())))
    assert answer.error() == (status, code)


async def test_dot_streams_are_refused_for_posts_and_viewers(env: Env) -> None:
    for s in (".", ".."):
        answer = await exchange(env, request("POST", f"/streams/{s}/comments", bearer(env.token("dot")),
                                             body=b'{"text":"hi"}'))
        assert answer.error() == (400, "bad_request")
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(env.ws_url(s))
        assert info.value.response.status_code == 400
    ok = await exchange(env, request("GET", "/streams/.a/comments"))  # dots inside an id are fine
    assert ok.status == 200


async def test_post_without_content_length_has_an_empty_body(env: Env) -> None:
    moderator = mint_token(env.app.config.auth, "mod-1", "Mod", ["read", "moderate"], "moderator")
    answer = await exchange(env, request("POST", f"/mod/streams/{stream()}/unpin", bearer(moderator)))
    assert answer.status == 200 and answer.json()["action"] == "unpin"
    answer = await exchange(env, request("POST", f"/streams/{stream()}/comments", bearer(env.token("nobody"))))
    assert answer.error() == (400, "bad_message")


# -- 11.9 / 17.5: what a refused post says ------------------------------------------------------

async def test_expired_and_read_only_tokens_say_so(env: Env) -> None:
    cfg = env.app.config.auth
    assert cfg.leeway_s >= 3
    in_leeway = mint_token(cfg, "late", "Late", ["read", "write:comments"], ttl_s=-1)
    long_gone = mint_token(cfg, "gone", "Gone", ["read", "write:comments"], ttl_s=-(cfg.leeway_s + 60))
    read_only = env.token("reader", ("read",))
    path = f"/streams/{stream()}/comments"
    for token, status, code in ((in_leeway, 401, "token_expired"), (long_gone, 401, "token_expired"),
                                (read_only, 403, "missing_scope")):
        answer = await exchange(env, request("POST", path, bearer(token), body=b'{"text":"hi"}'))
        assert answer.error() == (status, code), token
    # Over a WebSocket: the same codes in the error event.
    for token, code in ((in_leeway, "token_expired"), (read_only, "missing_scope")):
        client = await WebsocketsClient.connect(env.ws_url(stream()), token)
        await client.wait_for(lambda e: e["t"] == "welcome")
        await client.send_json({"t": "comment", "text": "hi", "nonce": "n"})
        error = await client.wait_for(lambda e: e["t"] == "error")
        assert (error["code"], error["nonce"]) == (code, "n") and error["reason"]
        await client.close()
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(env.ws_url("s1"), additional_headers={"Authorization": f"Bearer {long_gone}"})
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"] == "token_expired"


# -- 17.6: dev sign-in ----------------------------------------------------------------------------

async def dev_user(env: Env, name: str) -> Answer:
    return await exchange(env, request("GET", f"/dev/token?name={quote(name, safe='')}"))


async def test_dev_sign_in_names_do_not_collide(env: Env) -> None:
    names = ["Alice", "alice", "ALICE", "!!!", "%ff", "al ice", "al.ice", "al.2e.ice", "Zoë", "Zoe\u0308", "🙂",
             "a_b", "a-b"]
    ids: dict[str, str] = {}
    for name in names:
        answer = await dev_user(env, name)
        assert answer.status == 200, (name, answer.body)
        body = answer.json()
        claims = verify_token(env.app.config.auth, body["token"])
        assert claims.user_id == body["user"]["id"] and claims.name == body["user"]["name"]
        ids[name] = body["user"]["id"]
    # Zoë composed and decomposed are one name (NFC), so one user; every other pair differs.
    assert ids["Zoë"] == ids["Zoe\u0308"]
    distinct = {n: i for n, i in ids.items() if n != "Zoe\u0308"}
    assert len(set(distinct.values())) == len(distinct), ids
    assert ids["Alice"] == "dev-Alice"


async def test_dev_sign_in_strips_invisible_characters_and_refuses_empty_names(env: Env) -> None:
    answer = await dev_user(env, "\u202eAl\u200bi\u0000ce\u2066 ")
    assert answer.status == 200 and answer.json()["user"]["name"] == "Alice"
    assert answer.json()["user"]["id"] == (await dev_user(env, "Alice")).json()["user"]["id"]
    for name in ("", "   ", "\u202e\u202c\u200f", "\u0000\u0007"):
        answer = await dev_user(env, name)
        assert answer.error() == (400, "bad_request"), name
    answer = await dev_user(env, "x" * 33)
    assert answer.error() == (400, "bad_request") and "32" in answer.json()["reason"]
    # Tag characters hide text; a newer emoji than Python's Unicode tables stays.
    answer = await dev_user(env, "Bob\U000e0041\U000e0042 \U0001fae8")
    assert answer.status == 200 and answer.json()["user"]["name"] == "Bob \U0001fae8"
    # Ids stay within what the moderator API takes in a path (128 characters).
    assert (await dev_user(env, "中" * 20)).json()["user"]["id"] == "dev-" + ".4e2d." * 20
    assert (await dev_user(env, "中" * 30)).error() == (400, "bad_request")
