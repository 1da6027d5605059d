"""The post pipeline: a viewer's comment from its arrival in the hub to its answer.

Posts read in one drain of the hub are taken together (:meth:`PostPipeline.take`, then
:meth:`PostPipeline.submit`); one task admits every queued post a batch at a time (one Redis
round trip per step for the batch), and what arrives meanwhile makes the next batch, so
batches grow with the load instead of tasks. Refusals are answered at once; each batch's
appends wait for Kafka in a task of their own while the next batch is admitted. A post that
makes admission, encoding or its answer raise costs only itself (``internal_error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from chorus import native
from chorus.auth import Identity
from chorus.codes import CloseCode, ErrorCode
from chorus.gateway.drain import Drain
from chorus.gateway.failures import FailureLog
from chorus.ingest.admission import Admission, Admitted, Refused
from chorus.ingest.records import Comment, encode_record
from chorus.protocol import PostComment, Wire, encode_ack, encode_event, error_event

__all__ = ["INTERNAL_REASON", "MAX_ADMIT_BATCH", "OVERLOADED_RETRY_MS", "Post", "PostPipeline", "ShadowEcho"]

MAX_ADMIT_BATCH = 2000  # posts admitted together at most (one Redis pipeline)
OVERLOADED_RETRY_MS = 1000  # retry_after_ms of ``overloaded`` and of a draining gateway's not_accepted
INTERNAL_REASON = "the server failed on this message; nothing of it was done"

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class ShadowEcho(Protocol):
    """Shows a shadow-banned author their own comment (gateway/modapi.py)."""

    def echo_shadow(self, comment: Comment) -> None: ...


@dataclass(slots=True)
class Post:
    """A comment a viewer sent, waiting for admission with the others of its drain."""

    conn: int
    stream: str
    who: Identity | None
    msg: PostComment
    wire: Wire
    ip: str


def _encodes(comment: Comment) -> bool:
    """Whether the comment's log record can be encoded (a lone surrogate in its text cannot)."""
    try:
        encode_record(comment)
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return False
    return True


