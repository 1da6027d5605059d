"""The gateway's HTTP side: every request, routed to its answer.

gateway/handoff.py reads each request first. An upgrade goes to picows, which calls
:meth:`HttpRoutes.route` (the upgrade's checks, or a plain answer); every other request comes
to :meth:`HttpRoutes.answer`: GET and HEAD through the same routing (HEAD: GET's status and
headers, no body), POST to the comment and moderator endpoints, any other method 405 with
``Allow``. Errors are ``{"error": CODE, "reason": ...}`` throughout.

The WebSocket upgrade itself (stream id, Origin, token, subprotocol, deflate) is the join's
(gateway/join.py), which owns what happens to the socket next; this module decides only which
answer a request gets. Its collaborators come in its constructor, each typed by the small
protocol of what the routes use (:class:`Upgrades`, :class:`Probes`, :class:`ModeratorApi`...),
so no gateway module it serves imports it back.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Protocol
from urllib.parse import urlsplit

from multidict import CIMultiDict
from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from chorus.auth import AuthError, Identity, TokenExpired, mint_token, verify_token
from chorus.codes import ErrorCode, HttpErrorCode
from chorus.config import Config
from chorus.gateway.engagement import Engagement
from chorus.gateway.http import (
    STREAM_ID,
    Request,
    answer_comment_post,
    error_json,
    json_response,
    parse_request,
    response_bytes,
    static_response,
    text_response,
)
from chorus.gateway.httpreq import HttpRequest, error_response
from chorus.gateway.router import Router
from chorus.ingest.admission import Admission
from chorus.ingest.store import HistoryStore
from chorus.metrics import CONTENT_TYPE
from chorus.ops import Serving

__all__ = ["HttpRoutes", "ModeratorApi", "PostGate", "Probes", "Upgrades", "allowed_methods",
           "authenticate", "dev_user_id", "display_name", "handshake_refusal", "origin_allowed"]

log = logging.getLogger("chorus.gateway")

MAX_COMMENT_ID = 2**63 - 1  # ids are positive signed 64-bit integers (chorus/ids.py)
DEFAULT_PAGE = 50
_DECIMAL = re.compile(r"[0-9]{1,19}")  # fullmatch: no sign, no spaces, no "_" (int() takes all three)
# Paths GET serves beside the pages under /static/ and /streams/.
_GET_PATHS = frozenset({"/", "/index.html", "/streams", "/healthz", "/readyz", "/metrics", "/dev/token", "/ws",
                        "/echo"})
_POST_PATH = re.compile(r"^/streams/[^/]+/comments$")
DEV_NAME_MAX_CHARS = 32
DEV_USER_ID_MAX_CHARS = 128  # what the moderator API takes in a path (gateway/modapi.py USER_ID)
_ID_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# Invisible characters that would let one name pass for another or reorder the line it is
# shown in (controls, format characters such as bidi overrides and tags, surrogates, line and
# paragraph separators): dropped from display names. Joiners stay, as emoji sequences need
# them; unassigned code points stay too (newer emoji than this Python's Unicode tables).
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEPT_FORMAT = frozenset({"\u200c", "\u200d"})  # ZWNJ, ZWJ
WS_VERSION = "13"  # RFC 6455 4.1: the only version served
_WS_KEY_BYTES = 16  # RFC 6455 4.1: Sec-WebSocket-Key is 16 random bytes in base64


def allowed_methods(path: str) -> str | None:
    """The ``Allow`` of a path (RFC 9110 10.2.1), or None when nothing is served there."""
    if _POST_PATH.match(path) or path.startswith("/mod/"):
        return "GET, HEAD, POST"
    if path in _GET_PATHS or path.startswith(("/static/", "/streams/")):
        return "GET, HEAD"
    return None


def _valid_key(key: str | None) -> bool:
    try:
        return key is not None and len(base64.b64decode(key.encode("ascii"), validate=True)) == _WS_KEY_BYTES
    except (UnicodeEncodeError, binascii.Error):
        return False


def handshake_refusal(headers: Mapping[str, str]) -> WSUpgradeResponse | None:
    """RFC 6455 4.2.1's checks of an upgrade the routes accepted, as JSON (picows would answer
    them in plain text). The hand-off gave picows Connection as the bare token when it held it."""
    if "upgrade" not in (t.strip().lower() for t in headers.get("Connection", "").split(",")):
        return error_json(HTTPStatus.BAD_REQUEST, HttpErrorCode.BAD_REQUEST,
                          "a WebSocket upgrade needs Connection: Upgrade")
    if headers.get("Sec-WebSocket-Version") != WS_VERSION:  # RFC 6455 4.4: say which version we speak
        return error_json(HTTPStatus.UPGRADE_REQUIRED, HttpErrorCode.UPGRADE_REQUIRED,
                          f"only WebSocket version {WS_VERSION} is served", {"Sec-WebSocket-Version": WS_VERSION})
    if not _valid_key(headers.get("Sec-WebSocket-Key")):
        return error_json(HTTPStatus.BAD_REQUEST, HttpErrorCode.BAD_REQUEST,
                          "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


def display_name(raw: str) -> str:
    """A name as others see it: NFC, without invisible or bidirectional controls, trimmed."""
    name = unicodedata.normalize("NFC", raw)
    kept = (ch for ch in name if ch in _KEPT_FORMAT or unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    return "".join(kept).strip()


def dev_user_id(name: str) -> str:
    """The dev sign-in's user id of a display name: one id per name and one name per id
    (``Alice`` and ``alice`` are two users). Letters, digits, ``_`` and ``-`` stay as they are;
    every other character becomes ``.hex.`` (its code point), which cannot be read two ways."""
    return "dev-" + "".join(ch if ch in _ID_SAFE else f".{ord(ch):x}." for ch in name)


def _dev_name_problem(raw: str, name: str, user_id: str) -> str | None:
    """Why a dev sign-in name is refused (rather than cut short: two long names would collide)."""
    if not raw.strip():
        return "name is required"
    if not name:
        return "the name has no visible characters"
    if len(name) > DEV_NAME_MAX_CHARS:
        return f"the name has {len(name)} characters; the limit is {DEV_NAME_MAX_CHARS}"
    if len(user_id) > DEV_USER_ID_MAX_CHARS:
        return "the name is too long once made a user id: use fewer characters outside A-Z a-z 0-9 _ -"
    return None


def _decimal_arg(value: str, low: int, high: int) -> int | None:
    """``value`` as an integer in [low, high], or None if it is anything else."""
    if not _DECIMAL.fullmatch(value):
        return None
    number = int(value)
    return number if low <= number <= high else None


def page_args(req: Request, page_max: int) -> tuple[int | None, int] | str:
    """(before, limit) of a history request, or why they are refused."""
    raw_before, raw_limit = req.arg("before"), req.arg("limit")
    before = None
    if raw_before is not None:
        before = _decimal_arg(raw_before, 1, MAX_COMMENT_ID)
        if before is None:
            return f"before must be a comment id (1 to {MAX_COMMENT_ID}); leave it out for the newest"
    limit = DEFAULT_PAGE if raw_limit is None else _decimal_arg(raw_limit, 1, page_max)
    if limit is None:
        return f"limit must be an integer from 1 to {page_max}"
    return before, limit


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
        return error_json(HTTPStatus.UNAUTHORIZED, HttpErrorCode.UNAUTHORIZED, "a token is required")
    try:
        return verify_token(config.auth, token)
    except TokenExpired:
        return error_json(HTTPStatus.UNAUTHORIZED, HttpErrorCode.TOKEN_EXPIRED,
                          "the token has expired; get a fresh one")
    except AuthError as exc:
        return error_json(HTTPStatus.UNAUTHORIZED, HttpErrorCode.UNAUTHORIZED, f"invalid token: {exc}")


Answer = WSUpgradeResponse | WSUpgradeResponseWithListener
GetHandler = Callable[[WSUpgradeRequest, Request, dict[str, str]], Answer]  # (picows' request, parsed, path args)


class Upgrades(Protocol):
    """The WebSocket upgrades the routes accept (gateway/join.py)."""

    def upgrade(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        ...

    def accept_echo(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener: ...


class PostGate(Protocol):
    """Whether new posts are refused (a draining gateway past its delay: gateway/drain.py)."""

    refusing_posts: bool


class Probes(Protocol):
    """Health and readiness (chorus/ops.py Operations); readiness includes the gateway's own."""

    def health(self) -> tuple[bool, dict[str, str]]: ...

    def ready(self, serving: Serving | None = None) -> tuple[bool, dict[str, str]]: ...


