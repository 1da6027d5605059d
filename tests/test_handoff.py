"""The socket hand-off from picows to the hub keeps bytes a client sent behind its handshake."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_e2e import Env, make_config, started_app

from chorus.native import FrameParser


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request))
    yield Env(app)
    await app.stop()


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def test_frames_pipelined_behind_the_handshake_reach_the_hub(env: Env) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /ws?stream=pipe&access_token={env.token('pia')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    comment = masked_text(json.dumps({"t": "comment", "text": "pipelined", "nonce": "p1"}).encode())
    writer.write(handshake + comment)  # one write: the comment rides behind the handshake
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    parser = FrameParser(max_message_size=1 << 20, require_mask=False)
    events: list[dict[str, object]] = []
    while not any(e.get("t") == "ack" for e in events):
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, f"connection closed; got {events}"
        events += [json.loads(p) for _op, p in parser.feed(data)]
    assert events[0]["t"] == "welcome"
    assert any(e.get("t") == "ack" and e.get("nonce") == "p1" for e in events)
    writer.close()
