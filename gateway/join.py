"""The join: a viewer from its WebSocket upgrade to a socket the hub has adopted.

::

    upgrade (routes call it) --checks pass--> 101 with an Upgrader listener
      --picows: connected--> hand_off: reading paused; drain or per-address limit -> close
      --join task--> node.acquire (subscribe the stream's channel; fails -> 1013)
      --welcome read--> banned / timed out (4503 / 4504), no state (1013), or the welcome
      --101 written--> the fd detached and adopted by the hub, the welcome sent first, then
                       what the stream published while the welcome was read

Every failure on the way costs this join only, and the viewer counts stay right: a viewer
counted in :class:`LocalViewers` either reaches the hub (whose CLOSED event undoes the
count) or is uncounted here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

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
from chorus.codes import CloseCode
from chorus.config import Config
from chorus.extensions import DeflateParams, negotiate_deflate
from chorus.gateway.delivery import Delivery
from chorus.gateway.drain import DRAIN_REASON, Drain
from chorus.gateway.engagement import Engagement
from chorus.gateway.failures import FailureLog
from chorus.gateway.handoff import RecordingProtocol, detach_socket
from chorus.gateway.http import STREAM_ID, Request, text_response
from chorus.gateway.node import Node
from chorus.gateway.posts import Spawn
from chorus.gateway.recovery import Recovery
from chorus.gateway.routes import authenticate, origin_allowed
from chorus.gateway.viewers import ECHO_HANDLE, LocalStream, LocalViewers, viewer_tag
from chorus.ingest.store import HistoryStore
from chorus.positions import NO_EPOCH
from chorus.protocol import JSON, MSGPACK, SUBPROTOCOLS, Wire, choose_subprotocol, encode_event

__all__ = ["Join", "JoinGate", "Upgrader"]

RELEASE_WAIT_S = 2.0  # how long the 101 may take to leave uvloop's buffer before the socket is given up

# A welcome's reads: position (epoch, offset), recent comments, mode, pin, keep ratios.
_StreamState = tuple[str, int, list[dict[str, Any]], StreamMode, dict[str, Any] | None, list[tuple[int, float]]]


class JoinGate(Protocol):
    """Moderation's part in a join (gateway/modapi.py): refuse the banned, register the rest."""

    async def refusal(self, who: Identity | None, stream: str) -> tuple[int, str] | None: ...

    def on_join(self, who: Identity | None, conn: int, stream: str, msgpack: bool = False) -> None: ...


@dataclass(frozen=True, slots=True)
class _Welcome:
    """A welcome ready to send, and the cache's offset it was read at (what to replay after)."""

    event: dict[str, Any]
    cache_offset: int


class Upgrader(WSListener):
    """Lives only through the upgrade; on connect it hands the socket over to the hub."""

    def __init__(self, join: Join, stream: str, who: Identity | None, wire: Wire,
                 deflate: DeflateParams | None) -> None:
        super().__init__()
        self.join = join
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
        self.join.hand_off(self, transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Frames picows parsed from bytes behind the handshake: the hub re-reads those bytes."""


class Join:
    """Accepts upgrades and takes each socket through to the hub with its welcome first."""

    def __init__(self, config: Config, hub: native.Hub, node: Node, state: StreamState, store: HistoryStore | None,
                 recovery: Recovery, engagement: Engagement, viewers: LocalViewers, delivery: Delivery,
                 drain: Drain, failures: FailureLog, *, spawn: Spawn, wake: Callable[[], None],
                 gate: JoinGate | None = None) -> None:
        self.config = config
        self.hub = hub
        self.node = node
        self.state = state
        self.store = store
        self.recovery = recovery
        self.engagement = engagement
        self.viewers = viewers
        self.delivery = delivery
        self.drain = drain
        self.failures = failures
        self.spawn = spawn
        self.wake = wake
        self.gate = gate
        # Each accepted socket's recorder (gateway/handoff.py), by transport, until its hand-off.
        self.recorders: dict[Any, RecordingProtocol] = {}

    # -- the upgrade (called by the routes, gateway/routes.py) --
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

    # -- the hand-off (called by picows right after the 101) --
    def hand_off(self, up: Upgrader, transport: WSTransport) -> None:
        """Stop uvloop reading and move on to the hub (in a task: the join awaits)."""
        raw = transport.underlying_transport
        recorder = self.recorders.pop(raw, None)
        raw.pause_reading()
        peer = raw.get_extra_info("peername")
        ip = peer[0] if peer else ""
        if self.drain.refusing_posts:  # upgraded while the listener was closing: go elsewhere at once
            transport.send_close(WSCloseCode.SERVICE_RESTART, DRAIN_REASON.encode())
            transport.disconnect()
            return
        if not self.viewers.take_ip(ip):
            transport.send_close(WSCloseCode.TRY_AGAIN_LATER, b"too many connections from your address")
            transport.disconnect()
            return
        leftover = recorder.leftover() if recorder is not None else b""
        self.spawn(self._join(up, raw, ip, leftover))

    async def _join(self, up: Upgrader, raw: asyncio.Transport, ip: str, leftover: bytes) -> None:
        """Subscribe the stream, then give the socket to the hub with its welcome first."""
        tag = viewer_tag(ip, up.variant(), up.who)
        if not up.stream:  # the echo endpoint
            await self._release_when_sent(raw)
            self.hub.adopt(detach_socket(raw), ECHO_HANDLE, up.variant(), leftover, tag)
            return
        try:
            await self.node.acquire(up.stream)
        except Exception as exc:
            self.failures.failed("subscribing a stream's channel for a join", exc, logging.WARNING)
            self.viewers.release_ip(ip)
            raw.write(native.encode_close(CloseCode.TRY_AGAIN_LATER, "stream unavailable, try again"))
            raw.close()
            return
        s = self.viewers.joined(up.stream)
        controls_before = self.delivery.controls_seen  # a delete or pin arriving from here on is replayed
        try:
            prepared = await self._prepare_welcome(up, ip)
        except Exception as exc:  # a bug: it costs this join only, and the counts stay right
            self.failures.failed("preparing a welcome", exc)
            prepared = (CloseCode.INTERNAL_ERROR, "internal error")
        if isinstance(prepared, tuple) or raw.is_closing() or not await self._release_when_sent(raw):
            self.viewers.left(s.handle, ip)
            if isinstance(prepared, tuple) and not raw.is_closing():
                raw.write(native.encode_close(*prepared))
                raw.close()
            return
        self._adopt(up, raw, ip, leftover, tag, s, prepared, controls_before)

    def _adopt(self, up: Upgrader, raw: asyncio.Transport, ip: str, leftover: bytes, tag: bytes, s: LocalStream,
               prepared: _Welcome, controls_before: int) -> None:
        """The socket to the hub, then its welcome and what it missed meanwhile."""
        fd = detach_socket(raw)
        try:
            conn = self.hub.adopt(fd, s.handle, up.variant(), leftover, tag)
        except (ValueError, OSError) as exc:  # ValueError leaves the fd with us; OSError: the hub closed it
            self.failures.failed("handing a socket to the hub", exc)
            if isinstance(exc, ValueError):
                os.close(fd)
            self.viewers.left(s.handle, ip)
            return
        try:
            self._send_welcome(conn, up, s, prepared, controls_before)
        except Exception as exc:  # the hub holds it now: its CLOSED event undoes the counts
            self.failures.failed("sending a welcome", exc)
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")
        self.wake()

    # -- the welcome --
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
        refused = await self.gate.refusal(up.who, up.stream) if self.gate is not None else None
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

    def _send_welcome(self, conn: int, up: Upgrader, s: LocalStream, prepared: _Welcome, controls_before: int) -> None:
        """The welcome, then what the stream published while it was being read."""
        if self.gate is not None:
            self.gate.on_join(up.who, conn, up.stream, up.wire == MSGPACK)
        self.hub.send(conn, encode_event(prepared.event, up.wire))
        # Batches after the cache's position (not the store's: another epoch's offsets, maybe).
        for payload in self.delivery.missed(s, prepared.cache_offset, controls_before, up.wire):
            self.hub.send(conn, payload)

    async def _release_when_sent(self, raw: asyncio.Transport) -> bool:
        """Wait (briefly) until uvloop has written the 101, so nothing is lost at the abort."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        while raw.get_write_buffer_size() and not raw.is_closing():
            if time.monotonic() > deadline:
                raw.abort()
                return False
            await asyncio.sleep(0.001)
        return not raw.is_closing()
