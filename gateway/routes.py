"""The gateway's HTTP side: every request picows parses (GETs, and the upgrade's checks) and
the POSTs gateway/handoff.py reads, routed to their answers.

The WebSocket upgrade itself (stream id, Origin, token, subprotocol, deflate) stays with the
gateway (gateway/server.py), which owns what happens to the socket next; this module decides
only which answer a request gets. It knows the gateway through :class:`RoutedGateway`, the
few things it reads, so the two modules do not import each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from chorus.auth import AuthError, Identity, mint_token, verify_token
from chorus.codes import ErrorCode, HttpErrorCode
from chorus.config import Config
from chorus.gateway.engagement import Engagement
from chorus.gateway.http import (
    STREAM_ID,
    Request,
    answer_comment_post,
    json_response,
    parse_request,
    static_response,
    text_response,
)
from chorus.gateway.httpreq import HttpRequest, error_response
from chorus.gateway.modapi import GatewayModeration
from chorus.ingest.admission import Admission
from chorus.ingest.store import HistoryStore
from chorus.metrics import CONTENT_TYPE

__all__ = ["HttpRoutes", "RoutedGateway", "authenticate", "origin_allowed"]

log = logging.getLogger("chorus.gateway")

Check = Callable[[], tuple[bool, dict[str, str]]]


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Non-browser clients send no Origin; browsers must come from our host or the allowlist."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def authenticate(config: Config, request: WSUpgradeRequest, req: Request) -> Identity | WSUpgradeResponse | None:
    """The request's identity (header or ``access_token``), None for an anonymous reader, or
    the 401 to answer."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else req.arg("access_token")
    if not token:
        if config.auth.anonymous_read:
            return None
        return text_response(HTTPStatus.UNAUTHORIZED, "a token is required")
    try:
        return verify_token(config.auth, token)
    except AuthError as exc:
        return text_response(HTTPStatus.UNAUTHORIZED, f"invalid token: {exc}")


class RoutedGateway(Protocol):
    """What the routes read of the gateway (gateway/server.py)."""

    config: Config
    store: HistoryStore | None
    admission: Admission
    engagement: Engagement
    moderation: GatewayModeration | None
    readiness: Check | None
    health: Check | None
    metrics_page: Callable[[], bytes] | None
    draining: bool
    refusing_posts: bool

    @property
    def listening(self) -> bool: ...

    def upgrade(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        ...

    def accept_echo(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener: ...


class HttpRoutes:
    """Routes picows's GETs and the hand-off's POSTs for one gateway."""

    def __init__(self, gateway: RoutedGateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.http_inflight = 0  # HTTP posts between arrival and answer

    # -- GET (called by picows for every request) --
    def route(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        answer = self._route(request)
        if isinstance(answer, WSUpgradeResponse):
            return WSUpgradeResponseWithListener(answer, None)
        return answer

    def _route(self, request: WSUpgradeRequest) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        gw = self.gateway
        req = parse_request(request.path)
        if request.method != b"GET":
            return text_response(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served here")
        if req.path == "/ws":
            return gw.upgrade(request, req)
        if req.path in ("/", "/index.html"):
            return static_response("index.html")
        if req.path.startswith("/static/"):
            return static_response(req.path.removeprefix("/static/"))
        if req.path.startswith("/streams/") and req.path.endswith("/comments"):
            return self._history(req.path[len("/streams/") : -len("/comments")], req, request)
        if req.path.startswith("/mod/") and gw.moderation is not None:
            return gw.moderation.get(request, req)
        if req.path.startswith("/streams/") and "/" not in req.path[len("/streams/") :].rstrip("/"):
            return static_response("index.html")  # the viewer page; it checks the id itself
        if req.path == "/streams":
            return json_response({"streams": gw.engagement.live_streams()})
        if req.path in ("/healthz", "/readyz"):
            return self._probe(req.path)
        if req.path == "/metrics" and gw.metrics_page is not None:
            return WSUpgradeResponse.create_ok_response(gw.metrics_page(), {"Content-Type": CONTENT_TYPE})
        if req.path == "/dev/token":
            return self._dev_token(req)
        if req.path == "/echo" and self.config.gateway.echo_endpoint:
            return gw.accept_echo(request)
        return text_response(HTTPStatus.NOT_FOUND, "not found")

    def _history(self, stream: str, req: Request, request: WSUpgradeRequest) -> WSUpgradeResponse:
        store = self.gateway.store
        if not STREAM_ID.match(stream):
            return json_response({"error": "bad stream id"}, HTTPStatus.BAD_REQUEST)
        if store is None:
            return json_response({"error": "no history store on this gateway"}, HTTPStatus.NOT_FOUND)
        try:
            before = int(req.arg("before") or 0) or None
            limit = int(req.arg("limit") or 50)
        except ValueError:
            return json_response({"error": "before and limit must be integers"}, HTTPStatus.BAD_REQUEST)
        if not 1 <= limit <= self.config.history.page_max:
            return json_response({"error": f"limit must be 1-{self.config.history.page_max}"}, HTTPStatus.BAD_REQUEST)
        who = authenticate(self.config, request, req)  # the author also sees their own shadowed comments
        comments = store.page(stream, before, limit, who.user_id if isinstance(who, Identity) else None)
        next_before = comments[-1]["id"] if len(comments) == limit else None
        return json_response({"stream": stream, "comments": comments, "next_before": next_before})

    def _dev_token(self, req: Request) -> WSUpgradeResponse:
        if not (self.config.auth.dev_login and self.config.embedded):
            return text_response(HTTPStatus.NOT_FOUND, "dev login is off")
        name = (req.arg("name") or "").strip()[:32]
        if not name:
            return json_response({"error": "name is required"}, HTTPStatus.BAD_REQUEST)
        user_id = "dev-" + "".join(ch for ch in name.lower() if ch.isalnum())[:24]
        token = mint_token(self.config.auth, user_id, name, ["read", "write"])
        return json_response({"token": token, "user": {"id": user_id, "name": name}})

    def _probe(self, path: str) -> WSUpgradeResponse:
        gw = self.gateway
        check = gw.readiness if path == "/readyz" else gw.health
        detail: dict[str, str] = {}
        if check is None:  # no Operations attached (a bare Gateway in tests): listening is all
            ok = (gw.listening and not gw.draining) if path == "/readyz" else True
        else:
            ok, detail = check()
        if ok and path == "/healthz":
            return text_response(HTTPStatus.OK, "ok")
        detail.setdefault("status", "ready" if ok else "not ready")
        return json_response(detail, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    # -- POST (read by gateway/handoff.py) --
    async def post(self, request: HttpRequest, ip: str) -> bytes:
        """``POST /streams/{id}/comments`` (clients without a WebSocket) and the moderator API."""
        gw = self.gateway
        if not origin_allowed(request.header("Origin"), request.header("Host"), self.config.gateway.allowed_origins):
            return error_response(HTTPStatus.FORBIDDEN, HttpErrorCode.FORBIDDEN, "origin not allowed")
        if request.target.startswith("/mod/") and gw.moderation is not None:
            return await gw.moderation.post(request)
        if gw.refusing_posts:
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.NOT_ACCEPTED,
                                  "this gateway is restarting; it was not posted: post again", 1000)
        self.http_inflight += 1
        try:
            return await answer_comment_post(request, ip, self.config.auth, gw.admission)
        finally:
            self.http_inflight -= 1
