"""Unit and parity tests for the RFC 6455 frame codec, run against both twins.

The native twin is ``chorus.native._wsframe``: the hub's own C++ parser and encoder
(native/src/wsframe.cpp), the code that parses every viewer's frames, here behind codec_pure's
API. Parsers are tested with bytes: each vector is fed whole, one byte at a time, and followed
by the start of another frame. Seeded random streams check that the native and pure modules
give identical messages and identical errors, byte for byte.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from frames import MASK, client_frame

import chorus.native
import chorus.native.codec_pure as pure
from chorus.errors import ChorusError

native: ModuleType | None
try:
    import chorus.native._wsframe as native
except ImportError:
    if os.environ.get("CHORUS_EXPECT_IMPL") == "native":
        raise
    native = None

__all__ = ["native", "run_parser"]  # tests/test_fuzz.py drives the same twins

needs_native = pytest.mark.skipif(native is None, reason="native codec not built")
IMPLS = [pytest.param(pure, id="pure"), pytest.param(native, id="native", marks=needs_native)]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
COMPRESSED = 0x100  # OR-ed into the opcode of a permessage-deflate message (RFC 7692)
RSV1 = 4  # client_frame's rsv argument: RSV1, RSV2, RSV3 are 4, 2, 1
DEFLATE = {"allow_rsv1": True}
TRAILER = b"\x89\x84" + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(b"next"))  # a ping


@pytest.fixture(params=IMPLS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def deflate(data: bytes) -> bytes:
    """A permessage-deflate message body (RFC 7692 7.2.1), independent of the code under test."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


def inflate(body: bytes) -> bytes:
    """RFC 7692 7.2.2: append the stripped sync-flush tail; the stream has no final block."""
    return zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")


DEFLATED_TEXT = deflate("hello, hello, hello! κόσμε 😀".encode())
DEFLATED_BINARY = deflate(bytes(range(256)) * 4)
DEFLATED_LONG = deflate(b"chat " * 2000)  # 10000 bytes that compress to a few dozen


# --- the switch module ---


def test_compressed_flag_value(codec: ModuleType) -> None:
    assert codec.COMPRESSED == COMPRESSED
    assert COMPRESSED & 0xFF == 0  # clear of every opcode, so `opcode & 0x0F` recovers it


def test_both_twins_export_the_same_api() -> None:
    if native is None:
        pytest.skip("native codec not built")
    assert sorted(pure.__all__) == sorted(native.__all__)
    for name in pure.__all__:
        if name.isupper():
            assert getattr(pure, name) == getattr(native, name), name


def test_switch_exports_the_chosen_twin() -> None:
    forced = os.environ.get("CHORUS_PURE", "") not in ("", "0")
    expected = "pure" if forced or native is None else "native"
    assert expected == chorus.native.IMPLEMENTATION
    impl = pure if expected == "pure" else native
    for name in pure.__all__:
        assert getattr(chorus.native, name) is getattr(impl, name), name


def test_chorus_pure_forces_the_pure_twin() -> None:
    env = {**os.environ, "CHORUS_PURE": "1"}
    code = "import chorus.native as n; print(n.IMPLEMENTATION, n.FrameParser.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["pure", "chorus.native.codec_pure"]


# --- encoding ---


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
    ],
)
def test_encode_frame_lengths(codec: ModuleType, length: int, header: bytes) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    assert codec.encode_frame(OP_BINARY, payload) == header + payload


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encode_frame_accepts_buffers(codec: ModuleType, kind: Callable[[bytes], Any]) -> None:
    assert codec.encode_frame(OP_TEXT, kind(b"hi")) == b"\x81\x02hi"


def test_encode_frame_flags(codec: ModuleType) -> None:
    assert codec.encode_frame(OP_TEXT, b"a", fin=False) == b"\x01\x01a"
    assert codec.encode_frame(OP_TEXT, b"a", rsv1=True) == b"\xc1\x01a"
    assert codec.encode_frame(OP_CONT, b"a") == b"\x80\x01a"
    assert codec.encode_frame(OP_PONG, b"") == b"\x8a\x00"


@pytest.mark.parametrize(
    ("opcode", "payload", "fin"),
    [
        (3, b"", True),
        (11, b"", True),
        (16, b"", True),
        (OP_PING, bytes(126), True),
        (OP_PING, b"", False),
    ],
)
def test_encode_frame_refuses(codec: ModuleType, opcode: int, payload: bytes, fin: bool) -> None:
    with pytest.raises(ValueError):
        codec.encode_frame(opcode, payload, fin=fin)


