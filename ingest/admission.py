"""Admission of a viewer's comment: checked, numbered, and appended to the log.

The gateway acknowledges a comment only after the log took it (Kafka acks=all), so an
``ack`` means the comment will be delivered and stored. Rate limits and slow mode plug in
here (DESIGN.md 4); this layer already refuses what the protocol forbids.
"""

from __future__ import annotations

import time

from chorus.ingest.log import CommentLog, LogUnavailable
from chorus.ingest.records import Comment, encode_record

from chorus.auth import Identity
from chorus.codes import ErrorCode
from chorus.ids import IdGenerator
from chorus.protocol import validate_comment_text

__all__ = ["Admission", "Refused"]


class Refused(Exception):
    """The comment was not accepted; ``code`` and ``reason`` go back to the poster."""

    def __init__(self, code: ErrorCode, reason: str, retry_after_ms: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.retry_after_ms = retry_after_ms


class Admission:
    def __init__(self, comment_log: CommentLog, ids: IdGenerator) -> None:
        self.log = comment_log
        self.ids = ids
        self.accepted = 0
        self.refused = 0

    async def post(self, who: Identity | None, stream: str, text: str) -> Comment:
        """Append the comment to the log and return it, or raise :class:`Refused`."""
        if who is None or not who.can_write:
            self.refused += 1
            raise Refused(ErrorCode.UNAUTHORIZED, "posting needs a valid token with the write scope")
        clean, code, reason = validate_comment_text(text)
        if code is not None or clean is None:
            self.refused += 1
            raise Refused(code or ErrorCode.BAD_MESSAGE, reason)
        comment = Comment(
            id=self.ids.next(), stream=stream, user_id=who.user_id, user_name=who.name,
            badges=tuple(who.badges()), text=clean, ts=time.time_ns() // 1_000_000,
        )
        key, value = encode_record(comment)
        try:
            await self.log.append(key, value)
        except LogUnavailable as exc:
            self.refused += 1
            raise Refused(ErrorCode.NOT_ACCEPTED, f"comment not accepted: {exc}; it was not posted",
                          retry_after_ms=2000) from exc
        self.accepted += 1
        return comment
