/* reactgen.c: viewers that react, for the Chorus `reactions` bench (python -m bench builds it).
 *
 * Opens --conns WebSocket connections from one epoll loop (source addresses 127.0.0.<base> ...
 * <base+count-1>, each connection authenticated with a line of --token-file, so each is a
 * different user), waits --start-after ms, then sends {"t":"react","emoji":"<e>"} at --rate
 * reactions/s in total for --seconds, cycling through --emoji. Writes go round robin over
 * the connections on a 1 ms tick, --per-write reactions (frames) per write: write w goes to
 * connection w mod N, so each connection writes at rate / (per_write x N) per second with
 * the connections' phases spread evenly.
 * Counts what comes back: `reactions` and `viewers` events, and `error` events by code.
 * At the end each connection is half-closed (FIN) and read until the gateway closes it, so
 * every reaction sent is read. Prints {"phase":"connected",...} when the connect phase ends
 * and {"phase":"done",...} at the end. When stdin is a pipe, its closing ends the run early.
 * Build: cc -O2 reactgen.c.
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
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "wsclient.h"


enum { CONNECTING = 1, HANDSHAKE, OPEN, CLOSED };

struct conn {
    int fd;
    uint8_t state;
    uint8_t *buf;            /* bytes carried over between reads: a partial response or frame */
    uint32_t len, cap;
};

static const char *host = "127.0.0.1", *path = "/ws?stream=bench", *emoji_list = "heart,fire,laugh,wow,clap,sad";
static int port, nconns = 1, src_base = 2, src_count = 1, per_write = 1;
static double rate = 1000, seconds = 10, start_after_ms = 1000, connect_timeout = 60;
static char **tokens;
static int ntokens;

static struct conn *conns;
static int ep, connected, failed, open_now, closed_by_server, inflight;
static long long sent, writes, blocked, reactions_events, viewers_events, errors_rate_limited, errors_other;
static char first_error[96];

/* Pre-built masked frames, one per emoji. A fixed mask key: the server unmasks whatever key a
 * frame carries, and the bench measures the server, not the client's randomness. */
static uint8_t frames[16][64];
static int frame_len[16], nframes;

static void build_frames(void) {
    static const uint8_t mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    char *list = strdup(emoji_list), *save = NULL;
    for (char *e = strtok_r(list, ",", &save); e && nframes < 16; e = strtok_r(NULL, ",", &save)) {
        char text[64];
        int n = snprintf(text, sizeof text, "{\"t\":\"react\",\"emoji\":\"%s\"}", e);
        if (n < 0 || n > 56) { fprintf(stderr, "reactgen: emoji name too long: %s\n", e); exit(2); }
        uint8_t *f = frames[nframes];
        f[0] = 0x81;                       /* FIN, text */
        f[1] = 0x80 | (uint8_t)n;          /* masked, n < 126 */
        memcpy(f + 2, mask, 4);
        for (int i = 0; i < n; i++) f[6 + i] = (uint8_t)text[i] ^ mask[i & 3];
        frame_len[nframes++] = 6 + n;
    }
    free(list);
    if (!nframes) { fprintf(stderr, "reactgen: --emoji is empty\n"); exit(2); }
}

static void close_conn(struct conn *c) {
    if (c->state == CLOSED) return;
    if (c->state == OPEN) open_now--;
    if (c->state == CONNECTING || c->state == HANDSHAKE) { inflight--; failed++; }
    close(c->fd);
    c->state = CLOSED;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}

static void send_control(struct conn *c, int op, const uint8_t *p, size_t n) {
    uint8_t f[6 + 125];
    if (n > 125) n = 125;
    f[0] = 0x80 | (uint8_t)op;
    f[1] = 0x80 | (uint8_t)n;
    memset(f + 2, 0, 4);                   /* mask key 0: the payload goes as is */
    memcpy(f + 6, p, n);
    (void)!send(c->fd, f, 6 + n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static void on_message(const uint8_t *p, size_t n) {
    if (is_event(p, n, "reactions")) { reactions_events++; return; }
    if (is_event(p, n, "viewers")) { viewers_events++; return; }
    if (!is_event(p, n, "error")) return;
    if (memmem(p, n, "\"code\":\"rate_limited\"", 21)) { errors_rate_limited++; return; }
    errors_other++;
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%.*s", (int)(n < 90 ? n : 90), (const char *)p);
}

/* Whole server frames (unmasked; the gateway sends no fragments to this client). */
static size_t parse_frames(struct conn *c, const uint8_t *p, size_t n) {
    size_t off = 0;
    while (c->state == OPEN) {
        const uint8_t *f = p + off;
        uint64_t len;
        size_t hdr;
        if (!frame_header(f, n - off, &hdr, &len)) break;
        if (n - off < hdr + len) break;
        int op = f[0] & 0x0f;
        if (op == 0x9) send_control(c, 0xA, f + hdr, (size_t)len);
        else if (op == 0x8) { send_control(c, 0x8, f + hdr, len < 2 ? (size_t)len : 2); closed_by_server++; close_conn(c); }
        else if (op == 0x1) on_message(f + hdr, (size_t)len);
        off += hdr + (size_t)len;
    }
    return off;
}

static size_t consume(struct conn *c, const uint8_t *p, size_t n) {
    size_t used = 0;
    if (c->state == HANDSHAKE) {
        const uint8_t *end = memmem(p, n, "\r\n\r\n", 4);
        if (!end) return 0;
        if (n < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) { close_conn(c); return n; }
        used = (size_t)(end - p) + 4;
        c->state = OPEN;
        inflight--; connected++; open_now++;
    }
    if (c->state == OPEN) used += parse_frames(c, p + used, n - used);
    return used;
}

static uint8_t rbuf[1 << 16];

static void on_readable(struct conn *c) {
    ssize_t r = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        close_conn(c);
        return;
    }
    c->buf = grow(c->buf, &c->cap, c->len + (uint32_t)r);
    memcpy(c->buf + c->len, rbuf, (size_t)r);
    c->len += (uint32_t)r;
    size_t used = consume(c, c->buf, c->len);
    if (c->state == CLOSED) return;
    memmove(c->buf, c->buf + used, c->len - used);
    c->len -= (uint32_t)used;
    if (!c->len) { free(c->buf); c->buf = NULL; c->cap = 0; }   /* idle connections hold nothing */
}

static void start_connect(int i) {
    struct conn *c = &conns[i];
    int sock_failed;
    c->fd = connect_from(host, port, src_base + i % src_count, &sock_failed);
    if (sock_failed) { perror("socket"); failed++; c->state = CLOSED; return; }
    c->state = CONNECTING;
    inflight++;
    if (c->fd < 0) { close_conn(c); return; }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void send_upgrade(int i) {
    struct conn *c = &conns[i];
    int err = 0;
    socklen_t elen = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen);
    if (err) { close_conn(c); return; }
    char req[4096], auth[2048] = "";
    if (ntokens) snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", tokens[i % ntokens]);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     path, host, port, auth);
    if (n >= (int)sizeof req || send(c->fd, req, (size_t)n, MSG_NOSIGNAL) != n) { close_conn(c); return; }
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write w: --per-write reactions in one send() on connection w mod N (the next open one). */
static void write_one(long long w) {
    uint8_t out[16 * 64 * 4];
    size_t n = 0;
    for (int k = 0; k < per_write; k++) {
        int e = (int)((w * per_write + k) % nframes);
        memcpy(out + n, frames[e], (size_t)frame_len[e]);
        n += (size_t)frame_len[e];
    }
    for (int tries = 0; tries < nconns; tries++) {
        struct conn *c = &conns[(w + tries) % nconns];
        if (c->state != OPEN) continue;
        ssize_t r = send(c->fd, out, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r == (ssize_t)n) { sent += per_write; writes++; return; }
        if (r < 0 && errno != EAGAIN && errno != EINTR) { close_conn(c); continue; }
        blocked++;   /* a full socket buffer: the server is not reading; these reactions are not sent */
        return;
    }
}

static void poll_once(int timeout_ms) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, timeout_ms);
    for (int k = 0; k < n; k++) {
        uint32_t i = evs[k].data.u32;
        if (i == UINT32_MAX) { seconds = 0; continue; }   /* stdin closed: stop */
        struct conn *c = &conns[i];
        if (c->state == CONNECTING) {
            if (evs[k].events & (EPOLLERR | EPOLLHUP)) close_conn(c);
            else send_upgrade((int)i);
        } else if (c->state != CLOSED) {
            on_readable(c);
        }
    }
}

