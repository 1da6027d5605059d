"""The pure-Python hub: the twin of the C++ hub (``chorus.native._hub``), per native/HUB.md.

It owns viewer sockets after the upgrade, in the event-loop thread: an epoll set of its own,
client frames parsed with the pure codec, one buffer per flush per encoding variant written
to every viewer of a stream, bounded backlogs, heartbeats and closes. It follows hub.cpp step
by step (the function names match), so tests/test_hub.py runs every case against both.

Python has no timerfd before 3.13, so this twin reports its next deadline through
``next_timeout_ms()`` and the caller polls again when it is due.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import select
import socket
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack

from . import codec_pure as codec  # the twin of the C++ hub's own parser (relative: mypy follows it)

__all__ = ["CLOSED", "DEFLATE", "JSON", "MESSAGE_BINARY", "MESSAGE_TEXT", "MSGPACK", "Hub"]

JSON, MSGPACK, DEFLATE = 0, 1, 2
# HUB.md "permessage-deflate": smaller messages go uncompressed (RFC 7692 6 leaves it to the
# sender) since compressing an ack or a count costs more than the bytes it saves.
DEFLATE_MIN_BYTES = 256


def _compressed(variant: int, size: int) -> bool:
    return bool(variant & DEFLATE) and size >= DEFLATE_MIN_BYTES
MESSAGE_TEXT, MESSAGE_BINARY, CLOSED = 1, 2, 3

READ_CHUNK = 65536  # one recv per ready socket per poll
MAX_EVENTS = 1024  # sockets handled per poll; the rest stay ready (level-triggered)
MAX_IOV = 64  # backlog slices per sendmsg
CLOSE_LINGER_S = 2.0
SWEEP_S = 1.0  # heartbeats, stuck slow viewers and lingering closes are checked this often
HARD_BACKLOG_FACTOR = 8  # a backlog over 8 x the limit + 1 MiB closes with 4008 at once
HARD_BACKLOG_EXTRA = 1 << 20
CLOSE_NORMAL, CLOSE_ABNORMAL, CLOSE_POLICY = 1000, 1006, 1008
_EMPTY_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: stripped after compressing, re-added to inflate
_PING = codec.encode_frame(codec.OP_PING, b"")  # HUB.md: heartbeat pings are empty
_HEARTBEAT_CLOSE = codec.encode_close(1001, "heartbeat timeout")
_SLOW_CLOSE = codec.encode_close(4008, "too slow: reconnect and resume")

Event = tuple[int, int, int, bytes, bytes]  # (kind, conn, stream, data, tag), see drain()
Payloads = tuple[bytes | None, bytes | None]


def deflate_message(data: bytes, level: int, window_bits: int) -> bytes:
    """One message compressed with no context takeover (RFC 7692 7.2.1)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(_EMPTY_TAIL) else out


def inflate_message(data: bytes, limit: int) -> bytes:
    """Inflate one client message; over ``limit`` bytes raises ProtocolError(1009).

    Window 15 accepts any client_max_window_bits (RFC 7692 7.1.2.2). Output stops one byte past
    the limit, so a bomb costs at most that whatever its ratio.
    """
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data + _EMPTY_TAIL, limit + 1)
    except zlib.error:
        raise codec.ProtocolError(codec.CLOSE_INVALID_DATA, "bad deflate data") from None
    if len(out) > limit:
        raise codec.ProtocolError(codec.CLOSE_TOO_BIG, "inflated message too big")
    return out


def normalised_variant(variant: int, deflate_window_bits: int) -> int:
    """The variant as the hub keeps it, or ValueError (HUB.md "Identifiers").

    A deflate variant always carries its window, min(the viewer's, the hub's), so viewers with
    equal encodings share one buffer per flush; zlib has no raw 8-bit window, so 1-8 is refused.
    """
    bits = variant >> 4
    if not 0 <= variant <= 0xFF or variant & 0x0C or 0 < bits < 9:
        raise ValueError("bad variant")
    if not variant & DEFLATE:
        return variant & 1
    return variant & 3 | min(bits or 15, deflate_window_bits) << 4


