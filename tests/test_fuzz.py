"""Fuzzing (issue 11): every parser of hostile input, fed what hypothesis makes of it.

Targets, and what each must do whatever it is given:

- ``parse_client_message`` (JSON and msgpack; random bytes, near-valid messages, deep nesting,
  huge integers, surrogates, mutated bytes): return a message or a BadMessage, never raise;
  what it accepts is clean (chorus/protocol.py) and every answer encodes.
- Comment text through validation and the encoders: refused, or it survives
  ``encode_record``/``encode_event``/``encode_ack`` and comes back equal.
- ``RequestParser.feed`` (gateway/httpreq.py; random and near-valid requests, whole, byte by
  byte and in random pieces): a request, None, or its own HttpError.
- The two frame parser twins (codec_pure and the C++ ``_wsframe``, the hub's own parser from
  native/src/wsframe.cpp): the same messages and the same error, chunk for chunk, on random
  and mutated streams.
- The hub's own parser (the C++ ``_hub`` and ``hub_pure``): random and mutated frame streams
  on real socketpairs, plain and permessage-deflate; on plain connections the hub delivers
  the messages and closes with the code the reference parser (codec_pure) expects, or 1006 at
  EOF when the stream is merely cut short; it never crashes, and a healthy viewer on the same
  hub keeps getting its events and having its messages read.
- The moderator API's and the POST endpoint's body readers (gateway/modapi.py ``_body``,
  gateway/http.py ``_comment_text`` behind the route's nesting check): only their own error.
- ``verify_token`` on random strings, mutated tokens and tokens signed with the test key over
  random claims: an Identity or an AuthError, nothing else.

Every test is seeded (``derandomize``: the examples depend only on the test) and bounded:
``CHORUS_FUZZ_EXAMPLES=N`` (default 150) examples per target, a third of that for the hub
targets, which go through sockets; the file takes ~30 s on a loaded 2-core machine. Run it
longer on demand with e.g. ``CHORUS_FUZZ_EXAMPLES=5000``. The number of inputs each target
tried is printed at the end of the module (and ``--hypothesis-show-statistics`` gives
hypothesis' own account).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import msgpack
import pytest
from frames import client_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import native as native_codec
from test_codec import run_parser
from test_hostile_input import AUTH, claims, signed
from test_hub import DEFLATE, JSON, MAX_FRAGMENTS, MAX_SIZE, MSGPACK, Harness, batch, reference
from test_hub import hub_module as hub_module  # the fixture: the hub targets run against both hubs

from chorus.auth import AuthError, Identity, verify_token
from chorus.codes import MAX_COMMENT_CHARS, MAX_NONCE_CHARS, ErrorCode
from chorus.gateway import http as gateway_http
from chorus.gateway import modapi
from chorus.gateway.httpreq import HttpError, HttpRequest, RequestParser
from chorus.ingest.records import Comment, Control, RecordError, decode_any, decode_record, encode_record
from chorus.native import codec_pure
from chorus.protocol import (
    MAX_EPOCH_CHARS,
    MAX_OFFSET,
    MIN_OFFSET,
    BadMessage,
    PostComment,
    React,
    Resume,
    Wire,
    clean_text,
    decode_event,
    encode_ack,
    encode_event,
    error_event,
    json_compact,
    parse_client_message,
    validate_comment_text,
)
from chorus.protocol import _json_too_deep as too_deep  # the nesting check the POST route applies first

EXAMPLES = int(os.environ.get("CHORUS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FUZZ_SOCKETS = settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
TRIED: Counter[str] = Counter()  # inputs per target, printed at the end
HUB_CLOSES: Counter[int] = Counter()  # the codes the hubs closed fuzzed connections with


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and TRIED:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items()))
        reporter.write_line(f"\nfuzz inputs tried ({time.monotonic() - started:.1f} s): {counts}")
        reporter.write_line(f"hub close codes: {dict(sorted(HUB_CLOSES.items()))}")


# --- strategies -----------------------------------------------------------------------------

# The characters that have broken something somewhere: surrogates, C0/C1 controls, bidi
# controls, joiners, line breaks, a BOM, an emoji sequence.
TRICKY = st.sampled_from([
    "\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\u061c",
    "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069", "\u200b", "\u200d", "\ufeff", "\n", "\r\n",
    "\t", "\u2028", " ", "\u3000", "👨\u200d👩\u200d👧", "é", "e\u0301", '"', "\\", "[", "{",
])
PIECES = st.one_of(st.characters(exclude_categories=()), TRICKY)  # every code point, surrogates too
TEXT = st.lists(PIECES, max_size=24).map("".join)
# Around the 500-character limit, made cheaply (hypothesis is slow to draw 500 pieces one by one).
LONG_TEXT = st.one_of(TEXT, st.builds(lambda t, n: t + "é" * n + t, TEXT, st.integers(450, 510)))
BIG_INTS = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**100]))
SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, st.floats(), TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=12)
MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {"t": st.sampled_from(["comment", "resume", "react"])},
        optional={"text": st.one_of(LONG_TEXT, VALUES), "nonce": st.one_of(TEXT, VALUES),
                  "epoch": st.one_of(TEXT, st.text(min_size=290, max_size=310), VALUES),
                  "offset": st.one_of(BIG_INTS, VALUES),
                  "emoji": st.one_of(st.from_regex(r"[a-z0-9_]{0,34}", fullmatch=True), VALUES)},
    ),
    st.dictionaries(st.one_of(st.sampled_from(["t", "text", "nonce"]), TEXT), VALUES, max_size=4),
    VALUES,
)


def as_json(obj: Any) -> bytes:
    """JSON with every non-ASCII character escaped, so lone surrogates travel as ``\\ud800``."""
    return json.dumps(obj, ensure_ascii=True).encode()


def as_msgpack(obj: Any) -> bytes:
    """msgpack, surrogates as their (invalid) UTF-8 bytes; what msgpack cannot hold, as a string."""
    try:
        return msgpack.packb(obj, unicode_errors="surrogatepass")
    except (OverflowError, ValueError, TypeError):
        return msgpack.packb(repr(obj), unicode_errors="surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with a few bytes flipped, inserted, deleted or a slice repeated."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 8))] * draw(st.integers(1, 50))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def deep(draw: st.DrawFn, wire: Wire) -> bytes:
    depth = draw(st.integers(0, 3000))
    if wire == "msgpack":
        opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
        return b"\x83\xa1t\xa7comment\xa4text\xa1x\xa4deep" + opener * depth + b"\xc0"
    text_opener = draw(st.sampled_from(["[", '{"a":', '[1,{"b":']))
    closer = "]" if text_opener == "[" else "}" if text_opener.startswith("{") else "}]"
    inner = text_opener * depth + "0" + (closer * depth if draw(st.booleans()) else "")
    return (inner if draw(st.booleans()) else '{"t":"comment","text":"x","deep":' + inner + "}").encode()


def client_bytes(wire: Wire) -> st.SearchStrategy[bytes]:
    encode = as_json if wire == "json" else as_msgpack
    valid = MESSAGES.map(encode)
    return st.one_of(st.binary(max_size=300), valid, mutated(valid), deep(wire))


# --- parse_client_message ----------------------------------------------------------------------


def assert_answer_encodes(event: dict[str, Any]) -> None:
    """The gateway's answer goes out in both encodings, strictly (no replacement needed)."""
    json_compact(event).encode("utf-8")
    msgpack.packb(event, use_bin_type=True)


