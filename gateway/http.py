"""Plain HTTP answers of the gateway: the viewer page, history pages, health, dev tokens,
and posts from clients without a WebSocket.

The routes (gateway/routes.py) build their answers with these helpers, synchronously and
quickly (the history page is one indexed SQLite read): as picows' ``WSUpgradeResponse``, which
picows writes for an upgrade request and :func:`response_bytes` turns into bytes for every other
request. ``POST /streams/{id}/comments`` is answered by :func:`answer_comment_post` through the
same admission as a WebSocket post.

Every error is JSON, ``{"error": CODE, "reason": ...}`` (CODE from chorus/codes.py); only the
page, its static files, ``/healthz``'s ``ok`` and ``/metrics`` are not.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import WSUpgradeResponse

from chorus.auth import AuthError, Identity, TokenExpired, verify_token
from chorus.codes import MAX_NONCE_CHARS, ErrorCode, HttpErrorCode
from chorus.config import AuthConfig
from chorus.gateway.httpreq import HttpRequest, error_response, json_response_bytes
from chorus.ingest.admission import Admission, Refused

__all__ = [
    "MAX_JSON_DEPTH",
    "STREAM_ID",
    "Request",
    "answer_comment_post",
    "error_json",
    "json_nesting",
    "json_response",
    "parse_request",
    "response_bytes",
    "static_response",
    "text_response",
]

# A stream id: what a URL path segment and a Redis key both carry without escaping; "." and
# ".." are not ids (a URL path would resolve them, RFC 3986 5.2.4).
STREAM_ID = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9_.:-]{1,64}\Z")
# Nested arrays/objects in a POST body ({"text": ...} has 1); json.loads recurses once per level.
MAX_JSON_DEPTH = 32
# The code of an error answer built without one (text_response), by status.
_STATUS_CODES: dict[int, HttpErrorCode] = {
    400: HttpErrorCode.BAD_REQUEST,
    401: HttpErrorCode.UNAUTHORIZED,
    403: HttpErrorCode.FORBIDDEN,
    404: HttpErrorCode.NOT_FOUND,
    405: HttpErrorCode.METHOD_NOT_ALLOWED,
    426: HttpErrorCode.UPGRADE_REQUIRED,
}

STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class Request:
    """The parts of an HTTP request line the gateway routes on."""

    __slots__ = ("path", "query")

    def __init__(self, path: str, query: dict[str, list[str]]) -> None:
        self.path = path
        self.query = query

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


def parse_request(raw_path: bytes) -> Request:
    parts = urlsplit(raw_path.decode("latin-1"))
    return Request(parts.path or "/", parse_qs(parts.query, keep_blank_values=True))


def _response(status: HTTPStatus, body: bytes, content_type: str) -> WSUpgradeResponse:
    headers = {"Content-Type": content_type, **SECURITY_HEADERS}
    if status == HTTPStatus.OK:
        return WSUpgradeResponse.create_ok_response(body, headers)
    return WSUpgradeResponse.create_error_response(status, body, headers)


def json_response(body: Any, status: HTTPStatus = HTTPStatus.OK) -> WSUpgradeResponse:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return _response(status, data, "application/json; charset=utf-8")


def error_json(status: HTTPStatus, code: str, reason: str, headers: dict[str, str] | None = None) -> WSUpgradeResponse:
    """The gateway's error answer: ``{"error": code, "reason": reason}``."""
    answer = json_response({"error": str(code), "reason": reason}, status)
    for name, value in (headers or {}).items():
        answer.headers[name] = value
    return answer


def text_response(status: HTTPStatus, text: str) -> WSUpgradeResponse:
    """Plain text for a success (``ok``); an error becomes :func:`error_json` with its status's code."""
    if status >= 400:
        return error_json(status, _STATUS_CODES.get(status, HttpErrorCode.INTERNAL_ERROR), text)
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def response_bytes(response: WSUpgradeResponse, with_body: bool = True) -> bytes:
    """The whole answer, closing the connection after it; ``with_body=False`` for HEAD: the
    same status and headers (``Content-Length`` too), no body (RFC 9110 9.3.2)."""
    response.headers["Connection"] = "close"
    data = bytes(response.to_bytes())
    return data if with_body else data[: data.index(b"\r\n\r\n") + 4]