def test_encode_frames_is_the_concatenation(codec: ModuleType) -> None:
    payloads = [b"", b"a", bytes(125), bytes(126), bytes(70000), b"x" * 300]
    expected = b"".join(codec.encode_frame(OP_TEXT, p) for p in payloads)
    assert codec.encode_frames(OP_TEXT, payloads) == expected
    assert codec.encode_frames(OP_BINARY, [bytearray(b"ab"), memoryview(b"cd")]) == (
        b"\x82\x02ab\x82\x02cd"
    )
    assert codec.encode_frames(OP_TEXT, []) == b""
    with pytest.raises(ValueError):
        codec.encode_frames(OP_PING, [bytes(126)])


def truncated_reason(reason: str) -> bytes:
    """The oracle: the longest whole-character prefix whose UTF-8 fits 123 bytes."""
    out = b""
    for char in reason:
        if len(out) + len(char.encode()) > 123:
            break
        out += char.encode()
    return out


@pytest.mark.parametrize(
    "reason",
    [
        "",
        "bye",
        "a" * 123,
        "a" * 124,
        "a" * 200,
        "é" * 100,
        "€" * 50,
        "😀" * 40,
        "a" + "😀" * 40,
        "ab" + "€" * 50,
    ],
)
def test_encode_close_truncates_on_a_character_boundary(codec: ModuleType, reason: str) -> None:
    frame = codec.encode_close(1001, reason)
    expected = b"\x03\xe9" + truncated_reason(reason)
    assert frame == bytes([0x88, len(expected)]) + expected
    parser = codec.FrameParser(require_mask=False)
    assert parser.feed(frame) == [(OP_CLOSE, expected)]


