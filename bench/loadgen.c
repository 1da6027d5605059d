/* loadgen.c: a WebSocket load client for the Chorus bench (python -m bench builds it).
 *
 * Opens N client connections from one epoll loop, spreading source addresses over
 * 127.0.0.<base> ... 127.0.0.<base+count-1> so one box can go past the ~28k ephemeral ports a
 * single (source, destination) pair allows. Modes:
 *   --hold  connect, stay idle until --seconds pass or a stdin pipe closes, report how many
 *           are still open;
 *   --recv  connect, wait --start-after ms, then for --seconds count deliveries: each
 *           `"bt":<ns>` marker in a text message is one, with latency now - bt (both
 *           CLOCK_MONOTONIC, which is system-wide on Linux) kept in a log-linear histogram.
 *           A `bt=<ns> k=<seq>` marker inside a comment's text counts too, once per
 *           connection and seq (repeats are `duplicates`);
 *   --sink  connect and read every message (answering pings and closes) without inflating or
 *           parsing it: many viewers' load on the server at little cost here;
 *   --post RATE  post comments at RATE/s over the N connections (round robin, on a 1 ms
 *           tick) with --token T (or --token-file F: one per line, connection i uses line
 *           i mod lines, so each connection can be a different user): comment k is due at t0 + k/RATE and sent as
 *           {"t":"comment","text":"bench bt=<due ns> k=<k>","nonce":"<k>"}, except during the
 *           first --start-after ms (warm-up: "bench warm-up k=<k>", no marker). Posts for
 *           --start-after ms + --seconds, then waits up to --grace s for the last answers;
 *           the histogram holds ack latency (ack receipt - due) of the marked comments.
 * Prints {"phase":"connected",...} when the connect phase ends and one {"phase":"done",...}
 * JSON line at the end. In every mode, when stdin is a pipe, its closing ends the run early.
 * Build: cc -O2 loadgen.c -lz.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "wsclient.h"


#define MAX_ANSWER_DEFLATED 512  /* bytes: larger compressed messages are batches, never answers */

enum { CONNECTING = 1, HANDSHAKE, OPEN, CLOSED };

struct conn {
    int fd;
    uint8_t state, deflate, frag_op, frag_rsv1;
    uint8_t *buf;              /* bytes carried over between reads: a partial response or frame */
    uint32_t len, cap;
    uint8_t *frag;             /* a message split over several frames (RFC 6455 5.4) */
    uint32_t flen, fcap;
    uint8_t *out;              /* --post: frames the socket did not take yet */
    uint32_t olen, ocap;
    uint8_t *seen;             /* bitmap of the comment seqs (k=) received on this connection */
    uint32_t seen_cap;
    long long got;             /* first receipts of markers on this connection */
};

/* ---- options ---- */
static const char *host = "127.0.0.1", *path = "/";
static int port, nconns = 1, src_base = 2, src_count = 1, hold, sink, want_proto, want_deflate;
static double seconds = 5, start_after_ms = 1000, connect_rate = 20000, connect_timeout = 60;
static int max_inflight = 100;
static long long expect;       /* --recv: stop once this many deliveries were counted */
static double post_rate, grace_s = 5;
static const char *token;
static char **tokens;           /* --token-file */
static int ntokens;

/* ---- counters ---- */
static struct conn *conns;
static int started, connected, failed, inflight, open_now, closed_by_server, deflate_conns;
static long long errors, deliveries, messages, rx_bytes, inflate_errors;
static long long duplicates, throttle_events, skipped_events;
/* --post: comment k's answer (0 none yet, 1 ack, 2 refused); totals over all and marked ones */
static uint8_t *answer;
static long long post_total, post_first_marked, posted, unsent, acked, refused, rate_limited;
static long long m_posted, m_acked, m_refused, m_rate_limited;
static uint64_t post_t0, max_lag_ns;
static double period_ns;
static char first_refusal[64];
static volatile sig_atomic_t stop_flag;
static uint64_t now_ns, win_start, win_end;

/* ---- latency histogram: exact µs below 1024, then 512 sub-buckets per power of two
 * (relative error under 0.2%), clamped at 60 s ---- */
#define SUB 512
#define NBUCKETS (1024 + 17 * SUB)
#define MAX_US 60000000ull
static uint64_t hist[NBUCKETS], lat_max_us;

