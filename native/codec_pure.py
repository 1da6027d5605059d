"""RFC 6455 frame codec in pure Python: the reference twin of the C++ ``_wsframe`` module.

Server side only: frames we send are unmasked (RFC 6455 5.1), frames we parse come from clients
and are masked. ``chorus.native`` chooses between this module and ``_wsframe`` (the hub's own
parser, native/src/wsframe.cpp, which raises this module's ``ProtocolError``: one exception
class for both); import it from there. permessage-deflate (RFC 7692) is framing only here: with
``allow_rsv1`` the parser accepts RSV1 on a message's first frame and returns the message, still
compressed, with ``COMPRESSED`` OR-ed into its opcode; the caller inflates it and validates
inflated text. Both modules must behave identically, down to the close code and reason of every
error (``tests/test_codec.py`` checks it with vectors, chunkings and seeded random input).
"""

from __future__ import annotations

import codecs
import struct

from chorus.errors import ChorusError

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "COMPRESSED",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameParser",
    "ProtocolError",
    "encode_close",
    "encode_frame",
    "encode_frames",
    "validate_utf8",
]

# Opcodes, RFC 6455 5.2.
OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# OR-ed into the opcode of a message that arrived with RSV1 set (permessage-deflate, RFC 7692 6).
COMPRESSED = 0x100

# Close codes the parser fails with, RFC 6455 7.4.1.
CLOSE_PROTOCOL_ERROR = 1002  # the peer broke the framing rules
CLOSE_INVALID_DATA = 1007  # a text message or close reason that is not UTF-8
CLOSE_TOO_BIG = 1009  # a message over max_message_size or max_fragments

MAX_CONTROL_PAYLOAD = 125  # bytes, RFC 6455 5.5
MAX_CLOSE_REASON = 123  # bytes: the control payload minus the 2-byte code, RFC 6455 5.5.1

_DATA_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY)
_KNOWN_OPCODES = (*_DATA_OPCODES, OP_CLOSE, OP_PING, OP_PONG)

_HEADER_7 = struct.Struct("!BB").pack
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


class ProtocolError(ChorusError):
    """The client broke RFC 6455; send a close frame with ``close_code`` and drop the peer."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.close_code} {self.reason}"


# --- encoding (server frames, never masked: RFC 6455 5.1) ---


def _frame_header(opcode: int, length: int, fin: bool, rsv1: bool) -> bytes:
    if opcode not in _KNOWN_OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    if opcode >= OP_CLOSE and (not fin or length > MAX_CONTROL_PAYLOAD):
        raise ValueError("a control frame must be final and at most 125 bytes")  # RFC 6455 5.5
    b0 = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    # RFC 6455 5.2: 7-bit length, or 126 + 16-bit, or 127 + 64-bit, all big-endian.
    if length < 126:
        return _HEADER_7(b0, length)
    if length < 0x10000:
        return _HEADER_16(b0, 126, length)
    return _HEADER_64(b0, 127, length)


def _nbytes(payload: bytes | bytearray | memoryview) -> int:
    return len(payload) if isinstance(payload, bytes | bytearray) else memoryview(payload).nbytes


def encode_frame(
    opcode: int, payload: bytes | bytearray | memoryview, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A server (unmasked) frame: 7/16/64-bit lengths (RFC 6455 5.2)."""
    return b"".join((_frame_header(opcode, _nbytes(payload), fin, rsv1), payload))


def encode_frames(opcode: int, payloads: list[bytes]) -> bytes:
    """Several whole frames concatenated, built in one allocation (one write per flush)."""
    parts: list[bytes | bytearray | memoryview] = []
    for payload in payloads:
        parts.append(_frame_header(opcode, _nbytes(payload), True, False))
        parts.append(payload)
    return b"".join(parts)


def _valid_close_code_to_send(code: int) -> bool:
    # 1004-1006 and 1015 are reserved and never sent (RFC 6455 7.4.1); 1012-1014 are in the
    # IANA registry (service restart, try again later, bad gateway) and useful to a server.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def encode_close(code: int, reason: str = "") -> bytes:
    """A server close frame; reason truncated to fit 123 bytes on a UTF-8 boundary."""
    if not _valid_close_code_to_send(code):
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode("utf-8")
    if len(data) > MAX_CLOSE_REASON:
        cut = MAX_CLOSE_REASON
        while data[cut] & 0xC0 == 0x80:  # step back over continuation bytes
            cut -= 1
        data = data[:cut]
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


# --- validation ---


