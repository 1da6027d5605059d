"""The Chorus envelope (DESIGN.md 3), sans-I/O: bytes in, typed messages out, and back.

Nothing here touches a socket or an event loop. A client message that cannot be understood
becomes a :class:`BadMessage` carrying the error code and reason to send back; it never
raises into the caller's loop.

Two encodings carry the same maps: ``chorus.json.v1`` (text frames, the default) and
``chorus.msgpack.v1`` (binary frames).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from chorus.codes import MAX_COMMENT_CHARS, MAX_NONCE_CHARS, ErrorCode

__all__ = [
    "JSON",
    "MSGPACK",
    "REACTION_NAME",
    "SUBPROTOCOLS",
    "BadMessage",
    "ChannelMessage",
    "ClientMessage",
    "PostComment",
    "React",
    "Resume",
    "Wire",
    "choose_subprotocol",
    "decode_event",
    "encode_ack",
    "encode_event",
    "error_event",
    "fast_react",
    "json_compact",
    "pack_channel_message",
    "parse_client_message",
    "unpack_channel_message",
    "validate_comment_text",
]

Wire = Literal["json", "msgpack"]
JSON: Wire = "json"
MSGPACK: Wire = "msgpack"
SUBPROTOCOLS: dict[str, Wire] = {"chorus.json.v1": JSON, "chorus.msgpack.v1": MSGPACK}
# A reaction's name on the wire ("fire"): the page maps names to glyphs.
REACTION_NAME = re.compile(r"^[a-z0-9_]{1,32}$")

# Compact JSON (UTF-8 kept as is) with one encoder for every call: json.dumps with arguments
# builds a new encoder each time, a measurable share of a busy gateway's per-post work.
json_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class PostComment:
    text: str
    nonce: str | None


@dataclass(frozen=True, slots=True)
class Resume:
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class React:
    """A reaction: the emoji's name (whether it is in the configured set is the gateway's check)."""

    emoji: str


@dataclass(frozen=True, slots=True)
class BadMessage:
    code: ErrorCode
    reason: str
    nonce: str | None = None


ClientMessage = PostComment | Resume | React | BadMessage


def choose_subprotocol(offered: str | None) -> str | None:
    """The first subprotocol of the client's offer that we speak (RFC 6455 4.2.2), or None."""
    if not offered:
        return None
    for name in (p.strip() for p in offered.split(",")):
        if name in SUBPROTOCOLS:
            return name
    return None


def _loads(data: bytes, wire: Wire) -> Any:
    if wire == JSON:
        return json.loads(data)
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def validate_comment_text(text: object) -> tuple[str | None, ErrorCode | None, str]:
    """(clean text, None, "") or (None, code, reason). Counts code points after stripping."""
    if not isinstance(text, str):
        return None, ErrorCode.BAD_MESSAGE, "comment text must be a string"
    clean = text.strip()
    if not clean:
        return None, ErrorCode.EMPTY_COMMENT, "comment is empty"
    if len(clean) > MAX_COMMENT_CHARS:
        return None, ErrorCode.COMMENT_TOO_LONG, (
            f"comment has {len(clean)} characters; the limit is {MAX_COMMENT_CHARS}"
        )
    return clean, None, ""


def _parse_nonce(obj: dict[str, Any]) -> tuple[str | None, BadMessage | None]:
    nonce = obj.get("nonce")
    if nonce is None:
        return None, None
    if not isinstance(nonce, str) or len(nonce) > MAX_NONCE_CHARS:
        reason = f"nonce must be a string of at most {MAX_NONCE_CHARS} characters"
        return None, BadMessage(ErrorCode.BAD_NONCE, reason)
    return nonce, None


def _parse_comment(obj: dict[str, Any]) -> ClientMessage:
    nonce, bad = _parse_nonce(obj)
    if bad is not None:
        return bad
    text, code, reason = validate_comment_text(obj.get("text"))
    if code is not None or text is None:
        return BadMessage(code or ErrorCode.BAD_MESSAGE, reason, nonce)
    return PostComment(text, nonce)


def _parse_resume(obj: dict[str, Any]) -> ClientMessage:
    epoch, offset = obj.get("epoch"), obj.get("offset")
    if not isinstance(epoch, str) or not isinstance(offset, int) or isinstance(offset, bool):
        return BadMessage(ErrorCode.BAD_MESSAGE, "resume needs a string epoch and an integer offset")
    return Resume(epoch, offset)


def _parse_react(obj: dict[str, Any]) -> ClientMessage:
    emoji = obj.get("emoji")
    if not isinstance(emoji, str) or not REACTION_NAME.match(emoji):
        return BadMessage(ErrorCode.BAD_MESSAGE, "react needs an emoji name of 1-32 characters a-z 0-9 _")
    return React(emoji)