def check_message(msg: object) -> None:
    if isinstance(msg, PostComment):
        assert clean_text(msg.text) == (msg.text, "") and 0 < len(msg.text) <= MAX_COMMENT_CHARS
        assert msg.nonce is None or (isinstance(msg.nonce, str) and len(msg.nonce) <= MAX_NONCE_CHARS)
        assert_answer_encodes({"t": "batch", "comments": [{"text": msg.text}], "nonce": msg.nonce})
    elif isinstance(msg, Resume):
        assert MIN_OFFSET <= msg.offset <= MAX_OFFSET and len(msg.epoch) <= MAX_EPOCH_CHARS
        msg.epoch.encode("utf-8")
    elif isinstance(msg, React):
        assert msg.emoji.isascii()
    else:
        assert isinstance(msg, BadMessage) and isinstance(msg.code, ErrorCode) and msg.reason
        assert_answer_encodes(error_event(msg.code, msg.reason, msg.nonce))


@FUZZ
@given(client_bytes("json"))
def test_fuzz_parse_json(data: bytes) -> None:
    TRIED["parse json"] += 1
    check_message(parse_client_message(data, "json"))
    if not too_deep(data):  # what the pre-scan lets through never exhausts the decoder's stack
        with contextlib.suppress(ValueError):
            json.loads(data.decode("utf-8"))


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@FUZZ
@given(VALUES, st.integers(0, 40), st.booleans())
def test_fuzz_nesting_pre_scan_is_exact_on_valid_json(value: Any, wraps: int, as_object: bool) -> None:
    TRIED["nesting pre-scan"] += 1
    for _ in range(wraps):
        value = {"k[": value} if as_object else [value, "]"]
    assert too_deep(as_json(value)) == (depth(value) > 32)


