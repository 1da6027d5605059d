// The native hub; the design notes are at the top of hub.hpp, the contract in native/HUB.md.
#include "hub.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

namespace chorus {

namespace {

int64_t monotonic_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

[[noreturn]] void throw_errno(const char* what) { throw std::system_error(errno, std::generic_category(), what); }

bool would_block() { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR; }

const HubConfig& checked(const HubConfig& c) {
    auto require = [](bool ok, const char* what) {
        if (!ok) throw std::invalid_argument(what);
    };
    require(c.flush_interval_ms >= 0, "flush_interval_ms must be >= 0");
    require(c.flush_max_messages >= 1, "flush_max_messages must be >= 1");
    require(c.slow_close_after_ms >= 0, "slow_close_after_ms must be >= 0");
    require(c.max_fragments >= 1, "max_fragments must be >= 1");
    require(c.max_pings_per_s <= 250, "max_pings_per_s must be 0..250");
    require(c.heartbeat_interval_ms >= 0, "heartbeat_interval_ms must be >= 0 (0: no heartbeat)");
    require(c.heartbeat_timeout_ms >= 0, "heartbeat_timeout_ms must be >= 0");
    require(c.deflate_level >= -1 && c.deflate_level <= 9, "deflate_level must be -1..9");
    // zlib has no raw deflate with an 8-bit window; RFC 7692 7.1.2.1 allows 8..15.
    require(c.deflate_window_bits >= 9 && c.deflate_window_bits <= 15, "deflate_window_bits must be 9..15");
    require(c.inflate_limit_bytes >= 1 && c.inflate_limit_bytes <= (1u << 30), "inflate_limit_bytes must be 1..2**30");
    return c;
}

}  // namespace

// --- what the parser completes on one connection ---

// Collects the parser's output for one on_bytes() call. Replies and closes are acted on after
// the parse, so nothing here can free the parser state it runs on.
class Hub::Sink final : public ws::FrameSink {
public:
    Sink(Hub& hub, int fd) : hub_(hub), fd_(fd) {}

    bool on_message(uint8_t opcode, bool compressed, const uint8_t* data, size_t n) override {
        std::string text;
        if (compressed && !inflate(opcode, data, n, text)) return false;
        const Conn& c = hub_.conns_[fd_];
        InboundEvent ev{opcode == ws::OP_TEXT ? MESSAGE_TEXT : MESSAGE_BINARY, hub_.conn_id(fd_), c.stream, {},
                        c.tag ? *c.tag : std::string()};
        if (compressed) {
            ev.data.swap(text);
        } else {
            ev.data.assign(reinterpret_cast<const char*>(data), n);
        }
        hub_.events_.push_back(std::move(ev));
        ++hub_.stats_.messages_in;
        return true;
    }

    bool on_control(uint8_t opcode, const uint8_t* data, size_t n) override {
        if (opcode == ws::OP_PING) {
            // DESIGN.md 10: pings are rate-limited; a flood is a policy violation (1008).
            Hub::Conn& c = hub_.conns_[size_t(fd_)];
            if (hub_.cfg_.max_pings_per_s && ++c.pings > hub_.cfg_.max_pings_per_s) {
                fail_code = ws::CLOSE_POLICY;
                fail_reason = "ping flood";
                return false;
            }
            // RFC 6455 5.5.2: a pong with the same payload. 5.5.3 would let us answer only
            // the latest of several pings, but clients (and Autobahn 2.10) expect one pong
            // each; the pongs of one read are no bigger than the pings, and go out in one write.
            ws::append_frame(pongs, ws::OP_PONG, data, n);
        } else if (opcode == ws::OP_CLOSE) {
            // RFC 6455 5.5.1: reply with a close frame echoing the code; stop reading. A
            // code-less close is answered (and reported) as 1000, like the pure twin does.
            peer_close = n >= 2 ? (data[0] << 8) | data[1] : ws::CLOSE_NORMAL;
            return false;
        }
        return true;  // a pong: its bytes already reset the heartbeat
    }

