"""Both hubs of native/HUB.md through real sockets: the C++ ``chorus.native._hub`` and its pure
twin ``chorus.native.hub_pure``. Every test runs against each (the ``hub_module`` fixture).

Each test holds the client end of a socketpair, hands the server end to the hub with
``adopt(sock.detach(), ...)``, drives ``hub.poll()`` and reads what arrives with the codec's
FrameParser (server frames are unmasked). Client frames are built by hand here, masked, so the
hub's parser is checked against bytes it did not produce. The last tests feed seeded random
frame streams through the hub and through codec_pure.FrameParser and want the same messages
and the same close code.

The native param fails if ``_hub`` does not import, unless CHORUS_EXPECT_IMPL=pure (then it is
skipped: only the pure twin is under test). A few tests check what only the C++ hub has; they
are marked ``native_only`` with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import os
import random
import select
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from frames import MASK, client_frame

from chorus.native import COMPRESSED, FrameParser, hub_pure
from chorus.native import codec_pure as pure

# The same in both modules (test_constants_match checks it).
JSON, MSGPACK, DEFLATE = hub_pure.JSON, hub_pure.MSGPACK, hub_pure.DEFLATE
MESSAGE_TEXT, MESSAGE_BINARY, CLOSED = hub_pure.MESSAGE_TEXT, hub_pure.MESSAGE_BINARY, hub_pure.CLOSED

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1


# --- building client frames and reading server frames ---


def deflate(data: bytes, wbits: int = 15) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate(body: bytes, wbits: int = 15) -> bytes:
    return zlib.decompressobj(-wbits).decompress(body + TAIL)


def code_of(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


class Client:
    """The test's end of one viewer socket."""

    def __init__(self, sock: socket.socket, conn: int, deflated: bool) -> None:
        self.sock = sock
        self.conn = conn
        self.deflated = deflated
        sock.setblocking(False)
        self.parser = FrameParser(require_mask=False, max_message_size=1 << 24, allow_rsv1=deflated)
        self.frames: list[tuple[int, bytes]] = []  # (opcode | COMPRESSED?, payload)
        self.eof = False

    def read(self) -> list[tuple[int, bytes]]:
        """Everything received so far (non-blocking)."""
        while not self.eof:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                break
            self.frames.extend(self.parser.feed(data))
        return self.frames

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)

    def data(self) -> list[bytes]:
        """Payloads of the data frames received (inflated if compressed)."""
        out = []
        for op, payload in self.read():
            if op & 0x0F in (OP_TEXT, OP_BINARY):
                out.append(inflate(payload) if op & COMPRESSED else payload)
        return out

    def events(self) -> list[Any]:
        return [json.loads(p) if not p or p[:1] in b"{[" else msgpack.unpackb(p) for p in self.data()]

    def close_code(self) -> int | None:
        for op, payload in self.read():
            if op == OP_CLOSE:
                return code_of(payload)
        return None

    def opcodes(self) -> list[int]:
        return [op for op, _ in self.read()]


class Harness:
    """A hub, its clients, and the inbound events drained so far."""

    def __init__(self, hub_module: ModuleType, **config: Any) -> None:
        self.native = hub_module is not hub_pure
        self.hub = hub_module.Hub(**config)
        self.events: list[tuple[int, int, int, bytes, bytes]] = []
        self.clients: list[Client] = []
        self.inodes: set[int] = set()  # of every socket made, to check none is left open

    def connect(
        self,
        stream: int = 1,
        variant: int = JSON,
        leftover: bytes = b"",
        tag: bytes = b"",
        small_buffers: bool = False,
    ) -> Client:
        ours, theirs = socket.socketpair()
        if small_buffers:  # a viewer that stops reading fills these quickly
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.inodes |= {os.fstat(ours.fileno()).st_ino, os.fstat(theirs.fileno()).st_ino}
        conn = self.hub.adopt(theirs.detach(), stream, variant, leftover, tag)
        client = Client(ours, conn, bool(variant & DEFLATE))
        self.clients.append(client)
        return client

    def pump(self, until: Callable[[], object], timeout: float = 5.0) -> None:
        """poll() + drain() until ``until()`` is true, waiting as the gateway does: on the hub's
        epoll fd, and until next_timeout_ms() when it is >= 0 (the pure twin has no timerfd)."""
        deadline = time.monotonic() + timeout
        while True:
            self.hub.poll()
            self.events.extend(self.hub.drain())
            if until():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; stats={self.hub.stats()} events={self.events}")
            due_ms = self.hub.next_timeout_ms()
            select.select([self.hub.fileno()], [], [], min(left, due_ms / 1000) if due_ms >= 0 else left)

    def closed(self, client: Client) -> int | None:
        for kind, conn, _stream, data, _tag in self.events:
            if kind == CLOSED and conn == client.conn:
                return code_of(data)
        return None

    def messages(self, client: Client) -> list[tuple[int, bytes]]:
        return [(k, d) for k, c, _s, d, _t in self.events if c == client.conn and k != CLOSED]

    def stat(self, name: str) -> int:
        return int(self.hub.stats()[name])

    def close(self) -> None:
        self.hub.shutdown()
        for client in self.clients:
            client.sock.close()


HUB_FD_KINDS = ("socket:", "anon_inode:[eventpoll]", "anon_inode:[timerfd]")


def hub_kind_fds() -> dict[str, int]:
    """Open fds of the kinds a hub holds, counted by kind, from /proc/self/fd.

    Only these kinds are counted so that a service another test boots in a background thread
    (pipes, log files) cannot make the count move under us.
    """
    counts = dict.fromkeys(HUB_FD_KINDS, 0)
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd listing the directory itself
        for kind in HUB_FD_KINDS:
            if target.startswith(kind):
                counts[kind] += 1
    return counts


def open_inodes() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(os.stat(f"/proc/self/fd/{name}").st_ino)
        except OSError:
            continue
    return out


@pytest.fixture(params=["native", "pure"])
def hub_module(request: pytest.FixtureRequest) -> ModuleType:
    """The hub implementation under test."""
    if request.param == "pure":
        return hub_pure
    if os.environ.get("CHORUS_EXPECT_IMPL") == "pure":
        pytest.skip("CHORUS_EXPECT_IMPL=pure: only the pure twin is under test")
    try:
        return importlib.import_module("chorus.native._hub")
    except ImportError as exc:  # a failed build must not pass as skipped tests
        pytest.fail(f"chorus.native._hub does not import ({exc}); set CHORUS_EXPECT_IMPL=pure to test only the twin")


