"""The envelope, sans-I/O: bytes in, typed messages out."""

import json

import msgpack
import pytest

from chorus.codes import MAX_COMMENT_CHARS, ErrorCode
from chorus.protocol import (
    JSON,
    MSGPACK,
    BadMessage,
    ChannelMessage,
    PostComment,
    Resume,
    Wire,
    choose_subprotocol,
    clean_text,
    decode_event,
    encode_ack,
    encode_event,
    pack_channel_message,
    parse_client_message,
    unpack_channel_message,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"t":"comment","text":"hi","nonce":"c1"}', PostComment("hi", "c1")),
        (b'{"t":"comment","text":"  hi  "}', PostComment("hi", None)),
        (b'{"t":"resume","epoch":"e1","offset":12}', Resume("e1", 12)),
        (b"not json", BadMessage(ErrorCode.BAD_MESSAGE, "message is not valid json")),
        (b"[1,2]", BadMessage(ErrorCode.BAD_MESSAGE, 'message must be an object with a string "t"')),
        (b'{"t":5}', BadMessage(ErrorCode.BAD_MESSAGE, 'message must be an object with a string "t"')),
        (b'{"t":"dance"}', BadMessage(ErrorCode.UNKNOWN_TYPE, "unknown message type 'dance'")),
        (b'{"t":"comment","text":"   ","nonce":"n"}', BadMessage(ErrorCode.EMPTY_COMMENT, "comment is empty", "n")),
        (b'{"t":"comment","text":7}', BadMessage(ErrorCode.BAD_MESSAGE, "comment text must be a string")),
        (b'{"t":"comment","text":"x","nonce":5}',
         BadMessage(ErrorCode.BAD_NONCE, "nonce must be a string of at most 64 characters")),
        (b'{"t":"resume","epoch":"e1","offset":true}',
         BadMessage(ErrorCode.BAD_MESSAGE, "resume needs a string epoch and an integer offset")),
    ],
)
def test_parse_json_messages(raw: bytes, expected: object) -> None:
    assert parse_client_message(raw, "json") == expected


def test_comment_length_counts_code_points() -> None:
    ok = json.dumps({"t": "comment", "text": "é" * MAX_COMMENT_CHARS}).encode()
    assert parse_client_message(ok, "json") == PostComment("é" * MAX_COMMENT_CHARS, None)
    too_long = json.dumps({"t": "comment", "text": "x" * (MAX_COMMENT_CHARS + 1), "nonce": "a"}).encode()
    msg = parse_client_message(too_long, "json")
    assert isinstance(msg, BadMessage)
    assert msg.code == ErrorCode.COMMENT_TOO_LONG
    assert msg.nonce == "a"
    assert "501" in msg.reason


def test_msgpack_messages_carry_the_same_maps() -> None:
    raw = msgpack.packb({"t": "comment", "text": "hi", "nonce": "z"})
    assert parse_client_message(raw, "msgpack") == PostComment("hi", "z")
    assert parse_client_message(b"\xc1", "msgpack").code == ErrorCode.BAD_MESSAGE  # type: ignore[union-attr]


def test_events_round_trip_in_both_encodings() -> None:
    event = {"t": "ack", "id": "7261", "nonce": "ü"}
    for wire in ("json", "msgpack"):
        assert decode_event(encode_event(event, wire), wire) == event
    assert encode_event(event, "json") == '{"t":"ack","id":"7261","nonce":"ü"}'.encode()


def test_subprotocol_choice() -> None:
    assert choose_subprotocol(None) is None
    assert choose_subprotocol("x, chorus.msgpack.v1, chorus.json.v1") == "chorus.msgpack.v1"
    assert choose_subprotocol("graphql-ws") is None


def test_channel_messages() -> None:
    batch = pack_channel_message(b'{"t":"batch"}', offset=2**40, count=3)
    assert unpack_channel_message(batch) == ChannelMessage(b'{"t":"batch"}', 2**40, 3)
    control = pack_channel_message(b'{"t":"delete","id":"1"}')
    assert unpack_channel_message(control) == ChannelMessage(b'{"t":"delete","id":"1"}', None, 0)
    with pytest.raises(ValueError):
        unpack_channel_message(b"hello")