class _Parser(codec.FrameParser):
    """codec_pure's parser, plus the two things the hub needs that its public API lacks."""

    def feed_until_error(self, data: bytes) -> tuple[list[tuple[int, bytes]], codec.ProtocolError | None]:
        """Like feed(), but keep what was completed before a protocol error.

        The C++ parser hands each message to the hub as it completes, so those messages are
        delivered even when a later frame of the same read is bad; feed() drops them with its
        exception, and codec_pure is shared with the codec twin, so it stays as it is. _parse
        appends to ``out`` as it goes: catching the error here keeps exactly the messages before
        it, with no re-parsing. This leans on FrameParser's internals (_parse, _buf, _fail,
        _error); the reference-parser cases of tests/test_hub.py catch a change there.
        """
        if self._error is not None:
            return [], self._error
        self._buf += data
        out: list[tuple[int, bytes]] = []
        try:
            consumed = self._parse(self._buf, out)
        except codec.ProtocolError as exc:
            self._fail(exc)
            return out, exc
        del self._buf[:consumed]
        return out, None

    def idle(self) -> bool:
        """No partial frame or fragmented message is held (stats: held_read_buffers)."""
        return self._remaining < 0 and not self._msg_opcode and not self._buf


class _Ending(NamedTuple):
    """Why a read ends the connection: a protocol violation or the client's close."""

    code: int
    reason: str
    protocol_error: bool


class _Outbound(NamedTuple):
    payloads: Payloads  # (JSON text, msgpack)
    control: bool  # never skipped for slow viewers
    comments: int  # carried by a batch


@dataclass(slots=True, eq=False)
class _Conn:
    id: int  # (generation << 32) | fd
    fd: int
    sock: socket.socket
    stream: int
    variant: int  # normalised_variant()
    tag: bytes
    parser: _Parser
    last_rx: float
    backlog: deque[memoryview] = field(default_factory=deque)  # unsent slices of shared buffers
    backlog_bytes: int = 0
    head_started: bool = False  # the first backlog slice is a frame already partly sent
    want_out: bool = False  # EPOLLOUT armed: only while there is a backlog
    skipped: int = 0  # comments skipped while slow, reported by the next marker
    slow_since: float | None = None  # the backlog is over the limit since then
    ping_sent_at: float | None = None
    closing_since: float | None = None  # None: open; else the close began then (HUB.md "Close")
    shut_wr: bool = False
    pings: int = 0  # pings answered since the last sweep


@dataclass(slots=True)
class _Stream:
    viewers: set[int] = field(default_factory=set)  # fds of its open connections
    pending: list[_Outbound] = field(default_factory=list)
    deadline: float = 0.0  # when the pending events must go out
    last_flush: float = -math.inf  # one flush per interval


class _FlushFrames:
    """The buffers of one flush, built on first use per (variant, control-only) and shared by
    every viewer that needs them; a deflated variant compresses each event once."""

    def __init__(self, hub: Hub, events: list[_Outbound]) -> None:
        self._hub = hub
        self._events = events
        self._built: dict[tuple[int, bool], bytes | None] = {}
        self.frames: dict[tuple[int, bool], int] = {}  # events in each built buffer (stats: messages_out)
        self._deflated: dict[tuple[int, int], bytes] = {}  # (variant, event index) -> compressed

    def get(self, variant: int, control_only: bool) -> bytes | None:
        """None when no event of the flush has a frame for this viewer."""
        key = (variant, control_only)
        if key not in self._built:
            self._built[key] = self._build(variant, control_only)
        return self._built[key]

    def _build(self, variant: int, control_only: bool) -> bytes | None:
        opcode = codec.OP_BINARY if variant & 1 else codec.OP_TEXT
        frames = [
            codec.encode_frame(opcode, self._payload(i, variant),
                               rsv1=_compressed(variant, len(e.payloads[variant & 1] or b"")))
            for i, e in enumerate(self._events)
            # an encoding published as None: no viewer used it then, one that joined since skips it
            if e.payloads[variant & 1] is not None and (e.control or not control_only)
        ]
        self.frames[variant, control_only] = len(frames)
        if not frames:
            return None
        self._hub._stats["frames_built"] += 1
        return b"".join(frames)

    def _payload(self, i: int, variant: int) -> bytes:
        raw = self._events[i].payloads[variant & 1]
        assert raw is not None
        if not _compressed(variant, len(raw)):
            return raw
        if (variant, i) not in self._deflated:
            self._deflated[variant, i] = self._hub._deflate(variant, raw)
        return self._deflated[variant, i]