static int bucket_of(uint64_t us) {
    if (us > MAX_US) us = MAX_US;
    if (us < 1024) return (int)us;
    int msb = 63 - __builtin_clzll(us);              /* 10 .. 25 */
    return 1024 + (msb - 10) * SUB + (int)((us >> (msb - 9)) & (SUB - 1));
}

static uint64_t bucket_low(int b) {
    if (b < 1024) return (uint64_t)b;
    int msb = 10 + (b - 1024) / SUB, sub = (b - 1024) % SUB;
    return ((uint64_t)(SUB + sub)) << (msb - 9);
}

static double percentile_ms(double q) {
    uint64_t total = 0, seen = 0;
    for (int b = 0; b < NBUCKETS; b++) total += hist[b];
    if (!total) return 0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    for (int b = 0; b < NBUCKETS; b++) {
        seen += hist[b];
        if (seen > rank) return (double)bucket_low(b) / 1000.0;
    }
    return (double)lat_max_us / 1000.0;
}

/* ---- small helpers ---- */
static void base64(const uint8_t *in, int n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    int o = 0;
    for (int i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

static void close_conn(struct conn *c, int was_error) {
    if (c->state == CLOSED) return;
    if (c->state == OPEN) open_now--;
    if (c->state == CONNECTING || c->state == HANDSHAKE) { inflight--; failed++; }
    if (was_error) errors++;
    close(c->fd);
    c->state = CLOSED;
    free(c->buf); free(c->frag); free(c->out); free(c->seen);
    c->buf = c->frag = c->out = c->seen = NULL;
    c->len = c->cap = c->flen = c->fcap = c->olen = c->ocap = c->seen_cap = 0;
}

/* A client frame: always masked (RFC 6455 5.3); only small control frames are sent here. */
static void send_control(struct conn *c, int op, const uint8_t *payload, size_t n) {
    uint8_t f[2 + 4 + 125];
    if (n > 125) n = 125;
    uint32_t mask = (uint32_t)rand();
    f[0] = 0x80 | (uint8_t)op;
    f[1] = 0x80 | (uint8_t)n;
    memcpy(f + 2, &mask, 4);
    for (size_t i = 0; i < n; i++) f[6 + i] = payload[i] ^ f[2 + (i & 3)];
    (void)!send(c->fd, f, 6 + n, MSG_NOSIGNAL | MSG_DONTWAIT);  /* a lost pong is harmless here */
}

/* ---- messages ---- */
static z_stream zs;
static uint8_t *zin, *zout;
static uint32_t zin_cap, zout_cap;

/* Raw inflate of one permessage-deflate message (RFC 7692 7.2.2: append 00 00 ff ff). Both
 * sides negotiated no_context_takeover, so one shared inflater reset per message will do. */
static const uint8_t *inflate_msg(const uint8_t *p, size_t n, size_t *out_n) {
    zin = grow(zin, &zin_cap, (uint32_t)n + 4);
    memcpy(zin, p, n);
    memcpy(zin + n, "\x00\x00\xff\xff", 4);
    zout = grow(zout, &zout_cap, (uint32_t)n * 4 + 1024);
    inflateReset(&zs);
    zs.next_in = zin; zs.avail_in = (uInt)n + 4;
    size_t done = 0;
    for (;;) {
        zs.next_out = zout + done; zs.avail_out = zout_cap - (uint32_t)done;
        int rc = inflate(&zs, Z_SYNC_FLUSH);
        done = zout_cap - zs.avail_out;
        if (rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END) { inflate_errors++; return NULL; }
        if (zs.avail_in == 0 && zs.avail_out > 0) break;
        zout = grow(zout, &zout_cap, zout_cap * 2);
    }
    *out_n = done;
    return zout;
}

static void record_latency(uint64_t since_ns) {
    uint64_t us = now_ns > since_ns ? (now_ns - since_ns) / 1000 : 0;
    hist[bucket_of(us)]++;
    if (us > lat_max_us) lat_max_us = us;
}

static uint64_t parse_u64(const uint8_t **pp, const uint8_t *end) {
    const uint8_t *p = *pp;
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (uint64_t)(*p++ - '0');
    *pp = p;
    return v;
}

/* A server event's type: the payload starts {"t":"<type>" (the gateway puts t first). */
/* First receipt of comment seq k on this connection? (k < 0: no seq, always first.) */
static int first_receipt(struct conn *c, long long k) {
    if (k < 0) return 1;
    uint32_t byte = (uint32_t)(k >> 3);
    if (byte >= c->seen_cap) {
        uint32_t old = c->seen_cap;
        c->seen = grow(c->seen, &c->seen_cap, byte + 1);
        memset(c->seen + old, 0, c->seen_cap - old);
    }
    uint8_t bit = (uint8_t)(1u << (k & 7));
    if (c->seen[byte] & bit) return 0;
    c->seen[byte] |= bit;
    return 1;
}

/* --post: an ack or error event answering comment k (its nonce). */
static void on_answer(const uint8_t *p, size_t n) {
    int ack = is_event(p, n, "ack");
    if (!ack && !is_event(p, n, "error")) return;             /* welcome, batches, ... */
    const uint8_t *end = p + n, *q = memmem(p, n, "\"nonce\":\"", 9);
    if (!q) { errors++; return; }                             /* an error about no comment of ours */
    q += 9;
    long long k = (long long)parse_u64(&q, end);
    if (k >= posted || answer[k]) return;
    int marked = k >= post_first_marked;
    answer[k] = ack ? 1 : 2;
    if (ack) {
        acked++;
        if (marked) { m_acked++; record_latency(post_t0 + (uint64_t)((double)k * period_ns)); }
        return;
    }
    refused++; m_refused += marked;
    const uint8_t *code = memmem(p, n, "\"code\":\"", 8);
    if (code && (size_t)(end - code) > 8 + 12 && memcmp(code + 8, "rate_limited", 12) == 0) {
        rate_limited++; m_rate_limited += marked;
    } else if (!first_refusal[0]) {
        snprintf(first_refusal, sizeof first_refusal, "%.*s", (int)(n < 63 ? n : 63), (const char *)p);
    }
}

static void on_message(struct conn *c, int rsv1, const uint8_t *p, size_t n) {
    messages++;
    rx_bytes += (long long)n;
    if (sink) return;  /* a sink only reads: the load of many viewers without their measuring */
    /* A poster reads only its answers (ack, error: a few dozen bytes compressed); inflating
     * every batch it also receives as a viewer would cost the load generator more than the
     * posting itself. */
    if (post_rate > 0 && rsv1 && n > MAX_ANSWER_DEFLATED) return;
    if (rsv1) {
        if (!c->deflate || !(p = inflate_msg(p, n, &n))) { errors++; return; }
    }
    if (post_rate > 0) { on_answer(p, n); return; }
    if (now_ns < win_start || now_ns >= win_end) return;
    throttle_events += is_event(p, n, "throttle");
    skipped_events += is_event(p, n, "skipped");
    /* markers: "bt":<ns> (a JSON field) or bt=<ns>[ k=<seq>] (inside a comment's text) */
    const uint8_t *start = p, *end = p + n;
    while ((p = memmem(p, (size_t)(end - p), "bt", 2)) != NULL) {
        const uint8_t *m = p;
        p += 2;
        if (m > start && m[-1] == '"' && end - p >= 2 && p[0] == '"' && p[1] == ':') p += 2;
        else if (p < end && *p == '=' && p + 1 < end && p[1] >= '0' && p[1] <= '9') p += 1;
        else continue;
        uint64_t bt = parse_u64(&p, end);
        long long k = -1;
        if (end - p > 3 && memcmp(p, " k=", 3) == 0) { p += 3; k = (long long)parse_u64(&p, end); }
        if (!first_receipt(c, k)) { duplicates++; continue; }
        record_latency(bt);
        deliveries++;
        c->got++;
    }
}

static void on_frame(struct conn *c, int fin, int rsv1, int op, const uint8_t *p, size_t n) {
    switch (op) {
    case 0x9: send_control(c, 0xA, p, n); return;          /* ping -> pong */
    case 0xA: return;
    case 0x8:                                                 /* close: echo it and go */
        send_control(c, 0x8, p, n < 2 ? n : 2);
        closed_by_server++;
        close_conn(c, 0);
        return;
    case 0x1: case 0x2:
        if (fin) { on_message(c, rsv1, p, n); return; }
        c->frag_op = (uint8_t)op; c->frag_rsv1 = (uint8_t)rsv1; c->flen = 0;
        __attribute__((fallthrough));  /* keep the first fragment */
    case 0x0:
        if (!c->frag_op) { close_conn(c, 1); return; }
        c->frag = grow(c->frag, &c->fcap, c->flen + (uint32_t)n);
        memcpy(c->frag + c->flen, p, n);
        c->flen += (uint32_t)n;
        if (fin && op == 0x0) { on_message(c, c->frag_rsv1, c->frag, c->flen); c->frag_op = 0; }
        return;
    default: close_conn(c, 1);
    }
}

/* Parse whole server frames (unmasked, RFC 6455 5.2) from p; returns the bytes consumed. */
static size_t parse_frames(struct conn *c, const uint8_t *p, size_t n) {
    size_t off = 0;
    while (c->state == OPEN) {
        const uint8_t *f = p + off;
        uint64_t len;
        size_t hdr;
        if (!frame_header(f, n - off, &hdr, &len)) break;
        if (f[1] & 0x80) { close_conn(c, 1); break; }       /* servers must not mask */
        if (n - off < hdr + len) break;
        on_frame(c, f[0] & 0x80, (f[0] & 0x40) != 0, f[0] & 0x0f, f + hdr, (size_t)len);
        off += hdr + (size_t)len;
    }
    return off;
}

/* The 101 response; what follows it in the same read is already frames. */
static size_t parse_handshake(struct conn *c, const uint8_t *p, size_t n) {
    const uint8_t *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t hlen = (size_t)(end - p) + 4;
    if (n < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) { close_conn(c, 1); return n; }
    char *head = strndup((const char *)p, hlen);
    c->deflate = strcasestr(head, "permessage-deflate") != NULL;
    free(head);
    deflate_conns += c->deflate;
    c->state = OPEN;
    inflight--; connected++; open_now++;
    return hlen;
}

static size_t consume(struct conn *c, const uint8_t *p, size_t n) {
    size_t used = 0;
    if (c->state == HANDSHAKE) used = parse_handshake(c, p, n);
    if (c->state == OPEN) used += parse_frames(c, p + used, n - used);
    return used;
}

static uint8_t rbuf[1 << 18];

static void on_readable(struct conn *c) {
    ssize_t r = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        close_conn(c, c->state != CLOSED);
        return;
    }
    now_ns = mono_ns();  /* one clock read per read(): deliveries in it arrived together */
    if (c->len == 0) {   /* common case: parse straight from the read buffer */
        size_t used = consume(c, rbuf, (size_t)r);
        if (c->state != CLOSED && used < (size_t)r) {
            c->buf = grow(c->buf, &c->cap, (uint32_t)(r - (ssize_t)used));
            memcpy(c->buf, rbuf + used, (size_t)r - used);
            c->len = (uint32_t)((size_t)r - used);
        }
        return;
    }
    c->buf = grow(c->buf, &c->cap, c->len + (uint32_t)r);
    memcpy(c->buf + c->len, rbuf, (size_t)r);
    c->len += (uint32_t)r;
    size_t used = consume(c, c->buf, c->len);
    if (c->state == CLOSED) return;
    memmove(c->buf, c->buf + used, c->len - used);
    c->len -= (uint32_t)used;
}

/* ---- connecting ---- */
static int ep;

static void start_connect(int i) {
    struct conn *c = &conns[i];
    int sock_failed;
    c->fd = connect_from(host, port, src_base + i % src_count, &sock_failed);
    if (sock_failed) { perror("socket"); failed++; errors++; c->state = CLOSED; return; }
    c->state = CONNECTING;
    inflight++;
    if (c->fd < 0) { close_conn(c, 1); return; }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void send_upgrade(int i) {
    struct conn *c = &conns[i];
    int err = 0;
    socklen_t elen = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen);
    if (err) { close_conn(c, 1); return; }
    uint8_t key[16];
    for (int k = 0; k < 16; k++) key[k] = (uint8_t)rand();
    char key64[32], req[4096], auth[2048] = "";
    const char *tok = ntokens ? tokens[i % ntokens] : token;
    if (tok) snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", tok);
    base64(key, 16, key64);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s%s\r\n",
                     path, host, port, key64, auth,
                     want_proto ? "Sec-WebSocket-Protocol: chorus.json.v1\r\n" : "",
                     want_deflate ? "Sec-WebSocket-Extensions: permessage-deflate; "
                                    "client_no_context_takeover; server_no_context_takeover\r\n" : "");
    if (n >= (int)sizeof req || send(c->fd, req, (size_t)n, MSG_NOSIGNAL) != n) { close_conn(c, 1); return; }
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* ---- posting ---- */
static void want_writable(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void flush_out(struct conn *c) {
    ssize_t r = send(c->fd, c->out, c->olen, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) close_conn(c, 1);
        return;
    }
    memmove(c->out, c->out + r, c->olen - (size_t)r);
    c->olen -= (uint32_t)r;
    if (!c->olen) want_writable(c, 0);
}

/* Queue bytes behind what the socket has not taken yet, or send them now. */
static void send_bytes(struct conn *c, const uint8_t *p, size_t n) {
    size_t done = 0;
    if (!c->olen) {
        ssize_t r = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0 && errno != EAGAIN && errno != EINTR) { close_conn(c, 1); return; }
        done = r > 0 ? (size_t)r : 0;
        if (done == n) return;
        want_writable(c, 1);
    }
    c->out = grow(c->out, &c->ocap, c->olen + (uint32_t)(n - done));
    memcpy(c->out + c->olen, p + done, n - done);
    c->olen += (uint32_t)(n - done);
}