    std::string pongs;  // the frames answering this read's pings
    int peer_close = 0;  // the client's close code, once it sent a close frame
    uint16_t fail_code = 0;  // a violation found after framing (inflate, inflated UTF-8)
    const char* fail_reason = "";

private:
    // RFC 7692 7.2.2: inflate with the shared stream; the output is capped (1009 past it).
    bool inflate(uint8_t opcode, const uint8_t* data, size_t n, std::string& out) {
        ++hub_.stats_.inflate_calls;
        switch (hub_.inflater_.inflate_message(data, n, out)) {
            case ws::Inflater::TOO_BIG:
                return fail(ws::CLOSE_TOO_BIG, "inflated message too big");
            case ws::Inflater::CORRUPT:
                return fail(ws::CLOSE_INVALID_DATA, "bad deflate data");
            case ws::Inflater::OK:
                break;
        }
        const auto* p = reinterpret_cast<const uint8_t*>(out.data());
        if (opcode == ws::OP_TEXT && !ws::utf8_valid(p, out.size()))  // RFC 6455 8.1
            return fail(ws::CLOSE_INVALID_DATA, "text message is not UTF-8");
        return true;
    }
    bool fail(uint16_t code, const char* reason) {
        fail_code = code;
        fail_reason = reason;
        return false;
    }

    Hub& hub_;
    int fd_;
};

// --- construction ---

Hub::Hub(const HubConfig& config) : cfg_(checked(config)), scratch_(READ_CHUNK), inflater_(cfg_.inflate_limit_bytes) {
    deflater(uint8_t(DEFLATE | (cfg_.deflate_window_bits << 4)));  // checks the level before any fd exists
    std::string ping;
    ws::append_frame(ping, ws::OP_PING, "", 0);  // HUB.md: heartbeat pings are empty
    ping_frame_ = std::make_shared<const std::string>(std::move(ping));
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) throw_errno("epoll_create1");
    timerfd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = timerfd_;
    if (timerfd_ < 0 || epoll_ctl(epfd_, EPOLL_CTL_ADD, timerfd_, &ev) < 0) {
        int err = errno;
        if (timerfd_ >= 0) ::close(timerfd_);
        ::close(epfd_);
        errno = err;
        throw_errno("timerfd");
    }
    epoch_ms_ = monotonic_ms() - 1;
    tick();
    next_sweep_ms_ = now_ms_ + SWEEP_MS;
}

Hub::~Hub() {
    for (size_t fd = 0; fd < conns_.size(); ++fd)
        if (conns_[fd].state != FREE) ::close(int(fd));
    if (timerfd_ >= 0) ::close(timerfd_);
    if (epfd_ >= 0) ::close(epfd_);
}

void Hub::shutdown() {
    tick();
    for (size_t fd = 0; fd < conns_.size(); ++fd)
        if (conns_[fd].state != FREE) drop(int(fd));
    streams_.clear();
    due_ = {};
    if (timerfd_ >= 0) ::close(timerfd_);
    if (epfd_ >= 0) ::close(epfd_);
    timerfd_ = epfd_ = -1;
}

void Hub::tick() {
    now_ms_ = monotonic_ms();
    clock_ = uint32_t(now_ms_ - epoch_ms_);
}

// --- connections ---