def _check_config(values: dict[str, int]) -> None:
    """The C++ hub's limits, with its messages: ValueError before any fd exists."""
    rules = {
        "flush_interval_ms": (0, None), "flush_max_messages": (1, None), "backlog_limit_bytes": (0, None),
        "slow_close_after_ms": (0, None), "max_message_bytes": (0, None), "max_fragments": (1, None),
        "heartbeat_interval_ms": (0, None), "heartbeat_timeout_ms": (0, None), "deflate_level": (-1, 9),
        "deflate_window_bits": (9, 15), "inflate_limit_bytes": (1, 1 << 30), "max_pings_per_s": (0, 250),
    }
    for name, (low, high) in rules.items():
        if values[name] < low or (high is not None and values[name] > high):
            raise ValueError(f"{name} must be {low}..{high}" if high is not None else f"{name} must be >= {low}")


class Hub:
    def __init__(self, *, flush_interval_ms: int = 10, flush_max_messages: int = 100,
                 backlog_limit_bytes: int = 65536, slow_close_after_ms: int = 10000,
                 max_message_bytes: int = 65536, max_fragments: int = 64,
                 heartbeat_interval_ms: int = 60000, heartbeat_timeout_ms: int = 30000,
                 deflate_level: int = 6, deflate_window_bits: int = 15,
                 inflate_limit_bytes: int = 65536, max_pings_per_s: int = 20) -> None:
        _check_config(locals())  # first thing: locals() holds just self and the arguments
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_max_messages = flush_max_messages
        self.backlog_limit_bytes = backlog_limit_bytes
        self.slow_close_after_s = slow_close_after_ms / 1000
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max_fragments
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000  # 0: no heartbeat
        self.heartbeat_timeout_s = heartbeat_timeout_ms / 1000
        self.deflate_level = deflate_level
        self.deflate_window_bits = deflate_window_bits
        self.inflate_limit_bytes = inflate_limit_bytes
        self.max_pings_per_s = max_pings_per_s  # 0: no limit
        self._conns: dict[int, _Conn] = {}  # by fd: open and closing ones
        self._streams: dict[int, _Stream] = {}
        self._events: list[Event] = []
        self._generation: dict[int, int] = {}
        self._next_sweep = time.monotonic() + SWEEP_S
        self._stats = dict.fromkeys(
            ("flushes", "writes", "drain_writes", "bytes_out", "frames_built", "deflate_calls", "skipped",
             "slow_closed", "pings_sent", "timeouts", "protocol_errors", "partial_writes", "bytes_in",
             "messages_in", "inflate_calls", "messages_out", "comments_out"), 0)
        self._ep = select.epoll()

    def __del__(self) -> None:
        # Like the C++ destructor: close what still lingers, without events (nobody drains them).
        for conn in getattr(self, "_conns", {}).values():
            conn.sock.close()
        if hasattr(self, "_ep"):
            self._ep.close()

    # -- queries --
    def fileno(self) -> int:
        return -1 if self._ep.closed else self._ep.fileno()

    def connections(self) -> int:
        """Open connections; closing ones waiting out the linger are stats()["closing"]."""
        return sum(1 for c in self._conns.values() if c.closing_since is None)

    def viewer_count(self, stream: int) -> int:
        s = self._streams.get(stream)
        return len(s.viewers) if s else 0

    def pending(self, stream: int) -> int:
        """Events of ``stream`` waiting for its next flush (0: everything published went out)."""
        s = self._streams.get(stream)
        return len(s.pending) if s else 0

    def backlog(self, conn_id: int) -> int:
        """Unsent bytes of one open connection; -1 for an unknown, stale or closing id."""
        conn = self._find(conn_id)
        return conn.backlog_bytes if conn is not None else -1

    def variants(self, stream: int) -> int:
        s = self._streams.get(stream)
        mask = 0
        for fd in s.viewers if s else ():
            mask |= 1 << (self._conns[fd].variant & 3)
        return mask

    def stats(self) -> dict[str, int]:
        conns = self._conns.values()
        open_conns = [c for c in conns if c.closing_since is None]
        return {
            **self._stats,
            "connections": len(open_conns),
            "closing": len(conns) - len(open_conns),
            "streams": len(self._streams),
            "backlog_bytes": sum(c.backlog_bytes for c in conns),
            # As the C++ hub counts its heap: a closing connection has dropped its parser and tag.
            "held_read_buffers": sum(1 for c in open_conns if not c.parser.idle()),
            "held_backlogs": sum(1 for c in conns if c.backlog),
            "held_tags": sum(1 for c in open_conns if c.tag),
            "events_pending": len(self._events),
        }

    def next_timeout_ms(self) -> int:
        """Ms until poll() is due: the earliest flush deadline, or the next sweep while any
        connection exists; -1 if nothing is due. Rounded up, so a poll then finds it due."""
        deadlines = [s.deadline for s in self._streams.values() if s.pending]
        if self._conns:
            deadlines.append(self._next_sweep)
        if not deadlines or self._ep.closed:
            return -1
        return max(0, math.ceil((min(deadlines) - time.monotonic()) * 1000))

    def drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- connections --
    def adopt(self, fd: int, stream: int, variant: int, leftover: bytes = b"", tag: bytes = b"") -> int:
        """Own ``fd``; return its connection id. ValueError leaves the fd with the caller;
        OSError means the hub already closed it."""
        if self._ep.closed:
            raise ValueError("the hub is shut down")
        if fd < 0 or fd == self._ep.fileno():
            raise ValueError("not a viewer socket fd")
        variant = normalised_variant(variant, self.deflate_window_bits)
        if fd in self._conns:
            raise ValueError("fd is already adopted")
        sock = self._own(fd)
        gen = (self._generation.get(fd, 0) + 1) & 0xFFFFFFFF
        self._generation[fd] = gen
        parser = _Parser(max_message_size=self.max_message_bytes, max_fragments=self.max_fragments,
                         allow_rsv1=bool(variant & DEFLATE))
        conn = _Conn((gen << 32) | fd, fd, sock, stream, variant, bytes(tag or b""), parser, time.monotonic())
        self._conns[fd] = conn
        self._streams.setdefault(stream, _Stream()).viewers.add(fd)
        if leftover:
            self._on_bytes(conn, bytes(leftover))
        return conn.id

    def _own(self, fd: int) -> socket.socket:
        """A non-blocking socket object for ``fd``, registered for EPOLLIN; on OSError the fd
        is closed (adopt took ownership)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)  # the socket object never took it (ENOTSOCK, ...)
            raise
        try:
            sock.setblocking(False)
            self._ep.register(fd, select.EPOLLIN)
        except OSError:
            sock.close()
            raise
        with contextlib.suppress(OSError):  # small frames must not wait for Nagle; not on AF_UNIX
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _find(self, conn_id: int) -> _Conn | None:
        """The open connection with this id; a stale generation (the fd was reused) is None."""
        conn = self._conns.get(conn_id & 0xFFFFFFFF)
        return conn if conn is not None and conn.id == conn_id and conn.closing_since is None else None

    def _leave_stream(self, conn: _Conn) -> None:
        s = self._streams.get(conn.stream)
        if s is None:
            return
        s.viewers.discard(conn.fd)
        if not s.viewers:
            del self._streams[conn.stream]

    def _report_closed(self, conn: _Conn, code: int) -> None:
        self._events.append((CLOSED, conn.id, conn.stream, code.to_bytes(2, "big"), conn.tag))

    def close(self, conn_id: int, code: int, reason: str = "") -> None:
        frame = codec.encode_close(code, reason)  # ValueError for a code that may not be sent
        conn = self._find(conn_id)
        if conn is not None:
            self._begin_close(conn, frame, code)

    def close_all(self, code: int, reason: str = "") -> None:
        """Shutdown drain: what is pending goes out first, then every viewer gets the close."""
        frame = codec.encode_close(code, reason)
        self.flush()
        for conn in list(self._conns.values()):
            self._begin_close(conn, frame, code)

    def _begin_close(self, conn: _Conn, frame: bytes, reported: int) -> None:
        """Leave the stream and report CLOSED now; queue the close frame and shut down writing
        once it is out. The fd lingers until the peer's EOF or CLOSE_LINGER_S."""
        if conn.closing_since is not None:
            return
        self._leave_stream(conn)
        self._report_closed(conn, reported)
        conn.closing_since = time.monotonic()
        conn.ping_sent_at = conn.slow_since = None
        if self._enqueue(conn, [frame]) and not conn.backlog:
            self._shutdown_wr(conn)

    def _slow_close(self, conn: _Conn) -> None:
        self._stats["slow_closed"] += 1
        # The viewer cannot keep up: drop what it has not started to receive so the close
        # frame comes right after the frame in flight instead of behind a full backlog.
        self._drop_unstarted(conn)
        self._begin_close(conn, _SLOW_CLOSE, 4008)

    def _drop(self, conn: _Conn) -> None:
        """The peer went away (EOF, reset, write error): report 1006 if it was open; close now."""
        if conn.closing_since is None:
            self._leave_stream(conn)
            self._report_closed(conn, CLOSE_ABNORMAL)
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        del self._conns[conn.fd]
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(conn.fd)
        conn.sock.close()

    def _want_out(self, conn: _Conn, on: bool) -> None:
        """EPOLLOUT only while a backlog exists: the epoll set is level-triggered."""
        if conn.want_out != on:
            self._ep.modify(conn.fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))
            conn.want_out = on

    def _shutdown_wr(self, conn: _Conn) -> None:
        if not conn.shut_wr:
            with contextlib.suppress(OSError):  # the peer's EOF or the linger releases it anyway
                conn.sock.shutdown(socket.SHUT_WR)  # RFC 6455 7.1.1: the server closes TCP first
            conn.shut_wr = True

    def shutdown(self) -> None:
        """Close every socket at once (CLOSED 1006 for open ones) and the epoll fd."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._streams.clear()
        self._ep.close()

    # -- writing --
    def _enqueue(self, conn: _Conn, bufs: list[bytes]) -> bool:
        """Write now if nothing is queued (one sendmsg for all ``bufs``), else queue behind the
        backlog. False if the connection was released (the peer is gone)."""
        if conn.backlog:
            self._queue(conn, bufs, 0)
            self._check_backlog(conn)
            return self._conns.get(conn.fd) is conn
        self._stats["writes"] += 1
        try:
            sent = conn.sock.sendmsg(bufs, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return False
        self._stats["bytes_out"] += sent
        if sent == sum(len(b) for b in bufs):
            return True
        self._stats["partial_writes"] += 1
        self._queue(conn, bufs, sent)
        self._want_out(conn, True)
        self._check_backlog(conn)
        return self._conns.get(conn.fd) is conn

    def _queue(self, conn: _Conn, bufs: list[bytes], skip: int) -> None:
        """Append what is left of ``bufs`` after ``skip`` sent bytes: slices, never copies."""
        for buf in bufs:
            if skip >= len(buf):
                skip -= len(buf)
                continue
            if not conn.backlog:
                conn.head_started = skip > 0
            conn.backlog.append(memoryview(buf)[skip:])
            conn.backlog_bytes += len(buf) - skip
            skip = 0

    def _on_writable(self, conn: _Conn) -> None:
        if not conn.backlog:
            self._want_out(conn, False)
            return
        self._stats["drain_writes"] += 1
        try:
            sent = conn.sock.sendmsg(list(itertools.islice(conn.backlog, MAX_IOV)), (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        self._stats["bytes_out"] += sent
        self._consume(conn, sent)

    def _consume(self, conn: _Conn, n: int) -> None:
        """``n`` bytes of the backlog went out."""
        conn.backlog_bytes -= n
        while n:
            head = conn.backlog[0]
            if n < len(head):
                conn.backlog[0] = head[n:]
                conn.head_started = True
                break
            n -= len(head)
            conn.backlog.popleft()
            conn.head_started = False
        if conn.backlog:
            self._check_backlog(conn)
            return
        self._want_out(conn, False)  # drained: an idle connection holds no buffer
        conn.slow_since = None
        if conn.closing_since is not None:
            self._shutdown_wr(conn)

    def _check_backlog(self, conn: _Conn) -> None:
        """Start the slow-viewer clock when the backlog goes over the limit (the sweep closes
        the viewer when it stays there); far over it (control events and send() keep coming
        to a viewer that reads nothing) close at once."""
        if conn.closing_since is not None:
            return
        if conn.backlog_bytes <= self.backlog_limit_bytes:
            conn.slow_since = None
            return
        if conn.slow_since is None:
            conn.slow_since = time.monotonic()
        if conn.backlog_bytes > HARD_BACKLOG_FACTOR * self.backlog_limit_bytes + HARD_BACKLOG_EXTRA:
            self._slow_close(conn)

    def _drop_unstarted(self, conn: _Conn) -> None:
        """Keep only a slice already partly sent (a frame must not be cut); drop the rest."""
        keep = [conn.backlog[0]] if conn.backlog and conn.head_started else []
        conn.backlog = deque(keep)
        conn.backlog_bytes = sum(len(v) for v in keep)
        if not keep:
            self._want_out(conn, False)

    def _frame_for(self, variant: int, payload: bytes, binary: bool | None = None) -> bytes:
        """One data frame for one viewer; ``binary`` overrides the variant's opcode."""
        as_binary = bool(variant & 1) if binary is None else bool(binary)
        opcode = codec.OP_BINARY if as_binary else codec.OP_TEXT
        if _compressed(variant, len(payload)):
            return codec.encode_frame(opcode, self._deflate(variant, payload), rsv1=True)  # RFC 7692 6
        return codec.encode_frame(opcode, payload)

    def _skipped_marker(self, variant: int, count: int) -> bytes:
        event = {"t": "skipped", "count": count}
        if variant & 1:
            return self._frame_for(variant, msgpack.packb(event))
        return self._frame_for(variant, json.dumps(event, separators=(",", ":")).encode())

    def _deflate(self, variant: int, payload: bytes) -> bytes:
        self._stats["deflate_calls"] += 1
        return deflate_message(payload, self.deflate_level, variant >> 4)

    def send(self, conn_id: int, payload: bytes, binary: bool | None = None) -> bool:
        """One event to one viewer, in its variant's opcode unless ``binary`` says otherwise."""
        conn = self._find(conn_id)
        if conn is None:
            return False
        self._stats["messages_out"] += 1
        self._enqueue(conn, [self._frame_for(conn.variant, bytes(payload), binary)])
        return True

    # -- publishing and flushing --
    def _check_payloads(self, stream: int, payloads: Payloads) -> None:
        if not isinstance(payloads, tuple) or len(payloads) != 2:
            raise TypeError("payloads must be a (json_text, msgpack_binary) tuple")
        used = self.variants(stream)
        for encoding in (JSON, MSGPACK):
            if used & (1 << encoding | 1 << (encoding | DEFLATE)) and payloads[encoding] is None:
                raise ValueError("publish lacks the payload of an encoding a viewer of this stream uses "
                                 "(ask variants(stream) first)")

    def publish(self, stream: int, payloads: Payloads, control: bool, count: int) -> None:
        self._check_payloads(stream, payloads)
        self._publish(stream, _Outbound(payloads, bool(control), min(max(count, 0), 0xFFFFFFFF)))

    def publish_many(self, items: list[tuple[int, Payloads, bool, int]]) -> None:
        """All items are checked before any is queued."""
        items = list(items)
        for stream, payloads, _control, _count in items:
            self._check_payloads(stream, payloads)
        for stream, payloads, control, count in items:
            self._publish(stream, _Outbound(payloads, bool(control), min(max(count, 0), 0xFFFFFFFF)))

    def _publish(self, stream: int, event: _Outbound) -> None:
        s = self._streams.get(stream)
        if s is None:
            return  # no local viewer
        s.pending.append(event)
        if len(s.pending) >= self.flush_max_messages:
            self._flush_stream(stream, s)
        elif len(s.pending) == 1:
            # Leading edge: the first event after a quiet spell goes out at the next poll, and
            # a burst behind it waits for the rest of the interval since the last flush.
            s.deadline = max(time.monotonic(), s.last_flush + self.flush_interval_s)

    def flush(self) -> None:
        for stream, s in list(self._streams.items()):
            if s.pending:
                self._flush_stream(stream, s)

    def _flush_stream(self, stream: int, s: _Stream) -> None:
        events, s.pending = s.pending, []
        s.last_flush = time.monotonic()
        self._stats["flushes"] += 1
        comments = min(sum(e.comments for e in events if not e.control), 0xFFFFFFFF)
        frames = _FlushFrames(self, events)
        for fd in list(s.viewers):
            if fd in s.viewers:  # a viewer closed by its own delivery leaves; the others stay
                self._deliver(self._conns[fd], frames, comments)

    def _deliver(self, conn: _Conn, frames: _FlushFrames, comments: int) -> None:
        """One viewer's share of a flush: one write, or control events only while it is slow."""
        if conn.backlog_bytes > self.backlog_limit_bytes:
            self._deliver_slow(conn, frames, comments)
            return
        data = frames.get(conn.variant, False)
        if data is None:
            return  # nothing in this viewer's encoding
        self._stats["messages_out"] += frames.frames[conn.variant, False]
        self._stats["comments_out"] += comments
        if conn.skipped:
            self._stats["messages_out"] += 1  # the skipped marker
            marker = self._skipped_marker(conn.variant, conn.skipped)
            conn.skipped = 0
            self._enqueue(conn, [marker, data])
        else:
            self._enqueue(conn, [data])

    def _deliver_slow(self, conn: _Conn, frames: _FlushFrames, comments: int) -> None:
        now = time.monotonic()
        if conn.slow_since is None:
            conn.slow_since = now
        elif now - conn.slow_since > self.slow_close_after_s:
            self._slow_close(conn)
            return
        conn.skipped = min(conn.skipped + comments, 0xFFFFFFFF)
        self._stats["skipped"] += comments
        control = frames.get(conn.variant, True)
        if control is not None:
            self._stats["messages_out"] += frames.frames[conn.variant, True]
            self._enqueue(conn, [control])

    # -- reading --
    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF or error; a closing socket is just released
            self._drop(conn)
            return
        self._stats["bytes_in"] += len(data)
        if conn.closing_since is None:  # RFC 6455 5.5.1: after our close only the peer's EOF matters
            self._on_bytes(conn, data)

    def _on_bytes(self, conn: _Conn, data: bytes) -> None:
        conn.last_rx = time.monotonic()
        conn.ping_sent_at = None  # any inbound byte answers the heartbeat
        frames, error = conn.parser.feed_until_error(data)
        pongs: list[bytes] = []
        ending = self._take_frames(conn, frames, pongs)
        if ending is None and error is not None:
            ending = _Ending(error.close_code, error.reason, True)
        # The pongs of one read go out in one write, before any close frame.
        if pongs and (not self._enqueue(conn, [b"".join(pongs)]) or conn.closing_since is not None):
            return
        if ending is not None:
            if ending.protocol_error:
                self._stats["protocol_errors"] += 1
            frame = codec.encode_close(ending.code, ending.reason)
            self._begin_close(conn, frame, ending.code)

    def _take_frames(self, conn: _Conn, frames: list[tuple[int, bytes]], pongs: list[bytes]) -> _Ending | None:
        """Act on the parsed frames in order; stop at a client close or a bad compressed message
        (the C++ parser stops there too, so later frames of the read are never looked at)."""
        for opcode, payload in frames:
            kind = opcode & 0x0F
            if kind == codec.OP_PING:
                # DESIGN.md 10: pings are rate-limited; a flood is a policy violation (1008).
                conn.pings += 1
                if self.max_pings_per_s and conn.pings > self.max_pings_per_s:
                    return _Ending(CLOSE_POLICY, "ping flood", True)
                # RFC 6455 5.5.2: a pong with the same payload. 5.5.3 would allow answering only
                # the latest ping, but clients (and Autobahn 2.10) expect one pong each.
                pongs.append(codec.encode_frame(codec.OP_PONG, payload))
            elif kind == codec.OP_CLOSE:
                # RFC 6455 5.5.1: echo the code; a code-less close is answered and reported as 1000.
                return _Ending(int.from_bytes(payload[:2], "big") if payload else CLOSE_NORMAL, "", False)
            elif kind != codec.OP_PONG:  # a pong's bytes already reset the heartbeat
                failure = self._on_message(conn, kind, payload, bool(opcode & codec.COMPRESSED))
                if failure is not None:
                    return failure
        return None

    def _on_message(self, conn: _Conn, opcode: int, payload: bytes, compressed: bool) -> _Ending | None:
        if compressed:
            self._stats["inflate_calls"] += 1
            try:
                payload = inflate_message(payload, self.inflate_limit_bytes)
            except codec.ProtocolError as exc:
                return _Ending(exc.close_code, exc.reason, True)
            if opcode == codec.OP_TEXT and not codec.validate_utf8(payload):  # RFC 6455 8.1
                return _Ending(codec.CLOSE_INVALID_DATA, "text message is not UTF-8", True)
        kind = MESSAGE_TEXT if opcode == codec.OP_TEXT else MESSAGE_BINARY
        self._events.append((kind, conn.id, conn.stream, payload, conn.tag))
        self._stats["messages_in"] += 1
        return None

    # -- the loop's entry points --
    def poll(self) -> None:
        """Non-blocking: one read per ready socket, drain backlogs, then the due timers."""
        if self._ep.closed:
            return
        for fd, mask in self._ep.poll(0, MAX_EVENTS):
            conn = self._conns.get(fd)
            if conn is None:
                continue  # closed earlier in this batch
            if mask & select.EPOLLOUT:
                self._on_writable(conn)
            if self._conns.get(fd) is conn and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._on_readable(conn)
        self._run_timers()

    def _run_timers(self) -> None:
        now = time.monotonic()
        for stream, s in list(self._streams.items()):
            if s.pending and s.deadline <= now:
                self._flush_stream(stream, s)
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + SWEEP_S

    def _sweep(self, now: float) -> None:
        """Every SWEEP_S: lingering closes, stuck slow viewers, heartbeats."""
        for conn in list(self._conns.values()):
            if self._conns.get(conn.fd) is conn:
                self._sweep_conn(conn, now)

    def _sweep_conn(self, conn: _Conn, now: float) -> None:
        conn.pings = 0  # a new second of ping budget
        if conn.closing_since is not None:
            if now - conn.closing_since >= CLOSE_LINGER_S:
                self._release(conn)
            return
        # A stuck viewer on a quiet stream gets no flush to notice it: the sweep does.
        if conn.slow_since is not None and now - conn.slow_since > self.slow_close_after_s:
            self._slow_close(conn)
            return
        if self.heartbeat_interval_s <= 0:
            return
        if conn.ping_sent_at is not None:
            if now - conn.ping_sent_at > self.heartbeat_timeout_s:
                self._stats["timeouts"] += 1
                self._begin_close(conn, _HEARTBEAT_CLOSE, CLOSE_ABNORMAL)  # sent 1001, reported 1006
        elif now - conn.last_rx > self.heartbeat_interval_s:
            conn.ping_sent_at = now
            self._stats["pings_sent"] += 1
            self._enqueue(conn, [_PING])
