"""The gateway: HTTP and the WebSocket upgrade on picows + uvloop, then viewers in the hub.

One ``Gateway`` per process. picows parses each request and calls the gateway's routes
(gateway/routes.py), which answer plain HTTP (page, history, health) or come back to
:meth:`Gateway.upgrade` to accept a WebSocket after checking the stream id, the Origin and
the token. Right after the 101 the socket goes to the hub
(``chorus.native.Hub``, see native/HUB.md) with its identity as a small tag: from then on the
gateway holds no Python object per viewer. The gateway reacts to the hub's inbound events
in batches and feeds it each stream's events from the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import msgpack
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from chorus import native
from chorus.auth import Identity
from chorus.broker import StreamMode, StreamState
from chorus.codes import CloseCode, ErrorCode
from chorus.config import Config
from chorus.counters import Counters
from chorus.extensions import DeflateParams, negotiate_deflate
from chorus.gateway.engagement import Engagement, open_counters
from chorus.gateway.handoff import RecordingProtocol, detach_socket, picows_protocol_factory
from chorus.gateway.http import STREAM_ID, Request, text_response
from chorus.gateway.modapi import GatewayModeration
from chorus.gateway.node import Node
from chorus.gateway.recovery import Recovery
from chorus.gateway.routes import HttpRoutes, authenticate, origin_allowed
from chorus.ingest.admission import Admission, Admitted, Refused
from chorus.ingest.records import Comment, encode_record
from chorus.ingest.store import HistoryStore
from chorus.metrics import DeliveryClock
from chorus.ops import DRAIN_REASON, drain_gateway
from chorus.positions import NO_EPOCH
from chorus.protocol import (
    JSON,
    MSGPACK,
    SUBPROTOCOLS,
    BadMessage,
    ChannelMessage,
    PostComment,
    React,
    Resume,
    Wire,
    choose_subprotocol,
    encode_ack,
    encode_event,
    error_event,
    fast_react,
    parse_client_message,
)

__all__ = ["Gateway", "Upgrader"]

log = logging.getLogger("chorus.gateway")

ECHO_HANDLE = 0  # the conformance echo endpoint's pseudo-stream
REPLAY_BATCHES = 32  # recent batches per stream, for viewers joining between welcome and hub
OVERLOADED_RETRY_MS = 1000  # retry_after_ms of ``overloaded``
# Control events a viewer joining meanwhile must not miss (not the periodic counts: the next
# one comes anyway). Every event is compact JSON starting with its type.
REPLAYED_CONTROLS = (b'{"t":"delete"', b'{"t":"restore"', b'{"t":"pin"', b'{"t":"unpin"', b'{"t":"mode"')
MAX_ADMIT_BATCH = 2000  # posts admitted together at most (one Redis pipeline)
RESUME_PACING_S = 5.0  # a resume waits for its viewer's backlog at most this long in all
FAILURE_LOG_INTERVAL_S = 10.0  # one log line per kind of failure this often, with the count in between
INTERNAL_REASON = "the server failed on this message; nothing of it was done"
UNTAG_MEMO_MAX = 50_000  # decoded viewer tags kept (Identity is immutable, so sharing is safe)


def _tag(ip: str, variant: int, who: Identity | None) -> bytes:
    """What the hub keeps for a viewer and returns with its messages."""
    if who is None:
        return msgpack.packb([ip, variant])
    return msgpack.packb([ip, variant, who.user_id, who.name, sorted(who.scopes), who.role, who.expires_at,
                          who.verified])


def _untag(tag: bytes) -> tuple[str, int, Identity | None]:
    """A viewer's tag back as (address, variant, identity); a connection's tag never changes,
    so each is decoded once and remembered (a poster's messages all carry the same one)."""
    found = _untagged.get(tag)
    if found is None:
        if len(_untagged) >= UNTAG_MEMO_MAX:
            _untagged.clear()
        fields = msgpack.unpackb(tag)
        if len(fields) == 2:
            found = (fields[0], fields[1], None)
        else:
            ip, variant, user_id, name, scopes, role, expires_at, verified = fields
            found = (ip, variant, Identity(user_id, name, frozenset(scopes), role, expires_at, verified=verified))
        _untagged[tag] = found
    return found


_untagged: dict[bytes, tuple[str, int, Identity | None]] = {}


def _encodes(comment: Comment) -> bool:
    """Whether the comment's log record can be encoded (a lone surrogate in its text cannot)."""
    try:
        encode_record(comment)
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return False
    return True


@dataclass(slots=True)
class _Stream:
    """A stream with local viewers: its hub handle and its last few batches."""

    name: str
    handle: int
    viewers: int = 0
    replay: deque[ChannelMessage] = field(default_factory=lambda: deque(maxlen=REPLAY_BATCHES))
    # Control events (deletes, pins, modes) by arrival number, for viewers joining meanwhile.
    controls: deque[tuple[int, ChannelMessage]] = field(default_factory=lambda: deque(maxlen=REPLAY_BATCHES))


@dataclass(frozen=True, slots=True)
class _Welcome:
    """A welcome ready to send, and the cache's offset it was read at (what to replay after)."""

    event: dict[str, Any]
    cache_offset: int


# A welcome's reads: position (epoch, offset), recent comments, mode, pin, keep ratios.
_StreamState = tuple[str, int, list[dict[str, Any]], StreamMode, dict[str, Any] | None, list[tuple[int, float]]]


@dataclass(slots=True)
class _Post:
    """A comment a viewer sent, waiting for admission with the others of its drain."""

    conn: int
    stream: str
    who: Identity | None
    msg: PostComment
    wire: Wire
    ip: str


class _FailureLog:
    """Logs a kind of failure the first time and then at most once per interval, with how
    many happened in between: a client repeating a message that trips a bug cannot flood the log."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}
        self.count = 0

    def failed(self, where: str, exc: BaseException, level: int = logging.ERROR) -> None:
        """Log ``exc`` (with its traceback at ERROR: a bug) unless its kind was logged lately."""
        self.count += 1
        key = (where, type(exc).__name__)
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        also = self._quiet.pop(key, 0)
        log.log(level, "%s failed (%s: %s; %d more like it since the last report)", where, type(exc).__name__, exc,
                also, exc_info=exc if level >= logging.ERROR else None)


class Upgrader(WSListener):
    """Lives only through the upgrade; on connect it hands the socket over to the hub."""

    def __init__(self, gateway: Gateway, stream: str, who: Identity | None, wire: Wire,
                 deflate: DeflateParams | None) -> None:
        super().__init__()
        self.gateway = gateway
        self.stream = stream
        self.who = who
        self.wire = wire
        self.deflate = deflate

    def variant(self) -> int:
        v = native.hub.MSGPACK if self.wire == MSGPACK else native.hub.JSON
        if self.deflate is not None:
            v |= native.hub.DEFLATE | (self.deflate.server_window_bits << 4)
        return v

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.gateway.hand_off(self, transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Frames picows parsed from bytes behind the handshake: the hub re-reads those bytes."""


class Gateway:
    def __init__(self, config: Config, admission: Admission, node: Node, state: StreamState,
                 store: HistoryStore | None, counters: Counters | None = None) -> None:
        self.config = config
        self.admission = admission
        self.node = node
        self.state = state
        self.store = store
        self.recovery = Recovery(state, store, config.history.recover_max)
        g = config.gateway
        self.hub = native.Hub(
            flush_interval_ms=g.flush_interval_ms, flush_max_messages=g.flush_max_messages,
            backlog_limit_bytes=g.backlog_limit_bytes, slow_close_after_ms=int(g.slow_close_after_s * 1000),
            max_message_bytes=g.max_message_bytes, max_fragments=g.max_fragments,
            heartbeat_interval_ms=int(g.heartbeat_interval_s * 1000),
            heartbeat_timeout_ms=int(g.heartbeat_timeout_s * 1000),
            deflate_level=g.deflate_level, deflate_window_bits=15, inflate_limit_bytes=g.max_message_bytes,
            max_pings_per_s=g.max_pings_per_s,
        )
        self.server: asyncio.Server | None = None
        self._recorders: dict[Any, RecordingProtocol] = {}
        self._streams: dict[str, _Stream] = {}
        self._by_handle: dict[int, _Stream] = {}
        self._next_handle = ECHO_HANDLE + 1
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0  # posts between arrival and answer; bounded by limits.max_inflight_posts
        self._queued: list[_Post] = []  # posts waiting for the admission task
        self._admitting = False  # the admission task is running
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.started_at = time.time()
        self.moderation: GatewayModeration | None = None  # gateway/modapi.py; set by the app
        self._controls_seen = 0  # control events delivered so far (numbers _Stream.controls)
        self.failures = _FailureLog()  # events and answers that raised (each cost only its own connection)
        node.deliver = self.deliver
        # Operations (chorus/ops.py) sets these hooks: readiness and health, the /metrics page,
        # the delivery-latency clock and the counter of posts refused before admission.
        self.readiness: Callable[[], tuple[bool, dict[str, str]]] | None = None
        self.health: Callable[[], tuple[bool, dict[str, str]]] | None = None
        self.metrics_page: Callable[[], bytes] | None = None
        self.clock: DeliveryClock | None = None
        self.posts_refused: Any = None
        self.draining = False  # SIGTERM: not ready (still serving through gateway.drain_delay_s)
        self.refusing_posts = False  # the drain is past its delay: new posts are refused, not_accepted
        self.drained = False  # the posts in flight are answered; viewers are closed next
        # Reactions and viewer counts (gateway/engagement.py): its events reach local viewers as control events.
        self.engagement = Engagement(config, counters or open_counters(config), self._local_viewers,
                                     lambda stream, event: self.deliver(stream, ChannelMessage(event)))
        self.routes = HttpRoutes(self)  # HTTP: page, history, probes, dev tokens, POSTs (gateway/routes.py)

    # -- lifecycle --
    async def start(self) -> None:
        g = self.config.gateway
        loop = asyncio.get_running_loop()
        await self.node.start()
        if self.moderation is not None:
            await self.moderation.start()
        self.engagement.start()
        loop.add_reader(self.hub.fileno(), self.on_hub_ready)
        picows_log = logging.getLogger("chorus.picows")
        if not picows_log.isEnabledFor(logging.DEBUG):
            picows_log.setLevel(logging.WARNING)  # it logs every accepted connection at INFO
        factory = picows_protocol_factory(self.routes.route, self._recorders, handshake_timeout_s=g.handshake_timeout_s,
                                          max_frame_size=g.max_message_bytes, logger=picows_log,
                                          http_handler=self.routes.answer)
        self.server = await loop.create_server(factory, g.host, g.port, reuse_port=True, backlog=4096)
        log.info("gateway listening on %s (hub: %s)", ", ".join(str(s.getsockname()) for s in self.server.sockets),
                 native.HUB_IMPLEMENTATION)

    @property
    def listening(self) -> bool:
        return self.server is not None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, code: int = CloseCode.SERVICE_RESTART) -> None:
        """Drain (chorus/ops.py), close every viewer with ``code`` and let the close frames go out."""
        if self.hub.fileno() < 0:
            return  # stopped already
        await drain_gateway(self)
        self.hub.close_all(code, DRAIN_REASON if code == CloseCode.SERVICE_RESTART else "gateway stopping")
        self.on_hub_ready()
        deadline = time.monotonic() + 1.0
        while self.hub.connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            self.on_hub_ready()
        for task in list(self._tasks):
            task.cancel()
        asyncio.get_running_loop().remove_reader(self.hub.fileno())
        if self._timer is not None:
            self._timer.cancel()
        self.hub.shutdown()
        if self.moderation is not None:
            await self.moderation.stop()
        await self.engagement.stop()
        await self.node.stop()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    # -- the hub's side --
    def on_hub_ready(self) -> None:
        """The hub's epoll fd is readable (or its deadline passed): let it work, then react."""
        self._timer = None
        self.hub.poll()
        if self.clock is not None:
            self.clock.polled()
        posts: list[_Post] = []
        for kind, conn, handle, data, tag in self.hub.drain():
            # Each event on its own: one that raises costs only its own connection, never
            # the rest of the drain (other viewers' posts, the CLOSED events the counts need).
            if kind == native.hub.CLOSED:
                self._on_closed(conn, handle, tag)
                continue
            try:
                self._on_event(kind, conn, handle, data, tag, posts)
            except Exception as exc:
                self._event_failed(conn, tag, exc)
        if posts:
            self._inflight += len(posts)
            self._queued += posts
            if not self._admitting:
                self._admitting = True
                self.spawn(self._admit_queued())
        self._arm_timer()

    def _on_event(self, kind: int, conn: int, handle: int, data: bytes, tag: bytes, posts: list[_Post]) -> None:
        if kind == native.hub.MESSAGE_TEXT and handle in self._by_handle and (emoji := fast_react(data)):
            self._react_fast(conn, self._by_handle[handle].name, tag, emoji)
            return
        ip, variant, who = _untag(tag)
        if handle == ECHO_HANDLE:
            self.hub.send(conn, data, kind == native.hub.MESSAGE_BINARY)
        else:
            self._on_client_message(conn, handle, kind, data, variant, who, ip, posts)

    def _on_closed(self, conn: int, handle: int, tag: bytes) -> None:
        """A viewer is gone: its counts always drop, even if the moderation hook fails."""
        try:
            ip, _, who = _untag(tag)
        except Exception as exc:  # our own tag, so a bug: still release the stream
            self.failures.failed("reading a closed viewer's tag", exc)
            ip, who = "", None
        self._viewer_left(handle, ip)
        if self.moderation is not None:
            try:
                self.moderation.on_leave(who, conn)
            except Exception as exc:
                self.failures.failed("the moderation hook of a closed viewer", exc)

    def _event_failed(self, conn: int, tag: bytes, exc: Exception) -> None:
        """Handling one viewer's message raised: log it (rate-limited) and tell that viewer."""
        self.failures.failed("handling a viewer's message", exc)
        try:
            wire: Wire = MSGPACK if _untag(tag)[1] & 1 else JSON
        except Exception:
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")
            return
        self._send_internal_error(conn, wire)

    def _send_internal_error(self, conn: int, wire: Wire, reason: str = INTERNAL_REASON,
                             comment_id: str | None = None, nonce: str | None = None) -> None:
        """An ``internal_error`` event, without the nonce if that is what cannot be encoded;
        close 1011 if even that fails."""
        try:
            try:
                payload = encode_event(error_event(ErrorCode.INTERNAL_ERROR, reason, nonce, None, comment_id), wire)
            except (ValueError, TypeError):
                payload = encode_event(error_event(ErrorCode.INTERNAL_ERROR, reason, None, None, comment_id), wire)
            self.hub.send(conn, payload)
        except Exception as exc:
            self.failures.failed("sending internal_error", exc)
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")

    def _arm_timer(self) -> None:
        """The pure hub has no timerfd: wake it when its next deadline is due."""
        wait_ms = self.hub.next_timeout_ms()
        if wait_ms < 0:
            return
        at = time.monotonic() + wait_ms / 1000
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(wait_ms / 1000, self.on_hub_ready)

    def deliver(self, stream: str, message: ChannelMessage) -> None:
        """An event from the broker for a stream this gateway has viewers of."""
        s = self._streams.get(stream)
        if s is None:
            if self.moderation is not None and self.moderation.owns(stream):
                self.moderation.on_control(message)  # this gateway's control channel
            return
        if message.offset is not None:
            s.replay.append(message)
        elif message.event_json.startswith(REPLAYED_CONTROLS):
            self._controls_seen += 1
            s.controls.append((self._controls_seen, message))
        # variants() has a bit per (variant & 3): plain and deflated viewers of one encoding both
        # need that encoding's payload (the hub compresses it once for the deflated ones).
        mask = self.hub.variants(s.handle)
        json_bits = (1 << native.hub.JSON) | (1 << (native.hub.JSON | native.hub.DEFLATE))
        msgpack_bits = (1 << native.hub.MSGPACK) | (1 << (native.hub.MSGPACK | native.hub.DEFLATE))
        as_json = message.event_json if mask & json_bits else None
        as_msgpack = msgpack.packb(json.loads(message.event_json)) if mask & msgpack_bits else None
        self.hub.publish(s.handle, (as_json, as_msgpack), message.offset is None, message.count)
        if message.published_us and self.clock is not None:
            self.clock.published(s.handle, message.published_us)
        self._arm_timer()

    def _viewer_left(self, handle: int, ip: str) -> None:
        self._release_ip(ip)
        s = self._by_handle.get(handle)
        if s is None:
            return
        s.viewers -= 1
        self.node.release(s.name)
        if s.viewers <= 0:
            del self._streams[s.name]
            del self._by_handle[s.handle]

    def _release_ip(self, ip: str) -> None:
        left = self._per_ip.get(ip, 0) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def _on_client_message(self, conn: int, handle: int, kind: int, data: bytes, variant: int,
                           who: Identity | None, ip: str = "", posts: list[_Post] | None = None) -> None:
        s = self._by_handle.get(handle)
        reply_wire: Wire = MSGPACK if variant & 1 else JSON
        msg = parse_client_message(data, JSON if kind == native.hub.MESSAGE_TEXT else MSGPACK)
        if isinstance(msg, BadMessage) or s is None:
            reason = msg.reason if isinstance(msg, BadMessage) else "stream gone"
            nonce = msg.nonce if isinstance(msg, BadMessage) else None
            code = msg.code if isinstance(msg, BadMessage) else "bad_message"
            self.hub.send(conn, encode_event(error_event(code, reason, nonce), reply_wire))  # type: ignore[arg-type]
        elif isinstance(msg, PostComment):
            if self.refusing_posts:
                self._refuse_draining(conn, msg, reply_wire)
            elif self._inflight + (len(posts) if posts is not None else 0) >= self.config.limits.max_inflight_posts:
                if self.posts_refused is not None:
                    self.posts_refused.labels("overloaded").inc()
                self.hub.send(conn, encode_event(error_event(
                    ErrorCode.OVERLOADED, "this gateway is taking too many comments right now; it was not posted",
                    msg.nonce, OVERLOADED_RETRY_MS), reply_wire))
            elif posts is not None:
                posts.append(_Post(conn, s.name, who, msg, reply_wire, ip))
            else:
                self._inflight += 1
                self.spawn(self.post(conn, s.name, who, msg, reply_wire, ip))
        elif isinstance(msg, Resume):
            self.spawn(self.resume(conn, s.name, msg, reply_wire))
        elif isinstance(msg, React):
            user = who.user_id if who is not None and time.time() < who.expires_at else None
            self._react(conn, s.name, user, ip, msg.emoji, reply_wire)

    def _react_fast(self, conn: int, stream: str, tag: bytes, emoji: str) -> None:
        """A canonical JSON react (its tag decoded once per connection, by _untag's memo)."""
        ip, _, who = _untag(tag)
        # A user whose token has expired reacts as an anonymous viewer.
        user = who.user_id if who is not None and time.time() < who.expires_at else None
        self._react(conn, stream, user, ip, emoji, JSON)

    def _react(self, conn: int, stream: str, user: str | None, ip: str, emoji: str, wire: Wire) -> None:
        refused = self.engagement.react(stream, user, ip, emoji)
        if refused is not None:
            self.hub.send(conn, encode_event(refused, wire))

    def _local_viewers(self) -> dict[str, int]:
        return {name: s.viewers for name, s in self._streams.items()}

    # -- the upgrade (HTTP routing: gateway/routes.py) --
    def upgrade(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        stream = req.arg("stream") or ""
        if not STREAM_ID.match(stream):
            return text_response(HTTPStatus.BAD_REQUEST, "stream must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        if not origin_allowed(request.headers.get("Origin"), request.headers.get("Host"),
                               self.config.gateway.allowed_origins):
            return text_response(HTTPStatus.FORBIDDEN, "origin not allowed")
        who = authenticate(self.config, request, req)
        if isinstance(who, WSUpgradeResponse):
            return who
        chosen = choose_subprotocol(request.headers.get("Sec-WebSocket-Protocol"))
        return self._accept(request, stream, who, SUBPROTOCOLS[chosen] if chosen else JSON, chosen)

    def accept_echo(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        """The conformance echo endpoint (``gateway.echo_endpoint``): a socket in the hub that
        gets its own frames back."""
        return self._accept(request, "", None, JSON)

    def _accept(self, request: WSUpgradeRequest, stream: str, who: Identity | None, wire: Wire,
                subprotocol: str | None = None) -> WSUpgradeResponseWithListener:
        headers: dict[str, str] = {}
        if subprotocol:
            headers["Sec-WebSocket-Protocol"] = subprotocol
        deflate = None
        if self.config.gateway.permessage_deflate:
            deflate = negotiate_deflate(request.headers.get("Sec-WebSocket-Extensions"))
            if deflate is not None:
                headers["Sec-WebSocket-Extensions"] = deflate.response_header(15)
        listener = Upgrader(self, stream, who, wire, deflate)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers or None), listener)

    # -- the hand-off --
    def hand_off(self, up: Upgrader, transport: WSTransport) -> None:
        """Called by picows right after the 101: stop uvloop reading and move on to the hub."""
        raw = transport.underlying_transport
        recorder = self._recorders.pop(raw, None)
        raw.pause_reading()
        peer = raw.get_extra_info("peername")
        ip = peer[0] if peer else ""
        if self.refusing_posts:  # upgraded while the listener was closing: go elsewhere at once
            transport.send_close(WSCloseCode.SERVICE_RESTART, DRAIN_REASON.encode())
            transport.disconnect()
            return
        if self._per_ip.get(ip, 0) >= self.config.gateway.max_connections_per_ip:
            transport.send_close(WSCloseCode.TRY_AGAIN_LATER, b"too many connections from your address")
            transport.disconnect()
            return
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        leftover = recorder.leftover() if recorder is not None else b""
        self.spawn(self._join(up, raw, ip, leftover))

    async def _join(self, up: Upgrader, raw: asyncio.Transport, ip: str, leftover: bytes) -> None:
        """Subscribe the stream, then give the socket to the hub with its welcome first."""
        tag = _tag(ip, up.variant(), up.who)
        if not up.stream:  # the echo endpoint
            await self._release_when_sent(raw)
            self.hub.adopt(detach_socket(raw), ECHO_HANDLE, up.variant(), leftover, tag)
            return
        try:
            await self.node.acquire(up.stream)
        except Exception as exc:
            self.failures.failed("subscribing a stream's channel for a join", exc, logging.WARNING)
            self._release_ip(ip)
            raw.write(native.encode_close(CloseCode.TRY_AGAIN_LATER, "stream unavailable, try again"))
            raw.close()
            return
        s = self._streams.get(up.stream)
        if s is None:
            s = self._streams[up.stream] = _Stream(up.stream, self._next_handle)
            self._by_handle[s.handle] = s
            self._next_handle += 1
        s.viewers += 1
        controls_before = self._controls_seen  # a delete or pin arriving from here on is replayed below
        try:
            prepared = await self._prepare_welcome(up, ip)
        except Exception as exc:  # a bug: it costs this join only, and the counts stay right
            self.failures.failed("preparing a welcome", exc)
            prepared = (CloseCode.INTERNAL_ERROR, "internal error")
        if isinstance(prepared, tuple) or raw.is_closing() or not await self._release_when_sent(raw):
            self._viewer_left(s.handle, ip)
            if isinstance(prepared, tuple) and not raw.is_closing():
                raw.write(native.encode_close(*prepared))
                raw.close()
            return
        fd = detach_socket(raw)
        try:
            conn = self.hub.adopt(fd, s.handle, up.variant(), leftover, tag)
        except (ValueError, OSError) as exc:  # ValueError leaves the fd with us; OSError: the hub closed it
            self.failures.failed("handing a socket to the hub", exc)
            if isinstance(exc, ValueError):
                os.close(fd)
            self._viewer_left(s.handle, ip)
            return
        try:
            self._send_welcome(conn, up, s, prepared, controls_before)
        except Exception as exc:  # the hub holds it now: its CLOSED event undoes the counts
            self.failures.failed("sending a welcome", exc)
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")
        self.on_hub_ready()

    async def _prepare_welcome(self, up: Upgrader, ip: str) -> _Welcome | tuple[int, str]:
        """The welcome for a viewer joining ``up.stream``, or the close (code, reason) it gets
        instead: "try again" without the stream's state, 4503 / 4504 when banned or timed out."""
        got = await self._stream_state(up.stream)
        if got is None:
            return CloseCode.TRY_AGAIN_LATER, "stream unavailable, try again"
        epoch, offset, recent, mode, pin, ratios = got
        # A cache holding less than the welcome shows (Redis restarted empty, the embedded
        # default restarted, Redis down) is filled from the history store (gateway/recovery.py).
        view = await self.recovery.welcome(up.stream, epoch, offset, recent, self.config.gateway.recent_on_welcome)
        refused = await self.moderation.refusal(up.who, up.stream) if self.moderation is not None else None
        if refused is not None:  # banned or timed out (gateway/modapi.py): 4503 / 4504, after the 101
            return refused
        self.engagement.joined(up.stream, up.who.user_id if up.who else None, ip)
        counts = await self.engagement.welcome(up.stream)
        event = {
            "t": "welcome", "stream": up.stream, "epoch": view.epoch, "offset": view.offset, "recent": view.recent,
            "pin": pin, **counts, "mode": mode.to_wire(),
            "keep_ratio": ratios[-1][1] if ratios else 1.0,  # a sampled stream: as the last `throttle` said
            "user": {"id": up.who.user_id, "name": up.who.name} if up.who else None,
        }
        return _Welcome(event, offset)

    async def _stream_state(self, stream: str) -> _StreamState | None:
        """The stream's position, recent comments, mode, pin and keep ratios for a welcome.

        If Redis does not answer and there is a history store, a welcome without the cache
        (its comments and position from the store, mode off, the pin the store kept): a
        viewer of a stream this gateway still serves joins during an outage (live comments
        keep coming over Pub/Sub's Kafka fallback). Without a store: None ("try again").
        """
        try:
            # Concurrent reads (a reconnect storm joins thousands at once); the ratios need the epoch.
            (epoch, offset), recent, mode, pin = await asyncio.gather(
                self.state.position(stream), self.state.recent(stream, self.config.gateway.recent_on_welcome),
                self.state.get_mode(stream), self.state.get_pin(stream))
            ratios = await self.state.keep_ratios(stream, epoch) if epoch else []
        except Exception as exc:
            self.failures.failed("reading a stream's state for a welcome", exc, logging.WARNING)
            if self.store is None:
                return None
            return NO_EPOCH, -1, [], StreamMode(), await self._stored_pin(stream), []
        return epoch, offset, recent, mode, pin, ratios

    async def _stored_pin(self, stream: str) -> dict[str, Any] | None:
        """The pin the history store keeps beside Redis's (SqliteStore.pin), if it can say."""
        read = getattr(self.store, "pin", None)
        if read is None:
            return None
        try:
            pin: dict[str, Any] | None = await asyncio.to_thread(read, stream)
        except Exception:
            return None
        return pin

    def _send_welcome(self, conn: int, up: Upgrader, s: _Stream, prepared: _Welcome, controls_before: int) -> None:
        """The welcome, then what the stream published while it was being read."""
        if self.moderation is not None:
            self.moderation.on_join(up.who, conn, up.stream, up.wire == MSGPACK)
        self.hub.send(conn, encode_event(prepared.event, up.wire))
        # Batches after the cache's position (not the store's: another epoch's offsets, maybe).
        missed = [m for m in s.replay if m.offset is not None and m.offset > prepared.cache_offset]
        missed += [m for n, m in s.controls if n > controls_before]  # after the batches they may name
        for m in missed:
            self.hub.send(conn, m.event_json if up.wire == JSON else msgpack.packb(json.loads(m.event_json)))

    async def _release_when_sent(self, raw: asyncio.Transport) -> bool:
        """Wait (briefly) until uvloop has written the 101, so nothing is lost at the abort."""
        deadline = time.monotonic() + 2.0
        while raw.get_write_buffer_size() and not raw.is_closing():
            if time.monotonic() > deadline:
                raw.abort()
                return False
            await asyncio.sleep(0.001)
        return not raw.is_closing()

    # -- what viewers ask for --
    async def post(self, conn: int, stream: str, who: Identity | None, msg: PostComment, wire: Wire,
                   ip: str = "") -> None:
        result: Comment | Refused
        try:
            result = await self.admission.post(who, stream, msg.text, ip, msg.nonce)
        except Refused as exc:
            result = exc
        finally:
            self._inflight -= 1
        self._answer([_Post(conn, stream, who, msg, wire, ip)], [result])
        self.on_hub_ready()

    async def _admit_queued(self) -> None:
        """One task admits every queued post, a batch at a time (one Redis round trip per step
        for the batch); what arrives meanwhile makes the next batch, so batches grow with the
        load instead of tasks. Refusals are answered at once; each batch's appends wait for
        Kafka in a task of their own while the next batch is admitted."""
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_ADMIT_BATCH], self._queued[MAX_ADMIT_BATCH:]
                await self._admit_batch(batch)
                self.on_hub_ready()
        finally:
            self._admitting = False

    async def _admit_batch(self, batch: list[_Post]) -> None:
        """Admit ``batch`` and start its appends. If admission raises (a post it cannot
        encode, a bug), the batch is split in halves until the post at fault is alone: it gets
        ``internal_error`` (not posted), the others go on (a few extra calls, only then)."""
        try:
            admitted = await self.admission.admit_many([(p.who, p.stream, p.msg.text, p.ip, p.msg.nonce)
                                                        for p in batch])
        except asyncio.CancelledError:
            self._inflight -= len(batch)
            raise
        except Exception as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                await self._admit_batch(batch[:half])
                await self._admit_batch(batch[half:])
                return
            self._inflight -= 1
            self.failures.failed("admitting a comment", exc)
            p = batch[0]
            self._send_internal_error(p.conn, p.wire, "the server could not take this comment; it was not posted",
                                      nonce=p.msg.nonce)
            return
        self._inflight -= len(batch) - len(admitted.waiting())
        self._answer(batch, admitted.results)
        self.spawn(self._append_admitted(batch, admitted))

    async def _append_admitted(self, batch: list[_Post], admitted: Admitted) -> None:
        waiting = admitted.waiting()  # appended, or repeats waiting for the first post's answer
        try:
            results = await self._append_encodable(admitted)
        finally:
            self._inflight -= len(waiting)
        self._answer([batch[i] for i in waiting], [results[i] for i in waiting])
        self.on_hub_ready()

    async def _append_encodable(self, admitted: Admitted) -> list[Comment | Refused]:
        """Append the batch; if that raises because a comment's record cannot be encoded, that
        comment is refused alone and the rest appended. Records are all encoded before the
        first append, so a record that fails to encode now failed before anything was appended."""
        try:
            return await self.admission.append_admitted(admitted)
        except Exception as exc:
            bad = [(i, c) for i, c in admitted.comments if not _encodes(c)]
            if not bad:
                raise  # not an encoding failure: the appends' own error
            self.failures.failed("encoding a comment's record", exc)
            for i, _ in bad:
                admitted.results[i] = Refused(ErrorCode.INTERNAL_ERROR, "the server could not encode this comment; "
                                                                        "it was not posted")
            good = [(i, c) for i, c in admitted.comments if _encodes(c)]
            return await self.admission.append_admitted(replace(admitted, comments=good))

    def _answer(self, posts: list[_Post], results: list[Comment | Refused] | list[Comment | Refused | None]) -> None:
        """Each post's ack or error; one that cannot be encoded gets ``internal_error`` alone."""
        for p, result in zip(posts, results, strict=True):
            try:
                self._answer_one(p, result)
            except Exception as exc:
                self.failures.failed("answering a post", exc)
                posted = result.id if isinstance(result, Comment) else None
                self._send_internal_error(p.conn, p.wire, "the answer to this comment could not be encoded"
                                          + ("; it was posted (id)" if posted else "; it was not posted"), posted,
                                          p.msg.nonce)

    def _answer_one(self, p: _Post, result: Comment | Refused | None) -> None:
        if isinstance(result, Refused):
            self.hub.send(p.conn, encode_event(error_event(result.code, result.reason, p.msg.nonce,
                                                           result.retry_after_ms, result.comment_id), p.wire))
        elif result is not None:
            self.hub.send(p.conn, encode_ack(result.id, p.msg.nonce, p.wire))
            if result.shadow and self.moderation is not None:
                self.moderation.echo_shadow(result)

    async def resume(self, conn: int, stream: str, msg: Resume, wire: Wire) -> None:
        """Send what the viewer missed (gateway/recovery.py) as batches in order, then ``resumed``.

        Between batches the hub gets to write, and while this viewer's own backlog is over the
        limit the rest waits (up to a deadline), so a long recovery does not trip the
        slow-viewer cap. Its own: other viewers' backlogs (the hub-wide total) say nothing
        about this socket, and on a busy gateway they made every resume wait out the deadline.
        """
        found = await self.recovery.missed(stream, msg.epoch, msg.offset)
        deadline = time.monotonic() + RESUME_PACING_S
        limit = self.config.gateway.backlog_limit_bytes
        for batch in found.batch_events(stream):
            if not self.hub.send(conn, encode_event(batch, wire)):
                return  # the viewer left
            self.on_hub_ready()
            while self.hub.backlog(conn) > limit and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                self.on_hub_ready()
        self.hub.send(conn, encode_event({"t": "resumed", "recovered": found.recovered}, wire))
        self.on_hub_ready()

    # -- operations (chorus/ops.py) --
    def posts_in_flight(self) -> int:
        """WebSocket and HTTP posts between arrival and answer."""
        return self._inflight + self.routes.http_inflight

    def _refuse_draining(self, conn: int, msg: PostComment, wire: Wire) -> None:
        if self.posts_refused is not None:
            self.posts_refused.labels("draining").inc()
        self.hub.send(conn, encode_event(error_event(
            ErrorCode.NOT_ACCEPTED, "this gateway is restarting; it was not posted: reconnect and post again",
            msg.nonce, OVERLOADED_RETRY_MS), wire))