uint64_t Hub::adopt(int fd, uint32_t stream, uint8_t variant, std::string leftover, std::string tag) {
    if (epfd_ < 0) throw std::invalid_argument("the hub is shut down");
    if (fd < 0 || fd == epfd_ || fd == timerfd_) throw std::invalid_argument("not a viewer socket fd");
    const unsigned bits = variant >> 4;
    if ((variant & 0x0C) || (bits != 0 && bits < 9)) throw std::invalid_argument("bad variant");
    if (size_t(fd) < conns_.size() && conns_[fd].state != FREE) throw std::invalid_argument("fd is already adopted");
    // One buffer per distinct variant per flush: normalise the window bits (0 means 15, and
    // never more than the configured window) so equal encodings share a buffer.
    variant = (variant & DEFLATE) ? uint8_t((variant & 3) | std::min<unsigned>(bits ? bits : 15, cfg_.deflate_window_bits) << 4)
                                  : uint8_t(variant & 1);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) throw_errno("fcntl");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;
        ::close(fd);  // ours now (HUB.md: adopt takes ownership)
        errno = err;
        throw_errno("adopt");
    }
    int one = 1;  // small frames must not wait for Nagle; fails harmlessly on AF_UNIX
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    tick();
    if (size_t(fd) >= conns_.size()) conns_.resize(size_t(fd) + 1);
    Conn& c = conns_[fd];
    c.generation += 1;
    c.state = OPEN;
    c.variant = variant;
    c.stream = stream;
    c.flags = 0;
    c.skipped = 0;
    c.last_in = clock_;
    if (!tag.empty()) {  // stored only if non-empty: anonymous viewers hold no heap
        c.tag = std::make_unique<std::string>(std::move(tag));
        ++held_tags_;
    }
    join_stream(fd);
    ++open_;
    const uint64_t id = conn_id(fd);
    if (!leftover.empty()) on_bytes(fd, reinterpret_cast<uint8_t*>(&leftover[0]), leftover.size());
    arm_timer(next_sweep_ms_);
    return id;
}

Hub::Conn* Hub::find(uint64_t conn) {
    const uint64_t fd = conn & 0xFFFFFFFFu;
    if (fd >= conns_.size()) return nullptr;
    Conn& c = conns_[fd];
    // A stale generation means the fd was closed and reused: never reach the new viewer.
    return c.state == OPEN && c.generation == uint32_t(conn >> 32) ? &c : nullptr;
}

void Hub::join_stream(int fd) {
    Conn& c = conns_[fd];
    Stream& s = streams_[c.stream];
    c.index = uint32_t(s.viewers.size());
    s.viewers.push_back(fd);
    s.variant_count[c.variant & 3] += 1;
}

// Swap-remove from the stream's viewer vector; the moved viewer learns its new index.
void Hub::leave_stream(int fd) {
    Conn& c = conns_[fd];
    auto it = streams_.find(c.stream);
    if (it == streams_.end()) return;
    Stream& s = it->second;
    const int32_t last = s.viewers.back();
    s.viewers[c.index] = last;
    conns_[last].index = c.index;
    s.viewers.pop_back();
    s.variant_count[c.variant & 3] -= 1;
    if (s.viewers.empty() && !s.flushing) streams_.erase(it);
}

void Hub::push_closed(int fd, int code) {
    const Conn& c = conns_[fd];
    std::string data{char(code >> 8), char(code & 0xFF)};
    events_.push_back(InboundEvent{CLOSED, conn_id(fd), c.stream, std::move(data), c.tag ? *c.tag : std::string()});
}

// Leave the stream and report CLOSED now; queue the close frame (`send_code` 0: none) and
// shut down writing once it is out. The fd lingers until the peer's EOF or CLOSE_LINGER_MS.
void Hub::begin_close(int fd, int send_code, const char* reason, size_t reason_len, int reported) {
    Conn& c = conns_[fd];
    if (c.state != OPEN) return;
    leave_stream(fd);
    push_closed(fd, reported);
    c.state = CLOSING;
    --open_;
    ++closing_;
    c.timer = clock_;
    c.flags &= uint8_t(~(F_PING | F_SLOW));
    if (c.read) {
        c.read.reset();
        --held_reads_;
    }
    if (c.tag) {
        c.tag.reset();
        --held_tags_;
    }
    if (send_code != 0) {
        Buffer frame = std::make_shared<const std::string>(ws::close_frame(send_code, std::string(reason, reason_len)));
        if (!enqueue(fd, &frame, 1)) return;  // the peer is gone: already released
    }
    if (!c.out) shutdown_wr(fd);
}

void Hub::slow_close(int fd) {
    ++stats_.slow_closed;
    // The viewer cannot keep up: drop what it has not started to receive so the close frame
    // comes right after the frame in flight instead of behind a full backlog.
    drop_unstarted(fd);
    static const char reason[] = "too slow: reconnect and resume";
    begin_close(fd, ws::CLOSE_SLOW_CONSUMER, reason, sizeof(reason) - 1, ws::CLOSE_SLOW_CONSUMER);
}