# For tests of what only the C++ hub has; each says why next to it.
native_only = pytest.mark.parametrize("hub_module", ["native"], indirect=True)


@pytest.fixture
def harness(hub_module: ModuleType) -> Iterator[Callable[..., Harness]]:
    """Hubs made by the test; afterwards none of their sockets, epoll or timer fds is open."""
    made: list[Harness] = []

    def make(**config: Any) -> Harness:
        h = Harness(hub_module, **config)
        made.append(h)
        return h

    anon_before = {k: v for k, v in hub_kind_fds().items() if k != "socket:"}
    yield make
    inodes = set()
    for h in made:
        h.close()
        inodes |= h.inodes
    made.clear()
    gc.collect()
    assert not inodes & open_inodes(), "a viewer socket was left open"
    assert {k: v for k, v in hub_kind_fds().items() if k != "socket:"} == anon_before


def batch(offset: int, pad: int = 0) -> tuple[bytes, bytes]:
    event = {"t": "batch", "offset": offset, "comments": [{"id": str(offset), "text": "x" * pad}]}
    return json.dumps(event, separators=(",", ":")).encode(), msgpack.packb(event)


def control(kind: str = "delete") -> tuple[bytes, bytes]:
    event = {"t": kind, "id": "9"}
    return json.dumps(event, separators=(",", ":")).encode(), msgpack.packb(event)


# --- memory ---


@native_only  # sizeof(Conn): a pure connection is Python objects, not a fixed slot
def test_conn_slot_is_small(harness: Callable[..., Harness]) -> None:
    h = harness()
    slot = h.stat("conn_slot_bytes")
    print(f"sizeof(Conn) = {slot} bytes")
    assert slot <= 64  # the brief says <= 64; the contract's hard ceiling is 128
    h.connect()
    assert h.stat("backlog_bytes") == 0


def held(h: Harness) -> tuple[int, int, int]:
    stats = h.hub.stats()
    return stats["held_read_buffers"], stats["held_backlogs"], stats["held_tags"]


