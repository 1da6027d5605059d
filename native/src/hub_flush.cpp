// The native hub's fan-out: publishing, coalesced flushes and the frames they share (one
// buffer per variant per flush, each event compressed once). The rest of the hub is hub.cpp;
// the design notes are at the top of hub.hpp, the contract in native/HUB.md.
#include "hub.hpp"

#include <algorithm>
#include <cstring>

namespace chorus {

namespace {

uint32_t saturating_add(uint32_t a, uint64_t b) { return uint32_t(std::min<uint64_t>(uint64_t(a) + b, UINT32_MAX)); }

// Append an unsigned int the way msgpack.packb does (the smallest form).
void msgpack_uint(std::string& out, uint32_t v) {
    if (v < 0x80) {
        out.push_back(static_cast<char>(v));
    } else if (v <= 0xFF) {
        out.push_back('\xcc');
        out.push_back(static_cast<char>(v));
    } else if (v <= 0xFFFF) {
        out.push_back('\xcd');
        out.push_back(static_cast<char>(v >> 8));
        out.push_back(static_cast<char>(v));
    } else {
        out.push_back('\xce');
        for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>(v >> shift));
    }
}

}  // namespace

// --- the flush's shared buffers ---

// The frames of one flush, built on first use per (variant, control-only) and shared by every
// viewer that needs them; a deflated variant compresses each event once.
class Hub::FlushFrames {
public:
    FlushFrames(Hub& hub, const std::vector<OutboundEvent>& events) : hub_(hub), events_(events) {}

    // Null when no event of the flush has a frame for this viewer. The reference stays valid
    // for the whole flush (a deque does not move its elements on push_back).
    // `frames` (optional) gets how many events the buffer holds (stats: messages_out).
    const Buffer& get(uint8_t variant, bool control_only, uint64_t* frames = nullptr) {
        for (const Built& b : built_)
            if (b.variant == variant && b.control_only == control_only) {
                if (frames != nullptr) *frames = b.frames;
                return b.buf;
            }
        uint64_t n = 0;
        for (const OutboundEvent& e : events_)
            if (selected(e, variant, control_only)) ++n;
        built_.push_back(Built{variant, control_only, build(variant, control_only), n});
        if (frames != nullptr) *frames = n;
        return built_.back().buf;
    }

private:
    struct Built {
        uint8_t variant;
        bool control_only;
        Buffer buf;
        uint64_t frames;
    };
    struct Deflated {
        uint8_t variant;
        std::vector<std::string> payload;  // by event index
        std::vector<bool> done;
    };

    bool selected(const OutboundEvent& e, uint8_t variant, bool control_only) const {
        return (e.present >> (variant & 1) & 1) && (e.control || !control_only);
    }
    const std::string& payload(size_t i, uint8_t variant);
    Buffer build(uint8_t variant, bool control_only);

    Hub& hub_;
    const std::vector<OutboundEvent>& events_;
    std::deque<Built> built_;
    std::deque<Deflated> deflated_;
};

// Event i as it goes on the wire for `variant`: as published, or compressed once.
const std::string& Hub::FlushFrames::payload(size_t i, uint8_t variant) {
    const std::string& raw = events_[i].payload[variant & 1];
    if (!compressed(variant, raw.size())) return raw;
    Deflated* d = nullptr;
    for (Deflated& x : deflated_)
        if (x.variant == variant) d = &x;
    if (d == nullptr) {
        deflated_.push_back(Deflated{variant, std::vector<std::string>(events_.size()), std::vector<bool>(events_.size())});
        d = &deflated_.back();
    }
    if (!d->done[i]) {
        d->payload[i] = hub_.deflate(variant, raw);
        d->done[i] = true;
    }
    return d->payload[i];
}

Hub::Buffer Hub::FlushFrames::build(uint8_t variant, bool control_only) {
    size_t total = 0;
    for (size_t i = 0; i < events_.size(); ++i) {
        if (!selected(events_[i], variant, control_only)) continue;
        size_t n = payload(i, variant).size();
        total += ws::header_size(n) + n;
    }
    if (total == 0) return nullptr;
    const uint8_t opcode = (variant & 1) ? ws::OP_BINARY : ws::OP_TEXT;
    std::string out;
    out.reserve(total);
    for (size_t i = 0; i < events_.size(); ++i) {
        if (!selected(events_[i], variant, control_only)) continue;
        const std::string& p = payload(i, variant);
        // RFC 7692 6: RSV1 marks each compressed message (each event is one message).
        ws::append_frame(out, opcode, p.data(), p.size(), compressed(variant, events_[i].payload[variant & 1].size()));
    }
    ++hub_.stats_.frames_built;
    return std::make_shared<const std::string>(std::move(out));
}

// One data frame for one viewer; `binary` overrides the variant's opcode (-1: keep it).
Hub::Buffer Hub::frame_for(uint8_t variant, const std::string& payload, int binary) {
    const bool as_binary = binary < 0 ? (variant & 1) != 0 : binary != 0;
    const uint8_t opcode = as_binary ? ws::OP_BINARY : ws::OP_TEXT;
    std::string out;
    if (compressed(variant, payload.size())) {
        const std::string z = deflate(variant, payload);
        ws::append_frame(out, opcode, z.data(), z.size(), true);  // RFC 7692 6: RSV1
    } else {
        ws::append_frame(out, opcode, payload.data(), payload.size());
    }
    return std::make_shared<const std::string>(std::move(out));
}

