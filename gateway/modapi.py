"""Moderation at the gateway: the moderator HTTP API, bans that reach every gateway, shadow echoes.

**The API** (JSON; ``Authorization: Bearer`` with a token that may moderate the stream:
role ``moderator`` or scope ``moderate`` on any stream unless the token's ``streams`` claim
names some, role ``broadcaster`` on the streams its ``streams`` claim names)::

    POST /mod/streams/{s}/comments/{id}/delete   {"reason"?}          delete (tombstone, live delete event)
    POST /mod/streams/{s}/comments/{id}/restore  {"reason"?}          a deleted comment is live again
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
    POST /mod/streams/{s}/queue/{id}             {"action": "keep"|"delete"|"restore"|"lift"}

Answers are ``200 {"ok": true, ...}`` or ``{"error": code, "reason": ...}`` with 400, 401,
403 (``not_a_moderator``), 404, 405 or 503 (the log did not take the operation). Everything in
a request is hostile until checked: a comment id is a decimal 1 to 2**63-1, a body is a JSON
object of at most :data:`MAX_BODY_DEPTH` levels, each field of its type; anything else is a
400 ``bad_request`` naming what is wrong, and a failure of the gateway itself a 500
``internal_error`` and one log line, never a traceback in the answer. Deletes, restores, pins
and unpins are control records appended to the comments log, so they keep the stream's order
and reach viewers through the coordinator, history through the archiver. Every action is
recorded in ``moderation_actions`` (stage ``api``, the moderator as actor). A moderator's
delete counts as a confident offence against the author (ingest/reputation.py); restoring a
comment automatic moderation deleted takes that offence back.

**Review queue.** Flagged comments wait there (``keep``, ``delete``); automatic deletes are
listed as resolved items (``?resolved=1``) so a wrong one can be restored (``restore``); an
automatic shadow-ban is an item of stage ``reputation`` with the offences that led to it
(``evidence``), and ``lift`` lifts it.

**Bans survive Redis restarting empty.** Bans and time-outs are also written to the history
store (``sanctions``). Every :data:`RESEED_CHECK_S` the gateway checks a marker key in Redis;
when it is missing (Redis restarted empty, or was flushed) the gateway puts every ban and
unexpired time-out back, sets the marker, and writes its connection registry again.

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
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from picows import WSUpgradeRequest, WSUpgradeResponse

from chorus.auth import AuthError, Identity, verify_token
from chorus.broker import Broker, StreamState, set_stream_mode
from chorus.codes import MAX_SLOW_MODE_SECONDS, CloseCode, DeleteCode, ErrorCode, HttpErrorCode
from chorus.config import Config
from chorus.errors import ChorusError
from chorus.gateway.http import STREAM_ID, Request, json_response
from chorus.gateway.httpreq import HttpRequest, error_response, json_response_bytes
from chorus.gateway.registry import ConnectionRegistry
from chorus.gateway.router import Router
from chorus.ingest.limits import BackendUnavailable, Sanctions
from chorus.ingest.log import CommentLog, append_many
from chorus.ingest.moderator import OFFENCE_WEIGHT
from chorus.ingest.records import Comment, Control, encode_control
from chorus.ingest.reputation import Reputation
from chorus.ingest.store import HistoryStore, ModerationAction, SqliteStore
from chorus.protocol import JSON, MSGPACK, ChannelMessage, encode_event, pack_channel_message

__all__ = ["CONTROL_PREFIX", "ApiError", "GatewayModeration", "ModerationSetup", "ViewerSockets", "publish_kick"]

log = logging.getLogger("chorus.modapi")

CONTROL_PREFIX = "gw/"  # a gateway's control channel is the broker stream gw/<instance>
USER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
MAX_COMMENT_ID = 2**63 - 1  # ids are positive signed 64-bit integers (chorus/ids.py; SQLite INTEGER)
MAX_BODY_DEPTH = 8  # nesting a moderator's JSON body may have (its fields are flat)
MAX_REASON_CHARS = 200
RESEED_CHECK_S = 1.0  # how often a gateway checks that Redis still holds the bans
SEEDED_MARKER = "sanctions:seeded"  # under the prefix: present while Redis holds the bans
MAX_TIMEOUT_S = 14 * 86400
DEFAULT_CLEAR_S = 3600
CLEAR_MAX = 500  # comments one clear deletes at most
STOP_TIMEOUT_S = 3.0
RESOLUTIONS = ("keep", "delete", "restore", "lift")
# The endpoints: (method, path, handler name); a comment id may be empty here, to be refused
# with a 400 that says what an id is rather than a 404.
_API: Router[str] = Router([
    ("POST", "/mod/streams/{stream}/comments/{id:[^/]*}/{op:delete|pin}", "_comment_op"),
    ("POST", "/mod/streams/{stream}/comments/{id:[^/]*}/restore", "_restore"),
    ("POST", "/mod/streams/{stream}/unpin", "_unpin"),
    ("POST", "/mod/streams/{stream}/users/{user}/{op:ban|timeout|unban}", "_sanction"),
    ("POST", "/mod/streams/{stream}/users/{user}/clear", "_clear"),
    ("POST", "/mod/streams/{stream}/users/{user}/{op:shadow_ban|unshadow}", "_shadow"),
    ("POST", "/mod/streams/{stream}/slow_mode", "_slow_mode"),
    ("POST", "/mod/streams/{stream}/queue/{id:[^/]*}", "_resolve"),
    ("GET", "/mod/streams/{stream}/queue", "_queue"),
])


Answer = dict[str, Any]  # the fields of a 200 answer beside "ok"


class ApiError(ChorusError):
    """A moderator request refused: its HTTP status, error code and reason."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _bad(reason: str) -> ApiError:
    return ApiError(400, HttpErrorCode.BAD_REQUEST, reason)


