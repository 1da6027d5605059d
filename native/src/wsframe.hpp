// RFC 6455 server-side frame codec and RFC 7692 raw-deflate helpers for the native hub.
//
// Everything here is sans-I/O: bytes in, events and bytes out. It reproduces the rules of
// chorus.native.codec_pure (the reference) down to each error's close code and reason:
//   - server frames are never masked (RFC 6455 5.1), client frames must be;
//   - a frame header is checked as soon as the bytes it needs have arrived, so an oversize or
//     malformed frame fails before its payload is buffered;
//   - text is validated incrementally (fail fast, even inside fragments, RFC 6455 8.1);
//   - RSV1 is accepted only on the first frame of a data message, and only when the
//     connection negotiated permessage-deflate (RFC 7692 6.1).
//
// Parser design: two nested state machines, as in codec_pure.FrameParser.
//   Frame level (RFC 6455 5.2): `remaining == -1` waits for a header. A control frame (at most
//   2 + 4 + 125 bytes on the wire) is consumed whole; a data frame's payload is streamed: each
//   chunk is unmasked in place, validated and delivered or appended.
//   Message level (RFC 6455 5.4): `msg_opcode` is 0 between messages, else OP_TEXT or OP_BINARY
//   while fragments are collected; control frames may interleave and do not touch it.
// The state lives in a ParseState that the caller keeps only while something is incomplete
// (ParseState::idle() says when it can be dropped): an idle connection holds no parser memory.
#pragma once

#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace chorus::ws {

// Opcodes, RFC 6455 5.2.
enum Opcode : uint8_t {
    OP_CONT = 0x0,
    OP_TEXT = 0x1,
    OP_BINARY = 0x2,
    OP_CLOSE = 0x8,
    OP_PING = 0x9,
    OP_PONG = 0xA,
};

// Close codes, RFC 6455 7.4.1 (and the ones the hub itself uses).
enum CloseCode : uint16_t {
    CLOSE_NORMAL = 1000,
    CLOSE_GOING_AWAY = 1001,  // heartbeat timeout, shutdown
    CLOSE_PROTOCOL_ERROR = 1002,  // the peer broke the framing rules
    CLOSE_NO_STATUS = 1005,  // reported (never sent) for a close frame without a code, 7.1.5
    CLOSE_ABNORMAL = 1006,  // reported (never sent) when the TCP connection just went away
    CLOSE_INVALID_DATA = 1007,  // a text message or close reason that is not UTF-8
    CLOSE_POLICY = 1008,  // a ping flood
    CLOSE_TOO_BIG = 1009,  // a message over the size limit, too many fragments, a deflate bomb
    CLOSE_SLOW_CONSUMER = 4008,  // chorus.codes.CloseCode.SLOW_CONSUMER
};

constexpr size_t MAX_CONTROL_PAYLOAD = 125;  // bytes, RFC 6455 5.5
constexpr size_t MAX_CLOSE_REASON = 123;  // the control payload minus the 2-byte code, 5.5.1
constexpr size_t MAX_HEADER = 14;  // 2 + 8-byte length + 4-byte mask key

// --- UTF-8 (RFC 3629 4): a DFA over bytes, incremental across chunks ---

enum Utf8State : uint8_t {
    UTF8_ACCEPT = 0,  // between code points
    UTF8_REJECT = 1,  // an invalid byte was seen; absorbing
};

// Advance the validator over `data`; stops early once it rejects.
uint8_t utf8_run(uint8_t state, const uint8_t* data, size_t n);
inline bool utf8_valid(const uint8_t* data, size_t n) { return utf8_run(UTF8_ACCEPT, data, n) == UTF8_ACCEPT; }

// --- masking, RFC 6455 5.3 ---

// dst = src XOR key, starting at key byte `offset`; dst may equal src (in place).
void unmask(uint8_t* dst, const uint8_t* src, size_t n, const uint8_t key[4], unsigned offset);

// --- building server frames ---

// Bytes a header takes for a payload of `length` (RFC 6455 5.2: 7, 16 or 64-bit length).
inline size_t header_size(uint64_t length) { return length < 126 ? 2 : (length < 0x10000 ? 4 : 10); }

// Write an unmasked server frame header into `dst` (room for MAX_HEADER); return its size.
size_t write_header(uint8_t* dst, uint8_t opcode, uint64_t length, bool fin = true, bool rsv1 = false);

// Append one whole server frame to `out`.
void append_frame(std::string& out, uint8_t opcode, const void* payload, size_t n, bool rsv1 = false);

