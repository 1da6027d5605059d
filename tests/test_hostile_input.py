"""Hostile client input at the protocol layer (issue 11 items 1, 2, 3, 9; issue 17 item 6).

End to end through the real gateway and hub (the embedded app, as tests/test_bad_input.py):
each hostile frame gets an ``error`` event and the connection keeps working; then the
token checks of chorus/auth.py on tokens signed with the test key but carrying claims of
the wrong type, which must be an AuthError and never a TypeError further on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import msgpack
import pytest
import websockets
from clients import WebsocketsClient
from test_admission import http_exchange, request
from test_e2e import TEST_KEY, Env, make_config, started_app

from chorus.auth import AuthError, Identity, mint_token, verify_token
from chorus.config import AuthConfig, load_config
from chorus.gateway.httpreq import HttpError, RequestParser
from chorus.ingest.records import RecordError, decode_any


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request))
    yield Env(app)
    await app.stop()


def stream() -> str:
    return f"hostile-{uuid.uuid4().hex[:6]}"


async def connected(env: Env, where: str, token: str | None = None, wire: str = "json") -> WebsocketsClient:
    client = await WebsocketsClient.connect(env.ws_url(where), token, wire=wire)
    await client.wait_for(lambda e: e["t"] == "welcome")
    return client


async def still_posts(client: WebsocketsClient, nonce: str = "still") -> None:
    """The connection survived: a normal comment is still acked on it."""
    await client.send_json({"t": "comment", "text": "still here", "nonce": nonce})
    ack = await client.wait_for(lambda e: e["t"] in ("ack", "error") and e.get("nonce") == nonce, timeout=10)
    assert ack["t"] == "ack", ack


def deep_msgpack(depth: int) -> bytes:
    return msgpack.packb({"t": "comment", "text": "x", "deep": json.loads("[" * depth + "]" * depth)})


# --- item 1: nesting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "frame"),
    [
        ("json", "[" * 5000),  # RecursionError in json.loads before the fix
        ("json", '{"t":"comment","text":"x","deep":' + "[" * 5000 + "]" * 5000 + "}"),
        ("msgpack", b"\x91" * 5000),  # msgpack's StackError
        ("msgpack", deep_msgpack(40)),
    ],
    ids=["json-5000-brackets", "json-deep-value", "msgpack-5000-arrays", "msgpack-40-deep"],
)
async def test_deep_nesting_gets_an_error_and_the_connection_stays_open(env: Env, wire: str,
                                                                        frame: str | bytes) -> None:
    client = await connected(env, stream(), env.token("nina"), wire)
    await client.send_raw(frame)
    error = await client.wait_for(lambda e: e["t"] == "error", timeout=10)
    assert (error["code"], error["reason"]) == ("bad_message", "message nests deeper than 32 levels")
    await still_posts(client)
    await client.close()


# --- item 2 and 17.6: text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"t":"comment","text":"a\\ud800","nonce":"s1"}',
         "comment holds a lone surrogate (U+D800 at character 2): not valid Unicode text"),
        ('{"t":"comment","text":"ding\\u0007","nonce":"s1"}',
         "comment holds a control character (U+0007 at character 5)"),
        ('{"t":"comment","text":"\\u001b[2J","nonce":"s1"}',
         "comment holds a control character (U+001B at character 1)"),
    ],
)
async def test_bad_text_is_refused_with_bad_text(env: Env, raw: str, reason: str) -> None:
    client = await connected(env, stream(), env.token("sam"))
    await client.send_raw(raw)
    error = await client.wait_for(lambda e: e["t"] == "error", timeout=10)
    assert error == {"t": "error", "code": "bad_text", "reason": reason, "nonce": "s1"}
    await still_posts(client)
    await client.close()


async def test_a_surrogate_nonce_is_refused_without_echoing_it(env: Env) -> None:
    client = await connected(env, stream(), env.token("sam"))
    await client.send_raw('{"t":"comment","text":"hi","nonce":"\\udc00"}')
    error = await client.wait_for(lambda e: e["t"] == "error", timeout=10)
    assert error == {"t": "error", "code": "bad_text", "reason": "nonce holds a lone surrogate (U+DC00 at character 1)"}
    await still_posts(client)
    await client.close()


async def test_bidi_controls_and_line_breaks_do_not_reach_viewers(env: Env) -> None:
    where = stream()
    watcher = await connected(env, where)
    token = mint_token(env.app.config.auth, "mallory", "\u202eMallory\u202c\x07 \nAdmin", ["read", "write"])
    poster = await connected(env, where, token)
    text = "\u2067look\u2069 here\r\n\r\nnow 👨\u200d👩\u200d👧\n"
    await poster.send_json({"t": "comment", "text": text, "nonce": "b"})
    ack = await poster.wait_for(lambda e: e["t"] in ("ack", "error"), timeout=10)
    assert ack["t"] == "ack", ack
    batch = await watcher.wait_for(lambda e: e["t"] == "batch", timeout=10)
    (comment,) = batch["comments"]
    assert comment["text"] == "look here now 👨\u200d👩\u200d👧"  # the family emoji keeps its joiners
    assert comment["user"]["name"] == "Mallory Admin"
    for client in (watcher, poster):
        await client.close()


async def test_http_post_of_bad_text_is_a_400(env: Env) -> None:
    body = b'{"text":"hi \\ud800 there"}'
    status, _, answer = await http_exchange(env, request(f"/streams/{stream()}/comments", body, env.token("hal")))
    assert (status, answer["error"]) == (400, "bad_text")
    assert answer["reason"] == "comment holds a lone surrogate (U+D800 at character 4): not valid Unicode text"


# --- item 3: resume positions ------------------------------------------------------------------


@pytest.mark.parametrize("offset", [2**63, -(2**63) - 1, 10**30])
async def test_resume_out_of_the_64_bit_range_is_answered(env: Env, offset: int) -> None:
    client = await connected(env, stream())
    await client.send_raw(json.dumps({"t": "resume", "epoch": "e1", "offset": offset}))
    error = await client.wait_for(lambda e: e["t"] in ("error", "resumed"), timeout=10)
    assert error == {"t": "error", "code": "bad_message",
                     "reason": "resume offset must be a signed 64-bit integer (-2^63 to 2^63-1)"}
    await client.send_json({"t": "resume", "epoch": "", "offset": 2**63 - 1})  # the edge is fine
    assert (await client.wait_for(lambda e: e["t"] in ("error", "resumed"), timeout=10))["t"] == "resumed"
    await client.close()


async def test_resume_with_a_huge_epoch_is_refused(env: Env) -> None:
    client = await connected(env, stream())
    await client.send_json({"t": "resume", "epoch": "e" * 10_000, "offset": 1})
    error = await client.wait_for(lambda e: e["t"] in ("error", "resumed"), timeout=10)
    assert (error["code"], error["reason"]) == ("bad_message", "resume epoch must be text of at most 300 characters")
    await client.close()


# --- item 9: tokens with claims of the wrong type ----------------------------------------------

AUTH = load_config(env={}, auth__key=TEST_KEY).auth


def signed(claims: dict[str, Any] | bytes, cfg: AuthConfig = AUTH) -> str:
    """A token over exactly these claims (raw bytes: any JSON at all), signed with the test key."""
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return jwt.api_jws.PyJWS().encode(payload, cfg.key, algorithm=cfg.algorithm, headers={"typ": "JWT"})


def claims(**extra: Any) -> dict[str, Any]:
    base = {"iss": AUTH.issuer, "aud": AUTH.audience, "sub": "u1", "exp": int(time.time()) + 600}
    return {k: v for k, v in {**base, **extra}.items() if v is not ...}


def test_a_well_formed_token_still_verifies() -> None:
    who = verify_token(AUTH, signed(claims(name="Uma", scope="read write", role="moderator", verified=True,
                                           streams=["s1"], iat=int(time.time()), nbf=int(time.time()) - 5)))
    assert who == Identity("u1", "Uma", frozenset({"read", "write"}), "moderator", who.expires_at,
                           frozenset({"s1"}), True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"exp": str(int(time.time()) + 600)}, "the exp claim must be a number of seconds since the Unix epoch"),
        ({"iat": str(int(time.time()))}, "the iat claim must be a number of seconds since the Unix epoch"),
        ({"nbf": "0"}, "the nbf claim must be a number of seconds since the Unix epoch"),
        ({"iat": True}, "the iat claim must be a number of seconds since the Unix epoch"),
        ({"nbf": False}, "the nbf claim must be a number of seconds since the Unix epoch"),
        ({"exp": 10**400}, "the exp claim must be a number of seconds since the Unix epoch"),
        ({"exp": 1e300}, "the exp claim must be a number of seconds since the Unix epoch"),
        ({"sub": ""}, "the sub claim must be 1-128 characters"),
        ({"sub": "x" * 129}, "the sub claim must be 1-128 characters"),
        ({"sub": "u\u202e1"}, "the sub claim must be 1-128 characters"),
        ({"sub": "u\x001"}, "the sub claim must be 1-128 characters"),
        ({"sub": "\ud800"}, "the sub claim must be 1-128 characters"),
        ({"name": 5}, "the name claim must be a string"),
        ({"name": ["a"]}, "the name claim must be a string"),
        ({"scope": ["write"]}, "the scope claim must be a string"),
        ({"scope": None}, "the scope claim must be a string"),
        ({"role": 1}, "the role claim must be a string"),
        ({"role": {"admin": True}}, "the role claim must be a string"),
        ({"verified": "true"}, "the verified claim must be true or false"),
        ({"streams": "s1"}, "the streams claim must be a list of stream ids"),
        ({"streams": [1]}, "the streams claim must be a list of stream ids"),
    ],
)
def test_claims_of_the_wrong_type_are_an_auth_error(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthError) as info:
        verify_token(AUTH, signed(claims(**extra)))
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"iss":"chorus","aud":"chorus","sub":"u1","exp":Infinity}',
        b'{"iss":"chorus","aud":"chorus","sub":"u1","exp":NaN}',
        b'{"iss":"chorus","aud":"chorus","sub":"u1","exp":' + b"9" * 5000 + b"}",
        b'["not", "an", "object"]',
        b'{"iss":"chorus","aud":"chorus","sub":"u1","exp":' + b"[" * 5000 + b"}",
    ],
)
def test_hostile_payloads_are_an_auth_error(payload: bytes) -> None:
    with pytest.raises(AuthError):
        verify_token(AUTH, signed(payload))


def test_a_token_that_is_not_text_is_an_auth_error() -> None:
    with pytest.raises(AuthError, match="not text"):
        verify_token(AUTH, "\ud800.\ud800.\ud800")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("\u202eAlice", "Alice"),
        ("Bob\x00\x07\ud800", "Bob"),
        ("Carol\nDanvers\n", "Carol Danvers"),
        ("\u2066\u2069", "u1"),  # nothing left: the user id
        ("é" * 100, "é" * 64),
        ("👩\u200d💻 Dev", "👩\u200d💻 Dev"),
    ],
)
def test_display_names_are_cleaned(name: str, shown: str) -> None:
    assert verify_token(AUTH, signed(claims(name=name))).name == shown


async def test_a_numeric_string_exp_is_refused_at_the_upgrade(env: Env) -> None:
    bad = signed(claims(exp=str(int(time.time()) + 600)), env.app.config.auth)
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(env.ws_url(stream()), additional_headers={"Authorization": f"Bearer {bad}"})
    assert info.value.response.status_code == 401
    assert b"exp claim" in info.value.response.body


# --- records in the comments log ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 5000,  # RecursionError before
        b'{"k":"comment","id":"1","stream":"s","user":{"id":"u","name":"n"},"text":"t","ts":1e999}',  # OverflowError
        b'{"k":"control","op":"delete","id":"1","stream":"s","ts":-Infinity}',
    ],
)
def test_hostile_log_records_are_skipped_as_record_errors(value: bytes) -> None:
    """Anyone who can write to the topic could append these; the coordinator and the moderator
    skip a RecordError, while any other exception would stop them at the record every time."""
    with pytest.raises(RecordError, match="malformed record"):
        decode_any(value)


# --- Content-Length beyond int()'s 4,300 digits (found by tests/test_fuzz.py) --------------------


@pytest.mark.parametrize(
    ("length", "body", "status"),
    [("9" * 5000, b"", 413), ("0" * 5000 + "1", b"x", None), ("0" * 5000, b"", None), ("1" + "0" * 25, b"", 413)],
)
def test_content_length_of_thousands_of_digits(length: str, body: bytes, status: int | None) -> None:
    raw = f"POST /streams/s1/comments HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode() + body
    parser = RequestParser()
    if status is None:
        request = parser.feed(raw)
        assert request is not None and request.body == body
        return
    with pytest.raises(HttpError) as info:
        parser.feed(raw)
    assert info.value.status == status
