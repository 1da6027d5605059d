"""The pure-Python hub: the reference implementation of native/HUB.md.

It owns viewer sockets after the upgrade, in the event-loop thread: an epoll set of its own,
client frames parsed with the pure codec, one buffer per flush per encoding variant written
to every viewer of a stream, bounded backlogs, heartbeats and closes. The C++ hub
(``chorus.native._hub``) behaves the same way at production scale; the parity tests run the
same cases against both.

Python has no timerfd before 3.13, so this twin reports its next deadline through
``next_timeout_ms()`` and the gateway wakes it with a loop timer.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import msgpack
from chorus.native import codec_pure as codec  # the twin of the C++ hub's own parser

__all__ = ["CLOSED", "DEFLATE", "JSON", "MESSAGE_BINARY", "MESSAGE_TEXT", "MSGPACK", "Hub"]

JSON, MSGPACK, DEFLATE = 0, 1, 2
MESSAGE_TEXT, MESSAGE_BINARY, CLOSED = 1, 2, 3

READ_CHUNK = 65536
CLOSE_LINGER_S = 2.0
HEARTBEAT_SWEEP_S = 1.0
_EMPTY_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: stripped after compressing, re-added to inflate


def deflate_message(data: bytes, level: int, window_bits: int) -> bytes:
    """One message compressed with no context takeover (RFC 7692 7.2.1)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(_EMPTY_TAIL) else out


