"""The POST request parser (gateway/httpreq.py), with bytes: whole, one byte at a time, garbage."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from chorus.codes import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEAD_BYTES
from chorus.gateway.httpreq import (
    MAX_HEADER_FIELDS,
    HttpError,
    HttpRequest,
    RequestParser,
    error_response,
    json_response_bytes,
)

BODY = b'{"text":"hi"}'


def post(body: bytes = BODY, *headers: str, target: str = "/streams/s1/comments", version: str = "HTTP/1.1",
         length: bool = True) -> bytes:
    lines = [f"POST {target} {version}", "Host: 127.0.0.1"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def feed_whole(data: bytes) -> tuple[HttpRequest | None, RequestParser]:
    parser = RequestParser()
    return parser.feed(data), parser


def feed_bytewise(data: bytes) -> tuple[HttpRequest | None, RequestParser]:
    parser = RequestParser()
    request = None
    for i in range(len(data)):
        request = parser.feed(data[i : i + 1])
    return request, parser


Feeder = Callable[[bytes], tuple[HttpRequest | None, RequestParser]]
FEEDERS: list[Feeder] = [feed_whole, feed_bytewise]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(
    ("raw", "target", "headers", "body"),
    [
        (post(), "/streams/s1/comments", {"host": "127.0.0.1", "content-length": "13"}, BODY),
        (post(b"", version="HTTP/1.0"), "/streams/s1/comments", {"content-length": "0"}, b""),
        (post(BODY, "Authorization:  Bearer abc \t", "X-Empty:"), "/streams/s1/comments",
         {"authorization": "Bearer abc", "x-empty": ""}, BODY),
        (post(BODY, target="/streams/s1/comments?x=1"), "/streams/s1/comments?x=1", {}, BODY),
        (post(b"\x00\xff" * 10), "/streams/s1/comments", {"content-length": "20"}, b"\x00\xff" * 10),
    ],
)
def test_valid_requests(feed: Feeder, raw: bytes, target: str, headers: dict[str, str], body: bytes) -> None:
    request, parser = feed(raw)
    assert request is not None
    assert (request.method, request.target, request.body) == ("POST", target, body)
    for name, value in headers.items():
        assert request.header(name) == value
        assert request.header(name.upper()) == value
    assert parser.trailing == b""


@pytest.mark.parametrize("feed", FEEDERS)
def test_bytes_after_the_request_are_kept_apart(feed: Feeder) -> None:
    request, parser = feed(post() + b"GET / HTTP/1.1\r\n\r\n")
    assert request is not None and request.body == BODY
    assert parser.trailing == b"GET / HTTP/1.1\r\n\r\n"


def test_incomplete_request_is_none_until_the_last_byte() -> None:
    raw = post()
    parser = RequestParser()
    assert parser.feed(raw[:-1]) is None
    request = parser.feed(raw[-1:])
    assert request is not None and request.body == BODY
    assert parser.feed(b"more") is request and parser.trailing == b"more"


def test_expect_100_continue_is_offered_once_while_the_body_is_missing() -> None:
    raw = post(BODY, "Expect: 100-continue")
    head = raw[: -len(BODY)]
    parser = RequestParser()
    assert parser.feed(head) is None
    assert parser.take_continue() is True
    assert parser.take_continue() is False
    assert parser.feed(BODY) is not None
    whole = RequestParser()
    assert whole.feed(raw) is not None and whole.take_continue() is False  # the body came with it


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(
    ("raw", "status", "code", "words"),
    [
        (post(b"2\r\nhi\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False), 411, "length_required",
         "chunked"),
        (post(BODY, "Transfer-Encoding: chunked"), 411, "length_required", "chunked"),
        (post(b"x" * (MAX_REQUEST_BODY_BYTES + 1)), 413, "body_too_large", str(MAX_REQUEST_BODY_BYTES)),
        (post(BODY, "X-Pad: " + "a" * MAX_REQUEST_HEAD_BYTES), 431, "headers_too_large", "over"),
        (b"POST /x HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 10), 431, "headers_too_large", "over"),
        (post(BODY, "Content-Length: 12"), 400, "bad_request", "Content-Length"),
        (post(BODY, length=False) .replace(b"Host", b"Content-Length: 1e3\r\nHost"), 400, "bad_request",
         "Content-Length"),
        (post(BODY, length=False).replace(b"Host", b"Content-Length: -1\r\nHost"), 400, "bad_request",
         "Content-Length"),
        (post(target="streams/s1/comments"), 400, "bad_request", "target"),
        (post(target="/a b"), 400, "bad_request", "request line"),
        (post(version="HTTP/2.0"), 505, "version_not_supported", "HTTP/1.1"),
        (post(version="HTPT/1.1"), 400, "bad_request", "HTTP/1.1"),
        (b"POST /x\r\nContent-Length: 0\r\n\r\n", 400, "bad_request", "request line"),
        (b"POST  /x HTTP/1.1\r\n\r\n", 400, "bad_request", "request line"),
        (post(BODY, " folded"), 400, "bad_request", "folding"),
        (post(BODY, "Bad Name: x"), 400, "bad_request", "malformed header"),
        (post(BODY, "Name : x"), 400, "bad_request", "malformed header"),
        (post(BODY, "no colon"), 400, "bad_request", "malformed header"),
        (post(BODY, "X-Ctl: a\x01b"), 400, "bad_request", "control character"),
        (post(BODY, "X-Cr: a\rb"), 400, "bad_request", "control character"),
        # A bare LF where "$" would have matched before it: in a method, a version, a name, a target.
        (b"POST\n /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, "bad_request", "request line"),
        (b"POST /x HTTP/1.1\n\r\nContent-Length: 0\r\n\r\n", 400, "bad_request", "HTTP/1.1"),
        (post(BODY, "X-Name\n: v"), 400, "bad_request", "malformed header"),
        (b"POST /x\n HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, "bad_request", "target"),
    ],
)
def test_bad_requests_name_their_status(feed: Feeder, raw: bytes, status: int, code: str, words: str) -> None:
    with pytest.raises(HttpError) as info:
        feed(raw)
    assert (info.value.status, str(info.value.code)) == (status, code)
    assert words in info.value.reason


@pytest.mark.parametrize("feed", FEEDERS)
def test_a_request_without_length_or_transfer_coding_has_no_body(feed: Feeder) -> None:
    """RFC 9112 6.3: neither header means an empty body; what follows is the next request's."""
    request, parser = feed(post(length=False))
    assert request is not None and request.body == b"" and request.header("content-length") is None
    assert parser.trailing == BODY
    request, _ = feed(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert request is not None and (request.method, request.target, request.version) == ("GET", "/healthz",
                                                                                         "HTTP/1.0")


@pytest.mark.parametrize("feed", FEEDERS)
def test_header_fields_are_counted(feed: Feeder) -> None:
    fields = [f"X-F{i}: v" for i in range(MAX_HEADER_FIELDS - 1)]  # plus Host (no Content-Length)
    request, _ = feed(post(b"", *fields, length=False))
    assert request is not None and len(request.headers) == MAX_HEADER_FIELDS
    with pytest.raises(HttpError) as info:
        feed(post(b"", *fields, "X-One-Too-Many: v", length=False))
    assert (info.value.status, info.value.code) == (431, "headers_too_large")
    assert str(MAX_HEADER_FIELDS) in info.value.reason


def test_reasons_show_client_bytes_without_python_reprs() -> None:
    with pytest.raises(HttpError) as info:
        RequestParser().feed(b'POST /x HTTP/1.1\r\nBad"Name\xff: x\r\n\r\n')
    assert info.value.reason == 'malformed header line "Bad\\x22Name\\xff: x"'


def test_random_bytes_raise_only_http_error() -> None:
    rng = random.Random(20261125)
    pieces = [b"POST ", b"/streams/s/comments", b" HTTP/1.1", b"\r\n", b"\r\n\r\n", b":", b" ", b"Content-Length: 3",
              b"Transfer-Encoding: x", b"\x00", b"\xff", b"abc"]
    for _ in range(3000):
        if rng.random() < 0.5:
            data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        parser = RequestParser(max_head_bytes=256, max_body_bytes=16)
        cut = rng.randrange(len(data) + 1)
        try:
            for chunk in (data[:cut], data[cut:]):
                result = parser.feed(chunk)
                assert result is None or isinstance(result, HttpRequest)
        except HttpError as exc:
            assert 400 <= exc.status <= 505 and exc.reason


def test_responses_are_whole_json_answers() -> None:
    raw = error_response(429, "rate_limited", "too fast", 1501)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    assert "Retry-After: 2" in lines and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"error": "rate_limited", "reason": "too fast", "retry_after_ms": 1501}
    ok = json_response_bytes(201, {"id": "1"})
    assert ok.startswith(b"HTTP/1.1 201 Created\r\n") and b"Retry-After" not in ok
