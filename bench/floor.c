/* floor.c: the physical floor, a raw C epoll WebSocket broadcast server (python -m bench builds it).
 *
 * What a server cannot beat on this machine: no parsing beyond the upgrade, frames built once,
 * one non-blocking send() per viewer. A timerfd publisher generates --rate messages/s of
 * ~200-byte JSON shaped like a Chorus one-comment batch, {"t":"batch",...,"bt":<ns>}, where bt is the
 * CLOCK_MONOTONIC time the message was due (so a publisher that falls behind shows up as
 * latency instead of hiding it).
 *   --mode single    one send() per message per viewer, as generated;
 *   --mode coalesce  each tick, everything waiting for a viewer goes out in ONE send().
 * On EAGAIN the rest waits in a bounded per-viewer pending buffer; what does not fit is dropped
 * (whole messages) and counted. Commands on stdin: "start" begins the schedule of a server
 * started with --paused, "burst N" publishes N messages at once. When stdin is
 * a pipe and it closes, the server exits (so a harness that died leaves nothing behind).
 * Build: cc -O2 floor.c (SHA-1 is below, so no libcrypto is needed).
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
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* ---- SHA-1 (FIPS 180-4), only for Sec-WebSocket-Accept ---- */
#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++) w[i] = (uint32_t)p[4 * i] << 24 | p[4 * i + 1] << 16 | p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t t = ROL(a, 5) + f + e + k + w[i];
        e = d; d = c; c = ROL(b, 30); b = a; a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1(const uint8_t *msg, size_t n, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    uint8_t tail[128] = {0};
    size_t full = n & ~(size_t)63, rest = n - full;
    for (size_t i = 0; i < full; i += 64) sha1_block(h, msg + i);
    memcpy(tail, msg + full, rest);
    tail[rest] = 0x80;
    size_t tlen = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++) tail[tlen - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha1_block(h, tail);
    if (tlen == 128) sha1_block(h, tail + 64);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

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

/* ---- connections: one preallocated slot per fd; buffers only while needed ---- */
enum { FREE = 0, HANDSHAKE, OPEN };
struct conn {
    uint8_t state;
    uint32_t hlen, plen, pcap;
    int vindex;                 /* position in viewers[] */
    char *hbuf;                 /* the upgrade request, freed once answered */
    uint8_t *pend;              /* bytes a full socket did not take yet */
};
static struct conn *conns;
static int *viewers, nviewers, maxfd;
static int ep, lfd, tfd;
static int mode_coalesce;
static size_t pending_max = 64 * 1024;  /* as Chorus's backlog_limit_bytes default */
static double rate;
static unsigned long long generated, sends, drops, eagains;
static volatile sig_atomic_t stop_flag;

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void drop_conn(int fd) {
    struct conn *c = &conns[fd];
    if (c->state == OPEN) {  /* swap-remove from the viewer list */
        int last = viewers[--nviewers];
        viewers[c->vindex] = last;
        conns[last].vindex = c->vindex;
    }
    free(c->hbuf); free(c->pend);
    memset(c, 0, sizeof *c);
    close(fd);
}

static void want_write(int fd, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static int keep_pending(struct conn *c, const uint8_t *p, size_t n) {
    if (c->plen + n > pending_max) return 0;
    if (c->plen + n > c->pcap) {
        c->pcap = (uint32_t)(c->plen + n < 4096 ? 4096 : c->plen + n);
        c->pend = realloc(c->pend, c->pcap);
    }
    memcpy(c->pend + c->plen, p, n);
    c->plen += (uint32_t)n;
    return 1;
}

/* One send() of p; whatever the socket does not take waits in the pending buffer. */
static void send_now(int fd, const uint8_t *p, size_t n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    sends++;
    if (w < 0) {
        if (errno != EAGAIN) { drop_conn(fd); return; }
        w = 0;
    }
    if ((size_t)w < n) {
        eagains++;
        keep_pending(&conns[fd], p + w, n - (size_t)w);  /* always fits: pending was empty */
        want_write(fd, 1);
    }
}

/* Frames p[0..n) holding `msgs` whole messages, for one viewer. */
static void deliver(int fd, const uint8_t *p, size_t n, int msgs) {
    struct conn *c = &conns[fd];
    if (c->plen == 0) { send_now(fd, p, n); return; }
    if (!keep_pending(c, p, n)) { drops += (unsigned long long)msgs; return; }
    if (mode_coalesce) {  /* pending + new in one send() */
        uint8_t *all = c->pend;
        size_t len = c->plen;
        c->pend = NULL; c->plen = c->pcap = 0;
        send_now(fd, all, len);
        free(all);
        if (conns[fd].state == OPEN && conns[fd].plen == 0) want_write(fd, 0);
    }
}

static void on_writable(int fd) {
    struct conn *c = &conns[fd];
    ssize_t w = send(fd, c->pend, c->plen, MSG_NOSIGNAL | MSG_DONTWAIT);
    sends++;
    if (w < 0) { if (errno != EAGAIN) drop_conn(fd); return; }
    memmove(c->pend, c->pend + w, c->plen - (size_t)w);
    c->plen -= (uint32_t)w;
    if (c->plen == 0) want_write(fd, 0);
}

/* ---- messages ---- */
static uint8_t batch[1 << 22];   /* frames of the messages generated in one tick */
static size_t batch_len;
static int batch_msgs;
static size_t frame_off[65536];

static void add_message(uint64_t bt) {
    char json[256];
    int n = snprintf(json, sizeof json,
                     "{\"t\":\"batch\",\"stream\":\"bench\",\"epoch\":\"e\",\"offset\":%llu,\"comments\":"
                     "[{\"id\":\"%llu\",\"stream\":\"bench\",\"user\":{\"id\":\"1\",\"name\":\"bench\","
                     "\"badges\":[]},\"text\":\"nice play!\",\"ts\":%llu,\"bt\":%llu}]}",
                     (unsigned long long)generated, (unsigned long long)generated,
                     (unsigned long long)(bt / 1000000), (unsigned long long)bt);
    if (batch_len + (size_t)n + 4 > sizeof batch || batch_msgs == 65535) return;
    frame_off[batch_msgs++] = batch_len;
    batch[batch_len++] = 0x81;          /* FIN + text; a server frame is unmasked (RFC 6455 5.1) */
    if (n < 126) {
        batch[batch_len++] = (uint8_t)n;    /* the 7-bit length form */
    } else {                                /* 126: a 16-bit length follows (RFC 6455 5.2) */
        batch[batch_len++] = 126;
        batch[batch_len++] = (uint8_t)(n >> 8);
        batch[batch_len++] = (uint8_t)(n & 0xff);
    }
    memcpy(batch + batch_len, json, (size_t)n);
    batch_len += (size_t)n;
    frame_off[batch_msgs] = batch_len;
    generated++;
}

static void publish_batch(void) {
    if (!batch_msgs) return;
    if (mode_coalesce) {
        for (int v = nviewers - 1; v >= 0; v--) deliver(viewers[v], batch, batch_len, batch_msgs);
    } else {
        for (int m = 0; m < batch_msgs; m++)
            for (int v = nviewers - 1; v >= 0; v--)   /* backwards: drop_conn swaps from the end */
                deliver(viewers[v], batch + frame_off[m], frame_off[m + 1] - frame_off[m], 1);
    }
    batch_len = 0;
    batch_msgs = 0;
}

static uint64_t t0;
static int paused;

static void on_tick(void) {
    uint64_t expirations;
    (void)!read(tfd, &expirations, sizeof expirations);
    uint64_t now = mono_ns();
    if (rate <= 0 || paused) return;
    /* Messages due by now; bt is when each was due, not when the loop got round to it. */
    unsigned long long due = (unsigned long long)((double)(now - t0) * rate / 1e9);
    static unsigned long long scheduled;
    while (scheduled < due && batch_msgs < 65535) {
        scheduled++;
        add_message(t0 + (uint64_t)((double)scheduled * 1e9 / rate));
    }
    publish_batch();
}

static void on_stdin(void) {
    char line[128];
    ssize_t n = read(0, line, sizeof line - 1);
    if (n <= 0) {  /* the harness is gone (or done): stop rather than linger */
        stop_flag = 1;
        return;
    }
    line[n] = 0;
    int k;
    if (strncmp(line, "start", 5) == 0 && paused) {
        paused = 0;
        t0 = mono_ns();
    } else if (sscanf(line, "burst %d", &k) == 1) {
        uint64_t bt = mono_ns();
        for (int i = 0; i < k; i++) add_message(bt);
        publish_batch();
    }
}

/* ---- the upgrade ---- */
static void answer_upgrade(int fd) {
    struct conn *c = &conns[fd];
    char *key = strcasestr(c->hbuf, "\r\nSec-WebSocket-Key:");
    if (!key) { drop_conn(fd); return; }
    key += 20;
    while (*key == ' ') key++;
    char buf[128];
    int klen = (int)strcspn(key, " \r\n");
    if (klen > 64) { drop_conn(fd); return; }
    int n = snprintf(buf, sizeof buf, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", klen, key);
    uint8_t digest[20];
    char accept[32], resp[512];
    sha1((uint8_t *)buf, (size_t)n, digest);
    base64(digest, 20, accept);
    int proto = strcasestr(c->hbuf, "chorus.json.v1") != NULL;
    n = snprintf(resp, sizeof resp,
                 "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n%s\r\n",
                 accept, proto ? "Sec-WebSocket-Protocol: chorus.json.v1\r\n" : "");
    free(c->hbuf);
    c->hbuf = NULL;
    if (send(fd, resp, (size_t)n, MSG_NOSIGNAL) != n) { drop_conn(fd); return; }
    c->state = OPEN;
    c->vindex = nviewers;
    viewers[nviewers++] = fd;
}

static void on_readable(int fd) {
    struct conn *c = &conns[fd];
    char tmp[4096];
    if (c->state == HANDSHAKE) {
        ssize_t r = recv(fd, c->hbuf + c->hlen, 4095 - c->hlen, 0);
        if (r <= 0) { if (r == 0 || errno != EAGAIN) drop_conn(fd); return; }
        c->hlen += (uint32_t)r;
        c->hbuf[c->hlen] = 0;
        if (strstr(c->hbuf, "\r\n\r\n")) answer_upgrade(fd);
        else if (c->hlen >= 4095) drop_conn(fd);
        return;
    }
    ssize_t r = recv(fd, tmp, sizeof tmp, 0);  /* pongs and closes: read and ignore */
    if (r == 0 || (r < 0 && errno != EAGAIN)) drop_conn(fd);
}

static void on_accept(void) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) return;
        if (fd >= maxfd) { close(fd); continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[fd].state = HANDSHAKE;
        conns[fd].hbuf = malloc(4096);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

int main(int argc, char **argv) {
    int port = 0, tick_us = 1000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (!strcmp(a, "--paused")) paused = 1;
        else if (OPT("--port")) port = atoi(v);
        else if (OPT("--rate")) rate = atof(v);
        else if (OPT("--mode")) mode_coalesce = !strcmp(v, "coalesce");
        else if (OPT("--tick-us")) tick_us = atoi(v);
        else if (OPT("--pending-max")) pending_max = (size_t)atol(v);
        else { port = 0; break; }
    }
    if (!port) {
        fprintf(stderr, "usage: floor --port P [--rate R] [--mode single|coalesce] [--tick-us 1000] [--paused]\n");
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    maxfd = (int)rl.rlim_cur;
    conns = calloc((size_t)maxfd, sizeof *conns);
    viewers = calloc((size_t)maxfd, sizeof *viewers);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {.it_interval = {0, tick_us * 1000L}, .it_value = {0, tick_us * 1000L}};
    timerfd_settime(tfd, 0, &its, NULL);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = tfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    struct stat st;
    if (fstat(0, &st) == 0 && S_ISFIFO(st.st_mode)) {  /* a controller: watch it */
        ev.data.fd = 0;
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }
    t0 = mono_ns();

    struct epoll_event evs[256];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) on_accept();
            else if (fd == tfd) on_tick();
            else if (fd == 0) on_stdin();
            else if (conns[fd].state == FREE) continue;        /* dropped earlier in this round */
            else if (evs[k].events & EPOLLOUT && conns[fd].plen) on_writable(fd);
            else if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(fd);
        }
    }
    fprintf(stderr, "floor: viewers=%d generated=%llu sends=%llu eagain=%llu dropped=%llu\n",
            nviewers, generated, sends, eagains, drops);
    return 0;
}
