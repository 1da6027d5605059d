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

picows refuses requests with a body, so the recorder also answers ``POST`` itself: when a
connection's first bytes are a ``POST `` request line, picows is let go at once (it never
sees a byte) and the request is read with gateway/httpreq.py, handed to the gateway's post
handler, answered and closed. The recorder's states::

    UNDECIDED --first bytes "POST "----> POST (read, answer, close)
    UNDECIDED --first bytes otherwise--> WEBSOCKET (forward to picows, record until the hand-off)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

from chorus.codes import HttpErrorCode
from chorus.gateway.httpreq import CONTINUE, HttpError, HttpRequest, RequestParser, error_response

__all__ = ["HANDSHAKE_END", "PostHandler", "RecordingProtocol", "detach_socket", "picows_protocol_factory"]

log = logging.getLogger("chorus.gateway")

HANDSHAKE_END = b"\r\n\r\n"
# The most a client may send before its handshake completes; past it we stop recording
# (picows refuses handshakes that large anyway).
MAX_RECORDED = 65536
POST_LINE = b"POST "
POST_READ_BUFFER = 4096
POST_LINGER_S = 2.0  # after answering a POST, how long to wait for the client to close first

# Answers a complete POST request from ``ip`` with the whole HTTP response.
PostHandler = Callable[[HttpRequest, str], Awaitable[bytes]]
_UNDECIDED, _WEBSOCKET, _POST = 0, 1, 2
# Answers being computed: the loop keeps only weak references to tasks.
_post_tasks: set[asyncio.Task[None]] = set()