@FUZZ
@given(client_bytes("msgpack"))
def test_fuzz_parse_msgpack(data: bytes) -> None:
    TRIED["parse msgpack"] += 1
    check_message(parse_client_message(data, "msgpack"))


@FUZZ
@given(LONG_TEXT, TEXT, st.one_of(st.none(), TEXT))
def test_fuzz_text_is_refused_or_survives_every_encoder(text: str, name: str, nonce: str | None) -> None:
    TRIED["text and encoders"] += 1
    clean, code, reason = validate_comment_text(text)
    if clean is None:
        assert code in (ErrorCode.BAD_TEXT, ErrorCode.EMPTY_COMMENT, ErrorCode.COMMENT_TOO_LONG) and reason
        return
    shown = clean_text(name, "name", drop_invalid=True)[0] or "u1"
    comment = Comment(id="7261", stream="s1", user_id="u1", user_name=shown, badges=("verified",), text=clean, ts=1)
    assert decode_record(encode_record(comment)[1]) == comment  # equal: nothing was replaced
    event = {"t": "batch", "comments": [comment.to_event()]}
    msg = parse_client_message(as_json({"t": "comment", "text": text, "nonce": nonce}), "json")
    assert not isinstance(msg, PostComment) or msg.text == clean  # the same rules on both paths
    for wire in ("json", "msgpack"):
        assert decode_event(encode_event(event, wire), wire) == event
        if isinstance(msg, PostComment):
            ack = decode_event(encode_ack("7261", msg.nonce, wire), wire)
            assert ack.get("nonce") == msg.nonce


# --- the HTTP request parser -------------------------------------------------------------------

CONTENT_LENGTHS = st.one_of(
    st.integers(0, 20_000).map(str), st.integers(1, 7000).map(lambda n: "9" * n),
    st.sampled_from(["9" * 4300, "9" * 4301, "0" * 5000 + "1", "1" * 8000]),  # int() refuses over 4,300 digits
    st.sampled_from(["", "-1", "+5", " 5", "5 ", "0x10", "1e3", "٣", "²", "5, 5", "00000000000000000000013"]),
)
HEADER_NAMES = st.sampled_from(["Content-Length", "Host", "content-length", "Transfer-Encoding", "Expect",
                                "Authorization", "X-A", "Bad Name", "", "Content-Length "])