@pytest.mark.parametrize("nonce", [None, "c1", 'quo"te\\ κόσμε 😀', ""])
@pytest.mark.parametrize("wire", [JSON, MSGPACK])
def test_encode_ack_is_encode_event_of_the_ack(nonce: str | None, wire: Wire) -> None:
    ack = {"t": "ack", "id": "7261000000000000001"}
    if nonce is not None:
        ack["nonce"] = nonce
    assert encode_ack("7261000000000000001", nonce, wire) == encode_event(ack, wire)


# --- hostile input (issue 11 items 1-3, issue 17 item 6) ---


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b"{" * 5000, b'{"t":"comment","x":' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"a":' * 3000],
)
def test_deep_json_is_refused_before_decoding(raw: bytes) -> None:
    assert parse_client_message(raw, JSON) == BadMessage(ErrorCode.BAD_MESSAGE, "message nests deeper than 32 levels")


def nested(depth: int) -> object:
    value: object = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("wire", [JSON, MSGPACK])
def test_nesting_limit_is_32_levels_in_both_encodings(wire: Wire) -> None:
    def message(depth: int) -> bytes:
        obj = {"t": "comment", "text": "hi", "extra": nested(depth - 1)}
        return json.dumps(obj).encode() if wire == JSON else msgpack.packb(obj)

    assert parse_client_message(message(32), wire) == PostComment("hi", None)
    too_deep = parse_client_message(message(33), wire)
    assert too_deep == BadMessage(ErrorCode.BAD_MESSAGE, "message nests deeper than 32 levels")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = "[{" * 200 + '\\"]' * 3
    raw = json.dumps({"t": "comment", "text": text}).encode()
    assert parse_client_message(raw, JSON) == PostComment(text, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x91" * 5000,  # msgpack's own stack is 1,024 deep: StackError
        b"\xdd\xff\xff\xff\xff",  # an array claiming 2^32-1 items
        msgpack.packb({1: 2}),  # a non-str map key
        b"\x81\x91\x01\x02",  # a map key that is an array
        b"\xa3\xed\xa0\x80",  # a surrogate in CESU-8: not UTF-8
        b"\xc7\x05\xff" + b"\x00" * 5,  # a timestamp extension of a bad length
        b"\x81\xa1t\xa7comment" + b"\x00",  # trailing bytes
    ],
)
def test_hostile_msgpack_is_a_bad_message(raw: bytes) -> None:
    msg = parse_client_message(raw, MSGPACK)
    assert isinstance(msg, BadMessage) and msg.code == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "raw",
    [
        b'{"t":"resume","epoch":"e","offset":' + b"9" * 5000 + b"}",  # over int()'s 4,300 digits
        b'\x00{\x00"\x00t\x00"\x00:\x00"\x00x\x00"\x00}',  # UTF-16 that json.loads(bytes) would guess
        b'{"t":"comment","text":"hi"',
        b'"' + b'\\"' * 20000 + b"[" * 40,  # an unterminated string: the pre-scan stays linear
    ],
)
def test_hostile_json_is_a_bad_message(raw: bytes) -> None:
    msg = parse_client_message(raw, JSON)
    assert isinstance(msg, BadMessage) and msg.code == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"t":"comment","text":"a\\ud800b","nonce":"n"}',
         "comment holds a lone surrogate (U+D800 at character 2): not valid Unicode text"),
        (b'{"t":"comment","text":"\\udfff","nonce":"n"}',
         "comment holds a lone surrogate (U+DFFF at character 1): not valid Unicode text"),
        (b'{"t":"comment","text":"bell\\u0007"}', "comment holds a control character (U+0007 at character 5)"),
        (b'{"t":"comment","text":"nul\\u0000"}', "comment holds a control character (U+0000 at character 4)"),
        (b'{"t":"comment","text":"\\u001b[31mred"}', "comment holds a control character (U+001B at character 1)"),
        (b'{"t":"comment","text":"del\\u007f"}', "comment holds a control character (U+007F at character 4)"),
        (b'{"t":"comment","text":"c1\\u009b"}', "comment holds a control character (U+009B at character 3)"),
    ],
)
def test_surrogates_and_control_characters_are_bad_text(raw: bytes, reason: str) -> None:
    msg = parse_client_message(raw, JSON)
    assert msg == BadMessage(ErrorCode.BAD_TEXT, reason, "n" if b'"nonce"' in raw else None)