// The peer went away (EOF, reset, write error): report 1006 if it was open; close the fd now.
void Hub::drop(int fd) {
    Conn& c = conns_[fd];
    if (c.state == OPEN) {
        leave_stream(fd);
        push_closed(fd, ws::CLOSE_ABNORMAL);
    }
    release(fd);
}

void Hub::release(int fd) {
    Conn& c = conns_[fd];
    epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    if (c.state == OPEN) --open_;
    if (c.state == CLOSING) --closing_;
    if (c.out) backlog_total_ -= c.out->bytes;
    held_reads_ -= c.read ? 1 : 0;
    held_backlogs_ -= c.out ? 1 : 0;
    held_tags_ -= c.tag ? 1 : 0;
    const uint32_t generation = c.generation;
    c = Conn();
    c.generation = generation;
}

// EPOLLOUT is armed only while a backlog exists (level-triggered: see hub.hpp).
void Hub::set_out(int fd, bool on) {
    Conn& c = conns_[fd];
    if (bool(c.flags & F_WANT_OUT) == on) return;
    epoll_event ev{};
    ev.events = EPOLLIN | (on ? uint32_t(EPOLLOUT) : 0u);
    ev.data.fd = fd;
    epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev);
    c.flags ^= F_WANT_OUT;
}

void Hub::shutdown_wr(int fd) {
    Conn& c = conns_[fd];
    if (c.flags & F_SHUT_WR) return;
    ::shutdown(fd, SHUT_WR);  // RFC 6455 7.1.1: the server closes the TCP connection first
    c.flags |= F_SHUT_WR;
}

// --- reading ---

void Hub::on_readable(int fd) {
    ssize_t n = ::recv(fd, scratch_.data(), scratch_.size(), 0);
    if (n < 0 && would_block()) return;
    if (n <= 0) {  // EOF or error; a closing socket is just released
        drop(fd);
        return;
    }
    stats_.bytes_in += uint64_t(n);
    // RFC 6455 5.5.1: after our close frame only the peer's close (and EOF) matter.
    if (conns_[fd].state == OPEN) on_bytes(fd, scratch_.data(), size_t(n));
}

// Parse inbound bytes. The parser state lives on the stack unless a frame or message stays
// incomplete: only then does the connection get a heap ParseState, dropped once idle again.
void Hub::on_bytes(int fd, uint8_t* data, size_t n) {
    Conn& c = conns_[fd];
    c.last_in = clock_;
    c.flags &= uint8_t(~F_PING);  // any inbound byte answers the heartbeat
    ws::ParseState local;
    ws::ParseState& st = c.read ? *c.read : local;
    ws::ParserLimits limits;
    limits.max_message_bytes = cfg_.max_message_bytes;
    limits.max_fragments = cfg_.max_fragments;
    limits.require_mask = true;  // RFC 6455 5.1
    limits.allow_rsv1 = (c.variant & DEFLATE) != 0;
    Sink sink(*this, fd);
    const ws::ParseResult r = ws::parse_frames(st, limits, data, n, sink);
    if (!sink.pongs.empty()) {
        Buffer pong = std::make_shared<const std::string>(std::move(sink.pongs));
        if (!enqueue(fd, &pong, 1) || c.state != OPEN) return;
    }
    const uint16_t code = r.close_code ? r.close_code : sink.fail_code;
    if (code != 0) {
        const char* reason = r.close_code ? r.reason : sink.fail_reason;
        ++stats_.protocol_errors;
        begin_close(fd, code, reason, std::strlen(reason), code);
    } else if (sink.peer_close != 0) {
        begin_close(fd, sink.peer_close, "", 0, sink.peer_close);
    } else if (c.read) {
        if (c.read->idle()) {
            c.read.reset();
            --held_reads_;
        }
    } else if (!local.idle()) {
        c.read = std::make_unique<ws::ParseState>(std::move(local));
        ++held_reads_;
    }
}

// --- writing ---