class RecordingProtocol(asyncio.BufferedProtocol):
    """Forwards everything to picows' protocol, keeping a copy of the bytes read so far;
    or, for a ``POST``, reads and answers the request itself."""

    __slots__ = ("_answered", "_deadline", "_inner", "_last_buffer", "_mode", "_own_buffer", "_parser",
                 "_post_handler", "_post_timeout_s", "_recorded", "_registry", "transport")

    def __init__(self, inner: Any, registry: dict[Any, RecordingProtocol], post_handler: PostHandler | None = None,
                 post_timeout_s: float = 5.0) -> None:
        self._inner = inner
        self._registry = registry
        self._recorded = bytearray()
        self._last_buffer: memoryview | None = None
        self.transport: asyncio.Transport | None = None
        self._post_handler = post_handler
        self._post_timeout_s = post_timeout_s
        self._mode = _UNDECIDED if post_handler is not None else _WEBSOCKET
        self._parser: RequestParser | None = None
        self._own_buffer: bytearray | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._registry[transport] = self
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.pop(self.transport, None)
        if self._mode == _POST:
            if self._deadline is not None:
                self._deadline.cancel()
            return  # picows was let go when the POST began
        self._inner.connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._own_buffer is not None:
            return memoryview(self._own_buffer)
        self._last_buffer = self._inner.get_buffer(sizehint)
        return self._last_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._mode == _POST:
            assert self._own_buffer is not None
            self._feed_post(bytes(self._own_buffer[:nbytes]))
            return
        if self._last_buffer is not None and len(self._recorded) < MAX_RECORDED:
            self._recorded += self._last_buffer[:nbytes]
        self._last_buffer = None
        if self._mode == _WEBSOCKET:
            self._inner.buffer_updated(nbytes)
            return
        self._decide(nbytes)

    def eof_received(self) -> bool | None:
        if self._mode == _POST:
            if self._answered:
                return False  # the client read the answer and closed: close too
            # A half-closed client still reads its answer: keep the socket open for it.
            if self._parser is not None and self._parser.request is None:
                self._answer(error_response(400, HttpErrorCode.BAD_REQUEST,
                                            "the connection ended before the whole request arrived"))
            return True
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._mode != _POST:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._mode != _POST:
            self._inner.resume_writing()

    def leftover(self) -> bytes:
        """The bytes read past the end of the HTTP handshake."""
        end = self._recorded.find(HANDSHAKE_END)
        return bytes(self._recorded[end + len(HANDSHAKE_END) :]) if end >= 0 else b""

    # -- the first bytes decide --
    def _decide(self, nbytes: int) -> None:
        if self._recorded.startswith(POST_LINE):
            self._start_post()
            return
        if len(self._recorded) < len(POST_LINE) and POST_LINE.startswith(self._recorded):
            return  # "PO": wait for more before picows sees anything
        self._mode = _WEBSOCKET
        if len(self._recorded) == nbytes:
            self._inner.buffer_updated(nbytes)  # the usual case: picows' buffer already holds them
            return
        # A held "POS" prefix: picows' buffer holds only the newest read, so give it all again.
        data = memoryview(bytes(self._recorded))
        while data:
            buf = self._inner.get_buffer(-1)
            n = min(len(buf), len(data))
            if n == 0:
                break
            buf[:n] = data[:n]
            self._inner.buffer_updated(n)
            data = data[n:]

    # -- POST /streams/{id}/comments --
    def _start_post(self) -> None:
        self._mode = _POST
        self._registry.pop(self.transport, None)
        self._inner.connection_lost(None)  # picows lets go: its handshake timer and state
        self._own_buffer = bytearray(POST_READ_BUFFER)
        self._parser = RequestParser()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._post_timeout_s, self._post_timed_out)
        recorded, self._recorded = bytes(self._recorded), bytearray()
        self._feed_post(recorded)

    def _feed_post(self, data: bytes) -> None:
        assert self._parser is not None and self.transport is not None
        if self._parser.request is not None or self._answered:
            return  # bytes after the request, or after an answer: dropped
        try:
            request = self._parser.feed(data)
        except HttpError as exc:
            self._answer(error_response(exc.status, exc.code, exc.reason))
            return
        if self._parser.take_continue():
            self.transport.write(CONTINUE)
        if request is None:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self.transport.pause_reading()
        peer = self.transport.get_extra_info("peername")
        task = asyncio.ensure_future(self._respond(request, peer[0] if peer else ""))
        _post_tasks.add(task)
        task.add_done_callback(_post_tasks.discard)

    async def _respond(self, request: HttpRequest, ip: str) -> None:
        assert self._post_handler is not None
        try:
            response = await self._post_handler(request, ip)
        except Exception:
            log.exception("POST %s failed", request.target[:80])
            response = error_response(500, HttpErrorCode.INTERNAL_ERROR, "internal error; the comment was not posted")
        self._answer(response)

    def _post_timed_out(self) -> None:
        self._deadline = None
        self._answer(error_response(408, HttpErrorCode.REQUEST_TIMEOUT, "the request did not arrive in time"))

    def _answer(self, response: bytes) -> None:
        """Write the whole response, then close gracefully.

        Closing a socket with unread bytes in it sends a reset that can destroy the answer
        before the client reads it (an early 413 while the body still arrives), so: send
        the answer and a FIN, drop whatever still comes, and close when the client does
        (or after the linger time).
        """
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        transport = self.transport
        if self._answered or transport is None or transport.is_closing():
            return
        self._answered = True
        transport.write(response)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._deadline = asyncio.get_running_loop().call_later(POST_LINGER_S, transport.close)


def picows_protocol_factory(listener_factory: Callable[[Any], Any], registry: dict[Any, RecordingProtocol], *,
                            handshake_timeout_s: float, max_frame_size: int, logger: Any,
                            post_handler: PostHandler | None = None) -> Callable[[], Any]:
    """Protocols as ``picows.ws_create_server`` builds them, each behind a recorder.

    The positional arguments mirror picows 2.3's ``ws_create_server`` (api.py); pyproject
    pins picows to that minor version for this reason. With ``post_handler`` the recorders
    answer ``POST`` requests (whole within ``handshake_timeout_s``) through it.
    """

    def factory() -> RecordingProtocol:
        inner = WSProtocol(
            None, None, False, listener_factory, logger,
            True,  # disconnect_on_exception
            handshake_timeout_s,
            False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,  # auto ping off: the hub pings after the hand-off
            True,  # auto pong while picows still owns the socket
            max_frame_size,
            None,  # extra headers
            2048,  # read buffer: handshakes are small, and the buffer dies at the hand-off
        )
        return RecordingProtocol(inner, registry, post_handler, handshake_timeout_s)

    return factory


def detach_socket(transport: asyncio.Transport) -> int:
    """A duplicate of the transport's fd; aborting the transport then closes only uvloop's."""
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    transport.abort()
    return fd
