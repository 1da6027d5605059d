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
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

__all__ = ["HANDSHAKE_END", "RecordingProtocol", "detach_socket", "picows_protocol_factory"]

HANDSHAKE_END = b"\r\n\r\n"
# The most a client may send before its handshake completes; past it we stop recording
# (picows refuses handshakes that large anyway).
MAX_RECORDED = 65536


class RecordingProtocol(asyncio.BufferedProtocol):
    """Forwards everything to picows' protocol, keeping a copy of the bytes read so far."""

    __slots__ = ("_inner", "_last_buffer", "_recorded", "_registry", "transport")

    def __init__(self, inner: Any, registry: dict[Any, RecordingProtocol]) -> None:
        self._inner = inner
        self._registry = registry
        self._recorded = bytearray()
        self._last_buffer: memoryview | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._registry[transport] = self
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.pop(self.transport, None)
        self._inner.connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        self._last_buffer = self._inner.get_buffer(sizehint)
        return self._last_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._last_buffer is not None and len(self._recorded) < MAX_RECORDED:
            self._recorded += self._last_buffer[:nbytes]
        self._last_buffer = None
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def leftover(self) -> bytes:
        """The bytes read past the end of the HTTP handshake."""
        end = self._recorded.find(HANDSHAKE_END)
        return bytes(self._recorded[end + len(HANDSHAKE_END) :]) if end >= 0 else b""


def picows_protocol_factory(listener_factory: Callable[[Any], Any], registry: dict[Any, RecordingProtocol], *,
                            handshake_timeout_s: float, max_frame_size: int, logger: Any) -> Callable[[], Any]:
    """Protocols as ``picows.ws_create_server`` builds them, each behind a recorder.

    The positional arguments mirror picows 2.3's ``ws_create_server`` (api.py); pyproject
    pins picows to that minor version for this reason.
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
        return RecordingProtocol(inner, registry)

    return factory


def detach_socket(transport: asyncio.Transport) -> int:
    """A duplicate of the transport's fd; aborting the transport then closes only uvloop's."""
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    transport.abort()
    return fd
