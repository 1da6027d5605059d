/* wsclient.h: what the bench's C WebSocket clients (loadgen.c, reactgen.c) share.
 *
 * Static helpers included by each program, which python -m bench compiles on its own
 * (bench/harness.py hashes this header into every build that includes it).
 */
#ifndef CHORUS_BENCH_WSCLIENT_H
#define CHORUS_BENCH_WSCLIENT_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* p grown (realloc, doubling from 512) to hold `need` bytes; exits if memory runs out. */
static void *grow(void *p, uint32_t *cap, uint32_t need) {
    if (need <= *cap) return p;
    uint32_t c = *cap ? *cap : 512;
    while (c < need) c *= 2;
    p = realloc(p, c);
    if (!p) { perror("realloc"); exit(2); }
    *cap = c;
    return p;
}

/* The gateway writes "t" first: {"t":"<type>",... */
static int is_event(const uint8_t *p, size_t n, const char *type) {
    size_t tn = strlen(type);
    return n > 7 + tn && memcmp(p, "{\"t\":\"", 6) == 0 && memcmp(p + 6, type, tn) == 0 && p[6 + tn] == '"';
}

/* The header of the frame at f (RFC 6455 5.2) when `avail` bytes hold all of it: its length
 * in *hdr and the payload's in *len; 0 when more bytes are needed. */
static int frame_header(const uint8_t *f, size_t avail, size_t *hdr, uint64_t *len) {
    if (avail < 2) return 0;
    *len = f[1] & 0x7f;
    *hdr = 2;
    if (*len == 126) {
        if (avail < 4) return 0;
        *len = (uint64_t)f[2] << 8 | f[3];
        *hdr = 4;
    } else if (*len == 127) {
        if (avail < 10) return 0;
        *len = 0;
        for (int i = 0; i < 8; i++) *len = *len << 8 | f[2 + i];
        *hdr = 10;
    }
    return 1;
}

/* A non-blocking TCP connect to host:port from 127.0.0.<src> (loopback source addresses
 * spread the connections past one address's ~28k ephemeral ports); the socket, or -1 when
 * it could not be made, bound or started (*sock_failed: the socket call itself failed). */
static int connect_from(const char *host, int port, int src, int *sock_failed) {
    *sock_failed = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { *sock_failed = 1; return -1; }
    /* Pick the port at connect() time from the full 4-tuple, not at bind() time per address. */
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in from = {.sin_family = AF_INET};
    from.sin_addr.s_addr = htonl(0x7f000000u | (uint32_t)src);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &to.sin_addr);
    if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0 ||
        (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The non-empty lines of `file` (one token each) appended to *lines; exits if unreadable. */
static void read_lines(const char *file, char ***lines, int *count) {
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); exit(2); }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (!n) continue;
        *lines = realloc(*lines, sizeof **lines * (size_t)(*count + 1));
        if (!*lines || !((*lines)[(*count)++] = strdup(line))) { perror(file); exit(2); }
    }
    free(line);
    fclose(f);
}

#endif
