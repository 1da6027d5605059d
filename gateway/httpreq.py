"""A small sans-I/O HTTP/1.1 request parser, and the JSON responses of the gateway's HTTP side.

Every request reaching the gateway is read here first (gateway/handoff.py does the I/O):
bytes in, one :class:`HttpRequest` out, or an :class:`HttpError` naming the status to answer.
A WebSocket upgrade then goes to picows, everything else is answered in Python
(gateway/routes.py), so a request picows would refuse with a bare 400 or a reset (a method
other than GET, a head over its size limit) gets a proper answer. Nothing here touches a
socket or an event loop.

The parser's states::

    HEAD --CRLF CRLF--> BODY --Content-Length bytes--> DONE
      \\--over MAX_REQUEST_HEAD_BYTES, malformed--> HttpError (then the connection closes)

It reads exactly one request: the gateway answers it with ``Connection: close``. Deliberate
limits: a body needs ``Content-Length`` (no chunked transfer coding: 411; a request with
neither header has no body, RFC 9112 6.3), at most MAX_HEADER_FIELDS fields, lines end in CRLF
(RFC 9112 2.2 lets a server refuse bare LF), and obsolete line folding is refused (RFC 9112
5.2), so nothing that another parser could read differently is ever accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from chorus.codes import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEAD_BYTES, HttpErrorCode
from chorus.errors import ChorusError

__all__ = [
    "CONTINUE",
    "MAX_HEADER_FIELDS",
    "HttpError",
    "HttpRequest",
    "RequestParser",
    "error_response",
    "json_response_bytes",
]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_END = b"\r\n\r\n"
# Header fields a request may carry (picows, which reads the upgrades next, takes 128).
MAX_HEADER_FIELDS = 100
# RFC 9110 5.6.2: a token (methods, header names).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # \Z: "$" would let a trailing LF through
# The request target in origin-form (RFC 9112 3.2.1): visible ASCII starting with "/".
_TARGET = re.compile(rb"^/[\x21-\x7e]*\Z")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)\Z")
# RFC 9110 5.5: field values are visible characters, spaces, tabs and obs-text; no CR, LF or NUL.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(ChorusError):
    """The request cannot be served: answer ``status`` with ``code`` and ``reason``, then close."""

    def __init__(self, status: int, code: HttpErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in the order sent
    body: bytes
    version: str = "HTTP/1.1"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        low = name.lower()
        return next((v for k, v in self.headers if k == low), None)


def _bad(reason: str) -> HttpError:
    return HttpError(400, HttpErrorCode.BAD_REQUEST, reason)


class RequestParser:
    """Feed it bytes as they arrive; it returns the request once the whole of it is in."""

    def __init__(self, max_head_bytes: int = MAX_REQUEST_HEAD_BYTES,
                 max_body_bytes: int = MAX_REQUEST_BODY_BYTES) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._head: tuple[str, str, str, tuple[tuple[str, str], ...]] | None = None
        self._length = 0
        self._continue = False
        self.request: HttpRequest | None = None
        self.trailing = b""  # bytes after the request (a pipelining client); never read

    def feed(self, data: bytes) -> HttpRequest | None:
        """Add ``data``; the request when complete (then and after), else None. Raises HttpError."""
        if self.request is not None:
            self.trailing += data
            return self.request
        self._buf += data
        if self._head is None and not self._parse_head():
            return None
        if len(self._buf) < self._length:
            return None
        assert self._head is not None
        method, target, version, headers = self._head
        self.request = HttpRequest(method, target, headers, bytes(self._buf[: self._length]), version)
        self.trailing = bytes(self._buf[self._length :])
        self._buf.clear()
        return self.request

    def take_continue(self) -> bool:
        """True once if the client waits for ``100 Continue`` before sending its body (RFC 9110 10.1.1)."""
        wants, self._continue = self._continue, False
        return wants

    def _parse_head(self) -> bool:
        # Step 1: find the end of the head; a client may not send more than the cap before it.
        end = self._buf.find(_HEAD_END)
        if end < 0:
            if len(self._buf) > self.max_head_bytes:
                raise HttpError(431, HttpErrorCode.HEADERS_TOO_LARGE,
                                f"request line and headers are over {self.max_head_bytes} bytes")
            return False
        if end + len(_HEAD_END) > self.max_head_bytes:
            raise HttpError(431, HttpErrorCode.HEADERS_TOO_LARGE,
                            f"request line and headers are over {self.max_head_bytes} bytes")
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + len(_HEAD_END)]
        # Step 2: the request line, then each header field.
        method, target, version = self._request_line(lines[0])
        if len(lines) - 1 > MAX_HEADER_FIELDS:
            raise HttpError(431, HttpErrorCode.HEADERS_TOO_LARGE,
                            f"the request has {len(lines) - 1} header fields; the limit is {MAX_HEADER_FIELDS}")
        headers = tuple(self._field(line) for line in lines[1:])
        # Step 3: the body's framing.
        self._head = (method, target, version, headers)
        self._length = self._body_length(headers)
        expect = next((v for k, v in headers if k == "expect"), None)
        self._continue = expect is not None and expect.lower() == "100-continue" and self._length > len(self._buf)
        return True

    @staticmethod
    def _request_line(line: bytes) -> tuple[str, str, str]:
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]):
            raise _bad("the request line must be: METHOD /path HTTP/1.1")
        method, target, version = parts
        match = _VERSION.match(version)
        if match is None:
            raise _bad("the request line must end with HTTP/1.1")
        if match.group(1) != b"1":
            raise HttpError(505, HttpErrorCode.VERSION_NOT_SUPPORTED, "only HTTP/1.0 and HTTP/1.1 are served")
        if not _TARGET.match(target):
            raise _bad("the request target must be a path starting with /")
        return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")

    @staticmethod
    def _field(line: bytes) -> tuple[str, str]:
        if line[:1] in (b" ", b"\t"):
            raise _bad("obsolete header line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # RFC 9112 5.1: no whitespace before the colon
            raise _bad(f"malformed header line {_printable(line[:40])}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _bad(f"header {name.decode('ascii')} holds a control character")
        return name.decode("ascii").lower(), value.decode("latin-1")

    def _body_length(self, headers: tuple[tuple[str, str], ...]) -> int:
        if any(k == "transfer-encoding" for k, _ in headers):
            raise HttpError(411, HttpErrorCode.LENGTH_REQUIRED,
                            "chunked or other transfer codings are not accepted; send Content-Length")
        lengths = {v for k, v in headers if k == "content-length"}
        if not lengths:
            return 0  # RFC 9112 6.3: neither Content-Length nor Transfer-Encoding: no body
        if len(lengths) != 1 or not next(iter(lengths)).isdigit() or not next(iter(lengths)).isascii():
            raise _bad("Content-Length must be one decimal number")
        if len(next(iter(lengths)).lstrip("0")) > 20:  # int() refuses over 4,300 digits: refuse first
            raise HttpError(413, HttpErrorCode.BODY_TOO_LARGE, f"the body is over {self.max_body_bytes} bytes")
        length = int(next(iter(lengths)).lstrip("0") or "0")  # leading zeros count toward int()'s limit too
        if length > self.max_body_bytes:
            raise HttpError(413, HttpErrorCode.BODY_TOO_LARGE,
                            f"the body has {length} bytes; the limit is {self.max_body_bytes}")
        return length


# -- responses ---------------------------------------------------------------------------------

_SECURITY_HEADERS = ("Cache-Control: no-store", "X-Content-Type-Options: nosniff")


def _printable(raw: bytes) -> str:
    """Bytes from the client shown in a reason: quoted, anything not visible ASCII as \\xNN."""
    shown = "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in raw)
    return f'"{shown}"'


def json_response_bytes(status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with a JSON body, closing the connection after it."""
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *_SECURITY_HEADERS,
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def error_response(status: int, code: str, reason: str, retry_after_ms: int | None = None,
                   comment_id: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    """``{"error": code, "reason": ..., "retry_after_ms": ..., "id": ...}``, with ``Retry-After``
    (whole seconds) and any ``headers`` (``Allow`` of a 405). ``id``: the comment's id when it
    may still appear (``unconfirmed``)."""
    body: dict[str, Any] = {"error": str(code), "reason": reason}
    if comment_id is not None:
        body["id"] = comment_id
    headers = dict(headers or {})
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
        headers["Retry-After"] = str(max(1, -(-retry_after_ms // 1000)))  # RFC 9110 10.2.3: delay-seconds
    return json_response_bytes(status, body, headers)
