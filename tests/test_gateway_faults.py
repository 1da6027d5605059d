"""Faults inside the gateway cost only the connection they came from.

A real app on the embedded default, real sockets, the real hub. The gateway's reader of the
hub's epoll fd is taken off the loop while the clients send, so every message (and a viewer
vanishing) lands in ONE ``poll()`` and ONE ``drain()``, then the reader goes back: the test
sees what one failing event does to the others of its drain and of its admission batch.
The failures are injected where hostile input meets an encoder or parser (the function is
wrapped to raise for one marked payload), since the validation that keeps such input out is
tested with the protocol.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient
from test_e2e import Env, make_config, started_app
from waiting import eventually

import chorus.gateway.events as events
import chorus.gateway.posts as posts
import chorus.ingest.admission as admission
from chorus import protocol
from chorus.ingest.records import encode_record


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request))
    yield Env(app)
    await app.stop()


async def posters(env: Env, stream: str, n: int) -> list[WebsocketsClient]:
    out = []
    for i in range(n):
        c = await WebsocketsClient.connect(env.ws_url(stream), env.token(f"user{i}-{uuid.uuid4().hex[:4]}"))
        await c.wait_for(lambda e: e["t"] == "welcome")
        out.append(c)
    return out


class OnePoll:
    """Holds the gateway's hub reader off the loop, so what clients send meanwhile is read by
    one poll() once it is back (loopback: a send that returned is in the server's socket)."""

    def __init__(self, env: Env, clients: list[WebsocketsClient]) -> None:
        assert env.app.gateway is not None
        self.gateway = env.app.gateway
        self.clients = clients

    async def __aenter__(self) -> None:
        asyncio.get_running_loop().remove_reader(self.gateway.hub.fileno())

    async def __aexit__(self, *exc: object) -> None:
        transports = [c.conn.transport for c in self.clients if not c.conn.transport.is_closing()]
        await eventually(lambda: all(t.get_write_buffer_size() == 0 for t in transports))
        asyncio.get_running_loop().add_reader(self.gateway.hub.fileno(), self.gateway.on_hub_ready)


def raising_for(real: Callable[..., Any], marker: Any, exc: BaseException,
                pick: Callable[..., Any] = lambda *a, **k: a[0]) -> Callable[..., Any]:
    """``real``, except that it raises ``exc`` when ``pick(args)`` contains ``marker``."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if marker in pick(*args, **kwargs):
            raise exc
        return real(*args, **kwargs)

    return wrapped


async def test_a_failing_event_costs_only_its_connection(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = env.app.gateway
    assert gw is not None
    stream = f"f-{uuid.uuid4().hex[:6]}"
    a, hostile, c = await posters(env, stream, 3)
    leaving = await env.viewer(stream)
    assert gw.viewers.counts()[stream] == 4
    monkeypatch.setattr(events, "parse_client_message",
                        raising_for(protocol.parse_client_message, b"boom", RecursionError("deep")))
    async with OnePoll(env, [a, hostile, c]):
        await a.send_json({"t": "comment", "text": "from a", "nonce": "a"})
        await hostile.send_json({"t": "comment", "text": "boom", "nonce": "h"})
        await c.send_json({"t": "comment", "text": "from c", "nonce": "c"})
        assert isinstance(leaving, WebsocketsClient)
        leaving.conn.transport.abort()
    ack_a = await a.wait_for(lambda e: e["t"] == "ack", timeout=10)
    ack_c = await c.wait_for(lambda e: e["t"] == "ack", timeout=10)
    assert (ack_a["nonce"], ack_c["nonce"]) == ("a", "c")
    err = await hostile.wait_for(lambda e: e["t"] == "error", timeout=10)
    assert err["code"] == "internal_error" and "nonce" not in err
    # The CLOSED event of the same drain was handled: the counts dropped by one.
    await eventually(lambda: gw.viewers.counts()[stream] == 3)
    assert gw.viewers.from_ip("127.0.0.1") == gw.hub.connections() == 3
    assert gw.failures.count == 1
    # The hostile connection stays open and works.
    await hostile.send_json({"t": "comment", "text": "fine now", "nonce": "h2"})
    assert (await hostile.wait_for(lambda e: e["t"] == "ack", timeout=10))["nonce"] == "h2"
    for client in (a, hostile, c):
        await client.close()
    await eventually(lambda: stream not in gw.viewers.counts() and gw.viewers.addresses() == 0)


async def test_one_post_that_cannot_be_encoded_does_not_take_down_its_batch(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    gw, store = env.app.gateway, env.app.store
    assert gw is not None and store is not None
    stream = f"b-{uuid.uuid4().hex[:6]}"
    clients = await posters(env, stream, 6)
    # Post 1's ack, post 2's log record and post 3's admission raise; 0, 4 and 5 are fine.
    monkeypatch.setattr(posts, "encode_ack", raising_for(protocol.encode_ack, "bad-ack", UnicodeEncodeError(
        "utf-8", "\ud800", 0, 1, "surrogates not allowed"), pick=lambda cid, nonce, wire: nonce or ""))
    bad_record = raising_for(encode_record, "bad record", UnicodeEncodeError(
        "utf-8", "\ud800", 0, 1, "surrogates not allowed"), pick=lambda c: c.text)
    monkeypatch.setattr(posts, "encode_record", bad_record)
    monkeypatch.setattr(admission, "encode_record", bad_record)
    monkeypatch.setattr(admission, "validate_comment_text",
                        raising_for(protocol.validate_comment_text, "bad admission", RecursionError("deep")))
    texts = ["ok 0", "ok 1", "bad record", "bad admission", "ok 4", "ok 5"]
    nonces = ["n0", "bad-ack", "n2", "n3", "n4", "n5"]
    admitted_before = gw.admission.accepted
    async with OnePoll(env, clients):
        for client, text, nonce in zip(clients, texts, nonces, strict=True):
            await client.send_json({"t": "comment", "text": text, "nonce": nonce})
    answers = [await cl.wait_for(lambda e: e["t"] in ("ack", "error"), timeout=10) for cl in clients]
    assert [a["t"] for a in answers] == ["ack", "error", "error", "error", "ack", "ack"]
    assert [a.get("nonce") for a in answers] == nonces
    assert {a["code"] for a in answers[1:4]} == {"internal_error"}
    assert "it was posted" in answers[1]["reason"] and answers[1]["id"]  # its ack failed, not the post
    assert "not posted" in answers[2]["reason"] and "not posted" in answers[3]["reason"]
    assert gw.admission.accepted - admitted_before == 4
    await eventually(lambda: store.count(stream) == 4)
    assert {c["text"] for c in store.page(stream, None, 10)} == {"ok 0", "ok 1", "ok 4", "ok 5"}
    assert gw.posts_in_flight() == 0
    for client in clients:
        await client.close()

