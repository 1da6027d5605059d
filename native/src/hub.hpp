// The native hub: owns viewer sockets after the HTTP upgrade and fans comment batches out to
// them. The contract is native/HUB.md; hub_pure.py is its Python twin. No Python types here.
//
// Event loop: one epoll set holds every viewer socket and one timerfd. It is LEVEL-triggered,
// on purpose: poll() does a bounded amount of work per call (one read of at most 64 KiB per
// ready socket, at most MAX_EVENTS sockets), and whatever is left stays ready, which keeps the
// hub's epoll fd readable so the Python loop calls poll() again. Edge-triggered mode would
// force reading every socket until EAGAIN in one call, letting one flooding client starve the
// rest, or else bookkeeping of "ready but not drained" sockets. EPOLLOUT is armed only while a
// socket has a backlog, so level-triggering costs nothing for idle writers.
//
// Connection states (Conn::state):
//   FREE ---adopt---> OPEN ---close / protocol error / peer close / timeout---> CLOSING
//   CLOSING: left its stream, CLOSED event queued, close frame queued; after the backlog
//            drains: shutdown(SHUT_WR); the fd is closed on the peer's EOF or CLOSE_LINGER_MS.
//   OPEN ---EOF / reset / write error---> FREE (CLOSED 1006 reported, fd closed at once).
//
// Memory: Conn is a fixed slot in an fd-indexed vector; its three pointers (partial read,
// backlog, tag) are null while the connection is idle. A stream holds its viewers' fds in a
// vector (4 bytes each) and each slot knows its index there (swap-remove).
//
// Writes: a flush builds ONE buffer per variant (shared_ptr, never copied per viewer) and
// writes it to every viewer with one sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT); what the kernel did
// not take stays queued as (buffer, offset) slices.
#pragma once

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <queue>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "wsframe.hpp"

namespace chorus {

struct HubConfig {
    int64_t flush_interval_ms = 10;
    uint32_t flush_max_messages = 100;
    uint64_t backlog_limit_bytes = 65536;
    int64_t slow_close_after_ms = 10000;
    uint64_t max_message_bytes = 65536;
    uint32_t max_fragments = 64;
    uint32_t max_pings_per_s = 20;  // more in one sweep second closes with 1008; 0: no limit
    int64_t heartbeat_interval_ms = 60000;  // 0 disables heartbeats
    int64_t heartbeat_timeout_ms = 30000;
    int deflate_level = 6;
    int deflate_window_bits = 15;  // 9..15: the largest window the hub compresses with
    uint64_t inflate_limit_bytes = 65536;
};

// Variant bits (HUB.md "Identifiers").
enum : uint8_t { JSON = 0, MSGPACK = 1, DEFLATE = 2 };
// Inbound event kinds.
enum : uint8_t { MESSAGE_TEXT = 1, MESSAGE_BINARY = 2, CLOSED = 3 };

struct InboundEvent {
    uint8_t kind;
    uint64_t conn;  // (generation << 32) | fd
    uint32_t stream;
    std::string data;  // the message, or the 2-byte big-endian close code
    std::string tag;
};

// One publish(): the event in both encodings (either may be absent) and what it is.
struct OutboundEvent {
    std::string payload[2];  // [JSON text, msgpack]
    uint8_t present = 0;  // bit 0: JSON payload given, bit 1: msgpack payload given
    bool control = false;  // never skipped for slow viewers
    uint32_t count = 0;  // comments carried by a batch
};

struct HubStats {
    uint64_t flushes = 0;  // streams flushed (with at least one event)
    uint64_t writes = 0;  // first-attempt sendmsg calls (flush deliveries, pongs, pings, closes, send())
    uint64_t drain_writes = 0;  // sendmsg calls that drained a backlog on EPOLLOUT
    uint64_t bytes_out = 0;
    uint64_t frames_built = 0;  // shared buffers built: one per variant (and kind) per flush
    uint64_t deflate_calls = 0;  // messages compressed
    uint64_t skipped = 0;  // comments not sent to slow viewers
    uint64_t slow_closed = 0;  // closed with 4008
    uint64_t pings_sent = 0;
    uint64_t timeouts = 0;  // closed by the heartbeat
    uint64_t protocol_errors = 0;  // closed with 1002 / 1007 / 1009
    uint64_t partial_writes = 0;  // first attempts the kernel did not take whole
    uint64_t bytes_in = 0;
    uint64_t messages_in = 0;  // text and binary messages queued for drain()
    uint64_t inflate_calls = 0;
    uint64_t messages_out = 0;  // events handed to viewers: one per viewer per event (and per send())
    uint64_t comments_out = 0;  // comments in the batches handed to viewers (one per viewer per comment)
};

class Hub {
public:
    explicit Hub(const HubConfig& config);
    ~Hub();
    Hub(const Hub&) = delete;
    Hub& operator=(const Hub&) = delete;

