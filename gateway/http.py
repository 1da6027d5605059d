"""Plain HTTP answers of the gateway: the viewer page, history pages, health, dev tokens.

picows calls the gateway's listener factory for every request on the port; these helpers
build the non-101 responses. Everything here is synchronous and quick: the history page is
one indexed SQLite read.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import WSUpgradeResponse

__all__ = ["STREAM_ID", "Request", "json_response", "parse_request", "static_response", "text_response"]

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