// Write now if nothing is queued (one sendmsg for all `bufs`), else queue behind the backlog.
// Returns false if the connection was released (the peer is gone).
bool Hub::enqueue(int fd, const Buffer* bufs, int nbufs) {
    Conn& c = conns_[fd];
    if (c.out) {
        for (int i = 0; i < nbufs; ++i) {
            c.out->q.push_back(Slice{bufs[i], 0});
            c.out->bytes += bufs[i]->size();
            backlog_total_ += bufs[i]->size();
        }
        check_backlog(fd);
        return c.state != FREE;
    }
    iovec iov[2];
    uint64_t total = 0;
    for (int i = 0; i < nbufs; ++i) {
        iov[i].iov_base = const_cast<char*>(bufs[i]->data());
        iov[i].iov_len = bufs[i]->size();
        total += bufs[i]->size();
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = size_t(nbufs);
    ssize_t sent = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    ++stats_.writes;
    if (sent < 0) {
        if (!would_block()) {
            drop(fd);
            return false;
        }
        sent = 0;
    }
    stats_.bytes_out += uint64_t(sent);
    if (uint64_t(sent) == total) return true;
    // Keep the unsent tail as references to the shared buffers, never as a copy.
    ++stats_.partial_writes;
    c.out = std::make_unique<Backlog>();
    ++held_backlogs_;
    size_t skip = size_t(sent);
    for (int i = 0; i < nbufs; ++i) {
        const size_t size = bufs[i]->size();
        if (skip >= size) {
            skip -= size;
            continue;
        }
        c.out->q.push_back(Slice{bufs[i], skip});
        c.out->bytes += size - skip;
        skip = 0;
    }
    backlog_total_ += c.out->bytes;
    set_out(fd, true);
    check_backlog(fd);
    return c.state != FREE;
}

void Hub::on_writable(int fd) {
    Conn& c = conns_[fd];
    if (!c.out) {
        set_out(fd, false);
        return;
    }
    const Backlog& b = *c.out;
    iovec iov[MAX_IOV];
    int count = 0;
    for (size_t i = b.head; i < b.q.size() && count < MAX_IOV; ++i, ++count) {
        iov[count].iov_base = const_cast<char*>(b.q[i].buf->data() + b.q[i].off);
        iov[count].iov_len = b.q[i].buf->size() - b.q[i].off;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = size_t(count);
    ssize_t sent = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    ++stats_.drain_writes;
    if (sent < 0) {
        if (!would_block()) drop(fd);
        return;
    }
    stats_.bytes_out += uint64_t(sent);
    consume(fd, uint64_t(sent));
}

// `n` bytes of the backlog went out.
void Hub::consume(int fd, uint64_t n) {
    Conn& c = conns_[fd];
    Backlog& b = *c.out;
    b.bytes -= n;
    backlog_total_ -= n;
    while (n > 0) {
        Slice& s = b.q[b.head];
        const size_t left = s.buf->size() - s.off;
        if (n < left) {
            s.off += size_t(n);
            break;
        }
        n -= left;
        s.buf.reset();
        ++b.head;
    }
    if (b.head == b.q.size()) {  // drained: an idle connection holds no buffer
        c.out.reset();
        --held_backlogs_;
        set_out(fd, false);
        c.flags &= uint8_t(~F_SLOW);
        if (c.state == CLOSING) shutdown_wr(fd);
        return;
    }
    if (b.head >= 64 && b.head * 2 >= b.q.size()) {
        b.q.erase(b.q.begin(), b.q.begin() + long(b.head));
        b.head = 0;
    }
    check_backlog(fd);
}

// The slow-viewer clock: F_SLOW while the backlog is over the limit. Far over it (control
// events and send() keep coming to a viewer that reads nothing) closes at once.
void Hub::check_backlog(int fd) {
    Conn& c = conns_[fd];
    if (c.state != OPEN) return;
    const uint64_t bytes = c.out ? c.out->bytes : 0;
    if (bytes <= cfg_.backlog_limit_bytes) {
        c.flags &= uint8_t(~F_SLOW);
        return;
    }
    if (!(c.flags & F_SLOW)) {
        c.flags |= F_SLOW;
        c.slow_since = clock_;
    }
    if (bytes > HARD_BACKLOG_FACTOR * cfg_.backlog_limit_bytes + (1u << 20)) slow_close(fd);
}

// Keep only a slice already partly sent (a frame must not be cut); drop the rest.
void Hub::drop_unstarted(int fd) {
    Conn& c = conns_[fd];
    if (!c.out) return;
    Backlog& b = *c.out;
    const size_t keep = b.q[b.head].off > 0 ? 1 : 0;
    uint64_t dropped = 0;
    for (size_t i = b.head + keep; i < b.q.size(); ++i) dropped += b.q[i].buf->size() - b.q[i].off;
    b.q.resize(b.head + keep);
    b.bytes -= dropped;
    backlog_total_ -= dropped;
    if (keep == 0) {
        c.out.reset();
        --held_backlogs_;
        set_out(fd, false);
    }
}

bool Hub::send(uint64_t conn, const std::string& payload, int binary) {
    Conn* c = find(conn);
    if (c == nullptr) return false;
    tick();
    const Buffer frame = frame_for(c->variant, payload, binary);
    ++stats_.messages_out;
    enqueue(int(conn & 0xFFFFFFFFu), &frame, 1);
    return true;
}

void Hub::close(uint64_t conn, int code, const std::string& reason) {
    if (find(conn) == nullptr) return;
    tick();
    begin_close(int(conn & 0xFFFFFFFFu), code, reason.data(), reason.size(), code);
}

// Shutdown drain: what is pending goes out first, then every viewer gets the close frame.
void Hub::close_all(int code, const std::string& reason) {
    flush_all();
    for (size_t fd = 0; fd < conns_.size(); ++fd)
        if (conns_[fd].state == OPEN) begin_close(int(fd), code, reason.data(), reason.size(), code);
}

// --- the loop's entry points ---

void Hub::poll() {
    if (epfd_ < 0) return;
    epoll_event events[MAX_EVENTS];
    const int n = epoll_wait(epfd_, events, MAX_EVENTS, 0);
    tick();
    for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        const uint32_t what = events[i].events;
        if (fd == timerfd_) {
            uint64_t expirations;
            ssize_t got = ::read(timerfd_, &expirations, sizeof(expirations));
            (void)got;  // EAGAIN if it was re-armed meanwhile: nothing to clear
            continue;
        }
        if (size_t(fd) >= conns_.size() || conns_[fd].state == FREE) continue;  // closed earlier in this batch
        if (what & EPOLLOUT) on_writable(fd);
        if (conns_[fd].state != FREE && (what & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(fd);
    }
    run_timers();
}

void Hub::run_timers() {
    tick();
    while (!due_.empty() && due_.top().first <= now_ms_) {
        const auto [deadline, sid] = due_.top();
        due_.pop();
        auto it = streams_.find(sid);  // stale entries: flushed early at max messages, or gone
        if (it != streams_.end() && !it->second.pending.empty() && it->second.deadline_ms == deadline) flush_stream(sid);
    }
    if (now_ms_ >= next_sweep_ms_) {
        sweep();
        next_sweep_ms_ = now_ms_ + SWEEP_MS;
    }
    int64_t next = INT64_MAX;
    if (!due_.empty()) next = due_.top().first;
    if (open_ + closing_ > 0) next = std::min(next, next_sweep_ms_);
    if (next != armed_ms_) program_timer(next);
}

// Program the timerfd (absolute CLOCK_MONOTONIC) if `at_ms` is earlier than what it holds.
void Hub::arm_timer(int64_t at_ms) {
    if (at_ms < armed_ms_) program_timer(at_ms);
}

// INT64_MAX disarms it.
void Hub::program_timer(int64_t at_ms) {
    if (timerfd_ < 0) return;
    itimerspec its{};
    if (at_ms != INT64_MAX) {
        its.it_value.tv_sec = time_t(at_ms / 1000);
        its.it_value.tv_nsec = long(at_ms % 1000) * 1000000L;
    }
    timerfd_settime(timerfd_, TFD_TIMER_ABSTIME, &its, nullptr);
    armed_ms_ = at_ms;
}

// Every SWEEP_MS: heartbeats, slow viewers past their deadline, lingering closes.
void Hub::sweep() {
    for (size_t fd = 0; fd < conns_.size(); ++fd)
        if (conns_[fd].state != FREE) sweep_conn(int(fd));
}

void Hub::sweep_conn(int fd) {
    Conn& c = conns_[fd];
    c.pings = 0;  // a new second of ping budget
    if (c.state == CLOSING) {
        if (since(c.timer) >= CLOSE_LINGER_MS) release(fd);
        return;
    }
    if ((c.flags & F_SLOW) && int64_t(since(c.slow_since)) > cfg_.slow_close_after_ms) {
        slow_close(fd);
        return;
    }
    if (cfg_.heartbeat_interval_ms <= 0) return;
    if (c.flags & F_PING) {
        if (int64_t(since(c.timer)) > cfg_.heartbeat_timeout_ms) {
            ++stats_.timeouts;
            static const char reason[] = "heartbeat timeout";
            begin_close(fd, ws::CLOSE_GOING_AWAY, reason, sizeof(reason) - 1, ws::CLOSE_ABNORMAL);
        }
    } else if (int64_t(since(c.last_in)) > cfg_.heartbeat_interval_ms) {
        c.flags |= F_PING;
        c.timer = clock_;
        ++stats_.pings_sent;
        enqueue(fd, &ping_frame_, 1);
    }
}

// --- queries ---

std::vector<InboundEvent> Hub::drain() {
    std::vector<InboundEvent> out;
    out.swap(events_);
    return out;
}

size_t Hub::viewer_count(uint32_t stream) const {
    auto it = streams_.find(stream);
    return it == streams_.end() ? 0 : it->second.viewers.size();
}

size_t Hub::pending(uint32_t stream) const {
    auto it = streams_.find(stream);
    return it == streams_.end() ? 0 : it->second.pending.size();
}

int64_t Hub::backlog(uint64_t conn) const {
    const uint64_t fd = conn & 0xFFFFFFFFu;
    if (fd >= conns_.size()) return -1;
    const Conn& c = conns_[fd];
    if (c.state != OPEN || c.generation != uint32_t(conn >> 32)) return -1;
    return c.out ? int64_t(c.out->bytes) : 0;
}

uint32_t Hub::variants(uint32_t stream) const {
    auto it = streams_.find(stream);
    if (it == streams_.end()) return 0;
    uint32_t mask = 0;
    for (unsigned v = 0; v < 4; ++v)
        if (it->second.variant_count[v]) mask |= 1u << v;
    return mask;
}

std::vector<std::pair<const char*, uint64_t>> Hub::stats() const {
    const HubStats& s = stats_;
    return {
        {"flushes", s.flushes},
        {"writes", s.writes},
        {"drain_writes", s.drain_writes},
        {"bytes_out", s.bytes_out},
        {"frames_built", s.frames_built},
        {"deflate_calls", s.deflate_calls},
        {"skipped", s.skipped},
        {"slow_closed", s.slow_closed},
        {"pings_sent", s.pings_sent},
        {"timeouts", s.timeouts},
        {"protocol_errors", s.protocol_errors},
        {"partial_writes", s.partial_writes},
        {"bytes_in", s.bytes_in},
        {"messages_in", s.messages_in},
        {"inflate_calls", s.inflate_calls},
        {"messages_out", s.messages_out},
        {"comments_out", s.comments_out},
        {"connections", open_},
        {"closing", closing_},
        {"streams", streams_.size()},
        {"backlog_bytes", backlog_total_},
        {"held_read_buffers", held_reads_},  // connections with a partial frame or message
        {"held_backlogs", held_backlogs_},  // connections with unsent bytes
        {"held_tags", held_tags_},
        {"events_pending", events_.size()},
        {"conn_slot_bytes", sizeof(Conn)},
        {"conn_table_bytes", conns_.capacity() * sizeof(Conn)},
    };
}

}  // namespace chorus
