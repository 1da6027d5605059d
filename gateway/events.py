"""What viewers send: the hub's inbound events of one drain, each to its handler.

After every ``hub.poll()`` the gateway hands the drained events here. Each is handled on its
own, so one that raises costs only its own connection (an ``internal_error``, or a 1011 close
if not even that can be sent), never the rest of the drain: other viewers' posts, the CLOSED
events the viewer counts need. Posts go to the post pipeline (gateway/posts.py) as one batch
per drain; a ``resume`` replays what the viewer missed (gateway/recovery.py), paced by that
viewer's own backlog; reactions go to engagement (gateway/engagement.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from chorus import native
from chorus.auth import Identity
from chorus.codes import CloseCode
from chorus.gateway.engagement import Engagement
from chorus.gateway.failures import FailureLog
from chorus.gateway.posts import Post, PostPipeline, Spawn
from chorus.gateway.recovery import Recovery
from chorus.gateway.viewers import ECHO_HANDLE, LocalViewers, read_tag
from chorus.protocol import (
    JSON,
    MSGPACK,
    BadMessage,
    PostComment,
    React,
    Resume,
    Wire,
    encode_event,
    error_event,
    fast_react,
    parse_client_message,
)

__all__ = ["RESUME_PACING_S", "LeaveHook", "ViewerEvents"]

RESUME_PACING_S = 5.0  # a resume waits for its viewer's backlog at most this long in all
HubEvent = tuple[int, int, int, bytes, bytes]  # (kind, conn, stream handle, data, tag) from hub.drain()


class LeaveHook(Protocol):
    """Told when a viewer's connection closed (gateway/modapi.py: the connection registry)."""

    def on_leave(self, who: Identity | None, conn: int) -> None: ...


def _live_user(who: Identity | None) -> str | None:
    """The user a viewer acts as; one whose token has expired acts as an anonymous viewer."""
    return who.user_id if who is not None and time.time() < who.expires_at else None


class ViewerEvents:
    """Handles each drained hub event: messages, reactions, resumes, closes."""

    def __init__(self, hub: native.Hub, viewers: LocalViewers, posts: PostPipeline, engagement: Engagement,
                 recovery: Recovery, failures: FailureLog, *, backlog_limit_bytes: int, spawn: Spawn,
                 wake: Callable[[], None], leave: LeaveHook | None = None) -> None:
        self.hub = hub
        self.viewers = viewers
        self.posts = posts
        self.engagement = engagement
        self.recovery = recovery
        self.failures = failures
        self.backlog_limit_bytes = backlog_limit_bytes
        self.spawn = spawn
        self.wake = wake
        self.leave = leave

    def handle_drain(self, events: Iterable[HubEvent]) -> list[Post]:
        """Handle one drain's events; the posts among them, for the pipeline to admit together."""
        posts: list[Post] = []
        for kind, conn, handle, data, tag in events:
            if kind == native.hub.CLOSED:
                self._on_closed(conn, handle, tag)
                continue
            try:
                self._on_event(kind, conn, handle, data, tag, posts)
            except Exception as exc:
                self._event_failed(conn, tag, exc)
        return posts

    def _on_event(self, kind: int, conn: int, handle: int, data: bytes, tag: bytes, posts: list[Post]) -> None:
        s = self.viewers.by_handle(handle)
        if kind == native.hub.MESSAGE_TEXT and s is not None and (emoji := fast_react(data)):
            ip, _, who = read_tag(tag)  # a canonical JSON react: its tag decoded once per connection
            self._react(conn, s.name, _live_user(who), ip, emoji, JSON)
            return
        ip, variant, who = read_tag(tag)
        if handle == ECHO_HANDLE:
            self.hub.send(conn, data, kind == native.hub.MESSAGE_BINARY)
        else:
            self._on_client_message(conn, handle, kind, data, variant, who, ip, posts)

    def _on_closed(self, conn: int, handle: int, tag: bytes) -> None:
        """A viewer is gone: its counts always drop, even if the moderation hook fails."""
        try:
            ip, _, who = read_tag(tag)
        except Exception as exc:  # our own tag, so a bug: still release the stream
            self.failures.failed("reading a closed viewer's tag", exc)
            ip, who = "", None
        self.viewers.left(handle, ip)
        if self.leave is not None:
            try:
                self.leave.on_leave(who, conn)
            except Exception as exc:
                self.failures.failed("the moderation hook of a closed viewer", exc)

    def _event_failed(self, conn: int, tag: bytes, exc: Exception) -> None:
        """Handling one viewer's message raised: log it (rate-limited) and tell that viewer."""
        self.failures.failed("handling a viewer's message", exc)
        try:
            wire: Wire = MSGPACK if read_tag(tag)[1] & 1 else JSON
        except Exception:
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")
            return
        self.posts.send_internal_error(conn, wire)

    def _on_client_message(self, conn: int, handle: int, kind: int, data: bytes, variant: int,
                           who: Identity | None, ip: str, posts: list[Post]) -> None:
        s = self.viewers.by_handle(handle)
        reply_wire: Wire = MSGPACK if variant & 1 else JSON
        msg = parse_client_message(data, JSON if kind == native.hub.MESSAGE_TEXT else MSGPACK)
        if isinstance(msg, BadMessage) or s is None:
            reason = msg.reason if isinstance(msg, BadMessage) else "stream gone"
            nonce = msg.nonce if isinstance(msg, BadMessage) else None
            code = msg.code if isinstance(msg, BadMessage) else "bad_message"
            self.hub.send(conn, encode_event(error_event(code, reason, nonce), reply_wire))  # type: ignore[arg-type]
        elif isinstance(msg, PostComment):
            self.posts.take(Post(conn, s.name, who, msg, reply_wire, ip), posts)
        elif isinstance(msg, Resume):
            self.spawn(self.resume(conn, s.name, msg, reply_wire))
        elif isinstance(msg, React):
            self._react(conn, s.name, _live_user(who), ip, msg.emoji, reply_wire)

    def _react(self, conn: int, stream: str, user: str | None, ip: str, emoji: str, wire: Wire) -> None:
        refused = self.engagement.react(stream, user, ip, emoji)
        if refused is not None:
            self.hub.send(conn, encode_event(refused, wire))

    async def resume(self, conn: int, stream: str, msg: Resume, wire: Wire) -> None:
        """Send what the viewer missed (gateway/recovery.py) as batches in order, then ``resumed``.

        Between batches the hub gets to write, and while this viewer's own backlog is over the
        limit the rest waits (up to a deadline), so a long recovery does not trip the
        slow-viewer cap. Its own: other viewers' backlogs (the hub-wide total) say nothing
        about this socket, and on a busy gateway they made every resume wait out the deadline.
        """
        found = await self.recovery.missed(stream, msg.epoch, msg.offset)
        deadline = time.monotonic() + RESUME_PACING_S
        for batch in found.batch_events(stream):
            if not self.hub.send(conn, encode_event(batch, wire)):
                return  # the viewer left
            self.wake()
            while self.hub.backlog(conn) > self.backlog_limit_bytes and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                self.wake()
        self.hub.send(conn, encode_event({"t": "resumed", "recovered": found.recovered}, wire))
        self.wake()