def static_response(name: str) -> WSUpgradeResponse:
    kind = STATIC_TYPES.get(name)
    if kind is None:
        return error_json(HTTPStatus.NOT_FOUND, HttpErrorCode.NOT_FOUND, "no such file")
    body = resources.files("chorus.gateway").joinpath("static", name).read_bytes()
    return _response(HTTPStatus.OK, body, kind)


# -- POST /streams/{id}/comments --

_COMMENTS_PATH = re.compile(r"^/streams/([^/]+)/comments$")
# The HTTP status of each admission refusal (the JSON body carries the code itself).
REFUSAL_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: 401,  # no token (refused before admission here)
    ErrorCode.TOKEN_EXPIRED: 401,  # expired within the JWT leeway: verified, but no longer posts
    ErrorCode.MISSING_SCOPE: 403,  # a valid token without write:comments
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.EMPTY_COMMENT: 400,
    ErrorCode.COMMENT_TOO_LONG: 400,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SLOW_MODE: 429,
    ErrorCode.BANNED: 403,
    ErrorCode.TIMED_OUT: 403,
    ErrorCode.NOT_ACCEPTED: 503,
    ErrorCode.UNCONFIRMED: 504,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.BAD_TEXT: 400,  # a lone surrogate or a control character in the text
}


def _bearer(request: HttpRequest, auth: AuthConfig) -> Identity | bytes:
    header = request.header("Authorization") or ""
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        return error_response(401, ErrorCode.UNAUTHORIZED, "posting needs a token: Authorization: Bearer ...")
    try:
        return verify_token(auth, header[7:].strip())
    except TokenExpired:
        return error_response(401, ErrorCode.TOKEN_EXPIRED, "the token has expired; get a fresh one and post again")
    except AuthError as exc:
        return error_response(401, ErrorCode.UNAUTHORIZED, f"invalid token: {exc}")


def json_nesting(data: bytes) -> int:
    """How deeply ``data`` nests arrays and objects, brackets inside strings not counted; one
    linear pass, so a body of 16,000 ``[`` is refused before json.loads would recurse into it."""
    depth = peak = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            peak = max(peak, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return peak


def _too_deep(body: bytes) -> bool:
    """No comment body nests like that: refused unread (the count keeps the common case cheap)."""
    return body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_nesting(body) > MAX_JSON_DEPTH


def _comment_text(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    text = obj.get("text") if isinstance(obj, dict) else None
    return text if isinstance(text, str) else None


async def answer_comment_post(request: HttpRequest, ip: str, auth: AuthConfig, admission: Admission) -> bytes:
    """Post ``{"text": ...}`` to a stream: 201 ``{"id": ...}``, or the refusal with its status."""
    match = _COMMENTS_PATH.match(urlsplit(request.target).path)
    if match is None:
        return error_response(404, HttpErrorCode.NOT_FOUND, "only POST /streams/{id}/comments is served")
    stream = match.group(1)
    if not STREAM_ID.match(stream):
        return error_response(400, HttpErrorCode.BAD_REQUEST, "stream must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    who = _bearer(request, auth)
    if isinstance(who, bytes):
        return who
    if _too_deep(request.body):
        return error_response(400, ErrorCode.BAD_MESSAGE, f"the body nests more than {MAX_JSON_DEPTH} levels deep")
    text = _comment_text(request.body)
    if text is None:
        return error_response(400, ErrorCode.BAD_MESSAGE, 'the body must be a JSON object with a string "text"')
    nonce = json.loads(request.body).get("nonce")  # a retry with the same nonce gets the first id (admission)
    if nonce is not None and not (isinstance(nonce, str) and len(nonce) <= MAX_NONCE_CHARS):
        return error_response(400, ErrorCode.BAD_NONCE, f"nonce must be a string of at most {MAX_NONCE_CHARS} "
                              "characters")
    try:
        comment = await admission.post(who, stream, text, ip, nonce)
    except Refused as exc:
        return error_response(REFUSAL_STATUS.get(exc.code, 400), exc.code, exc.reason, exc.retry_after_ms,
                              exc.comment_id)
    return json_response_bytes(201, {"id": comment.id})