def test_a_surrogate_in_the_nonce_is_bad_text_and_not_echoed() -> None:
    msg = parse_client_message(b'{"t":"comment","text":"hi","nonce":"\\ud83d"}', JSON)
    assert msg == BadMessage(ErrorCode.BAD_TEXT, "nonce holds a lone surrogate (U+D83D at character 1)")
    assert encode_event({"t": "error", "code": str(msg.code), "reason": msg.reason}, JSON)


def test_a_surrogate_pair_escape_is_one_valid_character() -> None:
    assert parse_client_message(b'{"t":"comment","text":"\\ud83d\\ude00"}', JSON) == PostComment("😀", None)


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("hello\n", "hello"),  # a paste's trailing newline
        ("\r\nhello\r\n", "hello"),
        ("line one\nline two", "line one line two"),
        ("a \r\n\r\n b\tc", "a b c"),
        ("a\u2028b\u0085c", "a b c"),
        ("\u202eevil\u202c ok", "evil ok"),  # RLO ... PDF
        ("\u2067abc\u2069 x \u200e\u200f\u061c", "abc x"),
        ("👨\u200d👩\u200d👧", "👨\u200d👩\u200d👧"),  # zero-width joiners stay
        ("🏳️\u200d🌈 flag", "🏳️\u200d🌈 flag"),
        ("עברית english", "עברית english"),
    ],
)
def test_text_hygiene(text: str, clean: str) -> None:
    raw = json.dumps({"t": "comment", "text": text}).encode()
    assert parse_client_message(raw, JSON) == PostComment(clean, None)
    assert clean_text(clean) == (clean, "")  # cleaning again changes nothing


def test_only_bidi_controls_is_an_empty_comment() -> None:
    raw = json.dumps({"t": "comment", "text": "\u202e\u2066\n\u200f"}).encode()
    assert parse_client_message(raw, JSON) == BadMessage(ErrorCode.EMPTY_COMMENT, "comment is empty")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"t": "resume", "epoch": "e", "offset": 2**63},
         BadMessage(ErrorCode.BAD_MESSAGE, "resume offset must be a signed 64-bit integer (-2^63 to 2^63-1)")),
        ({"t": "resume", "epoch": "e", "offset": -(2**63) - 1},
         BadMessage(ErrorCode.BAD_MESSAGE, "resume offset must be a signed 64-bit integer (-2^63 to 2^63-1)")),
        ({"t": "resume", "epoch": "e", "offset": 10**100},
         BadMessage(ErrorCode.BAD_MESSAGE, "resume offset must be a signed 64-bit integer (-2^63 to 2^63-1)")),
        ({"t": "resume", "epoch": "e", "offset": 2**63 - 1}, Resume("e", 2**63 - 1)),
        ({"t": "resume", "epoch": "e", "offset": -(2**63)}, Resume("e", -(2**63))),
        ({"t": "resume", "epoch": "t" * 249 + ":2147483647:" + "i" * 22, "offset": 1},
         Resume("t" * 249 + ":2147483647:" + "i" * 22, 1)),  # the longest epoch Kafka can make
        ({"t": "resume", "epoch": "e" * 301, "offset": 1},
         BadMessage(ErrorCode.BAD_MESSAGE, "resume epoch must be text of at most 300 characters")),
        ({"t": "resume", "epoch": "\ud800", "offset": 1},
         BadMessage(ErrorCode.BAD_MESSAGE, "resume epoch must be text of at most 300 characters")),
    ],
)
def test_resume_offset_and_epoch_bounds(obj: dict[str, object], expected: object) -> None:
    assert parse_client_message(json.dumps(obj).encode(), JSON) == expected
    offset = obj["offset"]
    assert isinstance(offset, int)
    # msgpack cannot carry a lone surrogate at all, nor an integer outside -2^63..2^64-1
    if "\ud800" not in str(obj["epoch"]) and -(2**63) <= offset < 2**64:
        assert parse_client_message(msgpack.packb(obj), MSGPACK) == expected


@pytest.mark.parametrize("wire", [JSON, MSGPACK])
def test_encoders_do_not_raise_on_a_lone_surrogate(wire: Wire) -> None:
    """Validation refuses them; one that came by a path without it becomes "?", not a crash."""
    assert decode_event(encode_event({"t": "x", "reason": "a\ud800b"}, wire), wire) == {"t": "x", "reason": "a?b"}
    assert decode_event(encode_ack("1", "n\udc00", wire), wire) == {"t": "ack", "id": "1", "nonce": "n?"}
