"""Records of the ``comments`` log, as pure functions: a comment becomes bytes and back.

A record's key is the stream id, so one stream's records keep their order in one partition.
The value is compact JSON so operators can read the topic with stock Kafka tools.

A comment's position, ``(epoch, offset)``, is not in the value: it is where the record sits
in the log (the partition's offset space and the record's offset in it), so every consumer
that reads the record computes the same position, however often it is replayed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chorus.protocol import json_compact

__all__ = ["Comment", "RecordError", "decode_record", "encode_record"]

RECORD_VERSION = 1


class RecordError(ValueError):
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
    return c.stream.encode(), json_compact(value).encode()


def decode_record(value: bytes, epoch: str = "", offset: int = -1) -> Comment:
    """The comment in a record's value, placed at the record's log position."""
    try:
        obj = json.loads(value)
        if obj.get("k") != "comment":
            raise RecordError(f"unknown record kind {obj.get('k')!r}")
        user = obj["user"]
        return Comment(
            id=str(obj["id"]),
            stream=str(obj["stream"]),
            user_id=str(user["id"]),
            user_name=str(user["name"]),
            badges=tuple(str(b) for b in user.get("badges", ())),
            text=str(obj["text"]),
            ts=int(obj["ts"]),
            epoch=epoch,
            offset=offset,
        )
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordError(f"malformed comment record: {exc}") from None