class PostPipeline:
    """WebSocket posts between arrival and answer (bounded by ``limits.max_inflight_posts``)."""

    def __init__(self, hub: native.Hub, admission: Admission, drain: Drain, failures: FailureLog, *,
                 max_inflight: int, spawn: Spawn, wake: Callable[[], None],
                 shadow: ShadowEcho | None = None, refused: Callable[[str], None] | None = None) -> None:
        self.hub = hub
        self.admission = admission
        self.drain = drain
        self.failures = failures
        self.max_inflight = max_inflight
        self.spawn = spawn
        self.wake = wake  # let the hub write what was just sent
        self.shadow = shadow
        self.refused = refused  # counts a post refused before admission, by reason (chorus_posts_refused)
        self.in_flight = 0
        self._queued: list[Post] = []  # posts waiting for the admission task
        self._admitting = False  # the admission task is running

    # -- arrival --
    def take(self, post: Post, batch: list[Post]) -> None:
        """A post read in this drain: refused at once (draining, overloaded) or added to ``batch``."""
        if self.drain.refusing_posts:
            self._refuse(post, "draining", ErrorCode.NOT_ACCEPTED,
                         "this gateway is restarting; it was not posted: reconnect and post again")
        elif self.in_flight + len(batch) >= self.max_inflight:
            self._refuse(post, "overloaded", ErrorCode.OVERLOADED,
                         "this gateway is taking too many comments right now; it was not posted")
        else:
            batch.append(post)

    def _refuse(self, post: Post, why: str, code: ErrorCode, reason: str) -> None:
        if self.refused is not None:
            self.refused(why)
        self.hub.send(post.conn, encode_event(error_event(code, reason, post.msg.nonce, OVERLOADED_RETRY_MS),
                                              post.wire))

    def submit(self, batch: list[Post]) -> None:
        """Queue a drain's posts for the admission task (started if it is not running)."""
        if not batch:
            return
        self.in_flight += len(batch)
        self._queued += batch
        if not self._admitting:
            self._admitting = True
            self.spawn(self._admit_queued())

    # -- admission --
    async def _admit_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_ADMIT_BATCH], self._queued[MAX_ADMIT_BATCH:]
                await self._admit_batch(batch)
                self.wake()
        finally:
            self._admitting = False

    async def _admit_batch(self, batch: list[Post]) -> None:
        """Admit ``batch`` and start its appends. If admission raises (a post it cannot
        encode, a bug), the batch is split in halves until the post at fault is alone: it gets
        ``internal_error`` (not posted), the others go on (a few extra calls, only then)."""
        try:
            admitted = await self.admission.admit_many([(p.who, p.stream, p.msg.text, p.ip, p.msg.nonce)
                                                        for p in batch])
        except asyncio.CancelledError:
            self.in_flight -= len(batch)
            raise
        except Exception as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                await self._admit_batch(batch[:half])
                await self._admit_batch(batch[half:])
                return
            self.in_flight -= 1
            self.failures.failed("admitting a comment", exc)
            p = batch[0]
            self.send_internal_error(p.conn, p.wire, "the server could not take this comment; it was not posted",
                                     nonce=p.msg.nonce)
            return
        self.in_flight -= len(batch) - len(admitted.waiting())
        self._answer(batch, admitted.results)
        self.spawn(self._append_admitted(batch, admitted))

    async def _append_admitted(self, batch: list[Post], admitted: Admitted) -> None:
        waiting = admitted.waiting()  # appended, or repeats waiting for the first post's answer
        try:
            results = await self._append_encodable(admitted)
        finally:
            self.in_flight -= len(waiting)
        self._answer([batch[i] for i in waiting], [results[i] for i in waiting])
        self.wake()

    async def _append_encodable(self, admitted: Admitted) -> list[Comment | Refused]:
        """Append the batch; if that raises because a comment's record cannot be encoded, that
        comment is refused alone and the rest appended. Records are all encoded before the
        first append, so a record that fails to encode now failed before anything was appended."""
        try:
            return await self.admission.append_admitted(admitted)
        except Exception as exc:
            bad = [(i, c) for i, c in admitted.comments if not _encodes(c)]
            if not bad:
                raise  # not an encoding failure: the appends' own error
            self.failures.failed("encoding a comment's record", exc)
            for i, _ in bad:
                admitted.results[i] = Refused(ErrorCode.INTERNAL_ERROR, "the server could not encode this comment; "
                                                                        "it was not posted")
            good = [(i, c) for i, c in admitted.comments if _encodes(c)]
            return await self.admission.append_admitted(replace(admitted, comments=good))

    # -- answers --
    def _answer(self, posts: list[Post], results: list[Comment | Refused] | list[Comment | Refused | None]) -> None:
        """Each post's ack or error; one that cannot be encoded gets ``internal_error`` alone."""
        for p, result in zip(posts, results, strict=True):
            try:
                self._answer_one(p, result)
            except Exception as exc:
                self.failures.failed("answering a post", exc)
                posted = result.id if isinstance(result, Comment) else None
                self.send_internal_error(p.conn, p.wire, "the answer to this comment could not be encoded"
                                         + ("; it was posted (id)" if posted else "; it was not posted"), posted,
                                         p.msg.nonce)

    def _answer_one(self, p: Post, result: Comment | Refused | None) -> None:
        if isinstance(result, Refused):
            self.hub.send(p.conn, encode_event(error_event(result.code, result.reason, p.msg.nonce,
                                                           result.retry_after_ms, result.comment_id), p.wire))
        elif result is not None:
            self.hub.send(p.conn, encode_ack(result.id, p.msg.nonce, p.wire))
            if result.shadow and self.shadow is not None:
                self.shadow.echo_shadow(result)

    def send_internal_error(self, conn: int, wire: Wire, reason: str = INTERNAL_REASON,
                            comment_id: str | None = None, nonce: str | None = None) -> None:
        """An ``internal_error`` event, without the nonce if that is what cannot be encoded;
        close 1011 if even that fails."""
        try:
            try:
                payload = encode_event(error_event(ErrorCode.INTERNAL_ERROR, reason, nonce, None, comment_id), wire)
            except (ValueError, TypeError):
                payload = encode_event(error_event(ErrorCode.INTERNAL_ERROR, reason, None, None, comment_id), wire)
            self.hub.send(conn, payload)
        except Exception as exc:
            self.failures.failed("sending internal_error", exc)
            self.hub.close(conn, CloseCode.INTERNAL_ERROR, "internal error")