/* Comment k as a masked text frame on the next open connection. */
static void post_one(long long k, uint64_t due) {
    char text[160];
    int n = k >= post_first_marked
        ? snprintf(text, sizeof text, "{\"t\":\"comment\",\"text\":\"bench bt=%llu k=%lld\",\"nonce\":\"%lld\"}",
                   (unsigned long long)due, k, k)
        : snprintf(text, sizeof text, "{\"t\":\"comment\",\"text\":\"bench warm-up k=%lld\",\"nonce\":\"%lld\"}", k, k);
    if (n < 0 || n > 125) { fprintf(stderr, "loadgen: comment too long\n"); exit(2); }
    for (int tries = 0; tries < nconns; tries++) {
        struct conn *c = &conns[(k + tries) % nconns];
        if (c->state != OPEN) continue;
        uint8_t f[6 + sizeof text];
        uint32_t mask = (uint32_t)rand();
        f[0] = 0x81;                                   /* FIN, text; n < 126 */
        f[1] = 0x80 | (uint8_t)n;
        memcpy(f + 2, &mask, 4);
        for (int i = 0; i < n; i++) f[6 + i] = (uint8_t)text[i] ^ f[2 + (i & 3)];
        send_bytes(c, f, 6 + (size_t)n);
        posted++; m_posted += k >= post_first_marked;
        return;
    }
    posted++; unsent++;                                /* every connection is gone */
    answer[k] = 2;
}

static void poll_once(int timeout_ms) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, timeout_ms);
    for (int k = 0; k < n; k++) {
        uint32_t i = evs[k].data.u32;
        if (i == UINT32_MAX) { stop_flag = 1; continue; }   /* stdin readable or closed: stop */
        struct conn *c = &conns[i];
        if (c->state == CONNECTING) {
            if (evs[k].events & (EPOLLERR | EPOLLHUP)) close_conn(c, 1);
            else send_upgrade((int)i);
        } else if (c->state != CLOSED) {
            if ((evs[k].events & EPOLLOUT) && c->olen) flush_out(c);
            if (c->state != CLOSED && (evs[k].events & ~(uint32_t)EPOLLOUT)) on_readable(c);
        }
    }
}

/* Time this process was runnable but not running (ns): another process had CPU 1. */
static uint64_t run_delay_ns(void) {
    unsigned long long run = 0, wait = 0;
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (f) { if (fscanf(f, "%llu %llu", &run, &wait) != 2) wait = 0; fclose(f); }
    return (uint64_t)wait;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port P (--hold|--recv|--sink|--post RATE) [--host H] [--path /ws] [--conns N]\n"
                    "  [--seconds S] [--start-after MS] [--expect D] [--src-base B] [--src-count K]\n"
                    "  [--subprotocol] [--deflate] [--connect-rate R] [--max-inflight M]\n"
                    "  [--token JWT | --token-file F] [--grace S]\n");
    exit(2);
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