def mostly(valid: str, *others: str) -> st.SearchStrategy[str]:
    """``valid`` four times in five, so most requests get past their first line."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), st.just(valid), st.sampled_from(others))


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(mostly("POST", "GET", "P OST", "", "POST\x00"))
    target = draw(mostly("/streams/s1/comments", "/", "", "x", "/a b", "/\x7f", "/é"))
    version = draw(mostly("HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/11"))
    body = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(str(len(body))), CONTENT_LENGTHS, st.none()))
    headers = [] if length is None else [("Content-Length", length)]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(HEADER_NAMES)
        value = draw(CONTENT_LENGTHS) if "length" in name.lower() else draw(st.one_of(TEXT, st.sampled_from(
            ["100-continue", "chunked", "Bearer x.y.z"])))
        headers.append((name, value))
    if draw(st.integers(0, 9)) == 0:
        headers.insert(0, (" folded", "line"))
    eol = draw(mostly("\r\n", "\n"))
    head = eol.join([f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]) + eol + eol
    return head.encode("utf-8", "surrogatepass") + body + draw(st.binary(max_size=8))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    how = draw(st.sampled_from(["whole", "bytes", "random"]))
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


HTTP_STATUSES = {400, 411, 413, 431, 505}


@FUZZ
@given(st.data())
def test_fuzz_http_request_parser(data: st.DataObject) -> None:
    TRIED["http request parser"] += 1
    raw = data.draw(st.one_of(st.binary(max_size=200), http_requests(), mutated(http_requests())))
    parser = RequestParser()
    got: HttpRequest | None = None
    try:
        for chunk in data.draw(chunked(raw)):
            answer = parser.feed(chunk)
            assert answer is None or isinstance(answer, HttpRequest)
            assert got is None or answer is got  # once complete, always the same request
            got = answer
    except HttpError as exc:
        assert exc.status in HTTP_STATUSES and exc.reason
        return
    if got is not None:
        assert len(got.body) == int((got.header("content-length") or "0").lstrip("0") or "0")


# --- the frame parser twins ----------------------------------------------------------------------

needs_native_codec = pytest.mark.skipif(native_codec is None, reason="native codec not built")


def often(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], odds: int = 25) -> st.SearchStrategy[Any]:
    """``rare`` once in ``odds``: each frame can break a rule, yet most streams get far enough to
    reach every outcome (a message over the limit, bad UTF-8, a client close echoed)."""
    return st.integers(1, odds).flatmap(lambda n: rare if n == 1 else usual)


MASKS = often(st.binary(min_size=4, max_size=4), st.none())


@st.composite
def data_message(draw: st.DrawFn) -> list[bytes]:
    """A text or binary message (invalid UTF-8 or over MAX_SIZE now and then), maybe fragmented
    with pings between, maybe with lying header bits."""
    opcode = draw(st.sampled_from([1, 2]))
    if opcode == 1:
        payload = draw(TEXT).encode("utf-8", "surrogatepass")  # a lone surrogate: 1007
    else:
        payload = draw(often(st.binary(max_size=300), st.binary(min_size=MAX_SIZE + 1, max_size=MAX_SIZE + 40), 6))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=2)))
    parts = [payload[i:j] for i, j in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    frames = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        frames.append(client_frame(opcode if i == 0 else 0, part, fin=draw(often(st.just(last), st.just(not last))),
                                   rsv=draw(often(st.just(0), st.sampled_from([1, 2, 4]))), mask=draw(MASKS)))
        if not last and draw(st.booleans()):
            frames.append(client_frame(9, draw(st.binary(max_size=20)), mask=draw(MASKS)))
    return frames


@st.composite
def control_frame(draw: st.DrawFn) -> list[bytes]:
    opcode = draw(st.sampled_from([8, 9, 10]))
    if opcode == 8:
        code = draw(often(st.sampled_from([1000, 1001, 1003, 1011, 3000, 4999]),
                          st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 2000, 5000])))
        reason = draw(TEXT).encode("utf-8", "surrogatepass")[:100]
        payload = draw(often(st.just(code.to_bytes(2, "big") + reason), st.sampled_from([b"", b"\x03"])))
    else:
        payload = draw(often(st.binary(max_size=125), st.binary(min_size=126, max_size=130)))
    return [client_frame(opcode, payload, fin=draw(often(st.just(True), st.just(False))), mask=draw(MASKS))]


@st.composite
def odd_frame(draw: st.DrawFn) -> list[bytes]:
    """A reserved opcode, an orphan continuation, or a header whose length lies."""
    payload = draw(st.binary(max_size=40))
    opcode = draw(st.sampled_from([0, 3, 7, 11, 15, 1, 2]))
    length = draw(st.one_of(st.none(), st.integers(0, 70_000), st.just(1 << 63 | 5)))
    return [client_frame(opcode, payload, fin=draw(st.booleans()), mask=draw(MASKS), length=length)]


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(often(st.one_of(data_message(), control_frame()), odd_frame(), 8), min_size=1, max_size=6))
    return b"".join(frame for part in parts for frame in part)


FRAME_BYTES = st.one_of(st.binary(max_size=300), frame_streams(), mutated(frame_streams()))


@needs_native_codec
@FUZZ
@given(st.data())
def test_fuzz_frame_parser_twins_agree(data: st.DataObject) -> None:
    TRIED["frame parser twins"] += 1
    stream = data.draw(FRAME_BYTES)
    kwargs = {
        "max_message_size": data.draw(st.sampled_from([16, 1000, 65536])),
        "max_fragments": data.draw(st.sampled_from([2, 64])),
        "require_mask": data.draw(st.booleans()),
        "allow_rsv1": data.draw(st.booleans()),
    }
    chunks = data.draw(chunked(stream))
    assert run_parser(codec_pure, chunks, kwargs) == run_parser(native_codec, chunks, kwargs)


# --- the hub's parser, through real sockets ------------------------------------------------------

@pytest.fixture
def fuzz_hub(hub_module: ModuleType) -> Iterator[Harness]:
    h = Harness(hub_module, max_message_bytes=MAX_SIZE, max_fragments=MAX_FRAGMENTS, inflate_limit_bytes=4096,
                max_pings_per_s=250, flush_interval_ms=1)  # the most it allows
    yield h
    h.close()


def healthy_viewer_still_served(h: Harness, healthy: Any, offset: int) -> None:
    """The healthy viewer gets a batch published now, and its next message is read."""
    h.hub.publish(999, batch(offset), False, 1)
    healthy.send(client_frame(1, b'{"t":"react","emoji":"fire"}'))
    h.pump(lambda: any(e.get("offset") == offset for e in healthy.events())
           and len(h.messages(healthy)) == offset, timeout=10)
    assert h.closed(healthy) is None


@FUZZ_SOCKETS
@given(st.data())
def test_fuzz_hub_parser_closes_properly_and_serves_others(fuzz_hub: Harness, data: st.DataObject) -> None:
    h = fuzz_hub
    TRIED[f"hub parser ({'native' if h.native else 'pure'})"] += 1
    if not h.clients:  # the healthy viewer, for every example of this hub
        h.connect(stream=999)
    healthy = h.clients[0]
    stream = data.draw(FRAME_BYTES)
    plain = data.draw(st.booleans())
    v = h.connect(stream=len(h.clients), variant=JSON if plain else MSGPACK | DEFLATE)
    for chunk in data.draw(chunked(stream)):
        with contextlib.suppress(OSError):  # the hub may have closed it already
            v.sock.sendall(chunk)
        h.hub.poll()
        h.events.extend(h.hub.drain())
    with contextlib.suppress(OSError):
        v.sock.shutdown(socket.SHUT_WR)  # then EOF: every case ends with a CLOSED event
    h.pump(lambda: h.closed(v) is not None, timeout=10)
    code = h.closed(v)
    assert code is not None and 1000 <= code <= 4999 and code not in (1004, 1005, 1015)
    HUB_CLOSES[code] += 1
    if plain:  # the hub's parser agrees with the reference (codec_pure) on every message
        want_messages, want_code = reference(stream)
        assert h.messages(v) == want_messages
        assert code == (1006 if want_code is None else want_code)
    v.sock.close()
    healthy_viewer_still_served(h, healthy, len(h.messages(healthy)) + 1)


# --- request bodies of the moderator API and the POST endpoint -----------------------------------

JSONISH = st.one_of(st.binary(max_size=100), MESSAGES.map(as_json), mutated(MESSAGES.map(as_json)),
                    deep("json"), st.sampled_from([b"", b" ", b"\xff", b"1" * 5000, b"NaN", b"[]", b"null"]))


@FUZZ
@given(JSONISH)
def test_fuzz_moderator_api_body(raw: bytes) -> None:
    TRIED["modapi _body"] += 1
    try:
        body = modapi._body(raw)
    except modapi.ApiError as exc:
        assert exc.status == 400
        return
    assert isinstance(body, dict)


@FUZZ
@given(JSONISH)
def test_fuzz_post_body(raw: bytes) -> None:
    TRIED["http _comment_text"] += 1
    if too_deep(raw):  # the route refuses bodies nested deeper than 32 before reading them
        return
    text = gateway_http._comment_text(raw)
    assert text is None or isinstance(text, str)


# --- records of the comments log --------------------------------------------------------------

RECORD = encode_record(Comment(id="7261", stream="s1", user_id="u1", user_name="Uma", badges=(), text="hi", ts=1))[1]
RECORD_FIELDS = st.fixed_dictionaries(
    {"k": st.sampled_from(["comment", "control"])},
    optional={"v": VALUES, "id": VALUES, "stream": VALUES, "user": st.one_of(VALUES, st.fixed_dictionaries(
        {"id": VALUES, "name": VALUES, "badges": VALUES})), "text": VALUES, "ts": st.one_of(BIG_INTS, st.floats()),
        "op": st.sampled_from(["delete", "shadow", "pin", "unpin", "restore", "x"]), "comment": VALUES,
        "code": VALUES, "shadow": VALUES},
)


@FUZZ
@given(st.one_of(st.binary(max_size=100), st.just(RECORD), mutated(st.just(RECORD)), RECORD_FIELDS.map(as_json),
                 deep("json"), st.just(b'{"k":"comment","id":"1","stream":"s","user":{"id":"u","name":"n"},'
                                       b'"text":"t","ts":1e999}')))
def test_fuzz_log_records(value: bytes) -> None:
    """A record anyone could have written to the topic: a Comment, a Control or RecordError,
    which the coordinator and the moderator count and skip (anything else would stop them)."""
    TRIED["decode_any"] += 1
    try:
        got = decode_any(value, "e", 5)
    except RecordError as exc:
        assert str(exc)
        return
    assert isinstance(got, Comment | Control) and (got.epoch, got.offset) == ("e", 5)


# --- tokens ------------------------------------------------------------------------------------

CLAIM_NAMES = st.sampled_from(["sub", "name", "scope", "scopes", "role", "verified", "streams", "exp", "iat", "nbf",
                               "iss", "aud"])
VALID = signed(claims(name="Vic", scope="read write"))


@st.composite
def tokens(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.one_of(TEXT, st.text(st.sampled_from("abcXYZ019-_.=+/"), max_size=80)))
    if kind == 1:
        return draw(mutated(st.just(VALID.encode()))).decode("latin-1")
    if kind == 2:  # signed with the test key over claims of any type
        extra = draw(st.dictionaries(CLAIM_NAMES, st.one_of(VALUES, st.just(...)), max_size=5))
        return signed(claims(**extra))
    return signed(draw(st.one_of(MESSAGES.map(as_json), mutated(st.just(json.dumps(claims()).encode())))))


@FUZZ
@given(tokens())
def test_fuzz_verify_token(token: str) -> None:
    TRIED["verify_token"] += 1
    try:
        who = verify_token(AUTH, token)
    except AuthError as exc:
        assert str(exc)
        return
    assert isinstance(who, Identity) and clean_text(who.name) == (who.name, "") and who.user_id
    who.name.encode("utf-8")
    who.user_id.encode("utf-8")


def test_tokens_strategy_reaches_both_outcomes() -> None:
    """The token target is not testing only garbage: a fair share of its inputs verify."""
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=60)
    @given(tokens())
    def sample(token: str) -> None:
        try:
            verify_token(AUTH, token)
            outcomes["ok"] += 1
        except AuthError:
            outcomes["refused"] += 1

    sample()
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes

