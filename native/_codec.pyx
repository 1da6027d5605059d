"""RFC 6455 frame codec in Cython: the accelerated twin of ``chorus.native.codec_pure``.

Same API and the same behaviour, down to each error's close code and reason; codec_pure.py is
the reference and carries the design notes. Import it through ``chorus.native``. What is native
here: unmasking 8 bytes at a time; UTF-8 validation that checks whole sequences (skipping ASCII
8 bytes at a time) and hands chunk edges and errors to a DFA, whose state carries a code point
split across fragments; frames built in one allocation. Field declarations are in _codec.pxd.
permessage-deflate (RFC 7692) is framing only, as in codec_pure: ``allow_rsv1`` and ``COMPRESSED``.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromObject, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

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

OP_CONT = OPCODE_CONT
OP_TEXT = OPCODE_TEXT
OP_BINARY = OPCODE_BINARY
OP_CLOSE = OPCODE_CLOSE
OP_PING = OPCODE_PING
OP_PONG = OPCODE_PONG

# OR-ed into the opcode of a message that arrived with RSV1 set (permessage-deflate, RFC 7692 6).
COMPRESSED = MSG_COMPRESSED

# Close codes the parser fails with, RFC 6455 7.4.1.
CLOSE_PROTOCOL_ERROR = 1002  # the peer broke the framing rules
CLOSE_INVALID_DATA = 1007  # a text message or close reason that is not UTF-8
CLOSE_TOO_BIG = 1009  # a message over max_message_size or max_fragments

cdef enum:
    MAX_CONTROL_PAYLOAD = 125  # bytes, RFC 6455 5.5
    MAX_CLOSE_REASON = 123  # bytes: the control payload minus the 2-byte code, RFC 6455 5.5.1

cdef uint64_t ASCII_HIGH_BITS = 0x8080808080808080ULL


class ProtocolError(Exception):
    """The client broke RFC 6455; send a close frame with ``close_code`` and drop the peer."""

    def __init__(self, close_code, reason):
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self):
        return f"{self.close_code} {self.reason}"


# Cython stamps the name it compiled under (native._codec, so it finds _codec.pxd without
# package-dir); logs and tracebacks should show the installed name.
ProtocolError.__module__ = __name__


# --- UTF-8 validation: a DFA over bytes (the shape of Hoehrmann's decoder, our own table) ---

cdef uint8_t UTF8_NEXT[UTF8_STATES * 256]


cdef void _utf8_edge(int state, int lo, int hi, int target) noexcept:
    cdef int byte
    for byte in range(lo, hi + 1):
        UTF8_NEXT[state * 256 + byte] = target


cdef void _build_utf8_table() noexcept:
    # RFC 3629 4, the well-formed byte sequences; every other edge goes to UTF8_REJECT.
    memset(UTF8_NEXT, UTF8_REJECT, sizeof(UTF8_NEXT))
    _utf8_edge(UTF8_ACCEPT, 0x00, 0x7F, UTF8_ACCEPT)
    _utf8_edge(UTF8_ACCEPT, 0xC2, 0xDF, UTF8_NEED1)
    _utf8_edge(UTF8_ACCEPT, 0xE0, 0xE0, UTF8_AFTER_E0)
    _utf8_edge(UTF8_ACCEPT, 0xE1, 0xEC, UTF8_NEED2)
    _utf8_edge(UTF8_ACCEPT, 0xED, 0xED, UTF8_AFTER_ED)
    _utf8_edge(UTF8_ACCEPT, 0xEE, 0xEF, UTF8_NEED2)
    _utf8_edge(UTF8_ACCEPT, 0xF0, 0xF0, UTF8_AFTER_F0)
    _utf8_edge(UTF8_ACCEPT, 0xF1, 0xF3, UTF8_NEED3)
    _utf8_edge(UTF8_ACCEPT, 0xF4, 0xF4, UTF8_AFTER_F4)
    _utf8_edge(UTF8_NEED1, 0x80, 0xBF, UTF8_ACCEPT)
    _utf8_edge(UTF8_NEED2, 0x80, 0xBF, UTF8_NEED1)
    _utf8_edge(UTF8_NEED3, 0x80, 0xBF, UTF8_NEED2)
    _utf8_edge(UTF8_AFTER_E0, 0xA0, 0xBF, UTF8_NEED1)
    _utf8_edge(UTF8_AFTER_ED, 0x80, 0x9F, UTF8_NEED1)
    _utf8_edge(UTF8_AFTER_F0, 0x90, 0xBF, UTF8_NEED2)
    _utf8_edge(UTF8_AFTER_F4, 0x80, 0x8F, UTF8_NEED2)


_build_utf8_table()


cdef inline bint _is_cont(uint8_t byte) noexcept nogil:
    return byte & 0xC0 == 0x80


cdef Py_ssize_t _whole_sequences(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Length of the longest prefix of ``s`` made of whole, well-formed sequences (RFC 3629 4).

    Checking a sequence at a time is about twice as fast as the DFA on mixed text (no table
    lookup chain); it stops at the first invalid or incomplete sequence for the DFA to judge.
    """
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef uint8_t c, lo, hi
    while i < n:
        if i + 8 <= n:  # chat text is mostly ASCII: skip 8-byte words with no high bit
            memcpy(&word, s + i, 8)
            if not word & ASCII_HIGH_BITS:
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif 0xC2 <= c <= 0xDF:
            if i + 1 >= n or not _is_cont(s[i + 1]):
                break
            i += 2
        elif 0xE0 <= c <= 0xEF:
            lo = 0xA0 if c == 0xE0 else 0x80  # no overlong 3-byte forms
            hi = 0x9F if c == 0xED else 0xBF  # no surrogates
            if i + 2 >= n or not lo <= s[i + 1] <= hi or not _is_cont(s[i + 2]):
                break
            i += 3
        elif 0xF0 <= c <= 0xF4:
            lo = 0x90 if c == 0xF0 else 0x80  # no overlong 4-byte forms
            hi = 0x8F if c == 0xF4 else 0xBF  # nothing above U+10FFFF
            if (i + 3 >= n or not lo <= s[i + 1] <= hi or not _is_cont(s[i + 2])
                    or not _is_cont(s[i + 3])):
                break
            i += 4
        else:
            break
    return i