def _nesting(raw: bytes) -> int:
    """How deep brackets nest in ``raw`` (strings skipped), counted before parsing: the parser
    would recurse once per level, and 100,000 of them exhaust the stack."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_BODY_DEPTH:
                break
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    if _nesting(raw) > MAX_BODY_DEPTH:
        raise _bad(f"the body nests deeper than {MAX_BODY_DEPTH} levels; it must be a flat JSON object")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("the body must be a JSON object (it is not valid JSON)") from None
    if not isinstance(obj, dict):
        raise _bad(f"the body must be a JSON object, not {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error reasons (never a Python repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _comment_id(raw: str) -> str:
    """A comment id from the path: a decimal 1 to 2**63-1 (what ids and the store can hold)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 0 < int(raw) <= MAX_COMMENT_ID:
        raise _bad(f"a comment id is a decimal integer 1-{MAX_COMMENT_ID}")
    return str(int(raw))


def _int_field(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        got = "missing" if value is None else _json_type(value) if not isinstance(value, int) else "out of range"
        raise _bad(f'"{name}" must be an integer {low}-{high} ({got})')
    return value


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise _bad(f'"reason" must be a string, not {_json_type(reason)}')
    return reason[:MAX_REASON_CHARS]


async def publish_kick(broker: Broker, gateways: list[str], user: str, stream: str, code: int, reason: str) -> None:
    """Tell each gateway (instance ids, from the registry) to close ``user``'s connections to
    ``stream`` ("*": every stream) with ``code``."""
    message = json.dumps({"op": "kick", "user": user, "stream": stream, "code": int(code), "reason": reason})
    for gateway in gateways:
        await broker.publish(CONTROL_PREFIX + gateway, pack_channel_message(message.encode()))


@dataclass(frozen=True, slots=True)
class ModerationSetup:
    """What the app gives a gateway for its moderation part (the gateway builds the part: it
    needs the gateway's hub): the log, the broker, reputation, this gateway's instance id and
    the Redis client of its connection registry (None: in this process only)."""

    comment_log: CommentLog
    broker: Broker
    reputation: Reputation
    instance: str
    redis: Any = None
    prefix: str = "chorus:"
    shadow_ban_s: int = 86400
    registry_ttl_s: float = 90.0


class ViewerSockets(Protocol):
    """The part of the hub moderation uses: close a viewer, send one an event."""

    def close(self, conn: int, code: int, reason: str) -> Any: ...

    def send(self, conn: int, data: bytes) -> Any: ...


class GatewayModeration:
    """One per gateway: the API, the connection registry and this gateway's control channel."""

    def __init__(self, setup: ModerationSetup, config: Config, hub: ViewerSockets, wake: Callable[[], None],
                 sanctions: Sanctions, state: StreamState, store: HistoryStore | None) -> None:
        self.config = config
        self.hub = hub
        self.wake = wake  # let the hub act on the closes just asked for
        self.sanctions = sanctions
        self.state = state
        self._store = store
        self.log = setup.comment_log
        self.broker = setup.broker
        self.reputation = setup.reputation
        self.registry = ConnectionRegistry(setup.instance, setup.redis, setup.prefix, setup.registry_ttl_s)
        self.channel = CONTROL_PREFIX + setup.instance
        self.shadow_ban_s = setup.shadow_ban_s
        self._redis = setup.redis
        self._prefix = setup.prefix
        self._watch: asyncio.Task[None] | None = None
        self.reseeds = 0  # times this gateway put the bans back into a Redis that came back empty
        self.kicked = 0  # connections closed on a ban or time-out
        self.refused = 0  # connections of banned users closed right after the upgrade
        self.shadow_echoes = 0

    # -- lifecycle and hooks the gateway calls ----------------------------------------------
    async def start(self) -> None:
        await self.broker.subscribe(self.channel)
        self.registry.start()
        if self._redis is not None and self.store is not None:
            self._watch = asyncio.create_task(self._watch_redis(), name="sanctions-reseed")

    async def stop(self) -> None:
        """Remove this gateway from the registry (bounded: a stopping gateway must not hang on Redis)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        try:
            await asyncio.wait_for(self.registry.stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("connection registry: not cleaned up within %.0f s; its keys expire on their own",
                        STOP_TIMEOUT_S)
        if self._redis is not None:
            await self._redis.aclose()

    async def _watch_redis(self) -> None:
        """Every RESEED_CHECK_S: if Redis lost the bans (restarted empty), put them back."""
        failing = False
        while True:
            try:
                await self.reseed_if_empty()
                failing = False
            except Exception as exc:  # Redis down or restarting: the next check tries again
                if not failing:
                    log.warning("sanctions: cannot check Redis for its bans (%s: %s); retrying every %.0f s",
                                type(exc).__name__, exc, RESEED_CHECK_S)
                failing = True
            await asyncio.sleep(RESEED_CHECK_S)

    async def reseed_if_empty(self) -> int | None:
        """If the marker key is missing, write every ban and unexpired time-out of the store into
        Redis, set the marker and rewrite the connection registry; how many (None: not needed)."""
        marker = f"{self._prefix}{SEEDED_MARKER}"
        if await self._redis.exists(marker):
            return None
        store = self.store
        assert store is not None
        now = _now_ms()
        sanctions = self.sanctions
        in_force = await asyncio.to_thread(store.sanctions_in_force, now)
        for stream, user, until in in_force:
            await sanctions.ban(stream, user, None if until is None else max(1.0, (until - now) / 1000))
        await self._redis.set(marker, b"1")
        self.registry.rewrite_all()
        self.reseeds += 1
        log.info("sanctions: Redis held no bans (restarted empty?); put back %d bans and time-outs", len(in_force))
        return len(in_force)

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
            refusal = await self.sanctions.check(stream, who.user_id)
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
            self.hub.close(conn, code, reason[:100])
        if conns:
            self.kicked += len(conns)
            self.wake()
        return len(conns)

    def echo_shadow(self, comment: Comment) -> None:
        """Show a shadowed comment to its author's connections on its stream at this gateway."""
        event = {"t": "batch", "stream": comment.stream, "comments": [comment.to_event()]}
        payloads = {False: encode_event(event, JSON), True: encode_event(event, MSGPACK)}
        for conn, binary in self.registry.conns_with_wire(comment.user_id, comment.stream):
            self.hub.send(conn, payloads[binary])
            self.shadow_echoes += 1

    # -- HTTP ---------------------------------------------------------------------------------
    def _identify(self, authorization: str | None, stream: str) -> Identity:
        header = authorization or ""
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "the moderator API needs a token: Authorization: Bearer ...")
        try:
            who = verify_token(self.config.auth, header[7:].strip())
        except AuthError as exc:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, f"invalid token: {exc}") from None
        if not who.may_moderate(stream):
            raise ApiError(403, HttpErrorCode.NOT_A_MODERATOR, f"this token may not moderate stream {stream}")
        return who

    def _route(self, method: str, path: str) -> tuple[str, str, dict[str, str]]:
        """(handler name, stream, path arguments) of a request, or the ApiError to answer."""
        found = _API.match(method, path)
        if found is None or not STREAM_ID.match(found.args["stream"]):
            raise ApiError(404, HttpErrorCode.NOT_FOUND, "no such moderator endpoint")
        if found.handler is None:
            raise ApiError(405, HttpErrorCode.METHOD_NOT_ALLOWED, f"use {found.allow} here")
        user = found.args.get("user")
        if user is not None and not USER_ID.match(user):
            raise ApiError(400, HttpErrorCode.BAD_REQUEST, "a user id is 1-128 characters of A-Z a-z 0-9 _ . : @ -")
        return found.handler, found.args["stream"], found.args

    async def post(self, request: HttpRequest) -> bytes:
        """Answer a ``POST /mod/...`` (gateway/handoff.py reads it) with the whole response."""
        try:
            name, stream, args = self._route("POST", urlsplit(request.target).path)
            who = self._identify(request.header("Authorization"), stream)
            answer = await getattr(self, name)(who, stream, args, _body(request.body))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.reason)
        except Exception as exc:  # a bug or a failing backend: this request only, one log line
            log.error("moderator API: POST %s failed: %s: %s", request.target[:200], type(exc).__name__, exc)
            return error_response(500, HttpErrorCode.INTERNAL_ERROR, "the gateway failed on this request; "
                                  "it may not have been done: check, then try again")
        return json_response_bytes(200, {"ok": True, **answer})

    def get(self, request: WSUpgradeRequest, req: Request) -> WSUpgradeResponse:
        """Answer a ``GET /mod/...`` (picows' router; the review queue is one indexed read)."""
        try:
            name, stream, args = self._route("GET", req.path)
            who = self._identify(request.headers.get("Authorization"), stream)
            answer = getattr(self, name)(who, stream, args, req)
        except ApiError as exc:
            return json_response({"error": exc.code, "reason": exc.reason}, HTTPStatus(exc.status))
        except Exception as exc:  # as for POST: one log line, a JSON answer
            log.error("moderator API: GET %s failed: %s: %s", req.path[:200], type(exc).__name__, exc)
            return json_response({"error": HttpErrorCode.INTERNAL_ERROR, "reason": "the gateway failed on this "
                                  "request"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        return json_response({"ok": True, **answer})

    # -- the operations -----------------------------------------------------------------------
    @property
    def store(self) -> SqliteStore | None:
        """The history store, where moderation keeps its records (None: no store here)."""
        store = self._store
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
        cached = await self.state.recent(stream, self.config.coordinator.recent_size)
        for c in cached:
            if c.get("id") == comment_id:
                return c
        store = self.store
        if store is None:
            return None
        found = await asyncio.to_thread(store.comment, stream, comment_id)
        return found[0] if found is not None and not found[1] else None

    async def _comment_op(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        cid, op = _comment_id(args["id"]), args["op"]
        reason = _reason(body)
        comment = await self._find(stream, cid)
        if comment is None:
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"no live comment {cid} on stream {stream}")
        if op == "pin":
            comment = {k: v for k, v in comment.items() if k != "offset"} | {"offset": comment.get("offset", -1)}
            pin = Control("pin", stream, cid, comment=comment, by=who.user_id, reason=reason, ts=_now_ms())
            await self._append([pin])
        else:
            await self._delete(who, stream, cid, comment["user"]["id"], reason)
        await self._record(ModerationAction(stream, op, "api", cid, comment["user"]["id"], None, reason, who.user_id))
        return {"action": op, "id": cid, **({"comment": comment} if op == "pin" else {})}

    async def _delete(self, who: Identity, stream: str, cid: str, author: str, reason: str) -> None:
        """A moderator's delete: the control record, the review item closed, a confident offence."""
        shown = f"removed by a moderator: {reason}" if reason else "removed by a moderator"
        await self._append([Control("delete", stream, cid, by=who.user_id, reason=shown, ts=_now_ms(),
                                    code=DeleteCode.MODERATOR)])
        store = self.store
        if store is not None:
            await asyncio.to_thread(store.resolve_review, stream, cid, "delete", who.user_id)
        await self.reputation.add([(author, OFFENCE_WEIGHT)])

    async def _restore(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        cid = _comment_id(args["id"])
        comment = await self._restore_comment(who, stream, cid, _reason(body))
        return {"action": "restore", "id": cid, "comment": comment}

    async def _restore_comment(self, who: Identity, stream: str, cid: str, reason: str) -> dict[str, Any]:
        """Bring a deleted comment back for every viewer; an automatic delete's offence is taken back."""
        store = self.store
        comment = await asyncio.to_thread(store.deleted_comment, stream, cid) if store is not None else None
        if store is None or comment is None:
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"no deleted comment {cid} on stream {stream}")
        automatic = await asyncio.to_thread(store.deleted_automatically, stream, cid)
        await self._append([Control("restore", stream, cid, comment=comment, by=who.user_id, reason=reason,
                                    ts=_now_ms())])
        await asyncio.to_thread(store.resolve_review, stream, cid, "restore", who.user_id, True)
        author = comment["user"]["id"]
        if automatic:
            await self.reputation.add([(author, -OFFENCE_WEIGHT)])
        await self._record(ModerationAction(stream, "restore", "api", cid, author, None, reason, who.user_id))
        return comment

    async def _unpin(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        await self._append([Control("unpin", stream, by=who.user_id, ts=_now_ms())])
        await self._record(ModerationAction(stream, "unpin", "api", None, None, None, "", who.user_id))
        return {"action": "unpin"}

    async def _sanction(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        user, op = args["user"], args["op"]
        sanctions = self.sanctions
        seconds = _int_field(body, "seconds", 1, MAX_TIMEOUT_S) if op == "timeout" else None
        reason = _reason(body)
        store = self.store
        if op == "unban":
            if store is not None:  # the durable record first: a re-seed meanwhile must not bring it back
                await asyncio.to_thread(store.lift_sanction, stream, user)
            await sanctions.unban(stream, user)
            await self._record(ModerationAction(stream, "unban", "api", None, user, None, reason, who.user_id))
            return {"action": "unban", "user": user}
        if store is not None:
            until = None if seconds is None else _now_ms() + seconds * 1000
            await asyncio.to_thread(store.record_sanction, stream, user, until, reason)
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
        for c in await self.state.recent(stream, self.config.coordinator.recent_size):
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
        state = self.state
        mode = dataclasses.replace(await state.get_mode(stream), slow_mode_seconds=seconds)
        await set_stream_mode(state, self.broker, stream, mode)
        await self._record(ModerationAction(stream, "slow_mode", "api", None, None, None, f"{seconds} s", who.user_id))
        return {"action": "slow_mode", "mode": mode.to_wire()}

    async def _resolve(self, who: Identity, stream: str, args: dict[str, str], body: dict[str, Any]) -> Answer:
        cid, action, reason = _comment_id(args["id"]), body.get("action"), _reason(body)
        if not isinstance(action, str) or action not in RESOLUTIONS:
            raise _bad('"action" must be "keep", "delete", "restore" or "lift"')
        if action == "restore":  # open or resolved: an automatic delete is a resolved item
            comment = await self._restore_comment(who, stream, cid, reason)
            return {"action": action, "id": cid, "comment": comment}
        store = self.store
        item = await asyncio.to_thread(store.review_item, stream, cid) if store is not None else None
        if store is None or item is None:
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"comment {cid} is not waiting for review on stream {stream}")
        if action == "lift" and item.stage != "reputation":
            raise _bad('"lift" resolves an automatic shadow-ban (an item of stage "reputation")')
        if not await asyncio.to_thread(store.resolve_review, stream, cid, action, who.user_id):
            raise ApiError(404, HttpErrorCode.NOT_FOUND, f"comment {cid} is not waiting for review on stream {stream}")
        if action == "delete":
            await self._delete(who, stream, cid, item.user_id, reason)
        elif action == "lift":
            await self.reputation.lift_shadow_ban(item.user_id)
        await self._record(ModerationAction(stream, action, "review", cid, item.user_id, None, reason, who.user_id))
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

