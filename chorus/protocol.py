"""The Chorus envelope (DESIGN.md 3), sans-I/O: bytes in, typed messages out, and back.

Nothing here touches a socket or an event loop. A client message that cannot be understood
becomes a :class:`BadMessage` carrying the error code and reason to send back; it never
raises into the caller's loop, whatever the bytes (tests/test_fuzz.py feeds it random ones).

Hostile input is refused before it is decoded or stored:

- Nesting: client messages are flat maps, so anything nested deeper than :data:`MAX_DEPTH` is
  ``bad_message`` (a JSON pre-scan, before the recursive decoder could run out of stack).
- Text (:func:`clean_text`, for comments here and display names in chorus/auth.py): a lone
  surrogate or a control character (C0 but tab and line breaks, DEL, C1 but NEL) is refused
  with ``bad_text``; bidirectional controls are removed, so a comment cannot reorder the rest
  of the line it is shown in; surrounding whitespace (a pasted trailing newline) is stripped
  and each inner run of line breaks and tabs becomes one space. Zero-width joiners stay:
  emoji sequences need them.
- Resume positions: the offset must fit in a signed 64-bit integer, the epoch in
  :data:`MAX_EPOCH_CHARS` characters.

Two encodings carry the same maps: ``chorus.json.v1`` (text frames, the default) and
``chorus.msgpack.v1`` (binary frames).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain, compress, filterfalse
from typing import Any, Literal

import msgpack

from chorus.codes import MAX_COMMENT_CHARS, MAX_NONCE_CHARS, ErrorCode

__all__ = [
    "JSON",
    "MAX_DEPTH",
    "MAX_EPOCH_CHARS",
    "MAX_OFFSET",
    "MIN_OFFSET",
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
    "clean_text",
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

MAX_DEPTH = 32  # nested maps/arrays in one client message (ours are flat: depth 1)
# A resume's epoch: topic:partition:topic id (ingest/kafka_topic.py), and a Kafka topic name
# may have 249 characters (the default, "comments", makes epochs of ~35).
MAX_EPOCH_CHARS = 300
MIN_OFFSET, MAX_OFFSET = -(2**63), 2**63 - 1  # a resume's offset: a signed 64-bit log offset

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


# A JSON string, or an unterminated one up to the end: matching every quote it starts at keeps
# the nesting pre-scan linear (a pattern that can fail would rescan from each later quote).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# bytes.translate arguments that keep only brackets, braces as brackets.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def _json_too_deep(data: bytes) -> bool:
    """True if ``data`` nests arrays/objects deeper than MAX_DEPTH. json.loads recurses once per
    level, so 5,000 ``[`` would exhaust the stack (RecursionError) before it could refuse them.

    Strings removed, the brackets left lose their innermost pairs one level per pass (each
    pass one bytes.replace, in C): a valid message of depth D takes D passes and leaves
    nothing. What invalid JSON leaves, unclosed ``[`` are levels the decoder would enter too.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False  # every message of ours: no scan at all
    brackets = _JSON_STRING.sub(b"", data).translate(_AS_BRACKETS, _NOT_BRACKETS)
    levels = 0
    while levels <= MAX_DEPTH:
        inner_gone = brackets.replace(b"[]", b"")
        if len(inner_gone) == len(brackets):
            break
        brackets, levels = inner_gone, levels + 1
    return levels + brackets.count(b"[") > MAX_DEPTH


_IS_CONTAINER = frozenset({dict, list}).__contains__  # the types msgpack builds containers of
_IS_DICT = dict.__instancecheck__


def _too_deep(obj: dict[str, Any] | list[Any]) -> bool:
    """True if a decoded value nests deeper than MAX_DEPTH. It is walked one level at a time
    and every step runs in C (itertools over the level's containers), so a message of
    thousands of small arrays costs about as much again as decoding it, not ten times."""
    if not any(map(_IS_CONTAINER, map(type, obj.values() if isinstance(obj, dict) else obj))):
        return False  # flat, as every message of ours is
    level: list[Any] = [obj]
    for _ in range(MAX_DEPTH):
        values = chain(chain.from_iterable(map(dict.values, filter(_IS_DICT, level))),
                       chain.from_iterable(filterfalse(_IS_DICT, level)))
        items = list(values)
        level = list(compress(items, map(_IS_CONTAINER, map(type, items))))
        if not level:
            return False
    return True


class _Undecodable(ValueError):
    """Why bytes are not a message (parse_client_message makes it a BadMessage)."""


# What json and msgpack raise on hostile bytes: ValueError covers JSONDecodeError,
# UnicodeDecodeError, msgpack's ExtraData/FormatError/StackError, a non-str map key, an integer
# of more than 4,300 digits; TypeError an unhashable key; OverflowError a huge number.
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError)


def _loads(data: bytes, wire: Wire) -> Any:
    if wire == JSON:
        if _json_too_deep(data):
            raise _Undecodable(f"message nests deeper than {MAX_DEPTH} levels")
        # Decoded here as UTF-8, the subprotocol's encoding: json.loads(bytes) would guess
        # UTF-16/32 from NUL bytes and decode with surrogatepass.
        return json.loads(data.decode("utf-8"))
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.StackError:  # deeper than msgpack's own stack (1,024 levels)
        raise _Undecodable(f"message nests deeper than {MAX_DEPTH} levels") from None
    if isinstance(obj, dict | list) and _too_deep(obj):
        raise _Undecodable(f"message nests deeper than {MAX_DEPTH} levels")
    return obj


# Characters comment text and display names may not carry as they are (clean_text), as
# regular-expression class contents.
_SURROGATES = r"\ud800-\udfff"
_CONTROLS = r"\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"  # C0, DEL and C1 but tab, line breaks and NEL
# UAX #9 explicit formatting characters (embeddings, overrides, isolates) and the implicit
# marks ALM, LRM, RLM: removed, so text cannot reorder what the page shows after it.
_BIDI_CONTROLS = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_BREAKS = r"\t\n\x0b\x0c\r\x85\u2028\u2029"  # tab, line and paragraph breaks
_SURROGATE = re.compile(f"[{_SURROGATES}]")
_CONTROL_CHAR = re.compile(f"[{_CONTROLS}]")
_INVALID = re.compile(f"[{_SURROGATES}{_CONTROLS}]")
_BIDI = re.compile(f"[{_BIDI_CONTROLS}]")
_FOLD = re.compile(f"[ {_BREAKS}]*[{_BREAKS}][ {_BREAKS}]*")  # a run of breaks, spaces around it
_UNUSUAL = re.compile(f"[{_SURROGATES}{_CONTROLS}{_BIDI_CONTROLS}{_BREAKS}]")


def _char(text: str, m: re.Match[str]) -> str:
    return f"U+{ord(m.group()):04X} at character {m.start() + 1}"


def clean_text(text: str, what: str = "comment", drop_invalid: bool = False) -> tuple[str | None, str]:
    """(``text`` made safe to show, "") or (None, the reason it is refused). See the module
    docstring for the rules; the result is stripped and cleaning it again changes nothing.
    ``drop_invalid`` removes lone surrogates and control characters instead of refusing them
    (display names: refusing would lock a viewer out over what the token's issuer wrote)."""
    if _UNUSUAL.search(text) is None:
        return text.strip(), ""  # nearly every comment: one scan
    if drop_invalid:
        text = _INVALID.sub("", text)
    elif (bad := _SURROGATE.search(text)) is not None:
        return None, f"{what} holds a lone surrogate ({_char(text, bad)}): not valid Unicode text"
    elif (bad := _CONTROL_CHAR.search(text)) is not None:
        return None, f"{what} holds a control character ({_char(text, bad)})"
    return _FOLD.sub(" ", _BIDI.sub("", text).strip()), ""


def validate_comment_text(text: object) -> tuple[str | None, ErrorCode | None, str]:
    """(clean text, None, "") or (None, code, reason). Counts code points after cleaning."""
    if not isinstance(text, str):
        return None, ErrorCode.BAD_MESSAGE, "comment text must be a string"
    clean, reason = clean_text(text)
    if clean is None:
        return None, ErrorCode.BAD_TEXT, reason
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
    bad = _SURROGATE.search(nonce)
    if bad is not None:  # not echoed back: it could not be encoded
        return None, BadMessage(ErrorCode.BAD_TEXT, f"nonce holds a lone surrogate ({_char(nonce, bad)})")
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
    if not MIN_OFFSET <= offset <= MAX_OFFSET:  # the store and the caches hold 64-bit offsets
        return BadMessage(ErrorCode.BAD_MESSAGE, "resume offset must be a signed 64-bit integer (-2^63 to 2^63-1)")
    if len(epoch) > MAX_EPOCH_CHARS or _SURROGATE.search(epoch):
        return BadMessage(ErrorCode.BAD_MESSAGE, f"resume epoch must be text of at most {MAX_EPOCH_CHARS} characters")
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
    """Decode one whole client message (already UTF-8 checked for text frames). Never raises:
    whatever is wrong with ``data`` comes back as a :class:`BadMessage`."""
    try:
        obj = _loads(data, wire)
    except _Undecodable as exc:
        return BadMessage(ErrorCode.BAD_MESSAGE, str(exc))
    except _DECODE_ERRORS:
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


# Encoders replace a lone surrogate (which validation refuses, so it can only come from a
# path that skipped it) instead of raising in the middle of a fan-out or an ack.
_ENCODE_ERRORS = "replace"


def encode_event(event: dict[str, Any], wire: Wire) -> bytes:
    """One server event in the connection's encoding (the frame's payload)."""
    if wire == JSON:
        return json_compact(event).encode("utf-8", _ENCODE_ERRORS)
    return msgpack.packb(event, use_bin_type=True, unicode_errors=_ENCODE_ERRORS)


def encode_ack(comment_id: str, nonce: str | None, wire: Wire) -> bytes:
    """``{"t":"ack","id":...,"nonce":...}`` in the connection's encoding: one per accepted post,
    so the JSON one is put together directly (the same bytes as :func:`encode_event`)."""
    if wire == JSON:
        tail = b"}" if nonce is None else b',"nonce":' + json_compact(nonce).encode("utf-8", _ENCODE_ERRORS) + b"}"
        return b'{"t":"ack","id":' + json_compact(comment_id).encode("utf-8", _ENCODE_ERRORS) + tail
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