static void usage(void) {
    fprintf(stderr, "usage: reactgen --port P [--host H] [--path /ws?stream=S] [--conns N] [--rate R]\n"
                    "  [--per-write K] [--seconds S] [--start-after MS] [--token-file F] [--emoji a,b]\n"
                    "  [--src-base B] [--src-count K]\n");
    exit(2);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (OPT("--host")) host = v;
        else if (OPT("--port")) port = atoi(v);
        else if (OPT("--path")) path = v;
        else if (OPT("--conns")) nconns = atoi(v);
        else if (OPT("--rate")) rate = atof(v);
        else if (OPT("--per-write")) per_write = atoi(v);
        else if (OPT("--seconds")) seconds = atof(v);
        else if (OPT("--start-after")) start_after_ms = atof(v);
        else if (OPT("--token-file")) read_lines(v, &tokens, &ntokens);
        else if (OPT("--emoji")) emoji_list = v;
        else if (OPT("--src-base")) src_base = atoi(v);
        else if (OPT("--src-count")) src_count = atoi(v);
        else usage();
    }
    if (!port || nconns < 1 || rate <= 0 || per_write < 1 || per_write > 64 || src_base + src_count > 255) usage();
    build_frames();
    conns = calloc((size_t)nconns, sizeof *conns);
    ep = epoll_create1(0);
    struct stat st;
    if (fstat(0, &st) == 0 && S_ISFIFO(st.st_mode)) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }

    uint64_t t0 = mono_ns(), connect_deadline = t0 + (uint64_t)(connect_timeout * 1e9);
    int started = 0;
    while ((started < nconns || inflight > 0) && mono_ns() < connect_deadline) {
        while (started < nconns && inflight < 500) start_connect(started++);
        poll_once(5);
    }
    printf("{\"phase\":\"connected\",\"conns\":%d,\"connected\":%d,\"failed\":%d,\"connect_s\":%.2f}\n",
           nconns, connected, failed, (double)(mono_ns() - t0) / 1e9);
    fflush(stdout);

    uint64_t start = mono_ns() + (uint64_t)(start_after_ms * 1e6);
    while (mono_ns() < start && seconds > 0) poll_once(5);
    uint64_t t1 = mono_ns(), end = t1 + (uint64_t)(seconds * 1e9);
    double writes_per_ns = rate / per_write / 1e9;
    long long w = 0;
    while (seconds > 0) {
        uint64_t now = mono_ns();
        if (now >= end) break;
        long long due = (long long)((double)(now - t1) * writes_per_ns);
        while (w < due) write_one(w++);
        poll_once(1);
    }
    double run_s = (double)(mono_ns() - t1) / 1e9;
    /* Half-close and read until the gateway closes each connection: exiting with unread bytes
     * would reset the sockets, and a reset drops what the gateway has not read yet. */
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == OPEN) shutdown(conns[i].fd, SHUT_WR);
    uint64_t drain_until = mono_ns() + 30000000000ull;
    while (open_now > 0 && mono_ns() < drain_until) poll_once(5);
    printf("{\"phase\":\"done\",\"conns\":%d,\"connected\":%d,\"open\":%d,\"closed_by_server\":%d,"
           "\"run_s\":%.3f,\"sent\":%lld,\"writes\":%lld,\"blocked_writes\":%lld,\"per_write\":%d,"
           "\"reactions_events\":%lld,\"viewers_events\":%lld,\"errors_rate_limited\":%lld,\"errors_other\":%lld,"
           "\"first_error\":\"",
           nconns, connected, open_now, closed_by_server, run_s, sent, writes, blocked, per_write,
           reactions_events, viewers_events, errors_rate_limited, errors_other);
    for (const char *p = first_error; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar(*p);
    }
    printf("\"}\n");
    return 0;
}