# A react in the exact form the page and loadgens send: a gateway takes ~100k of these a second,
# and a match here skips json.loads (anything else goes through parse_client_message).
_FAST_REACT = re.compile(rb'\{"t":"react","emoji":"([a-z0-9_]{1,32})"\}')


def fast_react(data: bytes) -> str | None:
    """The emoji of a JSON ``react`` in canonical form, else None (then parse it in full)."""
    m = _FAST_REACT.fullmatch(data)
    return m.group(1).decode() if m else None


def parse_client_message(data: bytes, wire: Wire) -> ClientMessage:
    """Decode one whole client message (already UTF-8 checked for text frames)."""
    try:
        obj = _loads(data, wire)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        return BadMessage(ErrorCode.BAD_MESSAGE, f"message is not valid {wire}")
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        return BadMessage(ErrorCode.BAD_MESSAGE, 'message must be an object with a string "t"')
    kind = obj["t"]
    if kind == "comment":
        return _parse_comment(obj)
    if kind == "resume":
        return _parse_resume(obj)
    if kind == "react":
        return _parse_react(obj)
    return BadMessage(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}")


def encode_event(event: dict[str, Any], wire: Wire) -> bytes:
    """One server event in the connection's encoding (the frame's payload)."""
    if wire == JSON:
        return json_compact(event).encode()
    return msgpack.packb(event, use_bin_type=True)


def encode_ack(comment_id: str, nonce: str | None, wire: Wire) -> bytes:
    """``{"t":"ack","id":...,"nonce":...}`` in the connection's encoding: one per accepted post,
    so the JSON one is put together directly (the same bytes as :func:`encode_event`)."""
    if wire == JSON:
        tail = b"}" if nonce is None else b',"nonce":' + json_compact(nonce).encode() + b"}"
        return b'{"t":"ack","id":' + json_compact(comment_id).encode() + tail
    ack = {"t": "ack", "id": comment_id}
    if nonce is not None:
        ack["nonce"] = nonce
    return encode_event(ack, wire)


def decode_event(data: bytes, wire: Wire = JSON) -> dict[str, Any]:
    """Inverse of :func:`encode_event` (used by tests, the coordinator's peers and clients)."""
    obj = _loads(data, wire)
    if not isinstance(obj, dict):
        raise ValueError("event is not an object")
    return obj


def error_event(code: ErrorCode, reason: str, nonce: str | None = None,
                retry_after_ms: int | None = None, comment_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"t": "error", "code": str(code), "reason": reason}
    if comment_id is not None:  # ``unconfirmed``: the id the comment has if it does appear
        event["id"] = comment_id
    if retry_after_ms is not None:
        event["retry_after_ms"] = retry_after_ms
    if nonce is not None:
        event["nonce"] = nonce
    return event


# Pub/Sub channel messages: one header byte; for batches then the stream offset of their last
# comment (8 bytes) and their comment count (4 bytes), big-endian; then the event's JSON. The
# header lets a gateway order, replay and count batches without parsing JSON on the hot path.
# A timed batch ("T") also carries the publisher's wall clock in microseconds (8 bytes) after
# the count: gateways measure Pub/Sub and delivery latency from it (chorus/metrics.py).
_BATCH, _CONTROL, _TIMED_BATCH = b"B", b"C", b"T"
_BATCH_HEADER = 13
_TIMED_HEADER = 21


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    event_json: bytes
    offset: int | None = None  # last offset of a batch; None for control events (deletes, pins, modes)
    count: int = 0  # comments in a batch
    published_us: int = 0  # the coordinator's wall clock when it published (0: not stamped)


def pack_channel_message(event_json: bytes, offset: int | None = None, count: int = 0,
                         published_us: int = 0) -> bytes:
    if offset is None:
        return _CONTROL + event_json
    head = offset.to_bytes(8, "big") + count.to_bytes(4, "big")
    if published_us > 0:
        return _TIMED_BATCH + head + published_us.to_bytes(8, "big") + event_json
    return _BATCH + head + event_json


def unpack_channel_message(data: bytes) -> ChannelMessage:
    head = data[:1]
    if head == _BATCH and len(data) > _BATCH_HEADER:
        offset = int.from_bytes(data[1:9], "big")
        return ChannelMessage(data[_BATCH_HEADER:], offset, int.from_bytes(data[9:13], "big"))
    if head == _TIMED_BATCH and len(data) > _TIMED_HEADER:
        return ChannelMessage(data[_TIMED_HEADER:], int.from_bytes(data[1:9], "big"),
                              int.from_bytes(data[9:13], "big"), int.from_bytes(data[13:21], "big"))
    if head == _CONTROL:
        return ChannelMessage(data[1:])
    raise ValueError("not a Chorus channel message")
