"""The hand-off of a viewer's socket from picows/uvloop (the upgrade) to the hub (the rest).

picows parses the HTTP upgrade from its own read buffer, which Python cannot reach. So each
accepted socket gets a thin :class:`RecordingProtocol` in front of picows' protocol: it keeps
a copy of the bytes read until the hand-off, so the bytes a client sent right behind its
handshake (RFC 6455 lets nothing arrive there, but a pipelining client may) go to the hub
with the socket instead of being lost.

The sequence, in one loop turn: picows sends the 101 and calls ``on_ws_connected``; reading
is paused at once, so uvloop reads nothing more; the gateway later (after the welcome is
ready) duplicates the fd, aborts the uvloop transport (which closes only uvloop's fd), and
gives the duplicate plus the recorded leftover to the hub. From then on only the hub touches
the socket.

The recorder reads every request's head itself first (gateway/httpreq.py), before picows
sees a byte: only a WebSocket upgrade goes on to picows (which gets the recorded bytes, then
everything after them directly). Any other request (a page, history, a probe, a POST, a HEAD,
a method nobody serves) is handed to the gateway's HTTP handler and answered here, since picows
would refuse a body, a method other than GET or HTTP/1.0 with a bare 400, and drop a head
over its size limit with a reset. picows is built only for upgrades. The recorder's states::

    READING --the request is whole, an upgrade-------------> WEBSOCKET (picows reads, we record
       |                                                                 until the hand-off)
       |--the request is whole, anything else-----------> ANSWERING (the handler's answer, close)
       \\--malformed, over a limit, too slow, cut short---> ANSWERING (the HttpError's answer)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import picows
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

from chorus.codes import HttpErrorCode
from chorus.errors import PrivateApiChanged
from chorus.gateway.httpreq import CONTINUE, HttpError, HttpRequest, RequestParser, error_response

__all__ = ["HANDSHAKE_END", "PICOWS_PROTOCOL_METHODS", "HttpHandler", "RecordingProtocol", "check_picows_protocol",
           "detach_socket", "head_for_picows", "is_websocket_upgrade", "new_picows_protocol", "picows_protocol_factory",
           "picows_version", "upgrade_refusal"]

log = logging.getLogger("chorus.gateway")

HANDSHAKE_END = b"\r\n\r\n"
# The most a client may send before its handshake completes; past it we stop recording
# (the request head is capped well below it).
MAX_RECORDED = 65536
READ_BUFFER = 4096  # our own reads, until the request is whole
LINGER_S = 2.0  # after answering, how long to wait for the client to close first

# Answers a complete request (anything but a WebSocket upgrade) from ``ip`` with the whole HTTP response.
HttpHandler = Callable[[HttpRequest, str], Awaitable[bytes]]
_READING, _WEBSOCKET, _ANSWERING = 0, 1, 2
# Answers being computed: the loop keeps only weak references to tasks.
_answer_tasks: set[asyncio.Task[None]] = set()


def _tokens(value: str | None) -> set[str]:
    """The comma-separated tokens of a header (RFC 9110 5.6.1), lower-cased."""
    return {token.strip().lower() for token in (value or "").split(",")}


def is_websocket_upgrade(request: HttpRequest) -> bool:
    """A GET asking to upgrade to WebSocket (RFC 6455 4.1): picows' to read."""
    return request.method == "GET" and "websocket" in _tokens(request.header("Upgrade"))


def upgrade_refusal(request: HttpRequest) -> bytes | None:
    """What picows refuses before routing, with reasons showing Python bytes: answered as JSON
    here. (The handshake's own headers are checked after routing, in gateway/routes.py, as
    picows does, so a bad token still gets its 401 first.)"""
    if request.version != "HTTP/1.1":
        return error_response(400, HttpErrorCode.BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1 (RFC 6455 4.1)")
    if request.body or request.header("Content-Length") not in (None, "0"):
        return error_response(400, HttpErrorCode.BAD_REQUEST, "a WebSocket upgrade carries no body")
    return None


def head_for_picows(request: HttpRequest) -> bytes:
    """The upgrade's head as picows reads it. picows compares Connection and Upgrade whole
    ("upgrade", "websocket"), so a browser's ``Connection: keep-alive, Upgrade`` (Firefox)
    would be refused: a list holding the token is given as the token alone (RFC 6455 4.2.1
    asks only that it be there)."""
    lines = [f"GET {request.target} HTTP/1.1"]
    for name, value in request.headers:
        if name == "upgrade" or (name == "connection" and "upgrade" in _tokens(value)):
            value = "websocket" if name == "upgrade" else "upgrade"
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RecordingProtocol(asyncio.BufferedProtocol):
    """Reads each request's head; forwards an upgrade to picows' protocol, keeping a copy of the
    bytes read so far, or answers anything else itself through the HTTP handler."""

    __slots__ = ("_answered", "_client_done", "_deadline", "_handler", "_inner", "_last_buffer", "_make_inner", "_mode",
                 "_own_buffer", "_parser", "_recorded", "_registry", "_timeout_s", "transport")

    def __init__(self, make_inner: Callable[[], Any], registry: dict[Any, RecordingProtocol],
                 handler: HttpHandler, timeout_s: float = 5.0) -> None:
        self._make_inner = make_inner
        self._inner: Any = None  # picows' protocol, built for an upgrade only
        self._registry = registry
        self._recorded = bytearray()
        self._last_buffer: memoryview | None = None
        self.transport: asyncio.Transport | None = None
        self._handler = handler
        self._timeout_s = timeout_s
        self._mode = _READING
        self._parser = RequestParser()
        self._own_buffer: bytearray | None = bytearray(READ_BUFFER)
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = False
        self._client_done = False  # the client half-closed: it sends nothing more

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._registry[transport] = self
        self._deadline = asyncio.get_running_loop().call_later(self._timeout_s, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.pop(self.transport, None)
        self._cancel_deadline()
        if self._mode == _WEBSOCKET:
            self._inner.connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._mode != _WEBSOCKET:
            assert self._own_buffer is not None
            return memoryview(self._own_buffer)
        self._last_buffer = self._inner.get_buffer(sizehint)
        return self._last_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._mode == _WEBSOCKET:
            if self._last_buffer is not None and len(self._recorded) < MAX_RECORDED:
                self._recorded += self._last_buffer[:nbytes]
            self._last_buffer = None
            self._inner.buffer_updated(nbytes)
            return
        if self._mode == _READING:
            assert self._own_buffer is not None
            self._read(bytes(self._own_buffer[:nbytes]))
        # ANSWERING: bytes after the request, or after an answer, are dropped

    def eof_received(self) -> bool | None:
        if self._mode == _WEBSOCKET:
            return self._inner.eof_received()
        if self._answered or (self._mode == _READING and not self._recorded):
            return False  # the client read the answer (or sent nothing) and closed: close too
        # A half-closed client still reads its answer: keep the socket open for it.
        self._client_done = True
        if self._mode == _READING:
            self._answer(error_response(400, HttpErrorCode.BAD_REQUEST,
                                        "the connection ended before the whole request arrived"))
        return True

    def pause_writing(self) -> None:
        if self._mode == _WEBSOCKET:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._mode == _WEBSOCKET:
            self._inner.resume_writing()

    def leftover(self) -> bytes:
        """The bytes read past the end of the HTTP handshake."""
        end = self._recorded.find(HANDSHAKE_END)
        return bytes(self._recorded[end + len(HANDSHAKE_END) :]) if end >= 0 else b""

    # -- reading the request --
    def _read(self, data: bytes) -> None:
        assert self.transport is not None
        if len(self._recorded) < MAX_RECORDED:
            self._recorded += data
        try:
            request = self._parser.feed(data)
        except HttpError as exc:
            self._answer(error_response(exc.status, exc.code, exc.reason))
            return
        if self._parser.take_continue():
            self.transport.write(CONTINUE)
        if request is None:
            return
        self._cancel_deadline()
        if is_websocket_upgrade(request):
            refusal = upgrade_refusal(request)
            if refusal is None:
                self._start_websocket(head_for_picows(request) + self._parser.trailing)
            else:
                self._answer(refusal)
            return
        self._start_answer(request)

    def _timed_out(self) -> None:
        self._deadline = None
        self._answer(error_response(408, HttpErrorCode.REQUEST_TIMEOUT, "the request did not arrive in time"))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- an upgrade: picows reads it --
    def _start_websocket(self, recorded: bytes) -> None:
        """Build picows' protocol and give it the request and what followed it (its buffer grows
        as it needs); from here on ``recorded`` grows with what picows reads."""
        self._mode = _WEBSOCKET
        self._own_buffer = None
        self._recorded = bytearray(recorded)
        self._inner = self._make_inner()
        self._inner.connection_made(self.transport)
        data = memoryview(recorded)
        while data and not self._closing():
            buf = self._inner.get_buffer(-1)
            n = min(len(buf), len(data))
            if n == 0:
                break
            buf[:n] = data[:n]
            self._inner.buffer_updated(n)
            data = data[n:]

    def _closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    # -- anything else: the handler answers --
    def _start_answer(self, request: HttpRequest) -> None:
        assert self.transport is not None
        self._mode = _ANSWERING
        self._registry.pop(self.transport, None)
        self._recorded = bytearray()
        self.transport.pause_reading()
        peer = self.transport.get_extra_info("peername")
        task = asyncio.ensure_future(self._respond(request, peer[0] if peer else ""))
        _answer_tasks.add(task)
        task.add_done_callback(_answer_tasks.discard)

    async def _respond(self, request: HttpRequest, ip: str) -> None:
        try:
            response = await self._handler(request, ip)
        except Exception:
            log.exception("%s %s failed", request.method, request.target[:80])
            response = error_response(500, HttpErrorCode.INTERNAL_ERROR, "internal error; nothing was done")
        self._answer(response)

    def _answer(self, response: bytes) -> None:
        """Write the whole response, then close gracefully.

        Closing a socket with unread bytes in it sends a reset that can destroy the answer
        before the client reads it (an early 413 while the body still arrives), so: send
        the answer and a FIN, drop whatever still comes, and close when the client does
        (or after the linger time).
        """
        self._cancel_deadline()
        self._mode = _ANSWERING
        self._registry.pop(self.transport, None)
        transport = self.transport
        if self._answered or transport is None or transport.is_closing():
            return
        self._answered = True
        transport.write(response)
        if self._client_done or not transport.can_write_eof():
            transport.close()  # nothing unread can follow: close once the answer is written
            return
        transport.write_eof()
        transport.resume_reading()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_S, transport.close)


# What RecordingProtocol calls on picows' protocol (asyncio.BufferedProtocol's methods).
PICOWS_PROTOCOL_METHODS = ("connection_made", "connection_lost", "get_buffer", "buffer_updated", "eof_received",
                           "pause_writing", "resume_writing")


def picows_version() -> str:
    return str(getattr(picows, "__version__", "unknown"))


def new_picows_protocol(listener_factory: Callable[[Any], Any], logger: Any, handshake_timeout_s: float,
                        max_frame_size: int) -> Any:
    """A server-side ``WSProtocol`` as ``picows.ws_create_server`` builds one (api.py), by keyword:
    a picows whose constructor renamed, added or dropped a parameter fails here with a TypeError
    instead of taking our values in the wrong places. Needs a running event loop."""
    return WSProtocol(
        host_port=None, ws_path=None, is_client_side=False, ws_listener_factory=listener_factory, logger=logger,
        disconnect_on_exception=True,
        websocket_handshake_timeout=handshake_timeout_s,
        # auto ping off: the hub pings after the hand-off
        enable_auto_ping=False, auto_ping_idle_timeout=20.0, auto_ping_reply_timeout=20.0,
        auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
        enable_auto_pong=True,  # while picows still owns the socket
        max_frame_size=max_frame_size,
        extra_headers=None,
        read_buffer_init_size=2048,  # handshakes are small, and the buffer dies at the hand-off
    )


def check_picows_protocol(make_inner: Callable[[], Any]) -> None:
    """Build one protocol as the recorder will and check it has what the recorder calls; raise
    :class:`PrivateApiChanged` naming the picows version if not (at start, not at the first viewer)."""
    try:
        probe = make_inner()
    except TypeError as exc:
        raise _picows_changed(f"its WSProtocol constructor does not take the arguments of picows 2.3 ({exc})") from None
    missing = [name for name in PICOWS_PROTOCOL_METHODS if not callable(getattr(probe, name, None))]
    if missing:
        raise _picows_changed(f"its WSProtocol has no {', '.join(missing)}")


def _picows_changed(what: str) -> PrivateApiChanged:
    return PrivateApiChanged(
        f"picows {picows_version()}: {what}. gateway/handoff.py builds picows' private WSProtocol as picows 2.3's "
        "ws_create_server does; install the picows version pyproject.toml pins, or update gateway/handoff.py")


def picows_protocol_factory(listener_factory: Callable[[Any], Any], registry: dict[Any, RecordingProtocol], *,
                            handshake_timeout_s: float, max_frame_size: int, logger: Any,
                            http_handler: HttpHandler) -> Callable[[], Any]:
    """Recorders in front of protocols as ``picows.ws_create_server`` builds them.

    picows has no public way to put a protocol in front of its own, so this builds its private
    ``WSProtocol`` (pyproject pins picows to 2.3 for this reason), checked here, at start, by
    :func:`check_picows_protocol`. Every request must be whole within ``handshake_timeout_s``;
    all but upgrades are answered through ``http_handler``. Call it in the running loop.
    """

    def make_inner() -> Any:
        return new_picows_protocol(listener_factory, logger, handshake_timeout_s, max_frame_size)

    check_picows_protocol(make_inner)

    def factory() -> RecordingProtocol:
        return RecordingProtocol(make_inner, registry, http_handler, handshake_timeout_s)

    return factory


def detach_socket(transport: asyncio.Transport) -> int:
    """A duplicate of the transport's fd; aborting the transport then closes only uvloop's."""
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    transport.abort()
    return fd