def test_idle_connections_hold_no_heap_buffers(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect(tag=b"\xa3bob")
    h.connect()  # anonymous: no tag stored
    assert held(h) == (0, 0, 1)
    frame = client_frame(OP_TEXT, b"x" * 300)
    v.send(frame[:100])
    h.pump(lambda: h.stat("bytes_in") == 100)
    assert held(h) == (1, 0, 1)  # a partial frame is kept only while incomplete
    v.send(frame[100:])
    h.pump(lambda: h.messages(v))
    assert held(h) == (0, 0, 1)
    v.send(client_frame(OP_BINARY, b"a", fin=False))
    h.pump(lambda: h.stat("bytes_in") == 300 + 8 + 7)
    assert held(h) == (1, 0, 1)  # so is a fragmented message
    v.send(client_frame(OP_CONT, b"b"))
    h.pump(lambda: len(h.messages(v)) == 2)
    assert held(h) == (0, 0, 1)
    h.hub.close(v.conn, 1000)
    assert held(h) == (0, 0, 0)


# --- coalescing and encode once ---


def test_publishes_in_one_window_are_one_write_per_viewer(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=200)
    viewers = [h.connect(stream=1) for _ in range(3)]
    other = h.connect(stream=2)
    for i in range(1, 6):
        h.hub.publish(1, batch(i), False, 1)
    assert all(v.read() == [] for v in viewers)  # nothing inside publish
    h.hub.poll()  # a quiet stream: the first events go out at the next poll (leading edge)
    assert all(len(v.read()) == 5 for v in viewers)
    stats = h.hub.stats()
    assert stats["flushes"] == 1
    assert stats["writes"] == 3  # one send per viewer for five events
    assert stats["frames_built"] == 1  # one buffer shared by the three
    for i in range(6, 11):  # a burst right behind: waits for the rest of the interval
        h.hub.publish(1, batch(i), False, 1)
    h.hub.poll()
    assert all(len(v.read()) == 5 for v in viewers) and h.stat("flushes") == 1
    h.pump(lambda: all(len(v.read()) == 10 for v in viewers))
    assert h.stat("flushes") == 2 and h.stat("writes") == 6 and h.stat("frames_built") == 2
    for v in viewers:
        assert [e["offset"] for e in v.events()] == list(range(1, 11))
        assert v.opcodes() == [OP_TEXT] * 10  # each event its own frame
    assert other.read() == []


def test_flush_early_at_max_messages(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=60_000, flush_max_messages=3)
    v = h.connect()
    for i in range(1, 4):
        h.hub.publish(1, batch(i), False, 1)
    assert h.stat("flushes") == 1 and h.stat("writes") == 1  # inside publish, no poll needed
    h.pump(lambda: len(v.read()) == 3)
    h.hub.publish(1, batch(4), False, 1)
    h.hub.flush()
    h.pump(lambda: len(v.read()) == 4)
    assert h.stat("flushes") == 2


def test_messages_out_comments_out_and_pending(harness: Callable[..., Harness]) -> None:
    """The counters behind chorus_messages_out_total and the delivery-latency clock: every event
    handed to each viewer, the comments in them, and a stream's events still waiting."""
    h = harness(flush_interval_ms=60_000)
    viewers = [h.connect(stream=1) for _ in range(3)]
    assert h.hub.pending(1) == 0 and h.hub.pending(99) == 0  # an unknown stream has nothing waiting
    h.hub.publish(1, batch(1), False, 4)
    assert h.hub.pending(1) == 1
    h.hub.poll()  # leading edge: out at the next poll
    assert h.hub.pending(1) == 0
    h.hub.publish(1, batch(2), False, 2)
    h.hub.publish(1, control("pin"), True, 0)
    assert h.hub.pending(1) == 2  # behind the interval
    h.hub.flush()
    assert h.hub.pending(1) == 0
    h.pump(lambda: all(len(v.read()) == 3 for v in viewers))
    assert h.stat("messages_out") == 3 * 3  # three events to each of three viewers
    assert h.stat("comments_out") == 3 * (4 + 2)
    assert h.hub.send(viewers[0].conn, b'{"t":"ack"}')
    assert h.stat("messages_out") == 10 and h.stat("comments_out") == 18  # send() is a message, no comments


def test_json_and_msgpack_viewers_get_their_encoding(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=5)
    text, binary = h.connect(variant=JSON), h.connect(variant=MSGPACK)
    assert h.hub.variants(1) == 1 << JSON | 1 << MSGPACK
    h.hub.publish_many([(1, batch(i), False, 1) for i in range(1, 4)] + [(1, control("pin"), True, 0)])
    h.pump(lambda: len(text.read()) == 4 and len(binary.read()) == 4)
    assert text.opcodes() == [OP_TEXT] * 4 and binary.opcodes() == [OP_BINARY] * 4
    assert [e["t"] for e in text.events()] == ["batch"] * 3 + ["pin"]
    assert text.events() == binary.events()
    assert h.stat("frames_built") == 2
    with pytest.raises(ValueError):
        h.hub.publish(1, (batch(5)[0], None), False, 1)  # a MSGPACK viewer has nothing to get
    with pytest.raises(ValueError):
        h.hub.publish_many([(1, batch(6), False, 1), (1, (None, batch(7)[1]), False, 1)])
    h.hub.flush()
    h.pump(lambda: True)
    assert len(text.read()) == 4  # publish_many validated everything before queuing anything
    h.hub.publish(99, (None, None), False, 1)  # a stream with no local viewer: nothing to do


def test_deflate_variant_compresses_each_event_once(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=5)
    deflated = [h.connect(variant=JSON | DEFLATE) for _ in range(4)]
    small_window = h.connect(variant=JSON | DEFLATE | 10 << 4)  # server_max_window_bits=10
    plain = h.connect(variant=JSON)
    assert h.hub.variants(1) == 1 << JSON | 1 << (JSON | DEFLATE)
    events = [batch(i, pad=300) for i in range(1, 4)]
    h.hub.publish_many([(1, e, False, 1) for e in events])
    everyone = [*deflated, small_window, plain]
    h.pump(lambda: all(len(v.read()) == 3 for v in everyone))
    stats = h.hub.stats()
    assert stats["frames_built"] == 3  # window 15, window 10, plain
    assert stats["deflate_calls"] == 6  # each event once per window, not once per viewer
    assert stats["writes"] == 6
    for v in deflated:
        assert v.opcodes() == [OP_TEXT | COMPRESSED] * 3  # RSV1 set on every message
        assert v.data() == [e[0] for e in events]
    assert [inflate(p, wbits=10) for _op, p in small_window.read()] == [e[0] for e in events]
    assert plain.opcodes() == [OP_TEXT] * 3
    raw = deflated[0].read()[0][1]
    assert len(raw) < len(events[0][0]) and not raw.endswith(TAIL)


def test_deflate_viewer_messages_are_inflated(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=5)
    v = h.connect(variant=MSGPACK | DEFLATE)
    text = "hello, hello, hello! κόσμε 😀".encode()
    v.send(client_frame(OP_TEXT, deflate(text), rsv=4))
    v.send(client_frame(OP_BINARY, deflate(b"\x00" * 1000), rsv=4, fin=False))
    v.send(client_frame(OP_CONT, b""))  # RSV1 only on the first frame (RFC 7692 6.1)
    h.pump(lambda: len(h.messages(v)) == 2)
    assert h.messages(v) == [(MESSAGE_TEXT, text), (MESSAGE_BINARY, b"\x00" * 1000)]
    big = {"t": "batch", "comments": ["κόσμε " * 60]}
    assert h.hub.send(v.conn, msgpack.packb({"t": "ack"})) and h.hub.send(v.conn, msgpack.packb(big))
    h.pump(lambda: len(v.read()) == 2)
    # RFC 7692 6: compressing is the sender's choice per message; under DEFLATE_MIN_BYTES it does not pay
    assert v.opcodes() == [OP_BINARY, OP_BINARY | COMPRESSED] and v.events() == [{"t": "ack"}, big]


def test_small_events_of_a_flush_go_uncompressed(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=5)
    v = h.connect(variant=JSON | DEFLATE)
    small, large = b'{"t":"viewers","now":3}', json.dumps({"t": "batch", "text": "hi there " * 40}).encode()
    h.hub.publish(1, (small, None), True, 0)
    h.hub.publish(1, (large, None), False, 1)
    h.pump(lambda: len(v.read()) == 2)
    assert v.opcodes() == [OP_TEXT, OP_TEXT | COMPRESSED] and v.data() == [small, large]
    assert h.hub.stats()["deflate_calls"] == 1


# --- reading ---


def test_leftover_bytes_are_parsed_first(harness: Callable[..., Harness]) -> None:
    h = harness()
    second = client_frame(OP_TEXT, b"second")
    v = h.connect(leftover=client_frame(OP_TEXT, b"first") + second[:3])
    assert [d for _k, _c, _s, d, _t in h.hub.drain()] == [b"first"]  # inside adopt()
    v.send(second[3:] + client_frame(OP_BINARY, b"third"))
    h.pump(lambda: len(h.messages(v)) == 2)
    assert h.messages(v) == [(MESSAGE_TEXT, b"second"), (MESSAGE_BINARY, b"third")]


def test_fragments_with_control_frames_between_byte_by_byte(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    snowman = "☃".encode()  # split across fragments: valid once joined
    stream = b"".join(
        [
            client_frame(OP_TEXT, b"Hel", fin=False),
            client_frame(OP_PING, b"are you there"),
            client_frame(OP_CONT, b"lo " + snowman[:1], fin=False),
            client_frame(OP_PONG, b"unsolicited"),
            client_frame(OP_CONT, snowman[1:] + b" world"),
            client_frame(OP_BINARY, bytes(range(200))),
        ]
    )
    for i in range(len(stream)):
        v.send(stream[i : i + 1])
        h.hub.poll()
    h.pump(lambda: len(h.messages(v)) == 2)
    assert h.messages(v) == [(MESSAGE_TEXT, "Hello ☃ world".encode()), (MESSAGE_BINARY, bytes(range(200)))]
    h.pump(lambda: v.read())
    assert v.read() == [(OP_PONG, b"are you there")]
    assert h.stat("protocol_errors") == 0


def test_ping_gets_a_pong_with_the_same_payload(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.send(client_frame(OP_PING, bytes(range(125))))
    h.pump(lambda: v.read())
    assert v.read() == [(OP_PONG, bytes(range(125)))]
    v.send(b"".join(client_frame(OP_PING, b"%d" % i) for i in range(10)))  # one read
    h.pump(lambda: len(v.read()) == 11)
    assert v.read()[1:] == [(OP_PONG, b"%d" % i) for i in range(10)]  # one pong each, in order


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"\x03\xe8bye", 1000), (b"\x0b\xb9", 3001), (b"", 1000)],
    ids=["1000", "3001", "empty"],
)
def test_client_close_is_answered_with_the_same_code(
    harness: Callable[..., Harness], payload: bytes, code: int
) -> None:
    h = harness()
    v = h.connect(tag=b"\x81\xa1u\x07")
    v.send(client_frame(OP_TEXT, b"last words") + client_frame(OP_CLOSE, payload))
    h.pump(lambda: v.close_code() is not None and h.closed(v))
    assert v.close_code() == code
    assert h.messages(v) == [(MESSAGE_TEXT, b"last words")]
    assert (CLOSED, v.conn, 1, code.to_bytes(2, "big"), b"\x81\xa1u\x07") in h.events
    assert h.hub.viewer_count(1) == 0 and h.hub.connections() == 0
    h.pump(lambda: v.eof)  # the hub shut down its side
    v.sock.close()
    h.pump(lambda: h.stat("closing") == 0)  # and closed the fd on our EOF


