// RFC 6455 frame codec and RFC 7692 deflate helpers; see wsframe.hpp for the design.
#include "wsframe.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>

namespace chorus::ws {

// --- UTF-8 validation: a DFA over bytes (the shape of Hoehrmann's decoder, our own table) ---

namespace {

enum Utf8Internal : uint8_t {
    UTF8_NEED1 = 2,  // one continuation byte 80..BF to go
    UTF8_NEED2 = 3,  // two to go
    UTF8_NEED3 = 4,  // three to go
    UTF8_AFTER_E0 = 5,  // next byte A0..BF (no overlong 3-byte form)
    UTF8_AFTER_ED = 6,  // next byte 80..9F (no surrogates)
    UTF8_AFTER_F0 = 7,  // next byte 90..BF (no overlong 4-byte form)
    UTF8_AFTER_F4 = 8,  // next byte 80..8F (nothing above U+10FFFF)
    UTF8_STATES = 9,
};

struct Utf8Table {
    uint8_t next[UTF8_STATES * 256];
};

constexpr void utf8_edge(Utf8Table& t, int state, int lo, int hi, uint8_t target) {
    for (int byte = lo; byte <= hi; ++byte) t.next[state * 256 + byte] = target;
}

// RFC 3629 4, the well-formed byte sequences; every other edge goes to UTF8_REJECT.
constexpr Utf8Table build_utf8_table() {
    Utf8Table t{};
    for (auto& cell : t.next) cell = UTF8_REJECT;
    utf8_edge(t, UTF8_ACCEPT, 0x00, 0x7F, UTF8_ACCEPT);
    utf8_edge(t, UTF8_ACCEPT, 0xC2, 0xDF, UTF8_NEED1);
    utf8_edge(t, UTF8_ACCEPT, 0xE0, 0xE0, UTF8_AFTER_E0);
    utf8_edge(t, UTF8_ACCEPT, 0xE1, 0xEC, UTF8_NEED2);
    utf8_edge(t, UTF8_ACCEPT, 0xED, 0xED, UTF8_AFTER_ED);
    utf8_edge(t, UTF8_ACCEPT, 0xEE, 0xEF, UTF8_NEED2);
    utf8_edge(t, UTF8_ACCEPT, 0xF0, 0xF0, UTF8_AFTER_F0);
    utf8_edge(t, UTF8_ACCEPT, 0xF1, 0xF3, UTF8_NEED3);
    utf8_edge(t, UTF8_ACCEPT, 0xF4, 0xF4, UTF8_AFTER_F4);
    utf8_edge(t, UTF8_NEED1, 0x80, 0xBF, UTF8_ACCEPT);
    utf8_edge(t, UTF8_NEED2, 0x80, 0xBF, UTF8_NEED1);
    utf8_edge(t, UTF8_NEED3, 0x80, 0xBF, UTF8_NEED2);
    utf8_edge(t, UTF8_AFTER_E0, 0xA0, 0xBF, UTF8_NEED1);
    utf8_edge(t, UTF8_AFTER_ED, 0x80, 0x9F, UTF8_NEED1);
    utf8_edge(t, UTF8_AFTER_F0, 0x90, 0xBF, UTF8_NEED2);
    utf8_edge(t, UTF8_AFTER_F4, 0x80, 0x8F, UTF8_NEED2);
    return t;
}

constexpr Utf8Table UTF8 = build_utf8_table();
constexpr uint64_t ASCII_HIGH_BITS = 0x8080808080808080ULL;

// Index of the first non-ASCII byte at or after `i`; chat text is mostly ASCII, 8 bytes a step.
size_t skip_ascii(const uint8_t* s, size_t i, size_t n) {
    uint64_t word;
    while (i + 8 <= n) {
        std::memcpy(&word, s + i, 8);
        if (word & ASCII_HIGH_BITS) break;
        i += 8;
    }
    while (i < n && s[i] < 0x80) ++i;
    return i;
}

}  // namespace

uint8_t utf8_run(uint8_t state, const uint8_t* s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (state == UTF8_ACCEPT) {
            i = skip_ascii(s, i, n);
            if (i == n) break;
        }
        state = UTF8.next[state * 256 + s[i++]];
        if (state == UTF8_REJECT) break;
    }
    return state;
}

// --- masking, RFC 6455 5.3 ---

void unmask(uint8_t* dst, const uint8_t* src, size_t n, const uint8_t key[4], unsigned offset) {
    uint8_t key8[8];
    for (unsigned j = 0; j < 8; ++j) key8[j] = key[(offset + j) & 3];
    uint64_t k, word;
    std::memcpy(&k, key8, 8);  // memcpy keeps it alignment- and endian-neutral
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        std::memcpy(&word, src + i, 8);
        word ^= k;
        std::memcpy(dst + i, &word, 8);
    }
    for (; i < n; ++i) dst[i] = src[i] ^ key[(offset + i) & 3];
}

// --- building server frames (never masked, RFC 6455 5.1) ---

size_t write_header(uint8_t* p, uint8_t opcode, uint64_t length, bool fin, bool rsv1) {
    p[0] = static_cast<uint8_t>(opcode | (fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0));
    // RFC 6455 5.2: 7-bit length, or 126 + 16-bit, or 127 + 64-bit, all big-endian.
    if (length < 126) {
        p[1] = static_cast<uint8_t>(length);
        return 2;
    }
    if (length < 0x10000) {
        p[1] = 126;
        p[2] = static_cast<uint8_t>(length >> 8);
        p[3] = static_cast<uint8_t>(length);
        return 4;
    }
    p[1] = 127;
    for (int i = 0; i < 8; ++i) p[2 + i] = static_cast<uint8_t>(length >> (56 - 8 * i));
    return 10;
}

void append_frame(std::string& out, uint8_t opcode, const void* payload, size_t n, bool rsv1) {
    uint8_t head[MAX_HEADER];
    size_t h = write_header(head, opcode, n, true, rsv1);
    out.append(reinterpret_cast<const char*>(head), h);
    out.append(static_cast<const char*>(payload), n);
}

bool valid_close_code_to_send(int code) {
    return (1000 <= code && code <= 1003) || (1007 <= code && code <= 1014) || (3000 <= code && code <= 4999);
}

bool valid_close_code_received(int code) {
    return (1000 <= code && code <= 1003) || (1007 <= code && code <= 1011) || (3000 <= code && code <= 4999);
}

std::string close_frame(int code, const std::string& reason) {
    std::string payload;
    if (code != 0) {
        payload.push_back(static_cast<char>(code >> 8));
        payload.push_back(static_cast<char>(code & 0xFF));
        size_t cut = reason.size();
        if (cut > MAX_CLOSE_REASON) {  // RFC 6455 5.5.1: cut on a UTF-8 boundary
            cut = MAX_CLOSE_REASON;
            while (cut > 0 && (static_cast<uint8_t>(reason[cut]) & 0xC0) == 0x80) --cut;
        }
        payload.append(reason, 0, cut);
    }
    std::string out;
    append_frame(out, OP_CLOSE, payload.data(), payload.size());
    return out;
}

// --- parsing client frames ---

namespace {

constexpr long INCOMPLETE = -1;  // read_header: wait for more bytes
constexpr long FAILED = -2;  // read_header: error or stop; the result says which

const char* const UNKNOWN_OPCODE[16] = {
    "", "", "", "unknown opcode 3", "unknown opcode 4", "unknown opcode 5", "unknown opcode 6",
    "unknown opcode 7", "", "", "", "unknown opcode 11", "unknown opcode 12",
    "unknown opcode 13", "unknown opcode 14", "unknown opcode 15",
};

bool known_opcode(uint8_t op) { return op <= OP_BINARY || (OP_CLOSE <= op && op <= OP_PONG); }

// One parse_frames() call: the state machines of wsframe.hpp over one buffer.
class Run {
public:
    Run(ParseState& st, const ParserLimits& limits, FrameSink& sink) : st_(st), lim_(limits), sink_(sink) {}
    size_t parse(uint8_t* buf, size_t end);
    ParseResult result;

private:
    long read_header(uint8_t* buf, size_t pos, size_t end);
    bool check_rsv(uint8_t rsv, uint8_t opcode, bool& compressed);
    bool check_opcode(uint8_t opcode, bool fin, unsigned length7, bool masked);
    int read_length(const uint8_t* buf, size_t pos, size_t end, unsigned length7, uint64_t& length, size_t& start);
    bool check_message_size(uint64_t length);
    bool check_close_payload(const uint8_t* p, size_t n);
    bool on_control(uint8_t opcode, uint8_t* payload, size_t n, const uint8_t* mask);
    void start_frame(uint8_t opcode, bool fin, bool compressed, uint64_t length, const uint8_t* mask);
    bool read_payload(uint8_t* src, size_t n);
    bool check_text(const uint8_t* data, size_t n, bool final);
    bool take_message(const uint8_t* last, size_t n);

    bool fail(uint16_t code, const char* reason) {
        result.close_code = code;
        result.reason = reason;
        return false;
    }
    bool stop() {
        result.stopped = true;
        return false;
    }

    ParseState& st_;
    const ParserLimits& lim_;
    FrameSink& sink_;
};

// Decode as much of `buf` as possible; return how many bytes were consumed.
size_t Run::parse(uint8_t* buf, size_t end) {
    size_t pos = 0;
    for (;;) {
        if (st_.remaining < 0) {
            long start = read_header(buf, pos, end);
            if (start < 0) return pos;  // incomplete, failed or stopped
            pos = static_cast<size_t>(start);
        }
        if (st_.remaining >= 0) {  // a data frame's payload
            size_t n = std::min(static_cast<size_t>(st_.remaining), end - pos);
            if (n == 0 && st_.remaining > 0) return pos;
            if (!read_payload(buf + pos, n)) return pos + n;
            pos += n;
        }
    }
}

// Read one frame header at `pos`; return where its payload starts, INCOMPLETE or FAILED.
// A control frame is handled here whole; a data frame sets up the payload stream.
long Run::read_header(uint8_t* buf, size_t pos, size_t end) {
    // Step 1: the first two bytes.
    if (end - pos < 2) return INCOMPLETE;
    const uint8_t b0 = buf[pos], b1 = buf[pos + 1];
    const bool fin = b0 & 0x80, masked = b1 & 0x80;
    const uint8_t opcode = b0 & 0x0F;
    bool compressed = false;
    if (!check_rsv(b0 & 0x70, opcode, compressed) || !check_opcode(opcode, fin, b1 & 0x7F, masked)) return FAILED;
    // Step 2: the extended length, checked before any payload is buffered.
    uint64_t length = 0;
    size_t start = 0;
    int got = read_length(buf, pos, end, b1 & 0x7F, length, start);
    if (got <= 0) return got == 0 ? INCOMPLETE : FAILED;
    if (opcode < OP_CLOSE && !check_message_size(length)) return FAILED;
    // Step 3: the masking key, and a control frame's whole payload.
    const size_t stop = start + (masked ? 4 : 0);
    if (end < stop || (opcode >= OP_CLOSE && end - stop < length)) return INCOMPLETE;
    const uint8_t* mask = masked ? buf + start : nullptr;
    if (opcode >= OP_CLOSE) {
        if (!on_control(opcode, buf + stop, static_cast<size_t>(length), mask)) return FAILED;
        return static_cast<long>(stop + length);
    }
    start_frame(opcode, fin, compressed, length, mask);
    return static_cast<long>(stop);
}

bool Run::check_rsv(uint8_t rsv, uint8_t opcode, bool& compressed) {
    if (rsv == 0) return true;
    // RFC 6455 5.2: RSV1-3 MUST be 0 unless an extension defines them. permessage-deflate
    // defines RSV1 only, and only on the first frame of a data message (RFC 7692 6.1).
    if (rsv != 0x40 || !lim_.allow_rsv1) return fail(CLOSE_PROTOCOL_ERROR, "reserved bits set");
    if (opcode >= OP_CLOSE) return fail(CLOSE_PROTOCOL_ERROR, "RSV1 on a control frame");  // RFC 7692 6.1
    if (opcode == OP_CONT) return fail(CLOSE_PROTOCOL_ERROR, "RSV1 on a continuation frame");  // 7692 6.1
    compressed = true;
    return true;
}

bool Run::check_opcode(uint8_t opcode, bool fin, unsigned length7, bool masked) {
    if (!known_opcode(opcode)) return fail(CLOSE_PROTOCOL_ERROR, UNKNOWN_OPCODE[opcode]);  // RFC 6455 5.2
    if (opcode >= OP_CLOSE && !fin) return fail(CLOSE_PROTOCOL_ERROR, "fragmented control frame");  // 5.5
    if (opcode >= OP_CLOSE && length7 > MAX_CONTROL_PAYLOAD)
        return fail(CLOSE_PROTOCOL_ERROR, "control frame too long");  // RFC 6455 5.5
    if (lim_.require_mask && !masked) return fail(CLOSE_PROTOCOL_ERROR, "unmasked client frame");  // 5.1
    if (opcode == OP_CONT && st_.msg_opcode == 0)
        return fail(CLOSE_PROTOCOL_ERROR, "continuation without a message");  // RFC 6455 5.4
    if ((opcode == OP_TEXT || opcode == OP_BINARY) && st_.msg_opcode != 0)
        return fail(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one");  // RFC 6455 5.4
    return true;
}

// 1: `length` and `start` (offset after the length field) are set; 0: incomplete; -1: failed.
int Run::read_length(const uint8_t* buf, size_t pos, size_t end, unsigned length7, uint64_t& length,
                     size_t& start) {
    if (length7 < 126) {
        length = length7;
        start = pos + 2;
        return 1;
    }
    const size_t size = length7 == 126 ? 2 : 8;
    if (end - pos < 2 + size) return 0;
    uint64_t value = 0;
    for (size_t i = 0; i < size; ++i) value = (value << 8) | buf[pos + 2 + i];
    if (value >> 63) {
        fail(CLOSE_PROTOCOL_ERROR, "64-bit length with the top bit set");  // RFC 6455 5.2
        return -1;
    }
    length = value;
    start = pos + 2 + size;
    return 1;
}

bool Run::check_message_size(uint64_t length) {
    if (length > lim_.max_message_bytes - st_.msg_size) return fail(CLOSE_TOO_BIG, "message too big");  // 7.4.1
    if (st_.msg_fragments >= lim_.max_fragments) return fail(CLOSE_TOO_BIG, "too many fragments");
    return true;
}

bool Run::check_close_payload(const uint8_t* p, size_t n) {
    if (n == 1) return fail(CLOSE_PROTOCOL_ERROR, "close payload of 1 byte");  // RFC 6455 5.5.1
    if (n >= 2) {
        if (!valid_close_code_received((p[0] << 8) | p[1]))
            return fail(CLOSE_PROTOCOL_ERROR, "invalid close code");  // RFC 6455 7.4
        if (!utf8_valid(p + 2, n - 2)) return fail(CLOSE_INVALID_DATA, "close reason is not UTF-8");  // 5.5.1
    }
    return true;
}

bool Run::on_control(uint8_t opcode, uint8_t* payload, size_t n, const uint8_t* mask) {
    if (mask != nullptr) unmask(payload, payload, n, mask, 0);
    if (opcode == OP_CLOSE && !check_close_payload(payload, n)) return false;
    return sink_.on_control(opcode, payload, n) || stop();
}

void Run::start_frame(uint8_t opcode, bool fin, bool compressed, uint64_t length, const uint8_t* mask) {
    if (opcode != OP_CONT) {
        st_.msg_opcode = opcode;
        st_.msg_compressed = compressed;
        st_.utf8 = UTF8_ACCEPT;
    }
    st_.msg_fragments += 1;
    st_.msg_size += length;
    st_.remaining = static_cast<int64_t>(length);
    st_.frame_fin = fin;
    st_.frame_masked = mask != nullptr;
    if (mask != nullptr) std::memcpy(st_.mask, mask, 4);
    st_.mask_pos = 0;
}

// Unmask one chunk of a data frame's payload in place, validate it and collect or deliver it.
bool Run::read_payload(uint8_t* src, size_t n) {
    if (st_.frame_masked) unmask(src, src, n, st_.mask, st_.mask_pos);
    st_.mask_pos = static_cast<uint8_t>((st_.mask_pos + n) & 3);
    st_.remaining -= static_cast<int64_t>(n);
    const bool frame_done = st_.remaining == 0;
    const bool final = frame_done && st_.frame_fin;
    if (st_.msg_opcode == OP_TEXT && !st_.msg_compressed && !check_text(src, n, final)) return false;
    if (frame_done) st_.remaining = -1;
    if (final) return take_message(src, n);
    if (n) st_.msg.append(reinterpret_cast<const char*>(src), n);
    return true;
}

bool Run::check_text(const uint8_t* data, size_t n, bool final) {
    // RFC 6455 8.1: fail fast on an invalid prefix (Autobahn 6.4.x), but a code point may be
    // split across frames, so the DFA state carries over to the next chunk.
    st_.utf8 = utf8_run(st_.utf8, data, n);
    if (st_.utf8 == UTF8_REJECT || (final && st_.utf8 != UTF8_ACCEPT))
        return fail(CLOSE_INVALID_DATA, "text message is not UTF-8");
    return true;
}

// Deliver the reassembled message ending with `last`; resets the message state.
bool Run::take_message(const uint8_t* last, size_t n) {
    const uint8_t opcode = st_.msg_opcode;
    const bool compressed = st_.msg_compressed;
    st_.msg_opcode = 0;
    st_.msg_compressed = false;
    st_.msg_size = 0;
    st_.msg_fragments = 0;
    if (st_.msg.empty()) return sink_.on_message(opcode, compressed, last, n) || stop();  // no copy
    std::string whole;
    whole.swap(st_.msg);
    whole.append(reinterpret_cast<const char*>(last), n);
    return sink_.on_message(opcode, compressed, reinterpret_cast<const uint8_t*>(whole.data()), whole.size()) ||
           stop();
}

}  // namespace

ParseResult parse_frames(ParseState& st, const ParserLimits& limits, uint8_t* data, size_t n, FrameSink& sink) {
    Run run(st, limits, sink);
    if (st.pending.empty()) {
        // The usual case: parse straight from the caller's buffer and keep only the tail.
        size_t used = run.parse(data, n);
        if (run.result.ok()) st.pending.assign(reinterpret_cast<const char*>(data + used), n - used);
        return run.result;
    }
    st.pending.append(reinterpret_cast<const char*>(data), n);
    size_t used = run.parse(reinterpret_cast<uint8_t*>(&st.pending[0]), st.pending.size());
    if (run.result.ok()) {
        st.pending.erase(0, used);
        if (st.pending.capacity() > 1024) std::string(st.pending).swap(st.pending);  // a header at most
    }
    return run.result;
}

// --- permessage-deflate, RFC 7692 ---

Deflater::Deflater(int level, int window_bits) {
    // Negative window bits: a raw deflate stream, no zlib header (RFC 7692 7.2.1).
    if (deflateInit2(&zs_, level, Z_DEFLATED, -window_bits, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        throw std::invalid_argument("deflateInit2 failed (deflate_level or deflate_window_bits out of range)");
}

Deflater::~Deflater() { deflateEnd(&zs_); }

std::string Deflater::compress(const void* data, size_t n) {
    // server_no_context_takeover (RFC 7692 7.1.1.1): every message is its own stream, so the
    // same compressed bytes serve every viewer.
    deflateReset(&zs_);
    std::string out(deflateBound(&zs_, static_cast<uLong>(n)) + 16, '\0');
    zs_.next_in = static_cast<Bytef*>(const_cast<void*>(data));
    zs_.avail_in = static_cast<uInt>(n);
    size_t produced = 0;
    for (;;) {
        zs_.next_out = reinterpret_cast<Bytef*>(&out[produced]);
        zs_.avail_out = static_cast<uInt>(out.size() - produced);
        int rc = deflate(&zs_, Z_SYNC_FLUSH);
        produced = out.size() - zs_.avail_out;
        if (rc != Z_OK && rc != Z_BUF_ERROR) throw std::runtime_error("deflate failed");
        if (zs_.avail_in == 0 && zs_.avail_out != 0) break;  // all input in, flush complete
        out.resize(out.size() * 2);
    }
    // RFC 7692 7.2.1: remove the 00 00 ff ff the sync flush ended with.
    static const char tail[4] = {'\x00', '\x00', '\xff', '\xff'};
    if (produced >= 4 && std::memcmp(&out[produced - 4], tail, 4) == 0) produced -= 4;
    out.resize(produced);
    return out;
}

Inflater::Inflater(size_t limit_bytes) : limit_(limit_bytes), scratch_(limit_bytes + 1, '\0') {
    // 15 accepts any client_max_window_bits the client used (RFC 7692 7.1.2.2).
    if (inflateInit2(&zs_, -15) != Z_OK) throw std::runtime_error("inflateInit2 failed");
}

Inflater::~Inflater() { inflateEnd(&zs_); }

Inflater::Status Inflater::inflate_message(const uint8_t* data, size_t n, std::string& out) {
    static const uint8_t tail[4] = {0x00, 0x00, 0xFF, 0xFF};  // RFC 7692 7.2.2
    size_t produced = 0;
    Status status = run(data, n, produced);
    if (status == OK) status = run(tail, sizeof(tail), produced);
    inflateReset(&zs_);  // client_no_context_takeover: the next message starts fresh
    if (status == OK) out.assign(scratch_.data(), produced);
    return status;
}

// Inflate into the scratch after `produced` bytes; the scratch holds limit + 1 bytes, so a bomb
// stops after one byte past the limit whatever its ratio.
Inflater::Status Inflater::run(const uint8_t* data, size_t n, size_t& produced) {
    zs_.next_in = const_cast<Bytef*>(data);
    zs_.avail_in = static_cast<uInt>(n);
    while (zs_.avail_in > 0) {
        zs_.next_out = reinterpret_cast<Bytef*>(&scratch_[produced]);
        zs_.avail_out = static_cast<uInt>(scratch_.size() - produced);
        int rc = inflate(&zs_, Z_SYNC_FLUSH);
        produced = scratch_.size() - zs_.avail_out;
        if (produced > limit_) return TOO_BIG;
        if (rc == Z_STREAM_END) return OK;  // a final block (BFINAL): the message is complete
        if (rc != Z_OK) return CORRUPT;  // Z_DATA_ERROR, Z_NEED_DICT, Z_BUF_ERROR with input left
    }
    return OK;
}

}  // namespace chorus::ws