    int fileno() const { return epfd_; }
    // Own `fd`; returns the connection id. Throws std::invalid_argument for bad arguments
    // (fd untouched) and std::system_error if the fd cannot be set up (then it is closed).
    uint64_t adopt(int fd, uint32_t stream, uint8_t variant, std::string leftover, std::string tag);
    // Whether `present` (OutboundEvent::present) covers every encoding the stream's viewers use.
    bool payloads_cover(uint32_t stream, uint8_t present) const;
    void publish(uint32_t stream, OutboundEvent&& event);
    uint32_t variants(uint32_t stream) const;
    // `binary`: -1 frames in the viewer's variant, 0 forces a text frame, 1 a binary one.
    bool send(uint64_t conn, const std::string& payload, int binary = -1);
    void close(uint64_t conn, int code, const std::string& reason);
    void close_all(int code, const std::string& reason);
    void poll();
    void flush_all();
    std::vector<InboundEvent> drain();
    size_t viewer_count(uint32_t stream) const;
    size_t pending(uint32_t stream) const;  // events of the stream waiting for its next flush
    int64_t backlog(uint64_t conn) const;  // unsent bytes of an open connection; -1: unknown, stale, closing
    size_t connections() const { return open_; }
    std::vector<std::pair<const char*, uint64_t>> stats() const;
    void shutdown();  // close every socket now (CLOSED 1006 for open ones) and the epoll fd

    static constexpr int64_t CLOSE_LINGER_MS = 2000;  // HUB.md "Close"
    static constexpr int64_t SWEEP_MS = 1000;  // heartbeat sweep period
    static constexpr size_t READ_CHUNK = 65536;  // one recv per ready socket per poll
    static constexpr int MAX_EVENTS = 1024;  // sockets handled per poll
    static constexpr int MAX_IOV = 64;  // slices per sendmsg
    static constexpr uint64_t HARD_BACKLOG_FACTOR = 8;  // over 8x backlog_limit: close 4008 now
    // HUB.md "permessage-deflate": smaller messages go uncompressed (RFC 7692 6 leaves it to the
    // sender) since compressing an ack or a count costs more than the bytes it saves.
    static constexpr size_t DEFLATE_MIN_BYTES = 256;
    static bool compressed(uint8_t variant, size_t size) { return (variant & DEFLATE) && size >= DEFLATE_MIN_BYTES; }

private:
    struct Slice {
        std::shared_ptr<const std::string> buf;
        size_t off;
    };
    // The unsent tail of a connection's writes; exists only while non-empty.
    struct Backlog {
        std::vector<Slice> q;
        size_t head = 0;
        uint64_t bytes = 0;
    };
    enum : uint8_t { FREE = 0, OPEN = 1, CLOSING = 2 };
    enum : uint8_t { F_WANT_OUT = 1, F_SHUT_WR = 2, F_PING = 4, F_SLOW = 8 };
    // One fd's slot. Times are hub-clock ms (uint32, wrap-safe differences).
    struct Conn {
        std::unique_ptr<ws::ParseState> read;  // partial frame / fragmented message, else null
        std::unique_ptr<Backlog> out;  // unsent bytes, else null
        std::unique_ptr<std::string> tag;  // null for anonymous viewers
        uint32_t generation = 0;  // bumped on every adopt of this fd
        uint32_t stream = 0;
        uint32_t index = 0;  // position in the stream's viewer vector
        uint32_t skipped = 0;  // comments skipped while slow, reported by the next marker
        uint32_t last_in = 0;  // last inbound bytes
        uint32_t timer = 0;  // OPEN + F_PING: when the ping went out; CLOSING: when it began
        uint32_t slow_since = 0;  // with F_SLOW: when the backlog went over the limit
        uint8_t state = FREE;
        uint8_t variant = 0;
        uint8_t flags = 0;
        uint8_t pings = 0;  // pings answered since the last sweep (a byte of padding anyway)
    };
    struct Stream {
        std::vector<int32_t> viewers;  // fds
        std::array<uint32_t, 4> variant_count{};  // viewers per (variant & 3)
        std::vector<OutboundEvent> pending;
        int64_t deadline_ms = 0;  // when the pending events must go out
        int64_t last_flush_ms = INT64_MIN / 2;  // start of the last flush: one flush per interval
        bool flushing = false;  // viewers are being iterated: do not erase it
    };
    class Sink;
    class FlushFrames;
    using Buffer = std::shared_ptr<const std::string>;