@pytest.mark.parametrize("code", [1000, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
def test_encode_close_codes(codec: ModuleType, code: int) -> None:
    assert codec.encode_close(code) == b"\x88\x02" + code.to_bytes(2, "big")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_encode_close_refuses_reserved_codes(codec: ModuleType, code: int) -> None:
    with pytest.raises(ValueError):
        codec.encode_close(code)


# --- UTF-8 ---


def test_validate_utf8_matches_python_on_all_two_byte_strings(codec: ModuleType) -> None:
    for first in range(256):
        for second in range(256):
            data = bytes((first, second))
            try:
                data.decode("utf-8")
                valid = True
            except UnicodeDecodeError:
                valid = False
            assert codec.validate_utf8(data) is valid, data


BOUNDARY_BYTES = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0,
                  0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]  # fmt: skip


def test_validate_utf8_matches_python_on_boundary_sequences(codec: ModuleType) -> None:
    # Every 3- and 4-byte string of range-boundary bytes, alone and after 9 ASCII bytes (so the
    # native word-at-a-time path hands over mid-word).
    for size in (3, 4):
        for seq in itertools.product(BOUNDARY_BYTES, repeat=size):
            for data in (bytes(seq), b"123456789" + bytes(seq)):
                try:
                    data.decode("utf-8")
                    valid = True
                except UnicodeDecodeError:
                    valid = False
                assert codec.validate_utf8(data) is valid, data


@pytest.mark.parametrize(
    ("data", "valid"),
    [
        (b"", True),
        (b"plain ascii, longer than eight bytes", True),
        ("κόσμε😀".encode(), True),
        (b"\xed\x9f\xbf", True),
        (b"\xee\x80\x80", True),
        (b"\xf4\x8f\xbf\xbf", True),
        (b"\xed\xa0\x80", False),
        (b"\xc0\xaf", False),
        (b"\xe0\x80\xaf", False),
        (b"\xf0\x80\x80\xaf", False),
        (b"\xf4\x90\x80\x80", False),
        (b"\xf5", False),
        (b"abcdefgh\xff", False),
        (b"abcdefgh\xe2\x82", False),
        (b"\x80", False),
    ],
)
def test_validate_utf8_vectors(codec: ModuleType, data: bytes, valid: bool) -> None:
    assert codec.validate_utf8(data) is valid
    assert codec.validate_utf8(bytearray(data)) is valid


# --- parser vectors ---

OK: list[tuple[str, bytes, dict[str, Any], list[tuple[int, bytes]]]] = [
    ("text", client_frame(OP_TEXT, b"hello"), {}, [(OP_TEXT, b"hello")]),
    ("text-empty", client_frame(OP_TEXT), {}, [(OP_TEXT, b"")]),
    ("binary-empty", client_frame(OP_BINARY), {}, [(OP_BINARY, b"")]),
    ("text-4-byte", client_frame(OP_TEXT, "😀κ".encode()), {}, [(OP_TEXT, "😀κ".encode())]),
    *[
        (
            f"binary-{n}",
            client_frame(OP_BINARY, bytes(range(256)) * (n // 256) + bytes(n % 256)),
            {},
            [(OP_BINARY, bytes(range(256)) * (n // 256) + bytes(n % 256))],
        )
        for n in (125, 126, 65535, 65536)
    ],
    ("ping", client_frame(OP_PING, b"are you there"), {}, [(OP_PING, b"are you there")]),
    ("ping-125", client_frame(OP_PING, bytes(125)), {}, [(OP_PING, bytes(125))]),
    ("pong-empty", client_frame(OP_PONG), {}, [(OP_PONG, b"")]),
    ("close-empty", client_frame(OP_CLOSE), {}, [(OP_CLOSE, b"")]),
    *[
        (
            f"close-{code}",
            client_frame(OP_CLOSE, close_payload(code, "bye é".encode())),
            {},
            [(OP_CLOSE, close_payload(code, "bye é".encode()))],
        )
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999)
    ],
    (
        "fragmented-with-ping",
        client_frame(OP_TEXT, b"hel", fin=False)
        + client_frame(OP_PING, b"p")
        + client_frame(OP_CONT, b"l", fin=False, mask=b"\x00\x00\x00\x00")
        + client_frame(OP_CONT, b"o", mask=b"\xff\x01\x02\x03"),
        {},
        [(OP_PING, b"p"), (OP_TEXT, b"hello")],
    ),
    (
        "fragmented-empty",
        client_frame(OP_BINARY, fin=False)
        + client_frame(OP_CONT, fin=False)
        + client_frame(OP_CONT),
        {},
        [(OP_BINARY, b"")],
    ),
    (
        "codepoint-split-across-fragments",
        client_frame(OP_TEXT, b"a\xf0", fin=False)
        + client_frame(OP_CONT, b"\x9f\x98", fin=False)
        + client_frame(OP_CLOSE, close_payload(1000))
        + client_frame(OP_CONT, b"\x80"),
        {},
        [(OP_CLOSE, b"\x03\xe8"), (OP_TEXT, "a😀".encode())],
    ),
    (
        "two-messages",
        client_frame(OP_TEXT, b"a") + client_frame(OP_BINARY, b"b"),
        {},
        [(OP_TEXT, b"a"), (OP_BINARY, b"b")],
    ),
    (
        "unmasked-when-allowed",
        client_frame(OP_TEXT, b"hi", mask=None),
        {"require_mask": False},
        [(OP_TEXT, b"hi")],
    ),
    (
        "max-fragments-exactly",
        client_frame(OP_BINARY, b"a", fin=False)
        + client_frame(OP_CONT, b"b", fin=False)
        + client_frame(OP_CONT, b"c"),
        {"max_fragments": 3},
        [(OP_BINARY, b"abc")],
    ),
    (
        "max-size-exactly",
        client_frame(OP_BINARY, bytes(6), fin=False) + client_frame(OP_CONT, bytes(4)),
        {"max_message_size": 10},
        [(OP_BINARY, bytes(10))],
    ),
    # permessage-deflate (RFC 7692): the parser returns the compressed body, flagged.
    (
        "deflate-text",
        client_frame(OP_TEXT, DEFLATED_TEXT, rsv=RSV1),
        DEFLATE,
        [(OP_TEXT | COMPRESSED, DEFLATED_TEXT)],
    ),
    (
        "deflate-binary",
        client_frame(OP_BINARY, DEFLATED_BINARY, rsv=RSV1),
        DEFLATE,
        [(OP_BINARY | COMPRESSED, DEFLATED_BINARY)],
    ),
    (
        "deflate-empty",  # RFC 7692 7.2.3.6: an empty message compresses to one 0x00 byte
        client_frame(OP_TEXT, deflate(b""), rsv=RSV1),
        DEFLATE,
        [(OP_TEXT | COMPRESSED, b"\x00")],
    ),
    (
        "deflate-fragmented-with-ping",  # RFC 7692 6.1: RSV1 on the first frame only
        client_frame(OP_TEXT, DEFLATED_TEXT[:5], fin=False, rsv=RSV1)
        + client_frame(OP_PING, b"p")
        + client_frame(OP_CONT, DEFLATED_TEXT[5:9], fin=False, mask=b"\xff\x01\x02\x03")
        + client_frame(OP_CONT, DEFLATED_TEXT[9:]),
        DEFLATE,
        [(OP_PING, b"p"), (OP_TEXT | COMPRESSED, DEFLATED_TEXT)],
    ),
    (
        "deflate-fragmented-binary-empty-first",
        client_frame(OP_BINARY, fin=False, rsv=RSV1) + client_frame(OP_CONT, DEFLATED_BINARY),
        DEFLATE,
        [(OP_BINARY | COMPRESSED, DEFLATED_BINARY)],
    ),
    (
        "deflate-then-plain",  # the flag belongs to one message, not to the connection
        client_frame(OP_TEXT, DEFLATED_TEXT, rsv=RSV1)
        + client_frame(OP_TEXT, b"plain")
        + client_frame(OP_BINARY, DEFLATED_BINARY, rsv=RSV1)
        + client_frame(OP_BINARY, b"\xff"),
        DEFLATE,
        [
            (OP_TEXT | COMPRESSED, DEFLATED_TEXT),
            (OP_TEXT, b"plain"),
            (OP_BINARY | COMPRESSED, DEFLATED_BINARY),
            (OP_BINARY, b"\xff"),
        ],
    ),
    (
        "deflate-text-not-utf8",  # compressed bytes are not text; the caller checks the inflated
        client_frame(OP_TEXT, b"\xff\xfe\xed\xa0\x80\xc0", rsv=RSV1),
        DEFLATE,
        [(OP_TEXT | COMPRESSED, b"\xff\xfe\xed\xa0\x80\xc0")],
    ),
    (
        "deflate-not-utf8-split-across-fragments",
        client_frame(OP_TEXT, b"a\xf0", fin=False, rsv=RSV1) + client_frame(OP_CONT, b"\xff"),
        DEFLATE,
        [(OP_TEXT | COMPRESSED, b"a\xf0\xff")],
    ),
    (
        "deflate-max-size-counts-compressed-bytes",
        client_frame(OP_TEXT, DEFLATED_LONG, rsv=RSV1),
        {"allow_rsv1": True, "max_message_size": len(DEFLATED_LONG)},
        [(OP_TEXT | COMPRESSED, DEFLATED_LONG)],
    ),
    (
        "allow-rsv1-plain-message",
        client_frame(OP_TEXT, b"hel", fin=False) + client_frame(OP_CONT, b"lo"),
        DEFLATE,
        [(OP_TEXT, b"hello")],
    ),
]

ERR: list[tuple[str, bytes, dict[str, Any], int]] = [
    *[(f"rsv-{rsv}", client_frame(OP_TEXT, b"a", rsv=rsv), {}, 1002) for rsv in (1, 2, 4, 7)],
    *[(f"opcode-{op}", client_frame(op, b"a"), {}, 1002) for op in (3, 4, 5, 6, 7, 11, 15)],
    ("ping-not-fin", client_frame(OP_PING, b"a", fin=False), {}, 1002),
    ("close-not-fin", client_frame(OP_CLOSE, fin=False), {}, 1002),
    ("ping-126", client_frame(OP_PING, bytes(126)), {}, 1002),
    ("continuation-first", client_frame(OP_CONT, b"a"), {}, 1002),
    (
        "text-inside-fragmented",
        client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
        {},
        1002,
    ),
    (
        "binary-inside-fragmented",
        client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_BINARY, b"b"),
        {},
        1002,
    ),
    ("unmasked", client_frame(OP_TEXT, b"hi", mask=None), {}, 1002),
    ("unmasked-ping", client_frame(OP_PING, mask=None), {}, 1002),
    ("length-top-bit", client_frame(OP_BINARY, length=1 << 63), {}, 1002),
    # Header only, no payload: the size is refused before anything is buffered.
    ("declared-too-big", client_frame(OP_BINARY, length=65537), {}, 1009),
    ("declared-too-big-64", client_frame(OP_BINARY, length=1 << 40), {}, 1009),
    (
        "declared-too-big-small-limit",
        client_frame(OP_TEXT, length=11),
        {"max_message_size": 10},
        1009,
    ),
    (
        "reassembled-too-big",
        client_frame(OP_BINARY, bytes(6), fin=False) + client_frame(OP_CONT, bytes(5)),
        {"max_message_size": 10},
        1009,
    ),
    (
        "too-many-fragments",
        client_frame(OP_BINARY, b"a", fin=False)
        + client_frame(OP_CONT, b"b", fin=False)
        + client_frame(OP_CONT, b"c", fin=False),
        {"max_fragments": 2},
        1009,
    ),
    ("invalid-utf8", client_frame(OP_TEXT, b"ab\xff"), {}, 1007),
    ("surrogate", client_frame(OP_TEXT, b"\xed\xa0\x80"), {}, 1007),
    ("overlong", client_frame(OP_TEXT, b"\xc0\xaf"), {}, 1007),
    ("above-u10ffff", client_frame(OP_TEXT, b"\xf4\x90\x80\x80"), {}, 1007),
    ("truncated-at-end", client_frame(OP_TEXT, b"ab\xf0\x9f"), {}, 1007),
    (
        "truncated-at-last-fragment",
        client_frame(OP_TEXT, b"a\xf0", fin=False) + client_frame(OP_CONT, b"\x9f"),
        {},
        1007,
    ),
    # Autobahn 6.4.1/6.4.2: the message is never finished, the invalid prefix must fail anyway.
    (
        "fail-fast-first-fragment",
        client_frame(OP_TEXT, "κόσμε".encode() + b"\xf4\x90\x80\x80", fin=False),
        {},
        1007,
    ),
    ("fail-fast-surrogate-prefix", client_frame(OP_TEXT, b"a\xed\xa0", fin=False), {}, 1007),
    (
        "fail-fast-second-fragment",
        client_frame(OP_TEXT, b"ok", fin=False) + client_frame(OP_CONT, b"\xf4\x90", fin=False),
        {},
        1007,
    ),
    ("close-1-byte", client_frame(OP_CLOSE, b"\x03"), {}, 1002),
    *[
        (f"close-code-{code}", client_frame(OP_CLOSE, close_payload(code)), {}, 1002)
        for code in (0, 999, 1004, 1005, 1006, 1012, 1013, 1015, 1016, 2999, 5000, 65535)
    ],
    ("close-reason-invalid", client_frame(OP_CLOSE, close_payload(1000, b"\xff")), {}, 1007),
    ("close-reason-truncated", client_frame(OP_CLOSE, close_payload(1000, b"\xc3")), {}, 1007),
    # permessage-deflate (RFC 7692 6.1): RSV1 only on the first frame of a data message.
    ("rsv1-without-deflate", client_frame(OP_TEXT, DEFLATED_TEXT, rsv=RSV1), {}, 1002),
    (
        "rsv1-deflate-off",
        client_frame(OP_BINARY, DEFLATED_BINARY, rsv=RSV1),
        {"allow_rsv1": False},
        1002,
    ),
    *[
        (f"deflate-rsv-{rsv}", client_frame(OP_TEXT, DEFLATED_TEXT, rsv=rsv), DEFLATE, 1002)
        for rsv in (1, 2, 3, 5, 6, 7)
    ],
    (
        "deflate-rsv1-on-continuation",
        client_frame(OP_TEXT, DEFLATED_TEXT[:5], fin=False, rsv=RSV1)
        + client_frame(OP_CONT, DEFLATED_TEXT[5:], rsv=RSV1),
        DEFLATE,
        1002,
    ),
    (
        "deflate-rsv1-on-continuation-of-plain",
        client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_CONT, b"b", rsv=RSV1),
        DEFLATE,
        1002,
    ),
    ("deflate-rsv1-on-lone-continuation", client_frame(OP_CONT, b"a", rsv=RSV1), DEFLATE, 1002),
    *[
        (f"deflate-rsv1-on-{name}", client_frame(op, payload, rsv=RSV1), DEFLATE, 1002)
        for name, op, payload in [
            ("ping", OP_PING, b"p"),
            ("pong", OP_PONG, b""),
            ("close", OP_CLOSE, close_payload(1000)),
        ]
    ],
    (
        "deflate-rsv1-on-ping-inside-message",
        client_frame(OP_TEXT, DEFLATED_TEXT[:5], fin=False, rsv=RSV1)
        + client_frame(OP_PING, b"p", rsv=RSV1),
        DEFLATE,
        1002,
    ),
    ("deflate-rsv1-unknown-opcode", client_frame(3, b"a", rsv=RSV1), DEFLATE, 1002),
    (
        "deflate-declared-too-big",  # the limit counts compressed bytes, as before
        client_frame(OP_TEXT, length=11, rsv=RSV1),
        {"allow_rsv1": True, "max_message_size": 10},
        1009,
    ),
    (
        "deflate-reassembled-too-big",
        client_frame(OP_BINARY, DEFLATED_LONG, fin=False, rsv=RSV1)
        + client_frame(OP_CONT, b"\x00"),
        {"allow_rsv1": True, "max_message_size": len(DEFLATED_LONG)},
        1009,
    ),
    ("deflate-plain-text-still-checked", client_frame(OP_TEXT, b"ab\xff"), DEFLATE, 1007),
]


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    yield "with-trailer", [data + TRAILER[:5]]


def feed_chunks(parser: Any, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


@pytest.mark.parametrize(
    ("data", "kwargs", "expected"), [v[1:] for v in OK], ids=[v[0] for v in OK]
)
def test_parser_accepts(
    codec: ModuleType, data: bytes, kwargs: dict[str, Any], expected: list[tuple[int, bytes]]
) -> None:
    for mode, chunks in chunkings(data):
        parser = codec.FrameParser(**kwargs)
        assert feed_chunks(parser, chunks) == expected, mode
        if mode == "with-trailer":  # the next frame's first bytes stayed buffered
            assert parser.feed(TRAILER[5:]) == [(OP_PING, b"next")]


@pytest.mark.parametrize(("data", "kwargs", "code"), [v[1:] for v in ERR], ids=[v[0] for v in ERR])
def test_parser_refuses(codec: ModuleType, data: bytes, kwargs: dict[str, Any], code: int) -> None:
    for mode, chunks in chunkings(data):
        parser = codec.FrameParser(**kwargs)
        with pytest.raises(codec.ProtocolError) as caught:
            feed_chunks(parser, chunks)
        assert caught.value.close_code == code, mode
        # The parser stays failed, with the same error.
        with pytest.raises(codec.ProtocolError) as again:
            parser.feed(TRAILER)
        assert (again.value.close_code, again.value.reason) == (code, caught.value.reason)


def splits(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The chunkings, and for short vectors every cut into two feeds."""
    yield from chunkings(data)
    if len(data) <= 300:
        for cut in range(1, len(data)):
            yield f"cut-{cut}", [data[:cut], data[cut:]]


@needs_native
@pytest.mark.parametrize(
    ("data", "kwargs"), [v[1:3] for v in OK + ERR], ids=[v[0] for v in OK + ERR]
)
def test_vectors_parity(data: bytes, kwargs: dict[str, Any]) -> None:
    # The same messages from every feed and the same close code and reason, byte for byte.
    for mode, chunks in splits(data):
        assert run_parser(native, chunks, kwargs) == run_parser(pure, chunks, kwargs), mode


def test_parser_accepts_buffer_types(codec: ModuleType) -> None:
    frame = client_frame(OP_TEXT, b"hello")
    for kind in (bytes, bytearray, memoryview):
        assert codec.FrameParser().feed(kind(frame)) == [(OP_TEXT, b"hello")]


def test_utf8_fails_inside_an_unfinished_frame(codec: ModuleType) -> None:
    # Autobahn 6.4.3/6.4.4: the frame is sent in parts; fail on the invalid part, not at the end.
    frame = client_frame(OP_TEXT, "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"edited")
    parser = codec.FrameParser()
    assert parser.feed(frame[:12]) == []
    with pytest.raises(codec.ProtocolError) as caught:
        parser.feed(frame[12:20])
    assert caught.value.close_code == 1007


def test_utf8_split_at_every_position(codec: ModuleType) -> None:
    samples = [
        "κόσμε😀€".encode(),
        b"a\xed\x9f\xbfb",
        b"\xf4\x8f\xbf\xbf",
        b"ab\xed\xa0\x80",
        b"\xe0\x9f\x80",
        b"\xf0\x8f\xbf\xbf",
        b"x\xc3",
        b"\xf4\x90",
    ]
    for data in samples:
        valid = pure.validate_utf8(data)
        for cut in range(len(data) + 1):
            head, tail = data[:cut], data[cut:]
            stream = client_frame(OP_TEXT, head, fin=False) + client_frame(OP_CONT, tail)
            parser = codec.FrameParser()
            if valid:
                assert parser.feed(stream) == [(OP_TEXT, data)]
            else:
                with pytest.raises(codec.ProtocolError, match="UTF-8"):
                    parser.feed(stream)


def test_error_str(codec: ModuleType) -> None:
    err = codec.ProtocolError(1002, "reserved bits set")
    assert (err.close_code, err.reason, str(err)) == (
        1002,
        "reserved bits set",
        "1002 reserved bits set",
    )


def test_one_protocol_error_class_for_both_twins() -> None:
    assert issubclass(pure.ProtocolError, ChorusError)
    if native is not None:  # `except chorus.native.ProtocolError` catches either twin's
        assert native.ProtocolError is pure.ProtocolError


def test_parser_limits(codec: ModuleType) -> None:
    parser = codec.FrameParser(1000, 3, False, True)
    assert (parser.max_message_size, parser.max_fragments, parser.require_mask, parser.allow_rsv1) == (
        1000, 3, False, True,
    )
    for kwargs in ({"max_message_size": -1}, {"max_fragments": -1}):
        with pytest.raises(ValueError, match=">= 0"):
            codec.FrameParser(**kwargs)


def test_parser_leaves_the_callers_buffer_alone(codec: ModuleType) -> None:
    # The C++ parser unmasks in place (the hub's read buffer is its own): never in the caller's.
    stream = client_frame(OP_TEXT, b"hello", fin=False) + client_frame(OP_PING, b"p") + client_frame(OP_CONT, b"!")
    data = bytearray(stream)
    view = memoryview(data)
    parser = codec.FrameParser()
    assert parser.feed(view[:9]) + parser.feed(view[9:]) == [(OP_PING, b"p"), (OP_TEXT, b"hello!")]
    assert data == stream


def test_parser_after_a_large_feed(codec: ModuleType) -> None:
    big = bytes(range(256)) * 1000  # 256 KB in one feed, then the parser carries on as before
    parser = codec.FrameParser(max_message_size=1 << 20)
    assert parser.feed(client_frame(OP_BINARY, big) + TRAILER[:3]) == [(OP_BINARY, big)]
    assert parser.feed(TRAILER[3:] + client_frame(OP_TEXT, b"ok")) == [(OP_PING, b"next"), (OP_TEXT, b"ok")]


def test_encode_close_refuses_a_reason_that_is_not_utf8(codec: ModuleType) -> None:
    with pytest.raises(UnicodeEncodeError):
        codec.encode_close(1000, "lone \ud800")


def test_deflate_vectors_are_what_they_claim() -> None:
    assert inflate(DEFLATED_TEXT) == "hello, hello, hello! κόσμε 😀".encode()
    assert inflate(DEFLATED_BINARY) == bytes(range(256)) * 4
    assert len(DEFLATED_LONG) < 100 and inflate(DEFLATED_LONG) == b"chat " * 2000
    assert not pure.validate_utf8(DEFLATED_TEXT)  # so the parser must not check it


def test_allow_rsv1_attribute(codec: ModuleType) -> None:
    assert codec.FrameParser().allow_rsv1 is False
    assert codec.FrameParser(allow_rsv1=True).allow_rsv1 is True


@pytest.mark.parametrize(
    ("stream", "kwargs", "reason"),
    [
        (client_frame(OP_TEXT, b"a", rsv=RSV1), {}, "reserved bits set"),
        (client_frame(OP_TEXT, b"a", rsv=2), DEFLATE, "reserved bits set"),
        (client_frame(OP_PING, b"a", rsv=RSV1), DEFLATE, "RSV1 on a control frame"),
        (
            client_frame(OP_TEXT, b"a", fin=False, rsv=RSV1) + client_frame(OP_CONT, rsv=RSV1),
            DEFLATE,
            "RSV1 on a continuation frame",
        ),
    ],
)
def test_rsv_error_reasons(
    codec: ModuleType, stream: bytes, kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(codec.ProtocolError) as caught:
        codec.FrameParser(**kwargs).feed(stream)
    assert (caught.value.close_code, caught.value.reason) == (1002, reason)


def test_deflate_round_trip(codec: ModuleType) -> None:
    # What a permessage-deflate server does with the parser's output: strip the flag, inflate.
    text = "κόσμε 😀 ".encode() * 50
    body = deflate(text)
    stream = client_frame(OP_TEXT, body[:3], fin=False, rsv=RSV1) + client_frame(OP_CONT, body[3:])
    [(opcode, payload)] = codec.FrameParser(allow_rsv1=True).feed(stream)
    assert (opcode & 0x0F, bool(opcode & codec.COMPRESSED)) == (OP_TEXT, True)
    assert inflate(payload) == text


# --- seeded random parity ---

TEXT_POOLS = ["abcdefgh ", "éüßñ", "€中文✓", "😀𝄞🎉"]
CHUNK_SIZES = [1, 1, 2, 3, 5, 8, 16, 64, 200, 5000]


def random_text(rng: random.Random, size: int) -> bytes:
    return "".join(rng.choice(rng.choice(TEXT_POOLS)) for _ in range(size)).encode()


def random_control(rng: random.Random) -> tuple[bytes, tuple[int, bytes]]:
    opcode = rng.choice([OP_PING, OP_PONG, OP_CLOSE])
    if opcode == OP_CLOSE:
        code = rng.choice([1000, 1001, 1008, 3000, 4999])
        payload = rng.choice([b"", close_payload(code, random_text(rng, rng.randint(0, 20)))])
    else:
        payload = rng.randbytes(rng.randint(0, 125))
    return client_frame(opcode, payload, mask=rng.randbytes(4)), (opcode, payload)


def random_message(
    rng: random.Random, deflated: bool = False
) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """One message cut at random byte offsets (splitting code points), controls in between.

    With ``deflated`` half the messages are compressed (RFC 7692): RSV1 on the first frame, the
    compressed body cut into fragments; the others are plain. Without it no extra draws are
    made, so the plain streams stay what they were.
    """
    opcode = rng.choice([OP_TEXT, OP_BINARY])
    size = (
        rng.choice([0, 1, 10, 60, 125, 126, 300, 70000])
        if rng.random() < 0.2
        else rng.randint(0, 40)
    )
    payload = random_text(rng, size) if opcode == OP_TEXT else rng.randbytes(size)
    compressed = deflated and rng.random() < 0.5
    if compressed:
        payload = deflate(payload)
    cuts = sorted(rng.randint(0, len(payload)) for _ in range(rng.randint(0, 4)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    frames, events = [], []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        op = opcode if i == 0 else OP_CONT
        rsv = RSV1 if compressed and i == 0 else 0
        frames.append(client_frame(op, piece, fin=last, rsv=rsv, mask=rng.randbytes(4)))
        if not last and rng.random() < 0.3:
            control, event = random_control(rng)
            frames.append(control)
            events.append(event)
    return frames, [*events, (opcode | COMPRESSED if compressed else opcode, payload)]


def random_stream(
    rng: random.Random, deflated: bool = False
) -> tuple[bytes, list[tuple[int, bytes]]]:
    frames: list[bytes] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.25:
            control, event = random_control(rng)
            frames.append(control)
            expected.append(event)
        else:
            more, events = random_message(rng, deflated)
            frames += more
            expected += events
    return b"".join(frames), expected


def random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.choice(CHUNK_SIZES)
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


Outcome = tuple[list[list[tuple[int, bytes]]], tuple[int, str] | None]


def run_parser(codec: ModuleType | None, chunks: list[bytes], kwargs: dict[str, Any]) -> Outcome:
    """Per-feed results and the error, if any; only ProtocolError may escape a feed."""
    assert codec is not None, "the native twin is not built (needs_native skips such tests)"
    parser = codec.FrameParser(**kwargs)
    results = []
    for chunk in chunks:
        try:
            results.append(parser.feed(chunk))
        except codec.ProtocolError as exc:
            return results, (exc.close_code, exc.reason)
    return results, None


@needs_native
@pytest.mark.parametrize(
    ("seed", "deflated"), [(6455, False), (7692, True)], ids=["plain", "deflate"]
)
def test_random_valid_streams_parity(seed: int, deflated: bool) -> None:
    rng = random.Random(seed)
    kwargs = {"max_message_size": 1 << 20, "allow_rsv1": deflated}
    for case in range(2000):
        data, expected = random_stream(rng, deflated)
        chunks = random_chunks(rng, data)
        got_pure = run_parser(pure, chunks, kwargs)
        got_native = run_parser(native, chunks, kwargs)
        assert got_pure == got_native, case
        assert got_pure[1] is None, case
        assert [event for feed in got_pure[0] for event in feed] == expected, case


def garbage(rng: random.Random, deflated: bool = False) -> bytes:
    """Random bytes, or a valid stream with a few bytes changed, cut short or spliced."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300))
    data = bytearray(random_stream(rng, deflated)[0])
    if kind == 1 and data:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return bytes(data[: rng.randint(0, len(data))]) + rng.randbytes(rng.randint(0, 20))


@needs_native
@pytest.mark.parametrize(
    ("seed", "deflated"), [(1002, False), (7692, True)], ids=["plain", "deflate"]
)
def test_random_garbage_parity(seed: int, deflated: bool) -> None:
    rng = random.Random(seed)
    codes = set()
    for case in range(2000):
        data = garbage(rng, deflated)
        kwargs = {
            "max_message_size": rng.choice([16, 1000, 65536]),
            "max_fragments": rng.choice([2, 64]),
            "require_mask": rng.random() < 0.7,
            "allow_rsv1": deflated,
        }
        chunks = random_chunks(rng, data)
        got_pure = run_parser(pure, chunks, kwargs)
        assert got_pure == run_parser(native, chunks, kwargs), case
        if got_pure[1] is not None:
            codes.add(got_pure[1][0])
    assert codes == {1002, 1007, 1009}  # the generator reaches every kind of failure
