"""Records of the ``comments`` log, as pure functions: a comment becomes bytes and back.

A record's key is the stream id, so one stream's records keep their order in one partition.
The value is compact JSON so operators can read the topic with stock Kafka tools.

Two kinds of record share the topic, so moderation keeps each stream's order (DESIGN.md 4):

- ``"k":"comment"``: a viewer's comment. ``"shadow":true`` (absent otherwise) marks a comment
  whose author was shadow-banned when it was admitted: stored, shown to its author only.
- ``"k":"control"``: an operation on a stream, ``op`` one of :data:`CONTROL_OPS`: ``delete``
  (``id``: a comment becomes a tombstone), ``shadow`` (``id``: a comment already delivered
  is hidden from everyone but its author from now on; no live event), ``pin`` (``comment``:
  wire shape C), ``unpin`` and ``restore`` (``comment``: a deleted comment, wire shape C, is
  live again). Control records carry who asked (``by``) and why (``reason``); a delete also
  carries its ``code`` (chorus/codes.py DeleteCode: ``moderated`` automatic, ``moderator``
  a person), and its event shows code and reason to every viewer, so the author knows why.

:func:`decode_record` reads comments only and refuses a control record with
:class:`RecordError`, as it did before control records existed; :func:`decode_any` reads both.

A comment's position, ``(epoch, offset)``, is not in the value: it is where the record sits
in the log (the partition's offset space and the record's offset in it), so every consumer
that reads the record computes the same position, however often it is replayed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chorus.codes import DeleteCode
from chorus.errors import ChorusError
from chorus.protocol import json_compact

__all__ = ["CONTROL_OPS", "Comment", "Control", "RecordError", "decode_any", "decode_record", "encode_control",
           "encode_record"]

RECORD_VERSION = 1
CONTROL_OPS = frozenset({"delete", "shadow", "pin", "unpin", "restore"})
AUTOMATIC_ACTOR = "moderator"  # the ``by`` of automatic moderation's records


class RecordError(ChorusError, ValueError):
    """A log record that is not a Chorus record; consumers skip it and count it."""


@dataclass(frozen=True, slots=True)
class Comment:
    id: str
    stream: str
    user_id: str
    user_name: str
    badges: tuple[str, ...]
    text: str
    ts: int  # milliseconds since the Unix epoch, when the gateway accepted it
    epoch: str = ""  # the log position (see the module docstring); "" and -1 before it has one
    offset: int = -1
    shadow: bool = False  # the author was shadow-banned: stored, shown to the author only

    def to_event(self) -> dict[str, Any]:
        """The wire shape ``C`` of DESIGN.md 3 (``offset`` only once the comment has one)."""
        c: dict[str, Any] = {
            "id": self.id,
            "stream": self.stream,
            "user": {"id": self.user_id, "name": self.user_name, "badges": list(self.badges)},
            "text": self.text,
            "ts": self.ts,
        }
        if self.offset >= 0:
            c["offset"] = self.offset
        return c


def encode_record(c: Comment) -> tuple[bytes, bytes]:
    """(key, value) of the log record for ``c``."""
    value = {
        "v": RECORD_VERSION,
        "k": "comment",
        "id": c.id,
        "stream": c.stream,
        "user": {"id": c.user_id, "name": c.user_name, "badges": list(c.badges)},
        "text": c.text,
        "ts": c.ts,
    }
    if c.shadow:
        value["shadow"] = True
    return c.stream.encode(), _dumps(value)


@dataclass(frozen=True, slots=True)
class Control:
    """An operation on a stream that travels in the log, in order with its comments."""

    op: str  # one of CONTROL_OPS
    stream: str
    id: str = ""  # delete, shadow, restore: the comment; pin: the pinned comment's id
    comment: dict[str, Any] | None = None  # pin, restore: the comment in wire shape C
    by: str = ""  # who asked: a moderator's user id, or "moderator" (the automatic role)
    reason: str = ""
    ts: int = 0  # milliseconds since the Unix epoch, when it was asked
    epoch: str = ""  # the record's log position, as for comments
    offset: int = -1
    code: str = ""  # delete: a DeleteCode ("" reads as moderated when ``by`` is automatic, else moderator)

    @property
    def delete_code(self) -> str:
        if self.code:
            return self.code
        return DeleteCode.MODERATED if self.by == AUTOMATIC_ACTOR else DeleteCode.MODERATOR

    @property
    def delete_reason(self) -> str:
        """The sentence a delete event shows (the record's reason, or what the code says)."""
        if self.reason:
            return self.reason
        return "removed by automatic moderation" if self.delete_code == DeleteCode.MODERATED else \
            "removed by a moderator"

    def to_event(self) -> dict[str, Any] | None:
        """The wire event of DESIGN.md 3 (``delete``, ``pin``, ``unpin``, ``restore``); None for ``shadow``."""
        if self.op == "delete":
            return {"t": "delete", "id": self.id, "code": str(self.delete_code), "reason": self.delete_reason}
        if self.op == "pin":
            return {"t": "pin", "comment": self.comment}
        if self.op == "unpin":
            return {"t": "unpin"}
        if self.op == "restore":
            return {"t": "restore", "comment": self.comment}
        return None


def _dumps(value: dict[str, Any]) -> bytes:
    # A lone surrogate cannot be UTF-8: comment text and names are refused or cleaned before
    # they get here (chorus/protocol.py clean_text), so one can come only from a path without
    # that check (a moderator's reason); it becomes "?" rather than failing the append.
    return json_compact(value).encode("utf-8", "replace")


def encode_control(c: Control) -> tuple[bytes, bytes]:
    """(key, value) of the log record for ``c``: keyed by stream like the stream's comments."""
    if c.op not in CONTROL_OPS:
        raise ValueError(f"unknown control op {c.op!r}")
    value: dict[str, Any] = {"v": RECORD_VERSION, "k": "control", "op": c.op, "stream": c.stream, "ts": c.ts}
    if c.id:
        value["id"] = c.id
    if c.comment is not None:
        value["comment"] = c.comment
    if c.by:
        value["by"] = c.by
    if c.reason:
        value["reason"] = c.reason
    if c.code:
        value["code"] = c.code
    return c.stream.encode(), _dumps(value)


def _control(obj: dict[str, Any], epoch: str, offset: int) -> Control:
    op = obj.get("op")
    if op not in CONTROL_OPS:
        raise RecordError(f"unknown control op {op!r}")
    comment = obj.get("comment")
    if op in ("pin", "restore") and not (isinstance(comment, dict) and isinstance(comment.get("id"), str)):
        raise RecordError(f"a {op} record needs a comment with an id")
    cid = str(obj.get("id") or (comment or {}).get("id") or "")
    if op in ("delete", "shadow", "restore") and not cid.isdigit():
        raise RecordError(f"a {op} record needs a comment id")
    code = str(obj.get("code", ""))
    if code and code not in set(DeleteCode):
        raise RecordError(f"unknown delete code {code!r}")
    return Control(op=op, stream=str(obj["stream"]), id=cid, comment=comment if op in ("pin", "restore") else None,
                   by=str(obj.get("by", "")), reason=str(obj.get("reason", "")), ts=int(obj.get("ts", 0)),
                   epoch=epoch, offset=offset, code=code)


def decode_any(value: bytes, epoch: str = "", offset: int = -1) -> Comment | Control:
    """The comment or control operation in a record's value, placed at its log position."""
    try:
        obj = json.loads(value)
        kind = obj.get("k")
        if kind == "control":
            return _control(obj, epoch, offset)
        if kind != "comment":
            raise RecordError(f"unknown record kind {kind!r}")
        return _comment(obj, epoch, offset)
    except RecordError:
        raise
    # RecursionError: a record nested thousands deep; OverflowError: "ts": 1e999. Either would
    # otherwise stop the coordinator or the moderator at the same record after every restart.
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        raise RecordError(f"malformed record: {type(exc).__name__}: {str(exc)[:200]}") from None


def decode_record(value: bytes, epoch: str = "", offset: int = -1) -> Comment:
    """The comment in a record's value, placed at the record's log position (comments only)."""
    got = decode_any(value, epoch, offset)
    if not isinstance(got, Comment):
        raise RecordError("a control record, not a comment")
    return got


def _comment(obj: dict[str, Any], epoch: str, offset: int) -> Comment:
    user = obj["user"]
    return Comment(
        id=str(obj["id"]),
        stream=str(obj["stream"]),
        user_id=str(user["id"]),
        user_name=str(user["name"]),
        badges=tuple(map(str, user["badges"])) if user.get("badges") else (),
        text=str(obj["text"]),
        ts=int(obj["ts"]),
        epoch=epoch,
        offset=offset,
        shadow=obj.get("shadow") is True,
    )