def test_peer_vanishing_reports_1006(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.sock.close()
    h.pump(lambda: h.closed(v))
    assert h.closed(v) == 1006 and h.stat("closing") == 0


# --- protocol errors ---


def assert_closed_with(h: Harness, v: Client, code: int) -> None:
    h.pump(lambda: h.closed(v) and v.close_code() is not None)
    assert h.closed(v) == code
    assert v.close_code() == code
    assert h.stat("protocol_errors") == 1


def test_invalid_utf8_closes_1007(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.send(client_frame(OP_TEXT, b"ok \xff"))
    assert_closed_with(h, v, 1007)


def test_invalid_utf8_fails_fast_inside_fragments(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.send(client_frame(OP_TEXT, b"ok \xed\xa0", fin=False))  # a surrogate prefix: no final needed
    assert_closed_with(h, v, 1007)


def test_unmasked_frame_closes_1002(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.send(client_frame(OP_TEXT, b"hi", mask=None))
    assert_closed_with(h, v, 1002)


def test_rsv1_without_deflate_closes_1002(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect()
    v.send(client_frame(OP_TEXT, deflate(b"hi"), rsv=4))
    assert_closed_with(h, v, 1002)


def test_oversize_header_closes_1009_before_the_payload(harness: Callable[..., Harness]) -> None:
    h = harness(max_message_bytes=1024)
    v = h.connect()
    v.send(client_frame(OP_BINARY, b"", length=1 << 20)[:14])  # the header alone
    assert_closed_with(h, v, 1009)
    assert h.stat("bytes_in") == 14


def test_too_many_fragments_close_1009(harness: Callable[..., Harness]) -> None:
    h = harness(max_fragments=4)
    v = h.connect()
    v.send(b"".join(client_frame(OP_TEXT if i == 0 else OP_CONT, b"x", fin=False) for i in range(5)))
    assert_closed_with(h, v, 1009)


def test_deflate_bomb_closes_1009(harness: Callable[..., Harness]) -> None:
    h = harness(inflate_limit_bytes=65536)
    v = h.connect(variant=JSON | DEFLATE)
    bomb = deflate(b"\x00" * (8 << 20))
    assert len(bomb) < 65536  # fits the wire limit; only the inflate cap can stop it
    v.send(client_frame(OP_BINARY, bomb, rsv=4))
    assert_closed_with(h, v, 1009)
    assert h.messages(v) == []


def test_corrupt_deflate_data_closes_1007(harness: Callable[..., Harness]) -> None:
    h = harness()
    v = h.connect(variant=JSON | DEFLATE)
    v.send(client_frame(OP_TEXT, b"\xff\xff\xff\xff", rsv=4))
    assert_closed_with(h, v, 1007)
    assert v.read()[-1] == (OP_CLOSE, b"\x03\xefbad deflate data")


def test_messages_before_a_protocol_error_in_the_same_read_are_delivered(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    v = h.connect()
    good = client_frame(OP_TEXT, b"one") + client_frame(OP_PING, b"p") + client_frame(OP_BINARY, b"two")
    v.send(good + client_frame(OP_TEXT, b"bad", mask=None))  # one write, one read
    assert_closed_with(h, v, 1002)
    assert h.messages(v) == [(MESSAGE_TEXT, b"one"), (MESSAGE_BINARY, b"two")]
    assert v.opcodes() == [OP_PONG, OP_CLOSE]  # the pong goes out before the close


# --- slow viewers ---


def fill_backlog(h: Harness, stream: int, limit: int) -> int:
    """Publish 1 KiB batches (one flush each) until the viewer's backlog passes ``limit``."""
    offset = 0
    while h.stat("backlog_bytes") <= limit:
        offset += 1
        h.hub.publish(stream, batch(offset, pad=1000), False, 1)
        assert offset < 2000, "the backlog never grew"
    return offset


@pytest.mark.parametrize("variant", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_slow_viewer_skips_batches_keeps_control_then_gets_a_marker(
    harness: Callable[..., Harness], variant: int
) -> None:
    limit = 16384
    h = harness(flush_max_messages=1, backlog_limit_bytes=limit, slow_close_after_ms=60_000)
    slow = h.connect(variant=variant, small_buffers=True)
    last = fill_backlog(h, 1, limit)
    assert h.stat("partial_writes") == 1 and h.stat("skipped") == 0
    assert held(h) == (0, 1, 0)
    writes = h.stat("writes")
    h.hub.publish(1, batch(last + 1), False, 5)  # skipped: 5 comments
    h.hub.publish(1, control("delete"), True, 0)  # never skipped
    h.hub.publish(1, batch(last + 2), False, 2)  # skipped: 2 more
    assert h.stat("skipped") == 7
    assert h.stat("writes") == writes  # queued behind the backlog, no syscall
    # The viewer reads again: the backlog drains through EPOLLOUT.
    h.pump(lambda: len(slow.read()) == last + 1 and h.stat("backlog_bytes") == 0)
    assert h.stat("drain_writes") >= 1 and h.stat("writes") == writes  # drains are counted apart
    h.hub.publish(1, batch(last + 3), False, 1)
    h.pump(lambda: len(slow.read()) == last + 3)
    assert held(h) == (0, 0, 0)  # drained: the backlog is gone
    events = slow.events()
    assert [e["offset"] for e in events[:last]] == list(range(1, last + 1))
    assert events[last:] == [
        {"t": "delete", "id": "9"},
        {"t": "skipped", "count": 7},
        events[-1],
    ]
    assert events[-1]["offset"] == last + 3
    assert slow.opcodes()[-2] == (OP_BINARY if variant == MSGPACK else OP_TEXT)
    assert h.closed(slow) is None


def test_viewer_stuck_past_the_deadline_is_closed_4008(harness: Callable[..., Harness]) -> None:
    limit = 8192
    h = harness(flush_max_messages=1, backlog_limit_bytes=limit, slow_close_after_ms=150)
    stuck = h.connect(small_buffers=True)
    fine = h.connect()
    fill_backlog(h, 1, limit)
    h.hub.publish(1, control(), True, 0)  # over the limit: the slow clock starts
    time.sleep(0.2)
    h.hub.publish(1, control(), True, 0)  # past the deadline: closed at this flush
    h.pump(lambda: h.closed(stuck))
    assert h.closed(stuck) == 4008 and h.stat("slow_closed") == 1
    assert h.hub.viewer_count(1) == 1 and h.closed(fine) is None
    # What it had not started to receive was dropped: the close frame follows promptly.
    h.pump(lambda: stuck.close_code() is not None)
    assert stuck.close_code() == 4008
    assert stuck.read()[-1][0] == OP_CLOSE


def test_stuck_viewer_is_closed_by_the_sweep_without_new_flushes(harness: Callable[..., Harness]) -> None:
    limit = 8192
    h = harness(flush_max_messages=1, backlog_limit_bytes=limit, slow_close_after_ms=100, heartbeat_interval_ms=0)
    stuck = h.connect(small_buffers=True)
    quiet = h.connect(stream=2)
    fill_backlog(h, 1, limit)
    h.pump(lambda: h.closed(stuck), timeout=3.0)  # the 1 s sweep sees it
    assert h.closed(stuck) == 4008
    # The same sweep passed the quiet viewer: heartbeat_interval_ms=0 means no pings.
    assert h.stat("pings_sent") == 0 and quiet.read() == [] and h.closed(quiet) is None


def test_backlog_far_over_the_limit_closes_4008_at_once(harness: Callable[..., Harness]) -> None:
    limit = 1024
    h = harness(backlog_limit_bytes=limit, slow_close_after_ms=60_000)
    stuck = h.connect(small_buffers=True)
    payload = b'"' + b"x" * 65534 + b'"'
    sends = 0
    while h.hub.send(stuck.conn, payload):  # send() is never skipped: only the hard cap stops it
        sends += 1
        assert sends < 100, "the hard cap never closed the viewer"
    assert sends * len(payload) > 8 * limit + (1 << 20)  # over 8 x the limit + 1 MiB
    assert h.hub.viewer_count(1) == 0 and h.stat("slow_closed") == 1  # long before the deadline
    assert h.stat("backlog_bytes") <= len(payload) + 64  # only the frame in flight and the close
    h.pump(lambda: h.closed(stuck) and stuck.close_code() is not None)
    assert h.closed(stuck) == 4008 and stuck.close_code() == 4008


def test_backlog_is_per_connection(harness: Callable[..., Harness]) -> None:
    """backlog(conn) reads one viewer's unsent bytes, so a resume paces by its own viewer, not
    by every slow viewer of the gateway (stats()["backlog_bytes"] is the sum)."""
    limit = 16384
    h = harness(flush_max_messages=1, backlog_limit_bytes=limit, slow_close_after_ms=60_000)
    slow = h.connect(small_buffers=True)
    fine = h.connect(stream=2)
    assert h.hub.backlog(slow.conn) == 0 and h.hub.backlog(fine.conn) == 0
    fill_backlog(h, 1, limit)
    assert h.hub.backlog(slow.conn) == h.stat("backlog_bytes") > limit
    assert h.hub.send(fine.conn, b'{"t":"ack","nonce":"1"}')
    assert h.hub.backlog(fine.conn) == 0  # the kernel took it whole
    h.pump(lambda: fine.read())
    assert h.hub.backlog(12345 << 32 | 99999) == -1  # unknown
    h.hub.close(slow.conn, 1000)
    assert h.hub.backlog(slow.conn) == -1  # closing: gone for Python
    h.pump(lambda: h.closed(slow) == 1000)


# --- heartbeat ---


def test_heartbeat_closes_a_silent_client_and_keeps_one_that_answers(
    harness: Callable[..., Harness],
) -> None:
    h = harness(heartbeat_interval_ms=200, heartbeat_timeout_ms=200)
    silent = h.connect()
    alive = h.connect()
    answered = 0

    def answer() -> bool:
        nonlocal answered
        pings = [p for op, p in alive.read() if op == OP_PING]
        while answered < len(pings):
            alive.send(client_frame(OP_PONG, pings[answered]))
            answered += 1
        return False

    h.pump(lambda: answer() or h.closed(silent), timeout=6.0)
    assert h.closed(silent) == 1006  # reported as abnormal
    h.pump(lambda: silent.close_code() is not None)
    assert silent.opcodes()[0] == OP_PING and silent.read()[0][1] == b""
    assert silent.close_code() == 1001  # sent: going away, "heartbeat timeout"
    assert h.stat("timeouts") == 1
    deadline = time.monotonic() + 1.2
    h.pump(lambda: answer() or time.monotonic() > deadline, timeout=3.0)
    assert answered >= 2 and h.closed(alive) is None and h.hub.connections() == 1


# --- send, close, tags, bookkeeping ---


def test_send_reaches_one_viewer_and_stale_ids_do_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    a, b = h.connect(), h.connect()
    assert h.hub.send(a.conn, b'{"t":"ack","nonce":"1"}')
    h.pump(lambda: a.read())
    assert a.events() == [{"t": "ack", "nonce": "1"}] and b.read() == []
    h.hub.close(a.conn, 1000)
    assert not h.hub.send(a.conn, b"{}")  # closing: gone for Python
    a.sock.close()
    h.pump(lambda: h.stat("closing") == 0)
    c = h.connect()  # very likely the same fd as a: a new generation
    assert c.conn != a.conn
    assert not h.hub.send(a.conn, b'{"t":"not for you"}')
    h.hub.close(a.conn, 1000)  # a stale id: nothing happens to c
    assert h.hub.send(c.conn, b'{"t":"hello"}')
    h.pump(lambda: c.read())
    assert c.events() == [{"t": "hello"}]
    assert not h.hub.send(12345 << 32 | 99999, b"{}")
    assert h.hub.send(c.conn, b"\x01\x02", binary=True)  # the echo endpoint answers in kind
    h.pump(lambda: len(c.read()) == 2)
    assert c.read()[1] == (OP_BINARY, b"\x01\x02")


def test_close_and_close_all(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=60_000)
    banned, v1, v2 = h.connect(stream=1), h.connect(stream=1), h.connect(stream=2, variant=MSGPACK)
    h.hub.close(banned.conn, 4503, "banned")
    assert h.hub.viewer_count(1) == 1  # left its stream at once
    h.pump(lambda: banned.close_code() is not None and banned.eof)
    assert banned.read()[-1] == (OP_CLOSE, b"\x11\x97banned")
    with pytest.raises(ValueError):
        h.hub.close(v1.conn, 1006)  # reserved: never sent (RFC 6455 7.4.1)
    h.hub.publish(1, batch(1), False, 1)
    h.hub.publish(2, batch(2), False, 1)
    h.hub.close_all(1001, "restart")  # pending events go out first
    assert h.hub.connections() == 0 and h.stat("closing") == 3  # lingering until the peers close
    h.pump(lambda: all(c.close_code() == 1001 for c in (v1, v2)))
    assert v1.events() == [json.loads(batch(1)[0])] and v2.events() == [msgpack.unpackb(batch(2)[1])]
    assert [h.closed(c) for c in (banned, v1, v2)] == [4503, 1001, 1001]
    assert h.hub.connections() == 0 and h.stat("streams") == 0
    for c in (banned, v1, v2):
        c.sock.close()
    h.pump(lambda: h.stat("closing") == 0)


def test_tag_comes_back_with_messages_and_close(harness: Callable[..., Harness]) -> None:
    h = harness()
    tagged = h.connect(stream=5, tag=b"\x82\xa1u\xa3bob")
    anonymous = h.connect(stream=5)
    tagged.send(client_frame(OP_TEXT, b'{"t":"comment"}'))
    anonymous.send(client_frame(OP_BINARY, b"\x80"))
    h.pump(lambda: len(h.events) == 2)
    assert sorted(h.events) == sorted(
        [
            (MESSAGE_TEXT, tagged.conn, 5, b'{"t":"comment"}', b"\x82\xa1u\xa3bob"),
            (MESSAGE_BINARY, anonymous.conn, 5, b"\x80", b""),
        ]
    )
    tagged.sock.close()
    h.pump(lambda: h.closed(tagged))
    assert h.events[-1] == (CLOSED, tagged.conn, 5, b"\x03\xee", b"\x82\xa1u\xa3bob")


def test_viewer_count_and_variants_bookkeeping(harness: Callable[..., Harness]) -> None:
    h = harness()
    assert h.hub.viewer_count(1) == 0 and h.hub.variants(1) == 0
    a = h.connect(stream=1, variant=JSON)
    b = h.connect(stream=1, variant=MSGPACK | DEFLATE)
    c = h.connect(stream=2, variant=MSGPACK)
    assert (h.hub.viewer_count(1), h.hub.viewer_count(2), h.hub.connections()) == (2, 1, 3)
    assert h.hub.variants(1) == 1 << JSON | 1 << (MSGPACK | DEFLATE)
    assert h.stat("streams") == 2
    h.hub.close(a.conn, 1000)  # swap-remove: b moves to a's index
    assert h.hub.variants(1) == 1 << (MSGPACK | DEFLATE) and h.hub.viewer_count(1) == 1
    h.hub.publish(1, (None, msgpack.packb({"t": "x"})), True, 0)  # JSON payload now optional
    h.hub.flush()
    h.pump(lambda: b.data())
    h.hub.close(b.conn, 1000)
    assert h.hub.viewer_count(1) == 0 and h.stat("streams") == 1
    h.hub.close(c.conn, 1000)
    assert h.hub.connections() == 0 and h.stat("streams") == 0
    ours, theirs = socket.socketpair()
    with ours, theirs:  # a ValueError leaves the fd with its owner
        with pytest.raises(ValueError):
            h.hub.adopt(theirs.fileno(), 1, 4)  # bits 2-3 are not defined
        with pytest.raises(ValueError):
            h.hub.adopt(theirs.fileno(), 1, JSON | DEFLATE | 8 << 4)  # window bits 8: zlib cannot
        with pytest.raises(ValueError):
            h.hub.adopt(h.hub.fileno(), 1, JSON)


def test_adopt_oserror_means_the_hub_closed_the_fd(harness: Callable[..., Harness], tmp_path: Path) -> None:
    h = harness()
    fd = os.open(tmp_path / "not-a-socket", os.O_CREAT | os.O_RDWR)
    with pytest.raises(OSError):
        h.hub.adopt(fd, 1, JSON)  # a regular file: epoll (or the socket layer) refuses it
    with pytest.raises(OSError):
        os.fstat(fd)  # the hub owned it from the call on, and closed it
    assert h.hub.connections() == 0 and h.hub.viewer_count(1) == 0


@pytest.mark.parametrize(
    "config",
    [{"deflate_window_bits": 8}, {"deflate_level": 10}, {"flush_max_messages": 0}, {"max_fragments": 0},
     {"heartbeat_interval_ms": -1}, {"backlog_limit_bytes": -1}, {"inflate_limit_bytes": 0}],
)
def test_bad_config_is_a_value_error(hub_module: ModuleType, config: dict[str, int]) -> None:
    before = hub_kind_fds()
    with pytest.raises(ValueError):
        hub_module.Hub(**config)
    assert hub_kind_fds() == before  # checked before any fd exists


@native_only  # the other tests use hub_pure's constants for both modules
def test_constants_match(hub_module: ModuleType) -> None:
    for name in ("JSON", "MSGPACK", "DEFLATE", "MESSAGE_TEXT", "MESSAGE_BINARY", "CLOSED"):
        assert getattr(hub_module, name) == getattr(hub_pure, name), name


def test_next_timeout_ms_says_when_to_poll(harness: Callable[..., Harness]) -> None:
    """The pure twin names its next deadline; the C++ hub says -1 (its timerfd wakes the loop)."""
    h = harness(flush_interval_ms=300)
    assert h.hub.next_timeout_ms() == -1  # no connection, nothing pending: nothing to wait for
    v = h.connect()
    assert h.hub.next_timeout_ms() == -1 if h.native else 0 <= h.hub.next_timeout_ms() <= 1000  # the sweep
    h.hub.publish(1, batch(1), False, 1)
    assert h.hub.next_timeout_ms() == -1 if h.native else h.hub.next_timeout_ms() == 0  # leading edge
    h.hub.poll()
    h.hub.publish(1, batch(2), False, 1)
    assert h.hub.next_timeout_ms() == -1 if h.native else 0 < h.hub.next_timeout_ms() <= 300  # the rest
    h.pump(lambda: len(v.read()) == 2)
    h.hub.shutdown()
    assert h.hub.next_timeout_ms() == -1 and h.hub.fileno() == -1


def all_received(viewers: list[Client], frames: int) -> bool:
    return all(len(v.read()) == frames for v in viewers)


def test_two_hundred_viewers_get_every_batch_in_order(harness: Callable[..., Harness]) -> None:
    h = harness(flush_interval_ms=5)
    viewers = [h.connect(stream=9, variant=i % 2) for i in range(200)]
    rounds, per_round = 10, 5
    for r in range(rounds):
        items = [(9, batch(r * per_round + k + 1), False, 1) for k in range(per_round)]
        h.hub.publish_many(items)
        h.pump(functools.partial(all_received, viewers, (r + 1) * per_round))
    for v in viewers:
        assert [e["offset"] for e in v.events()] == list(range(1, rounds * per_round + 1))
    stats = h.hub.stats()
    assert stats["flushes"] == rounds
    assert stats["writes"] == rounds * 200  # one write per viewer per flush
    assert stats["frames_built"] == rounds * 2


# --- file descriptors ---


def test_no_fd_leak_through_a_whole_life(hub_module: ModuleType) -> None:
    before = hub_kind_fds()
    hub = hub_module.Hub(flush_interval_ms=1)
    socks = []
    for i in range(20):
        ours, theirs = socket.socketpair()
        socks.append((ours, hub.adopt(theirs.detach(), i % 3, JSON)))
    hub.publish(0, batch(1), False, 1)
    hub.close(socks[0][1], 1000)
    socks[1][0].close()
    hub.poll()
    hub.close_all(1001, "bye")
    del hub  # the destructor closes what still lingers, and the epoll and timer fds
    gc.collect()
    for ours, _conn in socks:
        ours.close()
    assert hub_kind_fds() == before


def test_shutdown_closes_everything_at_once(harness: Callable[..., Harness]) -> None:
    h = harness()
    clients = [h.connect() for _ in range(5)]
    h.hub.shutdown()
    assert len(h.hub.drain()) == 5  # CLOSED 1006 for each open one
    assert all(c.read() == [] and c.eof for c in clients)
    h.hub.poll()  # harmless afterwards


# --- parity with the reference parser on random streams ---

TEXT_POOL = "abc xyz 0123456789 éü€ κόσμε 😀☃"
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
MAX_SIZE, MAX_FRAGMENTS = 1024, 6


def random_message(rng: random.Random) -> list[bytes]:
    """One text or binary message, maybe fragmented, with control frames in between."""
    opcode = rng.choice([OP_TEXT, OP_BINARY])
    size = rng.choice([0, 1, 5, 40, 200, 900, 1100])  # 1100: over MAX_SIZE
    if opcode == OP_TEXT:
        payload = "".join(rng.choice(TEXT_POOL) for _ in range(size // 2)).encode()
        if rng.random() < 0.15:  # make it invalid somewhere
            at = rng.randint(0, len(payload))
            payload = payload[:at] + rng.choice(BAD_UTF8) + payload[at:]
    else:
        payload = rng.randbytes(size)
    count = rng.randint(1, MAX_FRAGMENTS + 1 if rng.random() < 0.1 else 3)
    cuts = sorted(rng.randint(0, len(payload)) for _ in range(count - 1))
    parts = [payload[i:j] for i, j in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    frames = []
    for i, part in enumerate(parts):
        frames.append(client_frame(opcode if i == 0 else OP_CONT, part, fin=i == len(parts) - 1, mask=rng.randbytes(4)))
        if i < len(parts) - 1 and rng.random() < 0.3:
            frames.append(client_frame(rng.choice([OP_PING, OP_PONG]), rng.randbytes(rng.randint(0, 20))))
    return frames


def random_bad_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(12)
    if kind == 0:
        return client_frame(OP_TEXT, b"hi", mask=None)
    if kind == 1:
        return client_frame(OP_BINARY, b"hi", rsv=rng.choice([1, 2, 3, 4]))
    if kind == 2:
        return client_frame(rng.choice([3, 7, 11, 15]), b"")
    if kind == 3:
        return client_frame(OP_PING, b"x" * 126)
    if kind == 4:
        return client_frame(OP_PING, b"", fin=False)
    if kind == 5:
        return client_frame(OP_CONT, b"orphan")
    if kind == 6:
        return client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b")
    if kind == 7:
        return client_frame(OP_BINARY, b"", length=MAX_SIZE + 1)
    if kind == 8:
        return client_frame(OP_CLOSE, rng.choice([0, 999, 1004, 1005, 1006, 1015, 2000, 5000]).to_bytes(2, "big"))
    if kind == 9:
        return client_frame(OP_CLOSE, b"\x03")
    if kind == 10:
        return client_frame(OP_CLOSE, b"\x03\xe8" + rng.choice(BAD_UTF8))
    return bytes([0x82, 0xFF]) + (1 << 63 | 5).to_bytes(8, "big") + MASK


def random_stream(rng: random.Random) -> bytes:
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 10)):
        roll = rng.random()
        if roll < 0.6:
            frames += random_message(rng)
        elif roll < 0.8:
            frames.append(client_frame(rng.choice([OP_PING, OP_PONG]), rng.randbytes(rng.randint(0, 125))))
        elif roll < 0.9:
            frames.append(random_bad_frame(rng))
        else:
            code = rng.choice([1000, 1001, 1003, 1011, 3000, 4999])
            reason = rng.choice([b"", "bye ☃".encode()])
            frames.append(client_frame(OP_CLOSE, rng.choice([b"", code.to_bytes(2, "big") + reason])))
    return b"".join(frames)


def reference(stream: bytes) -> tuple[list[tuple[int, bytes]], int | None]:
    """Messages before the first error or close, and the code it ends with (None: open).

    After an error the stream is fed again one byte at a time, so every message completed
    before the error is counted: the hub delivers those too, wherever the TCP chunks split.
    """
    def parser() -> pure.FrameParser:
        return pure.FrameParser(max_message_size=MAX_SIZE, max_fragments=MAX_FRAGMENTS, require_mask=True)

    try:
        chunks = [stream]
        outputs = [parser().feed(stream)]
    except pure.ProtocolError:
        bytewise = parser()
        chunks = [stream[i : i + 1] for i in range(len(stream))]
        outputs = (bytewise.feed(chunk) for chunk in chunks)  # type: ignore[assignment]
    messages: list[tuple[int, bytes]] = []
    try:
        for out in outputs:
            for opcode, payload in out:
                if opcode in (OP_TEXT, OP_BINARY):
                    messages.append((opcode, payload))
                elif opcode == OP_CLOSE:
                    return messages, code_of(payload) if payload else 1000
    except pure.ProtocolError as exc:
        return messages, exc.close_code
    return messages, None


def run_case(h: Harness, rng: random.Random, case: int) -> int | None:
    """Send one random stream in random chunks; check the hub against the reference."""
    stream = random_stream(rng)
    want_messages, want_code = reference(stream)
    v = h.connect(stream=case)
    bytes_in = h.stat("bytes_in")
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 2, 7, 64, 500, 4096])
        try:
            v.sock.sendall(stream[pos : pos + step])
        except OSError:
            break  # the hub closed on an error and let go of the socket
        pos += step
        h.hub.poll()
        h.events.extend(h.hub.drain())
    if want_code is None:
        h.pump(lambda: h.stat("bytes_in") - bytes_in == len(stream) and not h.closed(v))
    else:
        h.pump(lambda: h.closed(v) is not None and v.close_code() is not None)
    assert h.messages(v) == want_messages, f"case {case}"
    assert h.closed(v) == want_code, f"case {case}"
    if want_code is not None:
        assert v.close_code() == want_code, f"case {case}"
    v.sock.close()
    h.pump(lambda: h.closed(v) is not None and h.stat("closing") == 0)
    return want_code


def test_random_streams_match_the_reference_parser(harness: Callable[..., Harness]) -> None:
    rng = random.Random(6455)
    h = harness(max_message_bytes=MAX_SIZE, max_fragments=MAX_FRAGMENTS)
    codes = [run_case(h, rng, case) for case in range(300)]
    assert codes.count(None) >= 40 and len(set(codes)) >= 8  # open, closes, each error code
    assert {1002, 1007, 1009} <= set(codes)


def test_mutated_streams_only_close_with_documented_codes(harness: Callable[..., Harness]) -> None:
    """Bit-flipped frame streams, on plain and deflate connections: the hub closes with a
    protocol code, echoes a client close, or stays open; it never crashes or hangs."""
    rng = random.Random(7692)
    h = harness(max_message_bytes=MAX_SIZE, max_fragments=MAX_FRAGMENTS, inflate_limit_bytes=4096)
    for case in range(int(os.environ.get("CHORUS_FUZZ_CASES", "150"))):
        stream = bytearray(random_stream(rng))
        if rng.random() < 0.5:  # a compressed message to inflate, maybe corrupted below
            stream[:0] = client_frame(rng.choice([OP_TEXT, OP_BINARY]), deflate(rng.randbytes(50)), rsv=4)
        for _ in range(rng.randint(1, 4)):
            stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
        v = h.connect(stream=case, variant=rng.choice([JSON, MSGPACK | DEFLATE]))
        with contextlib.suppress(OSError):
            v.sock.sendall(stream)
        v.sock.shutdown(socket.SHUT_WR)  # then EOF: every case ends with a CLOSED event
        h.pump(lambda v=v: h.closed(v) is not None)  # type: ignore[misc]
        code = h.closed(v)
        assert code is not None and 1000 <= code <= 4999 and code not in (1004, 1005), f"case {case}"
        v.sock.close()
    h.pump(lambda: h.stat("closing") == 0)
    assert h.hub.connections() == 0


def test_ping_flood_closes_1008(harness: Callable[..., Harness]) -> None:
    h = harness(max_pings_per_s=10)
    calm, flood = h.connect(stream=1), h.connect(stream=1)
    calm.send(b"".join(client_frame(OP_PING, b"%d" % i) for i in range(10)))  # at the limit: fine
    flood.send(b"".join(client_frame(OP_PING, b"%d" % i) for i in range(11)))
    assert_closed_with(h, flood, 1008)
    pongs: list[tuple[int, bytes]] = []

    def ten_pongs_read() -> bool:
        pongs.extend(calm.read())
        return len(pongs) >= 10

    h.pump(ten_pongs_read)
    assert [op for op, _p in pongs] == [OP_PONG] * 10
    assert h.closed(calm) is None