def validate_utf8(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is well-formed UTF-8 (RFC 3629: no surrogates, no overlongs)."""
    try:
        codecs.utf_8_decode(data, "strict", True)
    except UnicodeDecodeError:
        return False
    return True


def _valid_close_code_received(code: int) -> bool:
    # RFC 6455 7.4.1 and 7.4.2: codes a client may send; 0-999, 1004-1006, 1012-2999 are not.
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def _check_close_payload(payload: bytes) -> None:
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close payload of 1 byte")  # RFC 6455 5.5.1
    if len(payload) >= 2:
        if not _valid_close_code_received(int.from_bytes(payload[:2], "big")):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "invalid close code")  # RFC 6455 7.4
        if not validate_utf8(payload[2:]):
            raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8")  # RFC 6455 5.5.1


def _unmask(data: bytes | bytearray, mask: bytes, offset: int) -> bytes:
    """XOR with the 4-byte key starting at key byte ``offset`` (RFC 6455 5.3), as one big int."""
    n = len(data)
    key = mask[offset:] + mask[:offset]
    stream = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(n, "little")


# --- parsing (client frames) ---


class FrameParser:
    """Incremental parser of CLIENT frames (masked). Sans-I/O: feed bytes, get messages.

    Design: two nested state machines.
      Frame level (RFC 6455 5.2): ``_remaining == -1`` waits for a header; a header's checks run
      as soon as the bytes they need have arrived, so a bad frame fails before its payload is
      buffered. A control frame (at most 131 bytes) is consumed whole. A data frame's payload is
      streamed: each chunk is unmasked and appended as it arrives, ``_remaining`` counts down.
      Message level (RFC 6455 5.4): ``_msg_opcode`` is 0 between messages, else OP_TEXT or
      OP_BINARY while fragments are collected, OR-ed with COMPRESSED if the first frame had RSV1
      (RFC 7692 6.1); control frames may interleave and do not touch it. Text is validated per
      chunk, so an invalid prefix fails before the message ends; compressed text is not
      validated (its bytes are deflate data), nor is its inflated size limited here.
    After a ProtocolError the parser is failed for good: every later ``feed`` raises it again.
    """

    def __init__(
        self,
        max_message_size: int = 65536,
        max_fragments: int = 64,
        require_mask: bool = True,
        allow_rsv1: bool = False,
    ) -> None:
        if max_message_size < 0 or max_fragments < 0:
            raise ValueError("max_message_size and max_fragments must be >= 0")
        self.max_message_size = max_message_size  # bytes, after reassembly (compressed if so)
        self.max_fragments = max_fragments  # frames per message
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1  # permessage-deflate was negotiated (RFC 7692)
        self._buf = bytearray()  # unread input: at most one header, or a partial control frame
        self._error: ProtocolError | None = None
        self._remaining = -1
        self._frame_fin = False
        self._mask: bytes | None = None
        self._mask_pos = 0
        self._msg_opcode = 0
        self._msg_buf = bytearray()  # earlier chunks of a message that spans several
        self._msg_size = 0
        self._msg_fragments = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Return the messages and control frames completed by ``data``, in order.

        Raises ProtocolError on a violation; messages completed earlier in the same call are
        dropped with it, since the connection is closing anyway.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        self._buf += data
        out: list[tuple[int, bytes]] = []
        try:
            consumed = self._parse(self._buf, out)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        del self._buf[:consumed]
        return out

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self._buf = bytearray()
        self._msg_buf = bytearray()

    def _parse(self, buf: bytearray, out: list[tuple[int, bytes]]) -> int:
        """Decode as much of ``buf`` as possible; return how many bytes were consumed."""
        pos = 0
        while True:
            if self._remaining < 0:
                start = self._read_header(buf, pos, out)
                if start < 0:
                    return pos
                pos = start
            if self._remaining >= 0:  # a data frame's payload
                n = min(self._remaining, len(buf) - pos)
                if n == 0 and self._remaining > 0:
                    return pos
                self._read_payload(buf[pos : pos + n], out)
                pos += n

    def _read_header(self, buf: bytearray, pos: int, out: list[tuple[int, bytes]]) -> int:
        """Read one frame header at ``pos``; return where its payload starts, -1 if incomplete.

        A control frame is handled here whole; a data frame sets up the payload stream.
        """
        # Step 1: the first two bytes.
        if len(buf) - pos < 2:
            return -1
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode, masked, rsv = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b0 & 0x70
        if rsv:
            self._check_rsv(rsv, opcode)
        self._check_opcode(opcode, fin, b1 & 0x7F, masked)
        # Step 2: the extended length, checked before any payload is buffered.
        length, start = self._read_length(buf, pos, b1 & 0x7F)
        if length < 0:
            return -1
        if opcode < OP_CLOSE:
            self._check_message_size(length)
        # Step 3: the masking key, and a control frame's whole payload.
        end = start + (4 if masked else 0)
        if len(buf) < end or (opcode >= OP_CLOSE and len(buf) < end + length):
            return -1
        mask = bytes(buf[start:end]) if masked else None
        if opcode >= OP_CLOSE:
            payload = bytes(buf[end : end + length])
            self._on_control(opcode, _unmask(payload, mask, 0) if mask else payload, out)
            return end + length
        # Past _check_rsv and _check_opcode, RSV set means RSV1 on a message's first frame.
        self._start_frame(opcode | COMPRESSED if rsv else opcode, fin, length, mask)
        return end

    def _check_rsv(self, rsv: int, opcode: int) -> None:
        """Called only when some RSV bit is set: raise unless it is an allowed RSV1."""
        # RFC 6455 5.2: RSV1-3 MUST be 0 unless an extension defines them. permessage-deflate
        # defines RSV1 only, and only on the first frame of a data message (RFC 7692 6.1).
        if rsv != 0x40 or not self.allow_rsv1:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode >= OP_CLOSE:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "RSV1 on a control frame")  # RFC 7692 6.1
        if opcode == OP_CONT:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "RSV1 on a continuation frame")  # 7692 6.1

    def _check_opcode(self, opcode: int, fin: bool, length7: int, masked: bool) -> None:
        if opcode not in _KNOWN_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")  # RFC 6455 5.2
        if opcode >= OP_CLOSE and not fin:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")  # RFC 6455 5.5
        if opcode >= OP_CLOSE and length7 > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame too long")  # RFC 6455 5.5
        if self.require_mask and not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "unmasked client frame")  # RFC 6455 5.1
        if opcode == OP_CONT and not self._msg_opcode:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")  # 5.4
        if opcode in (OP_TEXT, OP_BINARY) and self._msg_opcode:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")  # 5.4

    def _read_length(self, buf: bytearray, pos: int, length7: int) -> tuple[int, int]:
        """Return (payload length, offset after the length field), or (-1, -1) if incomplete."""
        if length7 < 126:
            return length7, pos + 2
        size = 2 if length7 == 126 else 8
        if len(buf) - pos < 2 + size:
            return -1, -1
        length = int.from_bytes(buf[pos + 2 : pos + 2 + size], "big")
        if length >> 63:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length with the top bit set")  # 5.2
        return length, pos + 2 + size

    def _check_message_size(self, length: int) -> None:
        if length > self.max_message_size - self._msg_size:
            raise ProtocolError(CLOSE_TOO_BIG, "message too big")  # RFC 6455 7.4.1
        if self._msg_fragments >= self.max_fragments:
            raise ProtocolError(CLOSE_TOO_BIG, "too many fragments")

    def _on_control(self, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode == OP_CLOSE:
            _check_close_payload(payload)
        out.append((opcode, payload))

    def _start_frame(self, opcode: int, fin: bool, length: int, mask: bytes | None) -> None:
        """``opcode`` carries COMPRESSED when the message's first frame had RSV1."""
        if opcode != OP_CONT:
            self._msg_opcode = opcode
            self._utf8.reset()
        self._msg_fragments += 1
        self._msg_size += length
        self._remaining = length
        self._frame_fin = fin
        self._mask = mask
        self._mask_pos = 0

    def _read_payload(self, chunk: bytearray, out: list[tuple[int, bytes]]) -> None:
        """Unmask one chunk of a data frame's payload, validate it and collect it."""
        data = _unmask(chunk, self._mask, self._mask_pos) if self._mask else bytes(chunk)
        self._mask_pos = (self._mask_pos + len(chunk)) & 3
        self._remaining -= len(chunk)
        frame_done = self._remaining == 0
        final = frame_done and self._frame_fin
        if self._msg_opcode == OP_TEXT:  # not OP_TEXT | COMPRESSED: the caller checks it inflated
            self._check_text(data, final)
        if final and not self._msg_buf:  # a message in one chunk, the usual case: no copy
            out.append((self._msg_opcode, data))
        else:  # one growing buffer: 1-byte chunks cost 1 byte each, not a bytes object each
            self._msg_buf += data
            if final:
                out.append((self._msg_opcode, bytes(self._msg_buf)))
        if final:
            self._end_message()
        if frame_done:
            self._remaining = -1

    def _check_text(self, data: bytes, final: bool) -> None:
        # RFC 6455 8.1: fail fast on an invalid prefix (Autobahn 6.4.x), but a code point may be
        # split across frames, so incomplete tails wait for the next chunk.
        try:
            self._utf8.decode(data, final)
        except UnicodeDecodeError:
            raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
        if not final:
            # CPython waits for a third byte before rejecting ED A0..BF (a surrogate) because the
            # surrogatepass handler needs it; RFC 3629 already rules the prefix out.
            pending = self._utf8.getstate()[0]
            if len(pending) == 2 and pending[0] == 0xED and pending[1] >= 0xA0:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8")

    def _end_message(self) -> None:
        self._msg_opcode = 0
        self._msg_buf = bytearray()
        self._msg_size = 0
        self._msg_fragments = 0
