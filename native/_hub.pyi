"""Type stubs for the compiled ``chorus.native._hub`` (C++, pybind11); the contract is HUB.md.

Connection ids are ``(generation << 32) | fd``; a stale id (its fd closed and reused) makes
``send`` return False and ``close`` do nothing. Not thread-safe: use one hub from one thread
(the event loop's); ``poll``, ``flush`` and the publish/send/close calls release the GIL.
"""

from collections.abc import Iterable
from typing import Final

__all__ = ["CLOSED", "DEFLATE", "JSON", "MESSAGE_BINARY", "MESSAGE_TEXT", "MSGPACK", "Hub"]

JSON: Final[int]  # text frames
MSGPACK: Final[int]  # binary frames
DEFLATE: Final[int]  # OR-ed in: permessage-deflate; bits 4-7 = server window bits (0: 15)
MESSAGE_TEXT: Final[int]
MESSAGE_BINARY: Final[int]
CLOSED: Final[int]

_Payloads = tuple[bytes | None, bytes | None]

class Hub:
    def __init__(
        self,
        *,
        flush_interval_ms: int = 10,
        flush_max_messages: int = 100,
        backlog_limit_bytes: int = 65536,
        slow_close_after_ms: int = 10000,
        max_message_bytes: int = 65536,
        max_fragments: int = 64,
        heartbeat_interval_ms: int = 60000,
        heartbeat_timeout_ms: int = 30000,
        deflate_level: int = 6,
        deflate_window_bits: int = 15,
        inflate_limit_bytes: int = 65536,
        max_pings_per_s: int = 20,
    ) -> None: ...
    def fileno(self) -> int: ...
    def adopt(self, fd: int, stream: int, variant: int, leftover: bytes = b"", tag: bytes = b"") -> int:
        """Own ``fd``; return its connection id. ValueError leaves the fd untouched; OSError
        (fcntl/epoll failed) means the hub already closed it."""
    def publish(self, stream: int, payloads: _Payloads, control: bool, count: int) -> None: ...
    def publish_many(self, items: Iterable[tuple[int, _Payloads, bool, int]]) -> None: ...
    def variants(self, stream: int) -> int: ...
    def send(self, conn: int, payload: bytes, binary: bool | None = None) -> bool:
        """One event to one viewer in its variant's opcode, unless ``binary`` says otherwise."""
    def close(self, conn: int, code: int, reason: str = "") -> None: ...
    def poll(self) -> None: ...
    def next_timeout_ms(self) -> int:
        """Always -1: the hub's timerfd makes fileno() readable when a deadline is due."""
    def flush(self) -> None: ...
    def drain(self) -> list[tuple[int, int, int, bytes, bytes]]: ...
    def viewer_count(self, stream: int) -> int: ...
    def pending(self, stream: int) -> int:
        """Events of ``stream`` waiting for its next flush (0: everything published went out)."""
    def backlog(self, conn: int) -> int:
        """Unsent bytes of one open connection; -1 for an unknown, stale or closing id."""
    def connections(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close_all(self, code: int, reason: str = "") -> None:
        """Flush what is pending, then close every open connection with ``code``."""
    def shutdown(self) -> None:
        """Close every socket now (CLOSED 1006 for open ones) and the epoll fd; the hub is
        unusable afterwards."""
