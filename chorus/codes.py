"""Close codes, error codes and protocol limits: data in one place, each with its meaning.

Close codes 4000-4499 tell a client to reconnect; 4500-4999 tell it not to (DESIGN.md 3).
"""

from enum import IntEnum, StrEnum

__all__ = [
    "MAX_COMMENT_CHARS",
    "MAX_NONCE_CHARS",
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEAD_BYTES",
    "MAX_SLOW_MODE_SECONDS",
    "CloseCode",
    "ErrorCode",
    "HttpErrorCode",
    "should_reconnect",
]

# A comment's text, counted in Unicode code points after stripping surrounding whitespace.
MAX_COMMENT_CHARS = 500
# The client's correlation token echoed in ack/error.
MAX_NONCE_CHARS = 64
# Any request's line plus headers (16 KiB: what picows allowed upgrades before the hand-off
# read every head, so a browser with many cookies still connects), and a POST's JSON body.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
MAX_REQUEST_BODY_BYTES = 16 * 1024
# The longest slow mode an operator may set on a stream.
MAX_SLOW_MODE_SECONDS = 3600


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
    TIMED_OUT = 4504  # the user is timed out from this stream; do not reconnect before it ends (the reason says when)


class ErrorCode(StrEnum):
    """Codes of the ``error`` event; the connection stays open after each of these."""

    BAD_MESSAGE = "bad_message"  # not JSON / msgpack, or not an object with a string ``t``
    UNKNOWN_TYPE = "unknown_type"  # a ``t`` the server does not handle
    EMPTY_COMMENT = "empty_comment"
    COMMENT_TOO_LONG = "comment_too_long"
    BAD_NONCE = "bad_nonce"
    UNAUTHORIZED = "unauthorized"  # posting without a token (expired: token_expired; no scope: missing_scope)
    NOT_ACCEPTED = "not_accepted"  # the comment never left the gateway for the log (Kafka unreachable): not posted
    # The log was handed the comment but did not confirm it within kafka.accept_timeout_ms: it
    # may still appear. The error carries the comment's ``id``; a client that reposts can drop
    # the first copy if it shows up.
    UNCONFIRMED = "unconfirmed"
    # The gateway has limits.max_inflight_posts posts waiting already: refused at once, with
    # ``retry_after_ms``; nothing was posted.
    OVERLOADED = "overloaded"
    # Admission refusals (ingest/limits.py); each carries ``retry_after_ms`` except ``banned``.
    RATE_LIMITED = "rate_limited"  # over the user, address, stream or global rate; the reason says which
    SLOW_MODE = "slow_mode"  # the stream allows one comment per user every N seconds
    BANNED = "banned"  # banned from this stream (or every stream) until an operator lifts it
    TIMED_OUT = "timed_out"  # banned for a while: ``retry_after_ms`` says how long is left
    # A ``react`` naming a reaction outside the configured set (reactions.emoji).
    UNKNOWN_REACTION = "unknown_reaction"
    # Posting refusals that say what to fix (UNAUTHORIZED above: no token at all).
    TOKEN_EXPIRED = "token_expired"  # the token's exp has passed (HTTP 401): get a fresh token
    MISSING_SCOPE = "missing_scope"  # a valid token without write:comments (or write) (HTTP 403)
    # Comment text (or a nonce) holding a lone surrogate or a control character other than tab
    # and line breaks (chorus/protocol.py clean_text); the reason names the character and where.
    BAD_TEXT = "bad_text"
    # The gateway failed while handling this message (a bug, or input it could not encode);
    # only this message is lost: the connection stays open and nothing was posted unless the
    # event carries the comment's ``id``.
    INTERNAL_ERROR = "internal_error"


class HttpErrorCode(StrEnum):
    """Codes of the gateway's HTTP errors (``{"error": CODE, "reason": ...}`` beside the status):
    requests refused before admission; admission refusals of a POST carry an :class:`ErrorCode`."""

    BAD_REQUEST = "bad_request"  # 400: not HTTP/1.1, a malformed header, or a body that is not {"text": ...}
    FORBIDDEN = "forbidden"  # 403: a browser Origin outside the allowlist
    NOT_FOUND = "not_found"  # 404: only /streams/{id}/comments takes a POST
    REQUEST_TIMEOUT = "request_timeout"  # 408: the request did not arrive within gateway.handshake_timeout_s
    LENGTH_REQUIRED = "length_required"  # 411: no Content-Length, or a chunked body (not supported)
    BODY_TOO_LARGE = "body_too_large"  # 413: body over MAX_REQUEST_BODY_BYTES
    HEADERS_TOO_LARGE = "headers_too_large"  # 431: request line and headers over MAX_REQUEST_HEAD_BYTES
    VERSION_NOT_SUPPORTED = "version_not_supported"  # 505: an HTTP version other than 1.0 or 1.1
    INTERNAL_ERROR = "internal_error"  # 500: a bug; the comment was not posted
    # The moderator API (gateway/modapi.py)
    NOT_A_MODERATOR = "not_a_moderator"  # 403: the token may not moderate this stream
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405: GET for the review queue, POST for everything else
    # Every other HTTP answer of the gateway (gateway/routes.py)
    UNAUTHORIZED = "unauthorized"  # 401: no token where one is required, or one that does not verify
    TOKEN_EXPIRED = "token_expired"  # 401: the token's exp has passed
    UPGRADE_REQUIRED = "upgrade_required"  # 426: /ws and /echo take only a WebSocket upgrade


def should_reconnect(code: int) -> bool:
    """What a well-behaved client does after a close with ``code``."""
    return not 4500 <= code <= 4999


class DeleteCode(StrEnum):
    """The ``code`` of a ``delete`` event (and of a deleted comment in its author's history):
    who removed it; the event's ``reason`` says why, in a sentence for the author."""

    MODERATED = "moderated"  # automatic moderation (ingest/moderator.py)
    MODERATOR = "moderator"  # a moderator or the broadcaster, through the moderator API