int main(int argc, char **argv) {
    int recv_mode = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (strcmp(a, "--hold") == 0) hold = 1;
        else if (strcmp(a, "--recv") == 0) recv_mode = 1;
        else if (strcmp(a, "--sink") == 0) sink = 1;
        else if (strcmp(a, "--subprotocol") == 0) want_proto = 1;
        else if (strcmp(a, "--deflate") == 0) want_deflate = 1;
        else if (OPT("--host")) host = v;
        else if (OPT("--port")) port = atoi(v);
        else if (OPT("--path")) path = v;
        else if (OPT("--conns")) nconns = atoi(v);
        else if (OPT("--seconds")) seconds = atof(v);
        else if (OPT("--start-after")) start_after_ms = atof(v);
        else if (OPT("--expect")) expect = atoll(v);
        else if (OPT("--src-base")) src_base = atoi(v);
        else if (OPT("--src-count")) src_count = atoi(v);
        else if (OPT("--connect-rate")) connect_rate = atof(v);
        else if (OPT("--max-inflight")) max_inflight = atoi(v);
        else if (OPT("--connect-timeout")) connect_timeout = atof(v);
        else if (OPT("--post")) post_rate = atof(v);
        else if (OPT("--token")) token = v;
        else if (OPT("--token-file")) read_lines(v, &tokens, &ntokens);
        else if (OPT("--grace")) grace_s = atof(v);
        else usage();
    }
    if (!port || hold + recv_mode + sink + (post_rate > 0) != 1 || nconns < 1 || src_count < 1 || src_base + src_count > 255)
        usage();

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconns + 16 > rl.rlim_cur) {
        fprintf(stderr, "loadgen: %d connections need more than the %llu fds allowed\n",
                nconns, (unsigned long long)rl.rlim_cur);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    srand((unsigned)getpid());
    if (inflateInit2(&zs, -15) != Z_OK) return 2;
    conns = calloc((size_t)nconns, sizeof *conns);
    ep = epoll_create1(0);
    struct stat st;
    if (fstat(0, &st) == 0 && S_ISFIFO(st.st_mode)) {
        /* the harness closes our stdin when it has measured: that ends the run */
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }

    /* Connect in small bursts under a rate limit and an in-flight cap, so the server's accept
     * queue (100 by default in asyncio) never overflows into SYN retries. */
    uint64_t t0 = mono_ns();
    win_start = win_end = UINT64_MAX;
    while (!stop_flag && connected + failed < nconns) {
        double elapsed = (double)(mono_ns() - t0) / 1e9;
        if (elapsed > connect_timeout) break;
        int allowed = (int)(elapsed * connect_rate) + 1 - started;
        while (started < nconns && allowed-- > 0 && inflight < max_inflight) start_connect(started++);
        poll_once(1);
    }
    for (int i = 0; i < started; i++)       /* whatever is still half-open failed */
        if (conns[i].state == CONNECTING || conns[i].state == HANDSHAKE) close_conn(&conns[i], 1);
    double connect_ms = (double)(mono_ns() - t0) / 1e6;
    printf("{\"phase\":\"connected\",\"connected\":%d,\"failed\":%d,\"connect_ms\":%.1f}\n",
           connected, failed, connect_ms);
    fflush(stdout);

    uint64_t t1 = mono_ns();
    win_start = t1 + (uint64_t)(start_after_ms * 1e6);
    win_end = win_start + (uint64_t)(seconds * 1e9);
    if (hold) win_start = win_end = t1;  /* nothing is counted while holding */
    if (post_rate > 0) {
        period_ns = 1e9 / post_rate;
        post_first_marked = (long long)(post_rate * start_after_ms / 1e3 + 0.999999);
        post_total = (long long)(post_rate * (start_after_ms / 1e3 + seconds));
        answer = calloc((size_t)post_total + 1, 1);
        post_t0 = t1;
        win_end = t1 + (uint64_t)((double)post_total * period_ns);  /* the last comment is due */
    }
    struct rusage ru0 = {0}, ru1;
    uint64_t wait0 = 0;
    int window_open = 0;
    uint64_t stop_at = hold ? t1 + (uint64_t)(seconds * 1e9) : win_end;
    if (post_rate > 0) stop_at = win_end + (uint64_t)(grace_s * 1e9);
    while (!stop_flag) {
        uint64_t t = mono_ns();
        if (!window_open && t >= win_start) { window_open = 1; getrusage(RUSAGE_SELF, &ru0); wait0 = run_delay_ns(); }
        if (t >= stop_at || (expect && deliveries >= expect)) break;
        if (post_rate > 0) {
            while (posted < post_total) {
                uint64_t due = post_t0 + (uint64_t)((double)posted * period_ns);
                if (due > t) break;
                if (t - due > max_lag_ns) max_lag_ns = t - due;
                post_one(posted, due);
            }
            if (posted == post_total && acked + refused + unsent >= posted) break;  /* every comment answered */
        }
        poll_once(post_rate > 0 ? 1 : 5);
    }
    getrusage(RUSAGE_SELF, &ru1);
    double wait_s = window_open ? (double)(run_delay_ns() - wait0) / 1e9 : 0;
    uint64_t t_end = mono_ns();
    double win_s = 0;
    if (!hold && t_end > win_start) win_s = (double)((t_end < win_end ? t_end : win_end) - win_start) / 1e9;
    double cpu_s = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec)
                   + (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    printf("{\"phase\":\"done\",\"mode\":\"%s\",\"conns\":%d,\"connected\":%d,\"failed\":%d,\"open\":%d,"
           "\"closed_by_server\":%d,\"deflate_conns\":%d,\"errors\":%lld,\"inflate_errors\":%lld,"
           "\"connect_ms\":%.1f,\"window_s\":%.3f,\"messages\":%lld,\"rx_bytes\":%lld,"
           "\"deliveries\":%lld,\"deliveries_per_s\":%.1f,\"p50_ms\":%.3f,\"p95_ms\":%.3f,"
           "\"p99_ms\":%.3f,\"max_ms\":%.3f,\"cpu_pct\":%.1f,\"wait_pct\":%.1f,\"hist\":[",
           hold ? "hold" : recv_mode ? "recv" : sink ? "sink" : "post", nconns, connected, failed, open_now, closed_by_server, deflate_conns,
           errors, inflate_errors, connect_ms, win_s, messages, rx_bytes, deliveries,
           win_s > 0 ? (double)deliveries / win_s : 0.0, percentile_ms(0.50), percentile_ms(0.95),
           percentile_ms(0.99), (double)lat_max_us / 1000.0, win_s > 0 ? 100.0 * cpu_s / win_s : 0.0,
           win_s > 0 ? 100.0 * wait_s / win_s : 0.0);
    /* Non-empty buckets as [low_us, count], so the harness can merge several processes. */
    int first = 1;
    for (int b = 0; b < NBUCKETS; b++)
        if (hist[b]) { printf("%s[%llu,%llu]", first ? "" : ",", (unsigned long long)bucket_low(b),
                              (unsigned long long)hist[b]); first = 0; }
    printf("],\"duplicates\":%lld,\"throttle_events\":%lld,\"skipped_events\":%lld",
           duplicates, throttle_events, skipped_events);
    if (recv_mode) {  /* first receipts per connection: the least and most served viewer */
        long long lo = -1, hi = 0;
        for (int i = 0; i < started; i++)
            if (conns[i].state == OPEN) { if (lo < 0 || conns[i].got < lo) lo = conns[i].got; if (conns[i].got > hi) hi = conns[i].got; }
        printf(",\"conn_min\":%lld,\"conn_max\":%lld", lo < 0 ? 0 : lo, hi);
    }
    if (post_rate > 0)
        printf(",\"rate\":%.1f,\"posted\":%lld,\"unsent\":%lld,\"acked\":%lld,\"refused\":%lld,"
               "\"rate_limited\":%lld,\"marked_posted\":%lld,\"marked_acked\":%lld,\"marked_refused\":%lld,"
               "\"marked_rate_limited\":%lld,\"unanswered\":%lld,\"max_lag_ms\":%.3f,\"first_refusal\":\"",
               post_rate, posted, unsent, acked, refused, rate_limited, m_posted, m_acked, m_refused,
               m_rate_limited, posted - acked - refused - unsent, (double)max_lag_ns / 1e6);
    if (post_rate > 0) {
        for (const char *q = first_refusal; *q; q++)   /* printable ASCII only: it goes into JSON */
            printf(*q == '"' || *q == '\\' ? "\\%c" : "%c", *q >= 32 && *q < 127 ? *q : '?');
        printf("\"");
    }
    printf("}\n");
    fflush(stdout);
    /* Close with RST (SO_LINGER 0): a bench run leaves no TIME_WAIT sockets behind, which
     * would fill the kernel's table and skew the next step's slab readings. */
    struct linger lin = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < started; i++)
        if (conns[i].state != CLOSED) {
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
            close(conns[i].fd);
        }
    return 0;
}
