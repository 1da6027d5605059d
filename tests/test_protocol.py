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
        assert decode_event(encode_event(event, wire), wire) == event  # type: ignore[arg-type]
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