    // time
    void tick();
    uint32_t since(uint32_t t) const { return clock_ - t; }
    // connections
    Conn* find(uint64_t conn);
    uint64_t conn_id(int fd) const { return (uint64_t(conns_[fd].generation) << 32) | uint32_t(fd); }
    void join_stream(int fd);
    void leave_stream(int fd);
    void push_closed(int fd, int code);
    void begin_close(int fd, int send_code, const char* reason, size_t reason_len, int reported);
    void slow_close(int fd);
    void drop(int fd);  // peer gone: OPEN reports 1006; the fd is closed now
    void release(int fd);
    void set_out(int fd, bool on);
    void shutdown_wr(int fd);
    // reading
    void on_readable(int fd);
    void on_bytes(int fd, uint8_t* data, size_t n);
    // writing
    bool enqueue(int fd, const Buffer* bufs, int nbufs);
    void on_writable(int fd);
    void consume(int fd, uint64_t n);
    void check_backlog(int fd);
    void drop_unstarted(int fd);
    Buffer frame_for(uint8_t variant, const std::string& payload, int binary = -1);
    Buffer skipped_marker(uint8_t variant, uint32_t count);
    // flushing and timers
    void flush_stream(uint32_t sid);
    void deliver(int fd, FlushFrames& frames, uint32_t comments);
    void run_timers();
    void sweep();
    void sweep_conn(int fd);
    void arm_timer(int64_t at_ms);
    void program_timer(int64_t at_ms);
    ws::Deflater& deflater(uint8_t variant);
    std::string deflate(uint8_t variant, const std::string& payload);

    HubConfig cfg_;
    int epfd_ = -1;
    int timerfd_ = -1;
    int64_t epoch_ms_ = 0;  // hub clock 0, minus one so that clock_ is never 0
    int64_t now_ms_ = 0;  // CLOCK_MONOTONIC ms at the last tick()
    uint32_t clock_ = 0;  // hub clock: now_ms_ - epoch_ms_
    int64_t armed_ms_ = INT64_MAX;  // what the timerfd is set to
    int64_t next_sweep_ms_ = 0;
    std::vector<Conn> conns_;
    std::unordered_map<uint32_t, Stream> streams_;
    // (deadline, stream), earliest first; stale entries are skipped when they come up.
    std::priority_queue<std::pair<int64_t, uint32_t>, std::vector<std::pair<int64_t, uint32_t>>,
                        std::greater<>> due_;
    std::vector<InboundEvent> events_;
    std::vector<uint8_t> scratch_;  // READ_CHUNK bytes shared by every connection
    std::array<std::unique_ptr<ws::Deflater>, 16> deflaters_;  // by window bits, made on first use
    ws::Inflater inflater_;
    Buffer ping_frame_;
    size_t open_ = 0;
    size_t closing_ = 0;
    uint64_t backlog_total_ = 0;
    // Heap held by connections (HUB.md: none while idle), counted for stats().
    size_t held_reads_ = 0;
    size_t held_backlogs_ = 0;
    size_t held_tags_ = 0;
    HubStats stats_;
};

}  // namespace chorus