def inflate_message(data: bytes, limit: int) -> bytes:
    """Inflate one client message; over ``limit`` bytes raises ProtocolError(1009)."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data + _EMPTY_TAIL, limit + 1)
    except zlib.error as exc:
        raise codec.ProtocolError(codec.CLOSE_INVALID_DATA, f"bad deflate data: {exc}") from None
    if len(out) > limit:
        raise codec.ProtocolError(codec.CLOSE_TOO_BIG, "inflated message too big")
    return out


def window_bits(variant: int, default: int = 15) -> int:
    """The LZ77 window a deflate viewer allows the server (HUB.md: bits 4-7; 0: the default)."""
    return min((variant >> 4) & 0xF or default, default)


@dataclass(slots=True)
class _Conn:
    id: int  # (generation << 32) | fd
    fd: int
    sock: socket.socket
    stream: int
    variant: int
    tag: bytes
    parser: codec.FrameParser
    last_rx: float
    backlog: deque[memoryview] = field(default_factory=deque)
    backlog_bytes: int = 0
    skipped: int = 0
    slow_since: float = 0.0
    ping_sent_at: float = 0.0
    closing_since: float = 0.0  # close frame sent; waiting for the peer or the linger deadline
    close_code: int = 1006


@dataclass(slots=True)
class _Stream:
    viewers: set[int] = field(default_factory=set)
    pending: list[tuple[tuple[bytes | None, bytes | None], bool, int]] = field(default_factory=list)
    deadline: float = 0.0


class Hub:
    def __init__(self, *, flush_interval_ms: int = 10, flush_max_messages: int = 100,
                 backlog_limit_bytes: int = 65536, slow_close_after_ms: int = 10000,
                 max_message_bytes: int = 65536, max_fragments: int = 64,
                 heartbeat_interval_ms: int = 60000, heartbeat_timeout_ms: int = 30000,
                 deflate_level: int = 6, deflate_window_bits: int = 15,
                 inflate_limit_bytes: int = 65536) -> None:
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_max_messages = flush_max_messages
        self.backlog_limit_bytes = backlog_limit_bytes
        self.slow_close_after_s = slow_close_after_ms / 1000
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max_fragments
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000
        self.heartbeat_timeout_s = heartbeat_timeout_ms / 1000
        self.deflate_level = deflate_level
        self.deflate_window_bits = deflate_window_bits
        self.inflate_limit_bytes = inflate_limit_bytes
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._streams: dict[int, _Stream] = {}
        self._events: list[tuple[int, int, int, bytes, bytes]] = []
        self._generation: dict[int, int] = {}
        self._next_sweep = time.monotonic() + HEARTBEAT_SWEEP_S
        self._stats = dict.fromkeys(
            ("flushes", "writes", "bytes_out", "frames_built", "skipped", "slow_closed", "pings_sent",
             "timeouts", "protocol_errors", "partial_writes"), 0)

    # -- bookkeeping --
    def fileno(self) -> int:
        return self._ep.fileno()

    def connections(self) -> int:
        return len(self._conns)

    def viewer_count(self, stream: int) -> int:
        s = self._streams.get(stream)
        return len(s.viewers) if s else 0

    def variants(self, stream: int) -> int:
        s = self._streams.get(stream)
        mask = 0
        for fd in s.viewers if s else ():
            mask |= 1 << (self._conns[fd].variant & 3)
        return mask

    def stats(self) -> dict[str, int]:
        return {**self._stats, "connections": len(self._conns), "streams": len(self._streams),
                "conn_slot_bytes": 0}

    def next_timeout_ms(self) -> int:
        """Milliseconds until the earliest flush deadline or heartbeat sweep."""
        deadlines = [s.deadline for s in self._streams.values() if s.pending]
        if self._conns:
            deadlines.append(self._next_sweep)
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    # -- connections --
    def _find(self, conn_id: int) -> _Conn | None:
        conn = self._conns.get(conn_id & 0xFFFFFFFF)
        return conn if conn is not None and conn.id == conn_id else None

    def adopt(self, fd: int, stream: int, variant: int, leftover: bytes = b"", tag: bytes = b"") -> int:
        """Own ``fd`` from now on; returns the connection id."""
        gen = self._generation.get(fd, 0) + 1
        self._generation[fd] = gen
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        parser = codec.FrameParser(max_message_size=self.max_message_bytes, max_fragments=self.max_fragments,
                                   allow_rsv1=bool(variant & DEFLATE))
        conn = _Conn((gen << 32) | fd, fd, sock, stream, variant, tag, parser, time.monotonic())
        self._conns[fd] = conn
        self._streams.setdefault(stream, _Stream()).viewers.add(fd)
        self._ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        if leftover:
            self._on_bytes(conn, leftover)
        return conn.id

    def _leave_stream(self, conn: _Conn) -> None:
        s = self._streams.get(conn.stream)
        if s is None:
            return
        s.viewers.discard(conn.fd)
        if not s.viewers:
            del self._streams[conn.stream]

    def close(self, conn_id: int, code: int, reason: str = "") -> None:
        conn = self._find(conn_id)
        if conn is not None and not conn.closing_since:
            self._start_close(conn, code, reason)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self._conns.values()):
            if not conn.closing_since:
                self._start_close(conn, code, reason)

    def _start_close(self, conn: _Conn, code: int, reason: str, reported: int | None = None) -> None:
        """Send the close frame, leave the stream, report CLOSED; the fd lingers until EOF."""
        self._write(conn, codec.encode_close(code, reason), control=True)
        conn.closing_since = time.monotonic()
        conn.close_code = code if reported is None else reported
        self._leave_stream(conn)
        self._events.append((CLOSED, conn.id, conn.stream, conn.close_code.to_bytes(2, "big"), conn.tag))
        if not conn.backlog:  # else shut down once the backlog drains
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._destroy(conn)

    def _destroy(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if not conn.closing_since:
            self._leave_stream(conn)
            self._events.append((CLOSED, conn.id, conn.stream, conn.close_code.to_bytes(2, "big"), conn.tag))
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(conn.fd)
        conn.sock.close()

    # -- writing --
    def _frame(self, conn: _Conn, payload: bytes, binary: bool | None = None) -> bytes:
        if binary is None:
            binary = conn.variant & 1 == MSGPACK
        opcode = codec.OP_BINARY if binary else codec.OP_TEXT
        if conn.variant & DEFLATE:
            return codec.encode_frame(opcode, self._deflate(payload, conn.variant), rsv1=True)
        return codec.encode_frame(opcode, payload)

    def _deflate(self, payload: bytes, variant: int) -> bytes:
        return deflate_message(payload, self.deflate_level, window_bits(variant, self.deflate_window_bits))

    def send(self, conn_id: int, payload: bytes, binary: bool | None = None) -> bool:
        """One event to one viewer, in its variant's opcode unless ``binary`` says otherwise."""
        conn = self._find(conn_id)
        if conn is None or conn.closing_since:
            return False
        self._write(conn, self._frame(conn, payload, binary), control=True)
        return True

    def _write(self, conn: _Conn, data: bytes, control: bool = False) -> None:
        """Send now if nothing is queued; keep what the kernel did not take."""
        view = memoryview(data)
        if not conn.backlog:
            try:
                sent = conn.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._destroy(conn)
                return
            self._stats["writes"] += 1
            self._stats["bytes_out"] += sent
            if sent == len(view):
                return
            self._stats["partial_writes"] += 1
            view = view[sent:]
            self._ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)
        conn.backlog.append(view)
        conn.backlog_bytes += len(view)

    def _drain_backlog(self, conn: _Conn) -> None:
        while conn.backlog:
            head = conn.backlog[0]
            try:
                sent = conn.sock.send(head, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            except OSError:
                self._destroy(conn)
                return
            self._stats["bytes_out"] += sent
            conn.backlog_bytes -= sent
            if sent < len(head):
                conn.backlog[0] = head[sent:]
                return
            conn.backlog.popleft()
        self._ep.modify(conn.fd, select.EPOLLIN | select.EPOLLRDHUP)
        if conn.closing_since:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._destroy(conn)

    # -- publishing --
    def publish(self, stream: int, payloads: tuple[bytes | None, bytes | None], control: bool, count: int) -> None:
        s = self._streams.get(stream)
        if s is None:
            return
        if not s.pending:
            s.deadline = time.monotonic() + self.flush_interval_s
        s.pending.append((payloads, control, count))
        if len(s.pending) >= self.flush_max_messages:
            self._flush_stream(stream, s)

    def publish_many(self, items: list[tuple[int, tuple[bytes | None, bytes | None], bool, int]]) -> None:
        for stream, payloads, control, count in items:
            self.publish(stream, payloads, control, count)

    def flush(self) -> None:
        for stream, s in list(self._streams.items()):
            if s.pending:
                self._flush_stream(stream, s)

    def _build(self, pending: list[tuple[tuple[bytes | None, bytes | None], bool, int]],
               variant: int, control_only: bool) -> bytes:
        """One buffer of frames for one variant: built once per flush, shared by every viewer."""
        opcode = codec.OP_TEXT if variant & 1 == JSON else codec.OP_BINARY
        frames = []
        for payloads, control, _count in pending:
            if control_only and not control:
                continue
            payload = payloads[variant & 1]
            if payload is None:
                raise ValueError(f"publish lacks the payload of variant {variant & 1} that a viewer uses")
            if variant & DEFLATE:
                frames.append(codec.encode_frame(opcode, self._deflate(payload, variant), rsv1=True))
            else:
                frames.append(codec.encode_frame(opcode, payload))
        self._stats["frames_built"] += 1
        return b"".join(frames)

    def _skipped_frame(self, conn: _Conn) -> bytes:
        event = {"t": "skipped", "count": conn.skipped}
        if conn.variant & 1 == JSON:
            return self._frame(conn, json.dumps(event, separators=(",", ":")).encode())
        return self._frame(conn, msgpack.packb(event))

    def _flush_stream(self, stream: int, s: _Stream) -> None:
        pending, s.pending = s.pending, []
        self._stats["flushes"] += 1
        built: dict[tuple[int, bool], bytes] = {}
        comments = sum(count for _p, control, count in pending if not control)
        has_control = any(control for _p, control, _c in pending)
        now = time.monotonic()
        for fd in list(s.viewers):
            conn = self._conns[fd]
            slow = conn.backlog_bytes > self.backlog_limit_bytes
            if slow:
                if not conn.slow_since:
                    conn.slow_since = now
                elif now - conn.slow_since > self.slow_close_after_s:
                    self._stats["slow_closed"] += 1
                    self._start_close(conn, 4008, "too slow: reconnect and resume")
                    continue
                conn.skipped += comments
                self._stats["skipped"] += comments
                if not has_control:
                    continue
            key = (conn.variant, slow)
            data = built.get(key)
            if data is None:
                data = built[key] = self._build(pending, conn.variant, slow)
            if not slow and conn.skipped:
                data = self._skipped_frame(conn) + data
                conn.skipped = 0
            if not slow:
                conn.slow_since = 0.0
            self._write(conn, data)

    # -- reading --
    def _on_bytes(self, conn: _Conn, data: bytes) -> None:
        conn.last_rx = time.monotonic()
        conn.ping_sent_at = 0.0
        if conn.closing_since:
            return  # RFC 6455 5.5.1: after sending close we only wait for the peer's close/EOF
        try:
            messages = conn.parser.feed(data)
        except codec.ProtocolError as exc:
            self._stats["protocol_errors"] += 1
            self._start_close(conn, exc.close_code, exc.reason)
            return
        for opcode, payload in messages:
            if conn.closing_since:
                return
            self._on_message(conn, opcode & 0x0F, payload, bool(opcode & codec.COMPRESSED))

    def _on_message(self, conn: _Conn, opcode: int, payload: bytes, compressed: bool) -> None:
        if opcode == codec.OP_PING:
            self._write(conn, codec.encode_frame(codec.OP_PONG, payload), control=True)
        elif opcode == codec.OP_PONG:
            pass
        elif opcode == codec.OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            self._start_close(conn, code if len(payload) >= 2 else 1000, "")
        else:
            if compressed:
                try:
                    payload = inflate_message(payload, self.inflate_limit_bytes)
                    if opcode == codec.OP_TEXT and not codec.validate_utf8(payload):
                        raise codec.ProtocolError(codec.CLOSE_INVALID_DATA, "text is not UTF-8")
                except codec.ProtocolError as exc:
                    self._stats["protocol_errors"] += 1
                    self._start_close(conn, exc.close_code, exc.reason)
                    return
            kind = MESSAGE_TEXT if opcode == codec.OP_TEXT else MESSAGE_BINARY
            self._events.append((kind, conn.id, conn.stream, payload, conn.tag))

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._destroy(conn)
            return
        if not data:
            self._destroy(conn)
            return
        self._on_bytes(conn, data)

    # -- the loop's entry points --
    def poll(self) -> None:
        for fd, mask in self._ep.poll(0):
            conn = self._conns.get(fd)
            if conn is None:
                continue
            if mask & select.EPOLLOUT:
                self._drain_backlog(conn)
            if fd in self._conns and mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                self._on_readable(conn)
        now = time.monotonic()
        for stream, s in list(self._streams.items()):
            if s.pending and s.deadline <= now:
                self._flush_stream(stream, s)
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Heartbeats, and closes that lingered past their deadline."""
        self._next_sweep = now + HEARTBEAT_SWEEP_S
        for conn in list(self._conns.values()):
            if conn.closing_since:
                if now - conn.closing_since > CLOSE_LINGER_S:
                    self._destroy(conn)
            elif conn.ping_sent_at and now - conn.ping_sent_at > self.heartbeat_timeout_s:
                self._stats["timeouts"] += 1
                self._start_close(conn, 1001, "heartbeat timeout", reported=1006)
            elif not conn.ping_sent_at and now - conn.last_rx > self.heartbeat_interval_s:
                conn.ping_sent_at = now
                self._stats["pings_sent"] += 1
                self._write(conn, codec.encode_frame(codec.OP_PING, b""), control=True)

    def drain(self) -> list[tuple[int, int, int, bytes, bytes]]:
        events, self._events = self._events, []
        return events

    def shutdown(self) -> None:
        """Close every socket at once and the epoll fd (process exit, tests)."""
        for conn in list(self._conns.values()):
            self._destroy(conn)
        self._ep.close()

