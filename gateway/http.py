"""Plain HTTP answers of the gateway: the viewer page, history pages, health, dev tokens,
and posts from clients without a WebSocket.

picows calls the gateway's listener factory for every GET on the port; these helpers build
the non-101 responses, synchronously and quickly (the history page is one indexed SQLite
read). ``POST /streams/{id}/comments`` never reaches picows: gateway/handoff.py reads it and
:func:`answer_comment_post` answers it through the same admission as a WebSocket post.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import WSUpgradeResponse

from chorus.auth import AuthError, Identity, verify_token
from chorus.codes import ErrorCode, HttpErrorCode
from chorus.config import AuthConfig
from chorus.gateway.httpreq import HttpRequest, error_response, json_response_bytes
from chorus.ingest.admission import Admission, Refused

__all__ = [
    "STREAM_ID",
    "Request",
    "answer_comment_post",
    "json_response",
    "parse_request",
    "static_response",
    "text_response",
]

# A stream id: what a URL path segment and a Redis key both carry without escaping.
STREAM_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

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


def text_response(status: HTTPStatus, text: str) -> WSUpgradeResponse:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def static_response(name: str) -> WSUpgradeResponse:
    kind = STATIC_TYPES.get(name)
    if kind is None:
        return text_response(HTTPStatus.NOT_FOUND, "not found")
    body = resources.files("chorus.gateway").joinpath("static", name).read_bytes()
    return _response(HTTPStatus.OK, body, kind)


# -- POST /streams/{id}/comments --

_COMMENTS_PATH = re.compile(r"^/streams/([^/]+)/comments$")
# The HTTP status of each admission refusal (the JSON body carries the code itself).
REFUSAL_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: 403,  # a valid token without the scope (no token or a bad one: 401 before admission)
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
}


def _bearer(request: HttpRequest, auth: AuthConfig) -> Identity | bytes:
    header = request.header("Authorization") or ""
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        return error_response(401, ErrorCode.UNAUTHORIZED, "posting needs a token: Authorization: Bearer ...")
    try:
        return verify_token(auth, header[7:].strip())
    except AuthError as exc:
        return error_response(401, ErrorCode.UNAUTHORIZED, f"invalid token: {exc}")


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
    text = _comment_text(request.body)
    if text is None:
        return error_response(400, ErrorCode.BAD_MESSAGE, 'the body must be a JSON object with a string "text"')
    try:
        comment = await admission.post(who, stream, text, ip)
    except Refused as exc:
        return error_response(REFUSAL_STATUS.get(exc.code, 400), exc.code, exc.reason, exc.retry_after_ms,
                              exc.comment_id)
    return json_response_bytes(201, {"id": comment.id})
