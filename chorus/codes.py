"""Close codes, error codes and protocol limits: data in one place, each with its meaning.

Close codes 4000-4499 tell a client to reconnect; 4500-4999 tell it not to (DESIGN.md 3).
"""

from enum import IntEnum, StrEnum

__all__ = ["MAX_COMMENT_CHARS", "MAX_NONCE_CHARS", "CloseCode", "ErrorCode", "should_reconnect"]

# A comment's text, counted in Unicode code points after stripping surrounding whitespace.
MAX_COMMENT_CHARS = 500
# The client's correlation token echoed in ack/error.
MAX_NONCE_CHARS = 64


class CloseCode(IntEnum):
    """WebSocket close codes the gateway sends."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the gateway is shutting down for good
    PROTOCOL_ERROR = 1002  # RFC 6455 7.4.1
    INVALID_TEXT = 1007  # a text frame that is not UTF-8 (RFC 6455 8.1)
    POLICY = 1008
    TOO_BIG = 1009  # a frame or message over the size limit
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # graceful drain: reconnect elsewhere and resume
    TRY_AGAIN_LATER = 1013  # over the per-address cap, or the stream's channel is unavailable
    SLOW_CONSUMER = 4008  # stayed behind the backlog limit past the deadline; reconnect and resume
    TOKEN_EXPIRED = 4401  # the token expired while connected; reconnect with a fresh one
    BANNED = 4503  # the user is banned from this stream; do not reconnect


class ErrorCode(StrEnum):
    """Codes of the ``error`` event; the connection stays open after each of these."""

    BAD_MESSAGE = "bad_message"  # not JSON / msgpack, or not an object with a string ``t``
    UNKNOWN_TYPE = "unknown_type"  # a ``t`` the server does not handle
    EMPTY_COMMENT = "empty_comment"
    COMMENT_TOO_LONG = "comment_too_long"
    BAD_NONCE = "bad_nonce"
    UNAUTHORIZED = "unauthorized"  # posting needs a token with the write scope
    NOT_ACCEPTED = "not_accepted"  # the comment log did not take the comment; it was not stored
    RATE_LIMITED = "rate_limited"


def should_reconnect(code: int) -> bool:
    """What a well-behaved client does after a close with ``code``."""
    return not 4500 <= code <= 4999
