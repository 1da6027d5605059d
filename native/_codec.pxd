# Declarations for _codec.pyx: the parser's fields and the C-level helpers' signatures.

from libc.stdint cimport uint8_t


cdef enum Opcode:  # RFC 6455 5.2
    OPCODE_CONT = 0x0
    OPCODE_TEXT = 0x1
    OPCODE_BINARY = 0x2
    OPCODE_CLOSE = 0x8
    OPCODE_PING = 0x9
    OPCODE_PONG = 0xA


cdef enum:
    MSG_COMPRESSED = 0x100  # OR-ed into a message's opcode when it had RSV1 (RFC 7692 6)


cdef enum Utf8State:  # the validator's DFA; see _build_utf8_table() for the transitions
    UTF8_ACCEPT = 0  # between code points
    UTF8_REJECT = 1  # an invalid byte was seen; absorbing
    UTF8_NEED1 = 2  # one continuation byte 80..BF to go
    UTF8_NEED2 = 3  # two to go
    UTF8_NEED3 = 4  # three to go
    UTF8_AFTER_E0 = 5  # next byte A0..BF (no overlong 3-byte form)
    UTF8_AFTER_ED = 6  # next byte 80..9F (no surrogates)
    UTF8_AFTER_F0 = 7  # next byte 90..BF (no overlong 4-byte form)
    UTF8_AFTER_F4 = 8  # next byte 80..8F (nothing above U+10FFFF)
    UTF8_STATES = 9


cdef int utf8_run(int state, const uint8_t* data, Py_ssize_t n) noexcept nogil
cdef void unmask_into(
    uint8_t* dst, const uint8_t* src, Py_ssize_t n, const uint8_t* mask, int offset
) noexcept nogil


cdef class FrameParser:
    cdef readonly Py_ssize_t max_message_size  # bytes, after reassembly (compressed if so)
    cdef readonly Py_ssize_t max_fragments  # frames per message
    cdef readonly bint require_mask
    cdef readonly bint allow_rsv1  # permessage-deflate was negotiated (RFC 7692)
    cdef bytearray _buf  # unread input: at most one header, or a partial control frame
    cdef object _error  # the ProtocolError that failed the parser, or None
    # The frame being read (RFC 6455 5.2).
    cdef Py_ssize_t _remaining  # payload bytes still to come; -1 while waiting for a header
    cdef bint _frame_fin
    cdef bint _frame_masked
    cdef uint8_t _mask[4]
    cdef int _mask_pos  # key byte that applies to the next payload byte
    # The message being reassembled (RFC 6455 5.4).
    cdef int _msg_opcode  # 0 between messages, else OPCODE_TEXT or OPCODE_BINARY [| MSG_COMPRESSED]
    cdef bytearray _msg_buf  # earlier chunks of a message that spans several
    cdef Py_ssize_t _msg_size  # declared bytes so far
    cdef Py_ssize_t _msg_fragments
    cdef int _utf8_state

    cdef int _feed_view(self, const uint8_t* data, Py_ssize_t n, list out) except -1
    cdef int _fail(self, object exc) except -1
    cdef Py_ssize_t _parse(self, const uint8_t* buf, Py_ssize_t end, list out) except -1
    cdef Py_ssize_t _read_header(
        self, const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, list out
    ) except -2
    cdef int _check_rsv(self, int rsv, int opcode) except -1
    cdef int _check_opcode(self, int opcode, bint fin, int length7, bint masked) except -1
    cdef int _check_message_size(self, Py_ssize_t length) except -1
    cdef int _on_control(
        self, int opcode, const uint8_t* src, Py_ssize_t n, const uint8_t* mask, list out
    ) except -1
    cdef void _start_frame(
        self, int opcode, bint fin, Py_ssize_t length, const uint8_t* mask
    ) noexcept
    cdef int _read_payload(self, const uint8_t* src, Py_ssize_t n, list out) except -1
    cdef int _check_text(self, const uint8_t* data, Py_ssize_t n, bint final) except -1
    cdef int _end_message(self) except -1
