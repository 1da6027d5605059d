"""Moderation at the gateway: the moderator HTTP API, bans that reach every gateway, shadow echoes.

**The API** (JSON; ``Authorization: Bearer`` with a token that may moderate the stream:
role ``moderator`` or scope ``moderate`` on any stream unless the token's ``streams`` claim
names some, role ``broadcaster`` on the streams its ``streams`` claim names)::

    POST /mod/streams/{s}/comments/{id}/delete   {"reason"?}          delete (tombstone, live delete event)
    POST /mod/streams/{s}/comments/{id}/pin                            pin (live pin event, welcome's pin)
    POST /mod/streams/{s}/unpin
    POST /mod/streams/{s}/users/{u}/ban          {"reason"?}          ban: closed on every gateway, refused
    POST /mod/streams/{s}/users/{u}/timeout      {"seconds", "reason"?} likewise, for a while
    POST /mod/streams/{s}/users/{u}/unban
    POST /mod/streams/{s}/users/{u}/clear        {"seconds"?}         delete their comments of the last N s
    POST /mod/streams/{s}/users/{u}/shadow_ban   {"seconds"?}         later comments reach only them
    POST /mod/streams/{s}/users/{u}/unshadow
    POST /mod/streams/{s}/slow_mode              {"seconds"}          0 turns it off
    GET  /mod/streams/{s}/queue?limit=&resolved=                       the review queue
    POST /mod/streams/{s}/queue/{id}             {"action": "keep"|"delete"}

Answers are ``200 {"ok": true, ...}`` or ``{"error": code, "reason": ...}`` with 400, 401,
403 (``not_a_moderator``), 404, 405 or 503 (the log did not take the operation). Deletes,
pins and unpins are control records appended to the comments log, so they keep the stream's
order and reach viewers through the coordinator, history through the archiver. Every action
is recorded in ``moderation_actions`` (stage ``api``, the moderator as actor).

**Bans reach every gateway.** The ban is stored (admission refuses the user's posts, and a
new connection of the user is closed at once with 4503 banned or 4504 timed out); then the
connection registry (gateway/registry.py) names the gateways holding the user's
connections, and each gets ``{"op":"kick",...}`` on its own control channel (broker stream
``gw/<instance>``: ``/`` never occurs in a stream id) and closes them with that code.

**Shadow echoes.** A comment admitted while its author is shadow-banned is marked ``shadow``
in the log; nobody's live feed or history shows it but the author's. The gateway that took
it sends it back to the author's connections on that stream here, as a ``batch`` without
``epoch``/``offset`` (it is not a position in anyone else's feed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from picows import WSUpgradeRequest, WSUpgradeResponse

from chorus.auth import AuthError, Identity, verify_token
from chorus.broker import Broker, set_stream_mode
from chorus.codes import MAX_SLOW_MODE_SECONDS, CloseCode, ErrorCode, HttpErrorCode
from chorus.gateway.http import STREAM_ID, Request, json_response
from chorus.gateway.httpreq import HttpRequest, error_response, json_response_bytes
from chorus.gateway.registry import ConnectionRegistry
from chorus.ingest.limits import BackendUnavailable
from chorus.ingest.log import CommentLog, append_many
from chorus.ingest.records import Comment, Control, encode_control
from chorus.ingest.reputation import Reputation
from chorus.ingest.store import ModerationAction, SqliteStore
from chorus.protocol import JSON, MSGPACK, ChannelMessage, encode_event, pack_channel_message

if TYPE_CHECKING:
    from chorus.gateway.server import Gateway

__all__ = ["CONTROL_PREFIX", "GatewayModeration", "publish_kick"]

log = logging.getLogger("chorus.modapi")

CONTROL_PREFIX = "gw/"  # a gateway's control channel is the broker stream gw/<instance>
USER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
MAX_TIMEOUT_S = 14 * 86400
DEFAULT_CLEAR_S = 3600
CLEAR_MAX = 500  # comments one clear deletes at most
STOP_TIMEOUT_S = 3.0
_PATH = re.compile(r"^/mod/streams/(?P<stream>[^/]+)/(?P<rest>.+)$")
# (method, pattern of the rest of the path, handler name)
_ROUTES = [
    ("POST", re.compile(r"^comments/(?P<id>\d{1,20})/(?P<op>delete|pin)$"), "_comment_op"),
    ("POST", re.compile(r"^unpin$"), "_unpin"),
    ("POST", re.compile(r"^users/(?P<user>[^/]+)/(?P<op>ban|timeout|unban)$"), "_sanction"),
    ("POST", re.compile(r"^users/(?P<user>[^/]+)/clear$"), "_clear"),
    ("POST", re.compile(r"^users/(?P<user>[^/]+)/(?P<op>shadow_ban|unshadow)$"), "_shadow"),
    ("POST", re.compile(r"^slow_mode$"), "_slow_mode"),
    ("POST", re.compile(r"^queue/(?P<id>\d{1,20})$"), "_resolve"),
    ("GET", re.compile(r"^queue$"), "_queue"),
]


Answer = dict[str, Any]  # the fields of a 200 answer beside "ok"


class ApiError(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ApiError(400, HttpErrorCode.BAD_REQUEST, "the body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise ApiError(400, HttpErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return obj


def _int_field(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, HttpErrorCode.BAD_REQUEST, f'"{name}" must be an integer {low}-{high}')
    return value


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    return reason[:200] if isinstance(reason, str) else ""


async def publish_kick(broker: Broker, gateways: list[str], user: str, stream: str, code: int, reason: str) -> None:
    """Tell each gateway (instance ids, from the registry) to close ``user``'s connections to
    ``stream`` ("*": every stream) with ``code``."""
    message = json.dumps({"op": "kick", "user": user, "stream": stream, "code": int(code), "reason": reason})
    for gateway in gateways:
        await broker.publish(CONTROL_PREFIX + gateway, pack_channel_message(message.encode()))


class GatewayModeration:
    """One per gateway: the API, the connection registry and this gateway's control channel."""

    def __init__(self, gateway: Gateway, comment_log: CommentLog, broker: Broker, reputation: Reputation,
                 instance: str, redis: Any = None, prefix: str = "chorus:", shadow_ban_s: int = 86400,
                 registry_ttl_s: float = 90.0) -> None:
        self.gateway = gateway
        self.log = comment_log
        self.broker = broker
        self.reputation = reputation
        self.registry = ConnectionRegistry(instance, redis, prefix, registry_ttl_s)
        self.channel = CONTROL_PREFIX + instance
        self.shadow_ban_s = shadow_ban_s
        self._redis = redis
        self.kicked = 0  # connections closed on a ban or time-out
        self.refused = 0  # connections of banned users closed right after the upgrade
        self.shadow_echoes = 0

    # -- lifecycle and hooks the gateway calls ----------------------------------------------
    async def start(self) -> None:
        await self.broker.subscribe(self.channel)
        self.registry.start()

    async def stop(self) -> None:
        """Remove this gateway from the registry (bounded: a stopping gateway must not hang on Redis)."""
        try:
            await asyncio.wait_for(self.registry.stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("connection registry: not cleaned up within %.0f s; its keys expire on their own",
                        STOP_TIMEOUT_S)
        if self._redis is not None:
            await self._redis.aclose()

    def owns(self, stream: str) -> bool:
        return stream == self.channel

    def on_join(self, who: Identity | None, conn: int, stream: str, msgpack: bool = False) -> None:
        if who is not None:
            self.registry.add(who.user_id, conn, stream, msgpack)

    def on_leave(self, who: Identity | None, conn: int) -> None:
        if who is not None:
            self.registry.remove(who.user_id, conn)

    async def refusal(self, who: Identity | None, stream: str) -> tuple[int, str] | None:
        """(close code, reason) if ``who`` is banned or timed out here; None lets them in (and
        does so if Redis does not answer: fail open, as admission)."""
        if who is None:
            return None
        try:
            refusal = await self.gateway.admission.limits.sanctions.check(stream, who.user_id)
        except BackendUnavailable:
            return None
        if refusal is None:
            return None
        self.refused += 1
        code = CloseCode.BANNED if refusal.code == ErrorCode.BANNED else CloseCode.TIMED_OUT
        return code, refusal.reason

    def on_control(self, message: ChannelMessage) -> None:
        """A message on this gateway's control channel: close a banned user's connections."""
        try:
            op = json.loads(message.event_json)
            user, stream, code, reason = op["user"], op["stream"], int(op["code"]), str(op.get("reason", ""))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("bad control message %r: %s", message.event_json[:80], exc)
            return
        if op.get("op") == "kick":
            self.close_user(user, stream, code, reason)

    def close_user(self, user: str, stream: str, code: int, reason: str) -> int:
        conns = self.registry.conns(user, stream)
        for conn in conns:
            self.gateway.hub.close(conn, code, reason[:100])
        if conns:
            self.kicked += len(conns)
            self.gateway.on_hub_ready()
        return len(conns)

    def echo_shadow(self, comment: Comment) -> None:
        """Show a shadowed comment to its author's connections on its stream at this gateway."""
        event = {"t": "batch", "stream": comment.stream, "comments": [comment.to_event()]}
        payloads = {False: encode_event(event, JSON), True: encode_event(event, MSGPACK)}
        for conn, binary in self.registry.conns_with_wire(comment.user_id, comment.stream):
            self.gateway.hub.send(conn, payloads[binary])
            self.shadow_echoes += 1

    # -- HTTP ---------------------------------------------------------------------------------
    def _identify(self, authorization: str | None, stream: str) -> Identity:
        header = authorization or ""
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "the moderator API needs a token: Authorization: Bearer ...")
        try:
            who = verify_token(self.gateway.config.auth, header[7:].strip())
        except AuthError as exc:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, f"invalid token: {exc}") from None
        if not who.may_moderate(stream):
            raise ApiError(403, HttpErrorCode.NOT_A_MODERATOR, f"this token may not moderate stream {stream}")
        return who

    def _route(self, method: str, path: str) -> tuple[str, str, dict[str, str]]:
        match = _PATH.match(path)
        if match is None or not STREAM_ID.match(match.group("stream")):
            raise ApiError(404, HttpErrorCode.NOT_FOUND, "no such moderator endpoint")
        for want, pattern, name in _ROUTES:
            found = pattern.match(match.group("rest"))
            if found is None:
                continue
            if want != method:
                raise ApiError(405, HttpErrorCode.METHOD_NOT_ALLOWED, f"use {want} here")
            user = found.groupdict().get("user")
            if user is not None and not USER_ID.match(user):
                raise ApiError(400, HttpErrorCode.BAD_REQUEST, "a user id is 1-128 characters of A-Z a-z 0-9 _ . : @ -")
            return name, match.group("stream"), found.groupdict()
        raise ApiError(404, HttpErrorCode.NOT_FOUND, "no such moderator endpoint")

    async def post(self, request: HttpRequest) -> bytes:
        """Answer a ``POST /mod/...`` (gateway/handoff.py reads it) with the whole response."""
        try:
            name, stream, args = self._route("POST", urlsplit(request.target).path)
            who = self._identify(request.header("Authorization"), stream)
            answer = await getattr(self, name)(who, stream, args, _body(request.body))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.reason)
        return json_response_bytes(200, {"ok": True, **answer})

    def get(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse:
        """Answer a ``GET /mod/...`` (picows' router; the review queue is one indexed read)."""
        try:
            name, stream, args = self._route("GET", req.path)
            who = self._identify(request.headers.get("Authorization"), stream)
            answer = getattr(self, name)(who, stream, args, req)
        except ApiError as exc:
            return json_response({"error": exc.code, "reason": exc.reason}, HTTPStatus(exc.status))
        return json_response({"ok": True, **answer})

    # -- the operations -----------------------------------------------------------------------
    @property
    def store(self) -> SqliteStore | None:
        """The history store, where moderation keeps its records (None: no store here)."""
        store = self.gateway.store
        return store if isinstance(store, SqliteStore) else None

    async def _append(self, controls: list[Control]) -> None:
        failures = await append_many(self.log, [encode_control(c) for c in controls])
        failed = [f for f in failures if f is not None]
        if failed:
            raise ApiError(503, ErrorCode.NOT_ACCEPTED, f"the comments log did not take it ({failed[0]}); try again")

    async def _record(self, *actions: ModerationAction) -> None:
        store = self.store
        if store is not None:
            await asyncio.to_thread(store.record_actions, actions)

    async def _find(self, stream: str, comment_id: str) -> dict[str, Any] | None:
        """A live comment of the stream, from the recent cache, else the history store."""
        cached = await self.gateway.state.recent(stream, self.gateway.config.coordinator.recent_size)
        for c in cached:
            if c.get("id") == comment_id:
                return c
        store = self.store
        if store is None:
            return None
        found = await asyncio.to_thread(store.comment, stream, comment_id)
        return found[0] if found is not None and not found[1] else None

    async def _comment_op(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        cid, op = args["id"], args["op"]
        comment = await self._find(stream, cid)
        if comment is None:
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"no live comment {cid} on stream {stream}")
        reason = _reason(body)
        if op == "pin":
            comment = {k: v for k, v in comment.items() if k != "offset"} | {"offset": comment.get("offset", -1)}
            pin = Control("pin", stream, cid, comment=comment, by=who.user_id, reason=reason, ts=_now_ms())
            await self._append([pin])
        else:
            await self._append([Control("delete", stream, cid, by=who.user_id, reason=reason, ts=_now_ms())])
            store = self.store
            if store is not None:
                await asyncio.to_thread(store.resolve_review, stream, cid, "delete", who.user_id)
        await self._record(ModerationAction(stream, op, "api", cid, comment["user"]["id"], None, reason, who.user_id))
        return {"action": op, "id": cid, **({"comment": comment} if op == "pin" else {})}

    async def _unpin(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        await self._append([Control("unpin", stream, by=who.user_id, ts=_now_ms())])
        await self._record(ModerationAction(stream, "unpin", "api", None, None, None, "", who.user_id))
        return {"action": "unpin"}

    async def _sanction(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        user, op = args["user"], args["op"]
        sanctions = self.gateway.admission.limits.sanctions
        seconds = _int_field(body, "seconds", 1, MAX_TIMEOUT_S) if op == "timeout" else None
        reason = _reason(body)
        if op == "unban":
            await sanctions.unban(stream, user)
            await self._record(ModerationAction(stream, "unban", "api", None, user, None, reason, who.user_id))
            return {"action": "unban", "user": user}
        await sanctions.ban(stream, user, seconds)
        code = CloseCode.BANNED if seconds is None else CloseCode.TIMED_OUT
        text = reason or ("banned from this stream" if seconds is None else f"timed out for {seconds} s")
        gateways = await self.kick(user, stream, code, text)
        await self._record(ModerationAction(stream, op, "api", None, user, None, f"{text}; {gateways} gateways told",
                                            who.user_id))
        return {"action": op, "user": user, "seconds": seconds, "gateways": gateways}

    async def kick(self, user: str, stream: str, code: int, reason: str) -> int:
        """Close ``user``'s connections to ``stream`` on every gateway holding some; how many gateways."""
        try:
            gateways = await self.registry.gateways(user)
        except Exception as exc:  # the ban stands (admission refuses their posts); say what was missed
            log.warning("connection registry unavailable; %s's open connections stay open: %s", user, exc)
            raise ApiError(503, HttpErrorCode.INTERNAL_ERROR,
                           "the ban is stored but the connection registry did not answer; open connections "
                           "were not closed, try again") from None
        self.close_user(user, stream, code, reason)
        others = [g for g in gateways if g != self.registry.instance]
        await publish_kick(self.broker, others, user, stream, code, reason)
        return len(others) + 1

    async def _clear(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        user = args["user"]
        seconds = _int_field(body, "seconds", 1, MAX_TIMEOUT_S, DEFAULT_CLEAR_S)
        since = _now_ms() - seconds * 1000
        ids: dict[str, None] = {}
        for c in await self.gateway.state.recent(stream, self.gateway.config.coordinator.recent_size):
            if c["user"]["id"] == user and c["ts"] >= since:
                ids[c["id"]] = None
        store = self.store
        if store is not None:
            ids.update(dict.fromkeys(await asyncio.to_thread(store.recent_of_user, stream, user, since, CLEAR_MAX)))
        deleted = sorted(ids, key=int)[-CLEAR_MAX:]
        now = _now_ms()
        if deleted:
            await self._append([Control("delete", stream, cid, by=who.user_id, reason="cleared", ts=now)
                                for cid in deleted])
        await self._record(ModerationAction(stream, "clear", "api", None, user, None,
                                            f"{len(deleted)} comments of the last {seconds} s", who.user_id))
        return {"action": "clear", "user": user, "deleted": deleted}

    async def _shadow(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        user, op = args["user"], args["op"]
        if op == "unshadow":
            await self.reputation.lift_shadow_ban(user)
            seconds = None
        else:
            seconds = _int_field(body, "seconds", 1, MAX_TIMEOUT_S, self.shadow_ban_s)
            await self.reputation.shadow_ban([user], seconds)
        reason = f"{_reason(body)} ({seconds} s)" if seconds else _reason(body)
        await self._record(ModerationAction(stream, op, "api", None, user, None, reason, who.user_id))
        return {"action": op, "user": user, "seconds": seconds}

    async def _slow_mode(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        seconds = _int_field(body, "seconds", 0, MAX_SLOW_MODE_SECONDS)
        state = self.gateway.state
        mode = dataclasses.replace(await state.get_mode(stream), slow_mode_seconds=seconds)
        await set_stream_mode(state, self.broker, stream, mode)
        await self._record(ModerationAction(stream, "slow_mode", "api", None, None, None, f"{seconds} s", who.user_id))
        return {"action": "slow_mode", "mode": mode.to_wire()}

    async def _resolve(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        cid, action = args["id"], body.get("action")
        if action not in ("keep", "delete"):
            raise ApiError(400, HttpErrorCode.BAD_REQUEST, '"action" must be "keep" or "delete"')
        store = self.store
        if store is None or not await asyncio.to_thread(store.resolve_review, stream, cid, action, who.user_id):
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"comment {cid} is not waiting for review on stream {stream}")
        if action == "delete":
            await self._append([Control("delete", stream, cid, by=who.user_id, reason="review", ts=_now_ms())])
        await self._record(ModerationAction(stream, action, "review", cid, None, None, _reason(body), who.user_id))
        return {"action": action, "id": cid}

    def _queue(self, who: Identity, stream: str, args: dict[str, str], req: Request) -> dict[str, Any]:
        try:
            limit = int(req.arg("limit") or 50)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 500:
            raise ApiError(400, HttpErrorCode.BAD_REQUEST, "limit must be 1-500")
        resolved = (req.arg("resolved") or "0") in ("1", "true")
        store = self.store
        if store is None:
            return {"stream": stream, "items": [], "open": 0}
        items = store.review_queue(stream, limit, resolved)
        return {"stream": stream, "items": [i.to_wire() for i in items], "open": store.open_reviews(stream)}