// {"t":"skipped","count":N} in the viewer's encoding (compact JSON, or msgpack as packb does).
Hub::Buffer Hub::skipped_marker(uint8_t variant, uint32_t count) {
    std::string payload;
    if (variant & 1) {
        payload.assign("\x82\xa1t\xa7skipped\xa5" "count");
        msgpack_uint(payload, count);
    } else {
        payload = "{\"t\":\"skipped\",\"count\":" + std::to_string(count) + "}";
    }
    return frame_for(variant, payload);
}

ws::Deflater& Hub::deflater(uint8_t variant) {
    const unsigned bits = variant >> 4;
    if (!deflaters_[bits]) deflaters_[bits] = std::make_unique<ws::Deflater>(cfg_.deflate_level, int(bits));
    return *deflaters_[bits];
}

std::string Hub::deflate(uint8_t variant, const std::string& payload) {
    ++stats_.deflate_calls;
    return deflater(variant).compress(payload.data(), payload.size());
}

// --- publishing and flushing ---

bool Hub::payloads_cover(uint32_t stream, uint8_t present) const {
    auto it = streams_.find(stream);
    if (it == streams_.end()) return true;
    const auto& count = it->second.variant_count;
    const bool json = count[JSON] || count[JSON | DEFLATE];
    const bool msgpack = count[MSGPACK] || count[MSGPACK | DEFLATE];
    return (!json || (present & 1)) && (!msgpack || (present & 2));
}

void Hub::publish(uint32_t stream, OutboundEvent&& event) {
    auto it = streams_.find(stream);
    if (it == streams_.end()) return;  // no local viewer
    tick();
    Stream& s = it->second;
    s.pending.push_back(std::move(event));
    if (s.pending.size() >= cfg_.flush_max_messages) {
        flush_stream(stream);
    } else if (s.pending.size() == 1) {
        // Leading edge: a stream flushes at most once per interval, so the first event after a
        // quiet spell goes out at once and a burst behind it waits for the rest of the window.
        // Under load a flush outlasts the interval and the next one follows it directly.
        s.deadline_ms = std::max(now_ms_, s.last_flush_ms + cfg_.flush_interval_ms);
        due_.emplace(s.deadline_ms, stream);
        arm_timer(s.deadline_ms);
    }
}

void Hub::flush_all() {
    tick();
    std::vector<uint32_t> ids;
    for (const auto& kv : streams_)
        if (!kv.second.pending.empty()) ids.push_back(kv.first);
    for (uint32_t id : ids) flush_stream(id);
}

void Hub::flush_stream(uint32_t sid) {
    auto it = streams_.find(sid);
    if (it == streams_.end() || it->second.pending.empty()) return;
    Stream& s = it->second;
    std::vector<OutboundEvent> events;
    events.swap(s.pending);
    s.last_flush_ms = now_ms_;
    ++stats_.flushes;
    uint64_t comments = 0;
    for (const OutboundEvent& e : events)
        if (!e.control) comments += e.count;
    FlushFrames frames(*this, events);
    s.flushing = true;
    // Backwards: a viewer that closes is swap-removed with one already served.
    for (size_t i = s.viewers.size(); i-- > 0;)
        if (i < s.viewers.size()) deliver(s.viewers[i], frames, uint32_t(std::min<uint64_t>(comments, UINT32_MAX)));
    s.flushing = false;
    if (s.viewers.empty()) streams_.erase(it);
}

// One viewer's share of a flush: one write, or control events only while it is slow.
void Hub::deliver(int fd, FlushFrames& frames, uint32_t comments) {
    Conn& c = conns_[fd];
    const uint64_t backlog = c.out ? c.out->bytes : 0;
    if (backlog > cfg_.backlog_limit_bytes) {
        if (!(c.flags & F_SLOW)) {
            c.flags |= F_SLOW;
            c.slow_since = clock_;
        } else if (int64_t(since(c.slow_since)) > cfg_.slow_close_after_ms) {
            slow_close(fd);
            return;
        }
        c.skipped = saturating_add(c.skipped, comments);
        stats_.skipped += comments;
        uint64_t n = 0;
        const Buffer& control = frames.get(c.variant, true, &n);
        if (control) {
            stats_.messages_out += n;
            enqueue(fd, &control, 1);
        }
        return;
    }
    uint64_t n = 0;
    const Buffer& all = frames.get(c.variant, false, &n);
    if (!all) return;  // nothing in this viewer's encoding
    stats_.messages_out += n;
    stats_.comments_out += comments;
    if (c.skipped) {
        ++stats_.messages_out;  // the skipped marker
        const Buffer both[2] = {skipped_marker(c.variant, c.skipped), all};
        c.skipped = 0;
        enqueue(fd, both, 2);
    } else {
        enqueue(fd, &all, 1);
    }
}

}  // namespace chorus
