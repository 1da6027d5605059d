"""The gateway: HTTP upgrade, auth and Origin checks on picows, viewers into the hub.

One ``Gateway`` per process. picows parses each request and calls :meth:`Gateway.route`,
which either answers plain HTTP (page, history, health) or accepts a WebSocket with a
:class:`ViewerConnection` after checking the stream id, the token and the Origin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from chorus.auth import AuthError, Identity, mint_token, verify_token
from chorus.broker import StreamState
from chorus.codes import CloseCode
from chorus.config import Config
from chorus.gateway.hub import Hub
from chorus.gateway.http import (
    STREAM_ID,
    Request,
    json_response,
    parse_request,
    static_response,
    text_response,
)
from chorus.gateway.node import Node
from chorus.ingest.admission import Admission, Refused
from chorus.ingest.store import HistoryStore
from chorus.native import OP_BINARY, OP_TEXT, encode_close, encode_frame
from chorus.protocol import (
    JSON,
    SUBPROTOCOLS,
    BadMessage,
    PostComment,
    Resume,
    Wire,
    choose_subprotocol,
    encode_event,
    error_event,
    parse_client_message,
)

__all__ = ["Gateway", "ViewerConnection"]

log = logging.getLogger("chorus.gateway")


def _origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Non-browser clients send no Origin; browsers must come from our host or the allowlist."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


class ViewerConnection(WSListener):  # type: ignore[misc]
    """One viewer's socket: reads client messages, writes what the hub sends it."""

    def __init__(self, gateway: Gateway, stream: str, who: Identity | None, wire: Wire) -> None:
        super().__init__()
        self.gateway = gateway
        self.stream = stream
        self.who = who
        self.wire = wire
        self.transport: WSTransport | None = None
        self.peer_ip = ""
        self.skipped = 0
        self.slow_since = 0.0
        self.joined = False
        self.closed = False
        self._fragments: list[bytes] | None = None
        self._fragment_type = WSMsgType.TEXT

    # -- the hub's side (hub.Viewer) --
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.underlying_transport.write(data)

    def backlog(self) -> int:
        if self.transport is None:
            return 0
        return int(self.transport.underlying_transport.get_write_buffer_size())

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and drop the connection."""
        if self.closed or self.transport is None:
            return
        self.write(encode_close(code, reason))
        self.closed = True
        self.transport.disconnect(graceful=True)

    def send_event(self, event: dict[str, Any]) -> None:
        payload = encode_event(event, self.wire)
        self.write(encode_frame(OP_TEXT if self.wire == JSON else OP_BINARY, payload))

    # -- picows callbacks --
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        if not self.gateway.admit_ip(self.peer_ip):
            self.close(CloseCode.TRY_AGAIN_LATER, "too many connections from your address")
            return
        self.gateway.spawn(self.gateway.welcome(self))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.gateway.forget(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if kind in (WSMsgType.PING, WSMsgType.PONG):
            return  # picows answers pings itself
        message = self._reassemble(frame)
        if message is not None:
            self._on_message(*message)

    def _reassemble(self, frame: WSFrame) -> tuple[WSMsgType, bytes] | None:
        """Whole messages from frames (RFC 6455 5.4); picows hands over single frames."""
        kind = frame.msg_type
        if kind == WSMsgType.CONTINUATION:
            if self._fragments is None:
                self.close(CloseCode.PROTOCOL_ERROR, "continuation without a message")
                return None
            self._fragments.append(frame.get_payload_as_bytes())
            if sum(len(f) for f in self._fragments) > self.gateway.config.gateway.max_message_bytes:
                self.close(CloseCode.TOO_BIG, "message too big")
                return None
            if not frame.fin:
                return None
            data, self._fragments = b"".join(self._fragments), None
            return self._fragment_type, data
        if self._fragments is not None:
            self.close(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            return None
        if not frame.fin:
            self._fragments, self._fragment_type = [frame.get_payload_as_bytes()], kind
            return None
        return kind, frame.get_payload_as_bytes()

    def _on_message(self, kind: WSMsgType, data: bytes) -> None:
        if kind == WSMsgType.TEXT:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_TEXT, "text frame is not valid UTF-8")
                return
        wire: Wire = JSON if kind == WSMsgType.TEXT else "msgpack"
        msg = parse_client_message(data, wire)
        if isinstance(msg, BadMessage):
            self.send_event(error_event(msg.code, msg.reason, msg.nonce))
        elif isinstance(msg, PostComment):
            self.gateway.spawn(self.gateway.post(self, msg))
        elif isinstance(msg, Resume):
            self.gateway.spawn(self.gateway.resume(self, msg))


class Gateway:
    def __init__(self, config: Config, admission: Admission, node: Node, state: StreamState,
                 store: HistoryStore | None) -> None:
        self.config = config
        self.admission = admission
        self.node = node
        self.hub = node.hub
        self.state = state
        self.store = store
        self.server: asyncio.Server | None = None
        self.viewers: set[ViewerConnection] = set()
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()

    # -- lifecycle --
    async def start(self) -> None:
        g = self.config.gateway
        await self.node.start()
        self.server = await ws_create_server(
            self.route,
            g.host,
            g.port,
            websocket_handshake_timeout=g.handshake_timeout_s,
            enable_auto_ping=True,
            auto_ping_idle_timeout=g.heartbeat_interval_s,
            auto_ping_reply_timeout=g.heartbeat_timeout_s,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            max_frame_size=g.max_message_bytes,
            read_buffer_init_size=2048,
            use_aiofastnet=False,
            reuse_port=True,
        )
        log.info("gateway listening on %s", ", ".join(str(s.getsockname()) for s in self.server.sockets))

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, code: int = CloseCode.GOING_AWAY) -> None:
        if self.server is not None:
            self.server.close()
        for viewer in list(self.viewers):
            viewer.close(code, "gateway stopping")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        await self.node.stop()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    # -- routing (called by picows for every request) --
    def route(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        answer = self._route(request)
        if isinstance(answer, WSUpgradeResponse):
            return WSUpgradeResponseWithListener(answer, None)
        return answer

    def _route(self, request: WSUpgradeRequest) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        req = parse_request(request.path)
        if request.method != b"GET":
            return text_response(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served here")
        if req.path == "/ws":
            return self._upgrade(request, req)
        if req.path == "/" or req.path == "/index.html":
            return static_response("index.html")
        if req.path.startswith("/static/"):
            return static_response(req.path.removeprefix("/static/"))
        if req.path.startswith("/streams/") and req.path.endswith("/comments"):
            return self._history(req.path[len("/streams/") : -len("/comments")], req)
        if req.path == "/healthz":
            return text_response(HTTPStatus.OK, "ok")
        if req.path == "/readyz":
            ready = self.server is not None
            return text_response(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, "ready" if ready else "starting")
        if req.path == "/dev/token":
            return self._dev_token(req)
        return text_response(HTTPStatus.NOT_FOUND, "not found")

    def _authenticate(self, request: WSUpgradeRequest, req: Request) -> Identity | None | WSUpgradeResponse:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else req.arg("access_token")
        if not token:
            if self.config.auth.anonymous_read:
                return None
            return text_response(HTTPStatus.UNAUTHORIZED, "a token is required")
        try:
            return verify_token(self.config.auth, token)
        except AuthError as exc:
            return text_response(HTTPStatus.UNAUTHORIZED, f"invalid token: {exc}")

    def _upgrade(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        stream = req.arg("stream") or ""
        if not STREAM_ID.match(stream):
            return text_response(HTTPStatus.BAD_REQUEST, "stream must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        if not _origin_allowed(request.headers.get("Origin"), request.headers.get("Host"),
                               self.config.gateway.allowed_origins):
            return text_response(HTTPStatus.FORBIDDEN, "origin not allowed")
        who = self._authenticate(request, req)
        if isinstance(who, WSUpgradeResponse):
            return who
        offered = request.headers.get("Sec-WebSocket-Protocol")
        chosen = choose_subprotocol(offered)
        wire = SUBPROTOCOLS[chosen] if chosen else JSON
        listener = ViewerConnection(self, stream, who, wire)
        headers = {"Sec-WebSocket-Protocol": chosen} if chosen else None
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), listener)

    def _history(self, stream: str, req: Request) -> WSUpgradeResponse:
        if not STREAM_ID.match(stream):
            return json_response({"error": "bad stream id"}, HTTPStatus.BAD_REQUEST)
        if self.store is None:
            return json_response({"error": "no history store on this gateway"}, HTTPStatus.NOT_FOUND)
        try:
            before = int(req.arg("before")) if req.arg("before") else None
            limit = int(req.arg("limit") or 50)
        except ValueError:
            return json_response({"error": "before and limit must be integers"}, HTTPStatus.BAD_REQUEST)
        if not 1 <= limit <= self.config.history.page_max:
            return json_response({"error": f"limit must be 1-{self.config.history.page_max}"}, HTTPStatus.BAD_REQUEST)
        comments = self.store.page(stream, before, limit)
        next_before = comments[-1]["id"] if len(comments) == limit else None
        return json_response({"stream": stream, "comments": comments, "next_before": next_before})

    def _dev_token(self, req: Request) -> WSUpgradeResponse:
        if not (self.config.auth.dev_login and self.config.embedded):
            return text_response(HTTPStatus.NOT_FOUND, "dev login is off")
        name = (req.arg("name") or "").strip()[:32]
        if not name:
            return json_response({"error": "name is required"}, HTTPStatus.BAD_REQUEST)
        user_id = "dev-" + "".join(ch for ch in name.lower() if ch.isalnum())[:24]
        token = mint_token(self.config.auth, user_id, name, ["read", "write"])
        return json_response({"token": token, "user": {"id": user_id, "name": name}})

    # -- viewer lifecycle --
    def admit_ip(self, ip: str) -> bool:
        n = self._per_ip.get(ip, 0)
        if n >= self.config.gateway.max_connections_per_ip:
            return False
        self._per_ip[ip] = n + 1
        return True

    def forget(self, viewer: ViewerConnection) -> None:
        if viewer in self.viewers:
            self.viewers.discard(viewer)
        if viewer.joined:
            viewer.joined = False
            self.hub.leave(viewer, viewer.stream)
            self.node.release(viewer.stream)
        if viewer.peer_ip in self._per_ip:
            left = self._per_ip[viewer.peer_ip] - 1
            if left > 0:
                self._per_ip[viewer.peer_ip] = left
            else:
                del self._per_ip[viewer.peer_ip]

    async def welcome(self, viewer: ViewerConnection) -> None:
        """Subscribe, send the welcome, then join the hub (replaying any batch in between)."""
        stream = viewer.stream
        try:
            await self.node.acquire(stream)
        except Exception as exc:
            log.warning("subscribe to %s failed: %s", stream, exc)
            viewer.close(CloseCode.TRY_AGAIN_LATER, "stream unavailable, try again")
            return
        if viewer.closed:
            self.node.release(stream)
            return
        viewer.joined = True
        self.viewers.add(viewer)
        epoch, offset = await self.state.position(stream)
        recent = await self.state.recent(stream, self.config.gateway.recent_on_welcome)
        if viewer.closed:
            return
        viewer.send_event({
            "t": "welcome", "stream": stream, "epoch": epoch, "offset": offset, "recent": recent,
            "pin": None, "reactions": {}, "viewers": {"now": self.hub.viewer_count(stream) + 1},
            "mode": {"slow_mode_seconds": 0},
            "user": {"id": viewer.who.user_id, "name": viewer.who.name} if viewer.who else None,
        })
        self.hub.join(viewer, stream, after_offset=offset)

    async def post(self, viewer: ViewerConnection, msg: PostComment) -> None:
        try:
            comment = await self.admission.post(viewer.who, viewer.stream, msg.text)
        except Refused as exc:
            viewer.send_event(error_event(exc.code, exc.reason, msg.nonce, exc.retry_after_ms))
            return
        ack: dict[str, Any] = {"t": "ack", "id": comment.id}
        if msg.nonce is not None:
            ack["nonce"] = msg.nonce
        viewer.send_event(ack)

    async def resume(self, viewer: ViewerConnection, msg: Resume) -> None:
        """Replay what the viewer missed from the recent cache, if it still covers the gap."""
        epoch, offset = await self.state.position(viewer.stream)
        if msg.epoch != epoch or msg.offset > offset:
            viewer.send_event({"t": "resumed", "recovered": False})
            return
        missed = offset - msg.offset
        recent = await self.state.recent(viewer.stream, missed) if missed else []
        if missed and (len(recent) < missed or recent[0].get("offset") != msg.offset + 1):
            viewer.send_event({"t": "resumed", "recovered": False})
            return
        if recent:
            viewer.send_event({"t": "batch", "stream": viewer.stream, "epoch": epoch, "offset": offset,
                               "comments": recent})
        viewer.send_event({"t": "resumed", "recovered": True})