// 1004-1006 and 1015 are reserved and never sent (RFC 6455 7.4.1); 1012-1014 are in the IANA
// registry (service restart, try again later, bad gateway) and useful to a server.
bool valid_close_code_to_send(int code);
// RFC 6455 7.4.1 and 7.4.2: codes a client may send; 0-999, 1004-1006, 1012-2999 are not.
bool valid_close_code_received(int code);

// A server close frame; `code == 0` gives an empty payload (the reply to a code-less close).
// The reason is cut to 123 bytes on a UTF-8 boundary (RFC 6455 5.5.1).
std::string close_frame(int code, const std::string& reason = std::string());

// --- parsing client frames ---

struct ParserLimits {
    uint64_t max_message_bytes = 65536;  // after reassembly, as sent on the wire
    uint32_t max_fragments = 64;  // frames per message
    bool require_mask = true;  // RFC 6455 5.1: a server MUST close on an unmasked frame
    bool allow_rsv1 = false;  // permessage-deflate was negotiated (RFC 7692 6.1)
};

// Receives what the parser completes. A false return stops parsing (the connection closes).
class FrameSink {
public:
    virtual ~FrameSink() = default;
    // A whole data message. `compressed` is RSV1 of its first frame; its text is validated as
    // UTF-8 only when not compressed (the inflated text is the caller's to check).
    virtual bool on_message(uint8_t opcode, bool compressed, const uint8_t* data, size_t n) = 0;
    // A ping, pong or (already validated) close frame, unmasked.
    virtual bool on_control(uint8_t opcode, const uint8_t* data, size_t n) = 0;
};

// One connection's parser state; kept by the caller only while !idle().
struct ParseState {
    int64_t remaining = -1;  // payload bytes still to come; -1 while waiting for a header
    uint64_t msg_size = 0;  // declared bytes of the message so far
    uint32_t msg_fragments = 0;
    uint8_t mask[4] = {0, 0, 0, 0};
    uint8_t mask_pos = 0;  // key byte that applies to the next payload byte
    bool frame_fin = false;
    bool frame_masked = false;
    uint8_t msg_opcode = 0;  // 0 between messages, else OP_TEXT or OP_BINARY
    bool msg_compressed = false;
    uint8_t utf8 = UTF8_ACCEPT;
    std::string msg;  // the fragments of the message so far, unmasked
    std::string pending;  // unread input: at most one header, or a partial control frame

    bool idle() const { return remaining < 0 && msg_opcode == 0 && pending.empty(); }
};

struct ParseResult {
    uint16_t close_code = 0;  // non-zero: the peer broke the protocol; close with this code
    const char* reason = "";
    bool stopped = false;  // a sink callback asked to stop

    bool ok() const { return close_code == 0 && !stopped; }
};

// Parse `data` (modified: payloads are unmasked in place). Whatever stays incomplete is kept in
// `st`. After an error or a stop the state is unspecified and must be dropped.
ParseResult parse_frames(ParseState& st, const ParserLimits& limits, uint8_t* data, size_t n, FrameSink& sink);

// --- permessage-deflate, RFC 7692, no context takeover in either direction ---

// One shared raw-deflate stream; every message is compressed independently (deflateReset).
class Deflater {
public:
    Deflater(int level, int window_bits);
    ~Deflater();
    Deflater(const Deflater&) = delete;
    Deflater& operator=(const Deflater&) = delete;
    // Compress one message and strip the trailing 00 00 ff ff (RFC 7692 7.2.1).
    std::string compress(const void* data, size_t n);

private:
    z_stream zs_{};
};

// One shared raw-inflate stream; every message is inflated independently (inflateReset).
class Inflater {
public:
    enum Status { OK, TOO_BIG, CORRUPT };
    explicit Inflater(size_t limit_bytes);
    ~Inflater();
    Inflater(const Inflater&) = delete;
    Inflater& operator=(const Inflater&) = delete;
    // Inflate one message (00 00 ff ff appended, RFC 7692 7.2.2) into `out`; TOO_BIG as soon
    // as the output would exceed the limit, whatever the input still holds.
    Status inflate_message(const uint8_t* data, size_t n, std::string& out);

private:
    Status run(const uint8_t* data, size_t n, size_t& produced);

    z_stream zs_{};
    size_t limit_;
    std::string scratch_;  // limit_ + 1 bytes, shared by every connection
};

}  // namespace chorus::ws