cdef int utf8_run(int state, const uint8_t* data, Py_ssize_t n) noexcept nogil:
    """Advance the DFA over ``data``; stops early at UTF8_REJECT, which is absorbing."""
    cdef Py_ssize_t i = 0
    # Finish a code point the previous chunk left open.
    while i < n and state != UTF8_ACCEPT and state != UTF8_REJECT:
        state = UTF8_NEXT[state * 256 + data[i]]
        i += 1
    if state == UTF8_ACCEPT:
        i += _whole_sequences(data + i, n - i)
    # What is left starts with an invalid or an unfinished sequence: the DFA says which.
    while i < n and state != UTF8_REJECT:
        state = UTF8_NEXT[state * 256 + data[i]]
        i += 1
    return state


def validate_utf8(data):
    """True if ``data`` is well-formed UTF-8 (RFC 3629: no surrogates, no overlongs)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return utf8_run(UTF8_ACCEPT, <const uint8_t*>view.buf, view.len) == UTF8_ACCEPT
    finally:
        PyBuffer_Release(&view)


# --- masking, RFC 6455 5.3 ---

cdef void unmask_into(
    uint8_t* dst, const uint8_t* src, Py_ssize_t n, const uint8_t* mask, int offset
) noexcept nogil:
    """dst = src XOR the key, starting at key byte ``offset``; 8 bytes per step."""
    cdef uint8_t key8[8]
    cdef uint64_t key, word
    cdef Py_ssize_t i = 0
    cdef int j
    for j in range(8):
        key8[j] = mask[(offset + j) & 3]
    memcpy(&key, key8, 8)  # memcpy keeps it alignment- and endian-neutral
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= key
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ mask[(offset + i) & 3]
        i += 1


# --- encoding (server frames, never masked: RFC 6455 5.1) ---

cdef inline bint _known_opcode(int opcode) noexcept:
    return 0 <= opcode <= OPCODE_BINARY or OPCODE_CLOSE <= opcode <= OPCODE_PONG


cdef int _check_frame(int opcode, bint fin, Py_ssize_t length) except -1:
    if not _known_opcode(opcode):
        raise ValueError(f"unknown opcode {opcode}")
    if opcode >= OPCODE_CLOSE and (not fin or length > MAX_CONTROL_PAYLOAD):
        raise ValueError("a control frame must be final and at most 125 bytes")  # RFC 6455 5.5
    return 0


cdef inline Py_ssize_t _header_size(Py_ssize_t length) noexcept:
    return 2 if length < 126 else (4 if length < 0x10000 else 10)


cdef uint8_t* _write_header(uint8_t* p, int b0, Py_ssize_t length) noexcept:
    """Write a server frame header; return where the payload goes (RFC 6455 5.2)."""
    cdef int i
    p[0] = b0
    if length < 126:
        p[1] = length
        return p + 2
    if length < 0x10000:
        p[1] = 126
        p[2] = (length >> 8) & 0xFF
        p[3] = length & 0xFF
        return p + 4
    p[1] = 127
    for i in range(8):
        p[2 + i] = (<uint64_t>length >> (56 - 8 * i)) & 0xFF
    return p + 10


def encode_frame(int opcode, payload, bint fin=True, bint rsv1=False):
    """A server (unmasked) frame: 7/16/64-bit lengths (RFC 6455 5.2)."""
    cdef Py_buffer view
    cdef bytes frame
    cdef uint8_t* p
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        _check_frame(opcode, fin, view.len)
        frame = PyBytes_FromStringAndSize(NULL, _header_size(view.len) + view.len)
        p = <uint8_t*>PyBytes_AS_STRING(frame)
        p = _write_header(p, opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0), view.len)
        memcpy(p, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return frame


def encode_frames(int opcode, payloads):
    """Several whole frames concatenated, built in one allocation (one write per flush)."""
    cdef list items = [x if type(x) is bytes else PyBytes_FromObject(x) for x in payloads]
    cdef Py_ssize_t total = 0, n
    cdef bytes item, out
    cdef uint8_t* p
    for item in items:
        n = PyBytes_GET_SIZE(item)
        _check_frame(opcode, True, n)
        total += _header_size(n) + n
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <uint8_t*>PyBytes_AS_STRING(out)
    for item in items:
        n = PyBytes_GET_SIZE(item)
        p = _write_header(p, opcode | 0x80, n)
        memcpy(p, PyBytes_AS_STRING(item), n)
        p += n
    return out


cdef inline bint _valid_close_code_to_send(int code) noexcept:
    # 1004-1006 and 1015 are reserved and never sent (RFC 6455 7.4.1); 1012-1014 are in the
    # IANA registry (service restart, try again later, bad gateway) and useful to a server.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def encode_close(int code, str reason=""):
    """A server close frame; reason truncated to fit 123 bytes on a UTF-8 boundary."""
    cdef bytes data
    cdef Py_ssize_t cut
    if not _valid_close_code_to_send(code):
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode("utf-8")
    if len(data) > MAX_CLOSE_REASON:
        cut = MAX_CLOSE_REASON
        while data[cut] & 0xC0 == 0x80:  # step back over continuation bytes
            cut -= 1
        data = data[:cut]
    return encode_frame(OPCODE_CLOSE, bytes((code >> 8, code & 0xFF)) + data)


# --- parsing (client frames) ---

cdef inline bint _valid_close_code_received(int code) noexcept:
    # RFC 6455 7.4.1 and 7.4.2: codes a client may send; 0-999, 1004-1006, 1012-2999 are not.
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


cdef int _check_close_payload(const uint8_t* p, Py_ssize_t n) except -1:
    if n == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close payload of 1 byte")  # RFC 6455 5.5.1
    if n >= 2:
        if not _valid_close_code_received((p[0] << 8) | p[1]):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "invalid close code")  # RFC 6455 7.4
        if utf8_run(UTF8_ACCEPT, p + 2, n - 2) != UTF8_ACCEPT:
            raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8")  # RFC 6455 5.5.1
    return 0


cdef Py_ssize_t _read_length(
    const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, int length7, Py_ssize_t* length
) except -2:
    """Store the payload length; return the offset after the length field, -1 if incomplete."""
    cdef int size, i
    cdef uint64_t value = 0
    if length7 < 126:
        length[0] = length7
        return pos + 2
    size = 2 if length7 == 126 else 8
    if end - pos < 2 + size:
        return -1
    for i in range(size):
        value = (value << 8) | buf[pos + 2 + i]
    if value >> 63:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length with the top bit set")  # 5.2
    length[0] = <Py_ssize_t>value
    return pos + 2 + size


@cython.auto_pickle(False)  # a parser is bound to one connection's byte stream
cdef class FrameParser:
    """Incremental parser of CLIENT frames (masked). Sans-I/O: feed bytes, get messages.

    The state machines are described in codec_pure.FrameParser. After a ProtocolError the
    parser is failed for good: every later ``feed`` raises it again.
    """

    def __init__(
        self, Py_ssize_t max_message_size=65536, Py_ssize_t max_fragments=64,
        bint require_mask=True, bint allow_rsv1=False,
    ):
        self.max_message_size = max_message_size
        self.max_fragments = max_fragments
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1
        self._buf = bytearray()
        self._error = None
        self._remaining = -1
        self._msg_opcode = 0
        self._msg_buf = bytearray()
        self._msg_size = 0
        self._msg_fragments = 0
        self._utf8_state = UTF8_ACCEPT

    def feed(self, data):
        """Return the messages and control frames completed by ``data``, in order.

        Raises ProtocolError on a violation; messages completed earlier in the same call are
        dropped with it, since the connection is closing anyway.
        """
        cdef Py_buffer view
        cdef list out = []
        if self._error is not None:
            raise self._error.with_traceback(None)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed_view(<const uint8_t*>view.buf, view.len, out)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        finally:
            PyBuffer_Release(&view)
        return out

    cdef int _feed_view(self, const uint8_t* data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t held = PyByteArray_GET_SIZE(self._buf)
        cdef Py_ssize_t consumed
        if held == 0:
            # The usual case: parse straight from the caller's buffer and keep only the tail.
            consumed = self._parse(data, n, out)
            PyByteArray_Resize(self._buf, n - consumed)
            memcpy(PyByteArray_AS_STRING(self._buf), data + consumed, n - consumed)
            return 0
        PyByteArray_Resize(self._buf, held + n)
        memcpy(PyByteArray_AS_STRING(self._buf) + held, data, n)
        consumed = self._parse(<const uint8_t*>PyByteArray_AS_STRING(self._buf), held + n, out)
        del self._buf[:consumed]
        return 0

    cdef int _fail(self, object exc) except -1:
        self._error = exc
        self._buf = bytearray()
        self._msg_buf = bytearray()
        return 0

    cdef Py_ssize_t _parse(self, const uint8_t* buf, Py_ssize_t end, list out) except -1:
        """Decode as much of ``buf`` as possible; return how many bytes were consumed."""
        cdef Py_ssize_t pos = 0, start, n
        while True:
            if self._remaining < 0:
                start = self._read_header(buf, pos, end, out)
                if start < 0:
                    return pos
                pos = start
            if self._remaining >= 0:  # a data frame's payload
                n = min(self._remaining, end - pos)
                if n == 0 and self._remaining > 0:
                    return pos
                self._read_payload(buf + pos, n, out)
                pos += n

    cdef Py_ssize_t _read_header(
        self, const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, list out
    ) except -2:
        """Read one frame header at ``pos``; return where its payload starts, -1 if incomplete."""
        cdef int b0, b1, opcode, rsv
        cdef bint fin, masked
        cdef Py_ssize_t length = 0, start, stop
        # Step 1: the first two bytes.
        if end - pos < 2:
            return -1
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode, masked, rsv = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b0 & 0x70
        if rsv:
            self._check_rsv(rsv, opcode)
        self._check_opcode(opcode, fin, b1 & 0x7F, masked)
        # Step 2: the extended length, checked before any payload is buffered.
        start = _read_length(buf, pos, end, b1 & 0x7F, &length)
        if start < 0:
            return -1
        if opcode < OPCODE_CLOSE:
            self._check_message_size(length)
        # Step 3: the masking key, and a control frame's whole payload.
        stop = start + (4 if masked else 0)
        if end < stop or (opcode >= OPCODE_CLOSE and end < stop + length):
            return -1
        if opcode >= OPCODE_CLOSE:
            self._on_control(opcode, buf + stop, length, buf + start if masked else NULL, out)
            return stop + length
        # Past _check_rsv and _check_opcode, RSV set means RSV1 on a message's first frame.
        self._start_frame(
            opcode | MSG_COMPRESSED if rsv else opcode, fin, length, buf + start if masked else NULL
        )
        return stop

    cdef int _check_rsv(self, int rsv, int opcode) except -1:
        """Called only when some RSV bit is set: raise unless it is an allowed RSV1."""
        # RFC 6455 5.2: RSV1-3 MUST be 0 unless an extension defines them. permessage-deflate
        # defines RSV1 only, and only on the first frame of a data message (RFC 7692 6.1).
        if rsv != 0x40 or not self.allow_rsv1:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode >= OPCODE_CLOSE:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "RSV1 on a control frame")  # RFC 7692 6.1
        if opcode == OPCODE_CONT:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "RSV1 on a continuation frame")  # 7692 6.1
        return 0

    cdef int _check_opcode(self, int opcode, bint fin, int length7, bint masked) except -1:
        if not _known_opcode(opcode):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")  # RFC 6455 5.2
        if opcode >= OPCODE_CLOSE and not fin:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")  # RFC 6455 5.5
        if opcode >= OPCODE_CLOSE and length7 > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame too long")  # RFC 6455 5.5
        if self.require_mask and not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "unmasked client frame")  # RFC 6455 5.1
        if opcode == OPCODE_CONT and not self._msg_opcode:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")  # 5.4
        if (opcode == OPCODE_TEXT or opcode == OPCODE_BINARY) and self._msg_opcode:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")  # 5.4
        return 0

    cdef int _check_message_size(self, Py_ssize_t length) except -1:
        if length > self.max_message_size - self._msg_size:
            raise ProtocolError(CLOSE_TOO_BIG, "message too big")  # RFC 6455 7.4.1
        if self._msg_fragments >= self.max_fragments:
            raise ProtocolError(CLOSE_TOO_BIG, "too many fragments")
        return 0

    cdef int _on_control(
        self, int opcode, const uint8_t* src, Py_ssize_t n, const uint8_t* mask, list out
    ) except -1:
        cdef bytes payload = PyBytes_FromStringAndSize(NULL, n)
        cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(payload)
        if mask != NULL:
            unmask_into(dst, src, n, mask, 0)
        else:
            memcpy(dst, src, n)
        if opcode == OPCODE_CLOSE:
            _check_close_payload(dst, n)
        out.append((opcode, payload))
        return 0

    cdef void _start_frame(
        self, int opcode, bint fin, Py_ssize_t length, const uint8_t* mask
    ) noexcept:
        """``opcode`` carries MSG_COMPRESSED when the message's first frame had RSV1."""
        if opcode != OPCODE_CONT:
            self._msg_opcode = opcode
            self._utf8_state = UTF8_ACCEPT
        self._msg_fragments += 1
        self._msg_size += length
        self._remaining = length
        self._frame_fin = fin
        self._frame_masked = mask != NULL
        if mask != NULL:
            memcpy(self._mask, mask, 4)
        self._mask_pos = 0

    cdef int _read_payload(self, const uint8_t* src, Py_ssize_t n, list out) except -1:
        """Unmask one chunk of a data frame's payload, validate it and collect it."""
        cdef bint frame_done = n == self._remaining
        cdef bint final = frame_done and self._frame_fin
        cdef Py_ssize_t held = PyByteArray_GET_SIZE(self._msg_buf)
        cdef bytes whole = None
        cdef uint8_t* dst
        if final and held == 0:  # a message in one chunk, the usual case: unmask into the result
            whole = PyBytes_FromStringAndSize(NULL, n)
            dst = <uint8_t*>PyBytes_AS_STRING(whole)
        else:  # one growing buffer: 1-byte chunks cost 1 byte each, not a bytes object each
            PyByteArray_Resize(self._msg_buf, held + n)
            dst = <uint8_t*>PyByteArray_AS_STRING(self._msg_buf) + held
        if self._frame_masked:
            unmask_into(dst, src, n, self._mask, self._mask_pos)
        else:
            memcpy(dst, src, n)
        self._mask_pos = (self._mask_pos + n) & 3
        self._remaining -= n
        if self._msg_opcode == OPCODE_TEXT:  # not compressed text: the caller checks it inflated
            self._check_text(dst, n, final)
        if final:
            out.append((self._msg_opcode, whole if whole is not None else bytes(self._msg_buf)))
            self._end_message()
        if frame_done:
            self._remaining = -1
        return 0

    cdef int _check_text(self, const uint8_t* data, Py_ssize_t n, bint final) except -1:
        # RFC 6455 8.1: fail fast on an invalid prefix (Autobahn 6.4.x), but a code point may be
        # split across frames, so the DFA state carries over to the next chunk.
        self._utf8_state = utf8_run(self._utf8_state, data, n)
        if self._utf8_state == UTF8_REJECT or (final and self._utf8_state != UTF8_ACCEPT):
            raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8")
        return 0

    cdef int _end_message(self) except -1:
        self._msg_opcode = 0
        if PyByteArray_GET_SIZE(self._msg_buf):
            self._msg_buf = bytearray()  # drop a large message's buffer, not just its length
        self._msg_size = 0
        self._msg_fragments = 0
        return 0