class ModeratorApi(Protocol):
    """The moderator HTTP API (gateway/modapi.py)."""

    def get(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse: ...

    async def post(self, request: HttpRequest) -> bytes: ...


class HttpRoutes:
    """Routes picows's GETs and the hand-off's POSTs for one gateway."""

    def __init__(self, config: Config, upgrades: Upgrades, engagement: Engagement, admission: Admission,
                 store: HistoryStore | None, serving: Serving, posts: PostGate, *,
                 moderation: ModeratorApi | None = None, probes: Probes | None = None,
                 metrics_page: Callable[[], bytes] | None = None) -> None:
        self.config = config
        self.upgrades = upgrades
        self.engagement = engagement
        self.admission = admission
        self.store = store
        self.serving = serving
        self.posts = posts
        self.moderation = moderation
        self.probes = probes
        self.metrics_page = metrics_page
        self.http_inflight = 0  # HTTP posts between arrival and answer
        self._get: Router[GetHandler] = Router(self._get_routes())

    # -- every request but an upgrade (read by gateway/handoff.py) --
    async def answer(self, request: HttpRequest, ip: str) -> bytes:
        """The whole answer to a request that is not a WebSocket upgrade."""
        if request.method in ("GET", "HEAD"):
            return self._answer_get(request)
        path = urlsplit(request.target).path
        allow = allowed_methods(path)
        if request.method == "POST" and (allow is None or "POST" in allow):
            return await self.post(request, ip)  # an unknown path: post() says which ones take a POST
        if allow is None:
            return error_response(404, HttpErrorCode.NOT_FOUND, f"nothing is served at {path[:80]}")
        return error_response(405, HttpErrorCode.METHOD_NOT_ALLOWED,
                              f"{request.method[:20]} is not served at {path[:80]}; it takes {allow}",
                              headers={"Allow": allow})

    def _answer_get(self, request: HttpRequest) -> bytes:
        """GET through the same routes as picows' requests; HEAD gets GET's head alone."""
        as_picows = WSUpgradeRequest()
        as_picows.method = b"GET"
        as_picows.path = request.target.encode("ascii")
        as_picows.version = request.version.encode("ascii")
        as_picows.headers = CIMultiDict(request.headers)
        answer = self._route(as_picows)
        if isinstance(answer, WSUpgradeResponseWithListener):  # a 101 without an upgrade asked for
            answer = answer.response if answer.response.status != HTTPStatus.SWITCHING_PROTOCOLS else error_json(
                HTTPStatus.UPGRADE_REQUIRED, HttpErrorCode.UPGRADE_REQUIRED,
                "this endpoint takes a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
                {"Upgrade": "websocket"})
        return response_bytes(answer, with_body=request.method != "HEAD")

    # -- an upgrade request (called by picows) --
    def route(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        answer = self._route(request)
        if isinstance(answer, WSUpgradeResponse):
            return WSUpgradeResponseWithListener(answer, None)
        if answer.response.status == HTTPStatus.SWITCHING_PROTOCOLS:
            refusal = handshake_refusal(request.headers)
            if refusal is not None:
                return WSUpgradeResponseWithListener(refusal, None)
        return answer

    def _route(self, request: WSUpgradeRequest) -> WSUpgradeResponse | WSUpgradeResponseWithListener:
        req = parse_request(request.path)
        if request.method != b"GET":  # the hand-off gives picows GETs only
            return error_json(HTTPStatus.METHOD_NOT_ALLOWED, HttpErrorCode.METHOD_NOT_ALLOWED,
                              "only GET is served here", {"Allow": "GET, HEAD"})
        found = self._get.match("GET", req.path)
        if found is None or found.handler is None:
            return error_json(HTTPStatus.NOT_FOUND, HttpErrorCode.NOT_FOUND, f"nothing is served at {req.path[:80]}")
        return found.handler(request, req, found.args)

    def _get_routes(self) -> list[tuple[str, str, GetHandler]]:
        """The GET table, in order (the first template matching the whole path answers);
        optional endpoints are in it only when they are on."""
        routes: list[tuple[str, str, GetHandler]] = [
            ("GET", "/ws", lambda request, req, args: self.upgrades.upgrade(request, req)),
            ("GET", "/", self._page),
            ("GET", "/index.html", self._page),
            ("GET", "/static/{name:.*}", lambda request, req, args: static_response(args["name"])),
            # History; "/streams/comments" too, where the id is empty (a 400 that says what an id is).
            ("GET", "/streams/{stream:.*}/comments", self._history_route),
            ("GET", "/streams/comments", self._history_route),
        ]
        moderation = self.moderation
        if moderation is not None:
            routes.append(("GET", "/mod/{rest:.*}", lambda request, req, args: moderation.get(request, req)))
        routes += [
            ("GET", "/streams/{stream:[^/]*/*}", self._page),  # the viewer page; it checks the id itself
            ("GET", "/streams", lambda request, req, args: json_response({"streams": self.engagement.live_streams()})),
            ("GET", "/healthz", lambda request, req, args: self._probe(req.path)),
            ("GET", "/readyz", lambda request, req, args: self._probe(req.path)),
        ]
        metrics_page = self.metrics_page
        if metrics_page is not None:
            routes.append(("GET", "/metrics", lambda request, req, args: WSUpgradeResponse.create_ok_response(
                metrics_page(), {"Content-Type": CONTENT_TYPE})))
        routes.append(("GET", "/dev/token", lambda request, req, args: self._dev_token(req)))
        if self.config.gateway.echo_endpoint:
            routes.append(("GET", "/echo", lambda request, req, args: self.upgrades.accept_echo(request)))
        return routes

    @staticmethod
    def _page(request: WSUpgradeRequest, req: Request, args: dict[str, str]) -> WSUpgradeResponse:
        return static_response("index.html")

    def _history_route(self, request: WSUpgradeRequest, req: Request, args: dict[str, str]) -> WSUpgradeResponse:
        return self._history(args.get("stream", ""), req, request)

    def _history(self, stream: str, req: Request, request: WSUpgradeRequest) -> WSUpgradeResponse:
        store = self.store
        if not STREAM_ID.match(stream):
            return error_json(HTTPStatus.BAD_REQUEST, HttpErrorCode.BAD_REQUEST,
                              "stream must be 1-64 characters of A-Z a-z 0-9 _ . : -, not . or ..")
        if store is None:
            return error_json(HTTPStatus.NOT_FOUND, HttpErrorCode.NOT_FOUND, "no history store on this gateway")
        args = page_args(req, self.config.history.page_max)
        if isinstance(args, str):
            return error_json(HTTPStatus.BAD_REQUEST, HttpErrorCode.BAD_REQUEST, args)
        before, limit = args
        who = authenticate(self.config, request, req)  # the author also sees their own shadowed comments
        comments = store.page(stream, before, limit, who.user_id if isinstance(who, Identity) else None)
        next_before = comments[-1]["id"] if len(comments) == limit else None
        return json_response({"stream": stream, "comments": comments, "next_before": next_before})

    def _dev_token(self, req: Request) -> WSUpgradeResponse:
        if not (self.config.auth.dev_login and self.config.embedded):
            return error_json(HTTPStatus.NOT_FOUND, HttpErrorCode.NOT_FOUND, "dev login is off")
        raw = req.arg("name") or ""
        name = display_name(raw)
        user_id = dev_user_id(name)
        problem = _dev_name_problem(raw, name, user_id)
        if problem is not None:
            return error_json(HTTPStatus.BAD_REQUEST, HttpErrorCode.BAD_REQUEST, problem)
        token = mint_token(self.config.auth, user_id, name, ["read", "write"])
        return json_response({"token": token, "user": {"id": user_id, "name": name}})

    def _probe(self, path: str) -> WSUpgradeResponse:
        detail: dict[str, str] = {}
        if self.probes is None:  # no Operations attached (a bare Gateway in tests): listening is all
            ok = (self.serving.listening and not self.serving.draining) if path == "/readyz" else True
        elif path == "/readyz":
            ok, detail = self.probes.ready(self.serving)
        else:
            ok, detail = self.probes.health()
        if ok and path == "/healthz":
            return text_response(HTTPStatus.OK, "ok")
        detail.setdefault("status", "ready" if ok else "not ready")
        return json_response(detail, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    # -- POST (from answer) --
    async def post(self, request: HttpRequest, ip: str) -> bytes:
        """``POST /streams/{id}/comments`` (clients without a WebSocket) and the moderator API."""
        if not origin_allowed(request.header("Origin"), request.header("Host"), self.config.gateway.allowed_origins):
            return error_response(HTTPStatus.FORBIDDEN, HttpErrorCode.FORBIDDEN, "origin not allowed")
        if request.target.startswith("/mod/") and self.moderation is not None:
            return await self.moderation.post(request)
        if self.posts.refusing_posts:
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.NOT_ACCEPTED,
                                  "this gateway is restarting; it was not posted: post again", 1000)
        self.http_inflight += 1
        try:
            return await answer_comment_post(request, ip, self.config.auth, self.admission)
        finally:
            self.http_inflight -= 1
