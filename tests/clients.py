"""Clients we did not write, wrapped for tests: the `websockets` library and picows.

Each collects the server's events in a queue so a test can wait for one that matches. Every
timeout here is scaled by CHORUS_TEST_TIMEOUT_SCALE (tests/waiting.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import msgpack
import picows
import websockets
from waiting import scaled
from websockets.asyncio.client import ClientConnection

Event = dict[str, Any]


def reply_to(nonce: str, kinds: tuple[str, ...] = ("ack", "error")) -> Callable[[Event], bool]:
    """Matches the server's answer (by default an ack or an error) to the post with ``nonce``."""
    return lambda e: e["t"] in kinds and e.get("nonce") == nonce


class ViewerClient:
    """What every test client offers."""

    events: asyncio.Queue[Event]
    seen: list[Event]
    close_code: int | None

    async def send_json(self, obj: Any) -> None:
        raise NotImplementedError

    async def next_event(self, timeout: float = 5.0) -> Event:
        event = await asyncio.wait_for(self.events.get(), scaled(timeout))
        self.seen.append(event)
        return event

    async def wait_for(self, match: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        deadline = time.monotonic() + scaled(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching event in {scaled(timeout):g}s; saw {self.seen[-5:]}")
            event = await asyncio.wait_for(self.events.get(), left)
            self.seen.append(event)
            if match(event):
                return event

    def comment_texts(self) -> list[str]:
        texts = []
        for e in self.seen:
            if e.get("t") == "batch":
                texts += [c["text"] for c in e["comments"]]
        return texts

    async def close(self) -> None:
        raise NotImplementedError


class WebsocketsClient(ViewerClient):
    def __init__(self, conn: ClientConnection, wire: str) -> None:
        self.conn = conn
        self.wire = wire
        self.events = asyncio.Queue()
        self.seen = []
        self.close_code = None
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, token: str | None = None, wire: str = "json",
                      origin: str | None = None, compression: str | None = None) -> WebsocketsClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn = await websockets.connect(
            url, subprotocols=[f"chorus.{wire}.v1"], additional_headers=headers,  # type: ignore[list-item]
            origin=origin, compression=compression, max_size=2**24, open_timeout=scaled(5),  # type: ignore[arg-type]
        )
        return cls(conn, wire)

    async def _read(self) -> None:
        try:
            async for msg in self.conn:
                if isinstance(msg, str):
                    self.events.put_nowait(json.loads(msg))
                else:
                    self.events.put_nowait(msgpack.unpackb(msg))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.conn.close_code

    async def send_json(self, obj: Any) -> None:
        if self.wire == "json":
            await self.conn.send(json.dumps(obj))
        else:
            await self.conn.send(msgpack.packb(obj))

    async def send_raw(self, data: bytes | str) -> None:
        await self.conn.send(data)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._reader), scaled(timeout))
        return self.close_code

    async def close(self) -> None:
        await self.conn.close()
        await self._reader


class _PicowsListener(picows.WSListener):
    def __init__(self, client: PicowsClient) -> None:
        super().__init__()
        self.client = client
        self.partial: list[bytes] = []

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            self.client.close_code = frame.get_close_code().value
            transport.disconnect()
            return
        if frame.msg_type in (picows.WSMsgType.TEXT, picows.WSMsgType.CONTINUATION):
            self.partial.append(frame.get_payload_as_bytes())
            if frame.fin:
                self.client.events.put_nowait(json.loads(b"".join(self.partial)))
                self.partial = []


class PicowsClient(ViewerClient):
    def __init__(self) -> None:
        self.events = asyncio.Queue()
        self.seen = []
        self.close_code = None
        self.transport: picows.WSTransport | None = None

    @classmethod
    async def connect(cls, url: str, token: str | None = None) -> PicowsClient:
        client = cls()
        headers = {"Sec-WebSocket-Protocol": "chorus.json.v1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        client.transport, _ = await picows.ws_connect(lambda: _PicowsListener(client), url,
                                                      extra_headers=headers, max_frame_size=2**24)
        return client

    async def send_json(self, obj: Any) -> None:
        assert self.transport is not None
        self.transport.send(picows.WSMsgType.TEXT, json.dumps(obj).encode())

    async def close(self) -> None:
        assert self.transport is not None
        self.transport.send_close(picows.WSCloseCode.OK)
        self.transport.disconnect()
        await self.transport.wait_disconnected()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A blocking GET (run it with asyncio.to_thread); returns status and body."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=scaled(10)) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def aget_json(url: str) -> tuple[int, Any]:
    status, body = await asyncio.to_thread(http_get, url)
    return status, json.loads(body) if body.startswith((b"{", b"[")) else body
