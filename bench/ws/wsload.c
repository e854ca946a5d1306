/*
 * wsload: a small, fast WebSocket load generator and echo backend for Charon's benchmarks.
 *
 * One binary, single-threaded epoll, non-blocking sockets, loopback only:
 *
 *   wsload server    --port P
 *   wsload echo      --url ws://127.0.0.1:P/ [--host H] --conns 100 --size 32 --duration 10
 *                    [--warmup 2]
 *   wsload handshake --url ws://127.0.0.1:P/ [--host H] --conns 50 --duration 10 [--warmup 1]
 *   wsload idle      --url ws://127.0.0.1:P/ [--host H] --conns 9000 --hold 20 [--rate 2000]
 *   wsload selftest
 *
 * The client modes print JSON lines on stdout (one per result; `idle` also prints progress
 * lines). SHA-1 and base64 for the RFC 6455 handshake are implemented here: no OpenSSL.
 * Build: gcc -O2 -o wsload wsload.c (see the Makefile).
 *
 * `echo --inflight N` keeps N messages in flight per connection (default 1).
 * `--header "Name: value"` (client modes, repeatable) adds a field to every upgrade request,
 * e.g. an Authorization for a host behind basic auth (bench/access.py).
 *
 * wsload-tls (the same file built with -DWSLOAD_TLS, linked with OpenSSL; `make wsload-tls`)
 * also takes wss://127.0.0.1:P/ URLs: the client modes then speak TLS (certificates are not
 * verified: this measures the server's cost), with SNI `--sni NAME` (default: the --host name
 * without its port); `handshake --resume 1` offers the session of the first connection on every
 * later one, so that the server resumes instead of doing a full handshake. Its results add
 * "tls_handshakes" and "tls_resumed". `wsload-tls tls --url wss://...` loops over TLS alone:
 * connect, handshake, close_notify, wait for the server's close (no HTTP at all).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef WSLOAD_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define MAX_FRAME (16u << 20)    /* larger frames are refused (protocol error) */
#define MAX_HEAD 16384           /* a handshake head larger than this is refused */
#define HS_TIMEOUT_NS (15ull * 1000000000ull)
#define ECHO_TIMEOUT_NS (10ull * 1000000000ull)
#define CLOSE_TIMEOUT_NS (5ull * 1000000000ull)
#define HIST_US 1000000          /* latency histogram: 1 us buckets up to 1 s, then overflow */

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "wsload: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) { /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            fprintf(stderr, "wsload: setrlimit(NOFILE, %llu): %s\n",
                    (unsigned long long)rl.rlim_max, strerror(errno));
    }
}

static long nofile_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
    return rl.rlim_cur == RLIM_INFINITY ? -1 : (long)rl.rlim_cur;
}

/* ------------------------------------------------------------------------------------------ */
/* SHA-1 (FIPS 180-4) and base64, just enough for Sec-WebSocket-Accept                        */
/* ------------------------------------------------------------------------------------------ */

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, data + i);
    uint8_t tail[128];
    size_t rest = len - i;
    memset(tail, 0, sizeof tail);
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t tlen = rest + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) tail[tlen - 1 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, tail);
    if (tlen == 128) sha1_block(h, tail + 64);
    for (int j = 0; j < 5; j++) {
        out[4 * j] = (uint8_t)(h[j] >> 24);
        out[4 * j + 1] = (uint8_t)(h[j] >> 16);
        out[4 * j + 2] = (uint8_t)(h[j] >> 8);
        out[4 * j + 3] = (uint8_t)h[j];
    }
}

static size_t base64(const uint8_t *in, size_t n, char *out) {
    static const char T[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = T[v >> 18];
        out[o++] = T[(v >> 12) & 63];
        out[o++] = T[(v >> 6) & 63];
        out[o++] = T[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = T[v >> 18];
        out[o++] = T[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = T[v >> 18];
        out[o++] = T[(v >> 12) & 63];
        out[o++] = T[(v >> 6) & 63];
        out[o++] = '=';
    }
    out[o] = 0;
    return o;
}

/* accept must hold 29 bytes (28 + NUL) */
static void ws_accept(const char *key, size_t klen, char *accept) {
    uint8_t buf[256], dig[20];
    if (klen > sizeof buf - sizeof WS_GUID) klen = sizeof buf - sizeof WS_GUID;
    memcpy(buf, key, klen);
    memcpy(buf + klen, WS_GUID, sizeof WS_GUID - 1);
    sha1(buf, klen + sizeof WS_GUID - 1, dig);
    base64(dig, 20, accept);
}

/* ------------------------------------------------------------------------------------------ */
/* buffers, frames, HTTP heads                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t off, len, cap; /* live bytes are p[off..len) */
} buf_t;

static size_t buf_used(const buf_t *b) { return b->len - b->off; }

static uint8_t *buf_reserve(buf_t *b, size_t n) {
    if (b->off == b->len) b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {
            memmove(b->p, b->p + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t nc = b->cap ? b->cap : 512;
            while (nc < b->len + n) nc *= 2;
            uint8_t *np = realloc(b->p, nc);
            if (!np) die("out of memory");
            b->p = np;
            b->cap = nc;
        }
    }
    return b->p + b->len;
}

static void buf_append(buf_t *b, const void *d, size_t n) {
    memcpy(buf_reserve(b, n), d, n);
    b->len += n;
}

static void buf_consume(buf_t *b, size_t n) {
    b->off += n;
    if (b->off >= b->len) {
        b->off = b->len = 0;
        if (b->cap > 65536) { /* give big buffers back once drained */
            free(b->p);
            b->p = NULL;
            b->cap = 0;
        }
    }
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

typedef struct {
    uint8_t b0;
    int opcode;
    int masked;
    uint64_t plen;
    size_t hlen;
    uint8_t mask[4];
} frame_t;

/* >0: the whole frame's length; 0: incomplete; -1: too large */
static long long parse_frame(const uint8_t *p, size_t n, frame_t *f) {
    if (n < 2) return 0;
    f->b0 = p[0];
    f->opcode = p[0] & 0x0f;
    f->masked = p[1] >> 7;
    uint64_t len = p[1] & 0x7f;
    size_t h = 2;
    if (len == 126) {
        if (n < 4) return 0;
        len = (uint64_t)p[2] << 8 | p[3];
        h = 4;
    } else if (len == 127) {
        if (n < 10) return 0;
        len = 0;
        for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
        h = 10;
    }
    if (len > MAX_FRAME) return -1;
    if (f->masked) {
        if (n < h + 4) return 0;
        memcpy(f->mask, p + h, 4);
        h += 4;
    }
    f->plen = len;
    f->hlen = h;
    if (n < h + len) return 0;
    return (long long)(h + len);
}

static size_t frame_header(uint8_t *o, uint8_t b0, uint64_t len, const uint8_t *mask) {
    size_t h = 2;
    uint8_t mbit = mask ? 0x80 : 0;
    o[0] = b0;
    if (len < 126) {
        o[1] = mbit | (uint8_t)len;
    } else if (len < 65536) {
        o[1] = mbit | 126;
        o[2] = (uint8_t)(len >> 8);
        o[3] = (uint8_t)len;
        h = 4;
    } else {
        o[1] = mbit | 127;
        for (int i = 0; i < 8; i++) o[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        h = 10;
    }
    if (mask) {
        memcpy(o + h, mask, 4);
        h += 4;
    }
    return h;
}

/* dst = src XOR mask (or a plain copy when mask is NULL); dst and src may be the same */
static void mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *mask) {
    if (!mask) {
        if (dst != src) memmove(dst, src, n);
        return;
    }
    uint64_t m8;
    uint8_t mb[8];
    for (int i = 0; i < 8; i++) mb[i] = mask[i & 3];
    memcpy(&m8, mb, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, 8);
        v ^= m8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++) dst[i] = src[i] ^ mask[i & 3];
}

/* Find a header value in an HTTP head (case-insensitive name). */
static int find_header(const uint8_t *head, size_t n, const char *name, const char **val,
                       size_t *vlen) {
    size_t nl = strlen(name);
    const uint8_t *end = head + n;
    const uint8_t *line = memchr(head, '\n', n); /* skip the start line */
    while (line && line < end) {
        line++;
        const uint8_t *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) break;
        size_t ll = (size_t)(eol - line);
        if (ll > nl && line[nl] == ':' && strncasecmp((const char *)line, name, nl) == 0) {
            const uint8_t *v = line + nl + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            *val = (const char *)v;
            *vlen = (size_t)(ve - v);
            return 1;
        }
        line = eol;
    }
    return 0;
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static volatile sig_atomic_t stop_flag = 0;
static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void install_signals(void) {
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static uint8_t scratch[1 << 17];

/* ------------------------------------------------------------------------------------------ */
/* server: a WebSocket echo backend                                                            */
/* ------------------------------------------------------------------------------------------ */

enum { S_HS, S_OPEN, S_CLOSING, S_DEAD };

typedef struct {
    int fd;
    int state;
    int out_on; /* registered for EPOLLOUT (and not EPOLLIN) */
    int shut;   /* SHUT_WR done after our Close */
    buf_t in, out;
} sconn;

static int srv_ep;
static long srv_open_conns = 0;

static void srv_close(sconn *c) {
    close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    free(c);
    srv_open_conns--;
}

static void srv_events(sconn *c, int want_out) {
    if (c->out_on == want_out) return;
    struct epoll_event ev = {.events = want_out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(srv_ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out_on = want_out;
}

/* Handle what we have; returns how many bytes were consumed. */
static size_t srv_process(sconn *c, const uint8_t *d, size_t n) {
    size_t pos = 0;
    if (c->state == S_HS) {
        const uint8_t *e = memmem(d, n, "\r\n\r\n", 4);
        if (!e) {
            if (n > MAX_HEAD) c->state = S_DEAD;
            return 0;
        }
        size_t hl = (size_t)(e - d) + 4;
        const char *key;
        size_t klen;
        if (!find_header(d, hl, "sec-websocket-key", &key, &klen) || klen == 0 || klen > 64) {
            static const char bad[] =
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            buf_append(&c->out, bad, sizeof bad - 1);
            c->state = S_CLOSING;
            return n;
        }
        char accept[32], resp[256];
        ws_accept(key, klen, accept);
        int rl = snprintf(resp, sizeof resp,
                          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                          accept);
        buf_append(&c->out, resp, (size_t)rl);
        c->state = S_OPEN;
        pos = hl;
    }
    while (c->state == S_OPEN && pos < n) {
        frame_t f;
        long long fl = parse_frame(d + pos, n - pos, &f);
        if (fl < 0) {
            c->state = S_DEAD;
            return n;
        }
        if (fl == 0) break;
        const uint8_t *payload = d + pos + f.hlen;
        pos += (size_t)fl;
        uint8_t b0 = f.b0;
        if (f.opcode == 0xA) continue; /* Pong: nothing to answer */
        if (f.opcode == 0x9) b0 = 0x8A; /* Ping: answer with a Pong */
        uint8_t *o = buf_reserve(&c->out, 10 + f.plen);
        size_t h = frame_header(o, b0, f.plen, NULL);
        mask_copy(o + h, payload, f.plen, f.masked ? f.mask : NULL);
        c->out.len += h + f.plen;
        if (f.opcode == 0x8) {
            c->state = S_CLOSING; /* Close answered with Close; the rest is ignored */
            return n;
        }
    }
    return pos;
}

static void srv_flush(sconn *c) {
    while (buf_used(&c->out)) {
        ssize_t w = send(c->fd, c->out.p + c->out.off, buf_used(&c->out), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                srv_events(c, 1); /* stop reading until the peer reads: flow control */
                return;
            }
            if (errno == EINTR) continue;
            c->state = S_DEAD;
            return;
        }
        buf_consume(&c->out, (size_t)w);
    }
    srv_events(c, 0);
    if (c->state == S_CLOSING && !c->shut) {
        shutdown(c->fd, SHUT_WR); /* FIN after our Close; we close once the peer does */
        c->shut = 1;
    }
}

static void srv_read(sconn *c) {
    ssize_t r = recv(c->fd, scratch, sizeof scratch, 0);
    if (r == 0) {
        c->state = S_DEAD;
        return;
    }
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c->state = S_DEAD;
        return;
    }
    if (c->state != S_HS && c->state != S_OPEN) return; /* closing: discard until EOF */
    if (!buf_used(&c->in)) {
        size_t used = srv_process(c, scratch, (size_t)r);
        if (used < (size_t)r && c->state != S_DEAD) buf_append(&c->in, scratch + used, (size_t)r - used);
    } else {
        buf_append(&c->in, scratch, (size_t)r);
        size_t used = srv_process(c, c->in.p + c->in.off, buf_used(&c->in));
        buf_consume(&c->in, used);
    }
    if (c->state != S_DEAD) srv_flush(c);
}

static int run_server(int port) {
    raise_nofile();
    install_signals();
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind 127.0.0.1:%d: %s", port, strerror(errno));
    if (listen(lfd, 65535) < 0) die("listen: %s", strerror(errno));
    srv_ep = epoll_create1(EPOLL_CLOEXEC);
    static int listener_tag;
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(srv_ep, EPOLL_CTL_ADD, lfd, &lev);
    fprintf(stderr, "wsload server: listening on 127.0.0.1:%d (nofile %ld)\n", port, nofile_limit());
    struct epoll_event evs[512];
    uint64_t accept_errors = 0;
    while (!stop_flag) {
        int n = epoll_wait(srv_ep, evs, 512, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &listener_tag) {
                for (int k = 0; k < 256; k++) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                            if (accept_errors++ % 1000 == 0)
                                fprintf(stderr, "wsload server: accept: %s\n", strerror(errno));
                        }
                        break;
                    }
                    set_nodelay(fd);
                    sconn *c = calloc(1, sizeof *c);
                    if (!c) die("out of memory");
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(srv_ep, EPOLL_CTL_ADD, fd, &ev);
                    srv_open_conns++;
                }
                continue;
            }
            sconn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (e & EPOLLOUT) srv_flush(c);
            if (c->state != S_DEAD && (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !c->out_on) srv_read(c);
            else if (c->state != S_DEAD && (e & (EPOLLHUP | EPOLLERR)) && c->out_on) c->state = S_DEAD;
            if (c->state == S_DEAD) srv_close(c);
        }
    }
    fprintf(stderr, "wsload server: stopping with %ld connections open\n", srv_open_conns);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* clients: echo, handshake, idle                                                              */
/* ------------------------------------------------------------------------------------------ */

enum { M_ECHO, M_HANDSHAKE, M_IDLE, M_TLS };
#define CYCLES (mode == M_HANDSHAKE || mode == M_TLS) /* loops of connect ... close */
enum { C_FREE, C_CONNECTING, C_TLS, C_HS, C_OPEN, C_CLOSE_WAIT, C_EOF_WAIT };
#define MAX_INFLIGHT 64

enum {
    E_CONNECT,
    E_HS_STATUS,
    E_HS_ACCEPT,
    E_RESET,
    E_EOF,
    E_PROTOCOL,
    E_MISMATCH,
    E_CLOSED,
    E_TIMEOUT_HS,
    E_TIMEOUT_ECHO,
    E_TIMEOUT_CLOSE,
    E_COUNT
};
static const char *ERR_NAMES[E_COUNT] = {
    "connect",         "handshake_status", "handshake_accept", "reset",
    "unexpected_eof",  "protocol",         "echo_mismatch",    "closed_by_peer",
    "timeout_handshake", "timeout_echo",   "timeout_close",
};
static uint64_t errors[E_COUNT];
static char first_error[256];
static char first_status[128];

typedef struct {
    int fd;
    int state;
    uint32_t gen;
    int out_on;
    int inflight;
    buf_t in, out;
    uint8_t *msg; /* echo: the frame sent each time (header + masked payload) */
    size_t msglen, msghdr;
    char accept[32];
    uint64_t t_start, deadline;
    uint64_t t_sent[MAX_INFLIGHT]; /* send times of the messages in flight, oldest at sent_head */
    int sent_head;
#ifdef WSLOAD_TLS
    SSL *ssl;
#endif
} cconn;

/* options */
static int mode;
static int opt_port;
static char opt_path[1024] = "/";
static char opt_host[256] = "";
static char opt_headers[1024] = ""; /* --header lines, each ending in CRLF */
static int opt_conns = 100;
static size_t opt_size = 32;
static double opt_duration = 10, opt_warmup = -1, opt_hold = 20, opt_rate = 2000;
static int opt_inflight = 1;
#ifdef WSLOAD_TLS
static int opt_tls = 0, opt_resume = 0;
static char opt_sni[256] = "";
static SSL_CTX *tls_ctx;
static SSL_SESSION *tls_session; /* --resume: offered on every connection after the first */
static uint64_t n_tls_handshakes = 0, n_tls_resumed = 0;
#endif

static int cli_ep;
static cconn *conns;
static uint8_t *payload_ref; /* the unmasked echo payload */

/* run state */
static int phase_stop_new = 0; /* no new messages / cycles */
static uint64_t win_start = UINT64_MAX, win_end = UINT64_MAX;
static uint64_t n_done = 0;  /* echo: messages; handshake: cycles (in the window) */
static uint64_t n_opened = 0, n_failed = 0, n_settled = 0, n_dropped = 0, n_closed_clean = 0;
static long n_live = 0;        /* slots with a socket */
static uint32_t *hist, *hist2; /* latency us: echo RTT or handshake (connect -> 101); cycle */
static uint64_t hist_over = 0, hist2_over = 0, hist_max = 0, hist2_max = 0;

static void hist_add(uint32_t *h, uint64_t *over, uint64_t *mx, uint64_t us) {
    if (us < HIST_US)
        h[us]++;
    else
        (*over)++;
    if (us > *mx) *mx = us;
}

static double hist_pct(const uint32_t *h, uint64_t over, uint64_t mx, double q) {
    uint64_t total = over;
    for (size_t i = 0; i < HIST_US; i++) total += h[i];
    if (!total) return -1;
    uint64_t want = (uint64_t)(q * (double)total);
    if (want >= total) want = total - 1;
    uint64_t acc = 0;
    for (size_t i = 0; i < HIST_US; i++) {
        acc += h[i];
        if (acc > want) return (double)i;
    }
    return (double)mx;
}

static void note_error(int kind, const char *detail) {
    errors[kind]++;
    if (!first_error[0])
        snprintf(first_error, sizeof first_error, "%s%s%s", ERR_NAMES[kind], detail ? ": " : "",
                 detail ? detail : "");
}

/* send()/recv() on the connection, through TLS when it has it; -1 with errno EAGAIN: wait. */
static ssize_t io_send(cconn *c, const void *d, size_t n) {
#ifdef WSLOAD_TLS
    if (c->ssl) {
        if (!n) return 0;
        int r = SSL_write(c->ssl, d, n > (1u << 30) ? (1 << 30) : (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(c->ssl, r);
        errno = (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) ? EAGAIN : ECONNRESET;
        return -1;
    }
#endif
    return send(c->fd, d, n, MSG_NOSIGNAL);
}

static ssize_t io_recv(cconn *c, void *d, size_t n) {
#ifdef WSLOAD_TLS
    if (c->ssl) {
        /* several records per call: a level-triggered epoll does not see what OpenSSL holds */
        size_t got = 0;
        while (got < n) {
            int r = SSL_read(c->ssl, (uint8_t *)d + got, (int)(n - got > 65536 ? 65536 : n - got));
            if (r > 0) {
                got += (size_t)r;
                continue;
            }
            int e = SSL_get_error(c->ssl, r);
            if (got) break;
            if (e == SSL_ERROR_ZERO_RETURN) return 0;
            errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : ECONNRESET;
            return -1;
        }
        return (ssize_t)got;
    }
#endif
    return recv(c->fd, d, n, 0);
}

static void cli_events(cconn *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.u64 = ((uint64_t)(c - conns) << 32) | c->gen};
    epoll_ctl(cli_ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void conn_release(cconn *c) {
#ifdef WSLOAD_TLS
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
#endif
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = C_FREE;
    c->inflight = 0;
    c->out_on = 0;
    buf_free(&c->in);
    buf_free(&c->out);
    n_live--;
}

static void start_conn(cconn *c, uint64_t now);

/* A connection failed: count it, release it; the handshake loop starts a new one. */
static void conn_fail(cconn *c, int kind, const char *detail, uint64_t now) {
    int was_open = c->state == C_OPEN || c->state == C_CLOSE_WAIT || c->state == C_EOF_WAIT;
    int settling = c->state == C_CONNECTING || c->state == C_TLS || c->state == C_HS;
    note_error(kind, detail);
    conn_release(c);
    if (mode == M_IDLE || mode == M_ECHO) {
        if (settling) {
            n_failed++;
            n_settled++;
        } else if (was_open) {
            n_dropped++;
        }
    } else if (CYCLES && !phase_stop_new) {
        start_conn(c, now);
    }
}

static void cli_flush(cconn *c, uint64_t now) {
    while (buf_used(&c->out)) {
        ssize_t w = io_send(c, c->out.p + c->out.off, buf_used(&c->out));
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->out_on) {
                    cli_events(c, EPOLLIN | EPOLLOUT);
                    c->out_on = 1;
                }
                return;
            }
            if (errno == EINTR) continue;
            conn_fail(c, E_RESET, strerror(errno), now);
            return;
        }
        buf_consume(&c->out, (size_t)w);
    }
    if (c->out_on) {
        cli_events(c, EPOLLIN);
        c->out_on = 0;
    }
}

/* Send bytes now; what the socket does not take waits in c->out. 0 ok, -1 failed. */
static int cli_send(cconn *c, const uint8_t *d, size_t n, uint64_t now) {
    if (buf_used(&c->out)) {
        buf_append(&c->out, d, n);
        return 0;
    }
    for (;;) {
        ssize_t w = io_send(c, d, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) w = 0;
            else {
                conn_fail(c, E_RESET, strerror(errno), now);
                return -1;
            }
        }
        if ((size_t)w < n) {
            buf_append(&c->out, d + w, n - (size_t)w);
            if (!c->out_on) {
                cli_events(c, EPOLLIN | EPOLLOUT);
                c->out_on = 1;
            }
        }
        return 0;
    }
}

static void send_close(cconn *c, uint64_t now) {
    uint8_t fr[16], mask[4];
    uint32_t m = (uint32_t)rng();
    memcpy(mask, &m, 4);
    uint8_t pl[2] = {0x03, 0xE8}; /* 1000: normal closure */
    size_t h = frame_header(fr, 0x88, 2, mask);
    mask_copy(fr + h, pl, 2, mask);
    c->state = C_CLOSE_WAIT;
    c->deadline = now + CLOSE_TIMEOUT_NS;
    cli_send(c, fr, h + 2, now);
}

static void send_message(cconn *c, uint64_t now) {
    uint32_t m = (uint32_t)rng();
    uint8_t *mask = c->msg + c->msghdr - 4;
    memcpy(mask, &m, 4);
    mask_copy(c->msg + c->msghdr, payload_ref, opt_size, mask);
    c->t_sent[(c->sent_head + c->inflight) % MAX_INFLIGHT] = now;
    c->inflight++;
    c->deadline = now + ECHO_TIMEOUT_NS;
    cli_send(c, c->msg, c->msglen, now);
}

static void send_handshake(cconn *c, uint64_t now) {
    uint8_t raw[16];
    uint64_t a = rng(), b = rng();
    memcpy(raw, &a, 8);
    memcpy(raw + 8, &b, 8);
    char key[32];
    base64(raw, 16, key);
    ws_accept(key, strlen(key), c->accept);
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     opt_path, opt_host, key, opt_headers);
    c->state = C_HS;
    cli_send(c, (const uint8_t *)req, (size_t)n, now);
}

/* The TCP connection is up: the TLS handshake (wsload-tls with wss://), then the upgrade. */
static void on_connected(cconn *c, uint64_t now) {
#ifdef WSLOAD_TLS
    if (opt_tls) {
        if (!c->ssl) {
            c->ssl = SSL_new(tls_ctx);
            if (!c->ssl) die("SSL_new failed");
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_connect_state(c->ssl);
            SSL_set_tlsext_host_name(c->ssl, opt_sni);
            if (opt_resume && tls_session) SSL_set_session(c->ssl, tls_session);
            c->state = C_TLS;
        }
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) {
                cli_events(c, EPOLLIN);
                return;
            }
            if (e == SSL_ERROR_WANT_WRITE) {
                cli_events(c, EPOLLIN | EPOLLOUT);
                return;
            }
            char d[160];
            snprintf(d, sizeof d, "tls handshake: %s",
                     ERR_reason_error_string(ERR_peek_last_error()) ? ERR_reason_error_string(ERR_peek_last_error()) : "failed");
            ERR_clear_error();
            conn_fail(c, E_CONNECT, d, now);
            return;
        }
        if (now >= win_start && now < win_end) {
            n_tls_handshakes++;
            n_tls_resumed += (uint64_t)SSL_session_reused(c->ssl);
        }
        if (mode == M_TLS) { /* the cycle's end: our close_notify, then the server's close */
            if (now >= win_start && now < win_end)
                hist_add(hist, &hist_over, &hist_max, (now - c->t_start) / 1000);
            SSL_shutdown(c->ssl);
            c->state = C_EOF_WAIT;
            c->deadline = now + CLOSE_TIMEOUT_NS;
            cli_events(c, EPOLLIN);
            return;
        }
    }
#endif
    cli_events(c, EPOLLIN);
    send_handshake(c, now);
}

static void start_conn(cconn *c, uint64_t now) {
    c->gen++;
    c->t_start = now;
    c->deadline = now + HS_TIMEOUT_NS;
    c->inflight = 0;
    c->sent_head = 0;
    c->out_on = 0;
    c->state = C_CONNECTING;
    n_live++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->fd = fd;
    if (fd < 0) {
        char d[128];
        snprintf(d, sizeof d, "socket: %s", strerror(errno));
        if (CYCLES) { /* do not spin: count it and give up the slot */
            note_error(E_CONNECT, d);
            c->state = C_FREE;
            n_live--;
            return;
        }
        conn_fail(c, E_CONNECT, d, now);
        return;
    }
    set_nodelay(fd);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    struct epoll_event e = {.events = EPOLLOUT, .data.u64 = ((uint64_t)(c - conns) << 32) | c->gen};
    if (r == 0) {
        e.events = EPOLLIN;
        epoll_ctl(cli_ep, EPOLL_CTL_ADD, fd, &e);
        on_connected(c, now);
    } else if (errno == EINPROGRESS) {
        epoll_ctl(cli_ep, EPOLL_CTL_ADD, fd, &e);
    } else {
        char d[128];
        snprintf(d, sizeof d, "%s", strerror(errno));
        if (CYCLES) {
            note_error(E_CONNECT, d);
            close(fd);
            c->fd = -1;
            c->state = C_FREE;
            n_live--;
            return;
        }
        conn_fail(c, E_CONNECT, d, now);
    }
}

static void on_open(cconn *c, uint64_t now) {
#ifdef WSLOAD_TLS
    /* the 101 came through SSL_read, so a TLS 1.3 ticket sent after the handshake is in */
    if (opt_resume && !tls_session && c->ssl) {
        SSL_SESSION *s = SSL_get1_session(c->ssl);
        if (s && SSL_SESSION_is_resumable(s)) tls_session = s;
        else if (s) SSL_SESSION_free(s);
    }
#endif
    if (mode == M_ECHO) {
        n_opened++;
        n_settled++;
        c->state = C_OPEN;
        c->deadline = UINT64_MAX;
        if (phase_stop_new) send_close(c, now);
        else
            for (int i = 0; i < opt_inflight && c->state == C_OPEN; i++) send_message(c, now);
    } else if (mode == M_HANDSHAKE) {
        if (now >= win_start && now < win_end)
            hist_add(hist, &hist_over, &hist_max, (now - c->t_start) / 1000);
        send_close(c, now);
    } else {
        n_opened++;
        n_settled++;
        c->state = C_OPEN;
        c->deadline = UINT64_MAX;
    }
}

/* The peer finished the closing handshake (Close then EOF). */
static void on_closed(cconn *c, uint64_t now) {
#ifdef WSLOAD_TLS
    if (c->ssl) {
        SSL_shutdown(c->ssl); /* close_notify (if not sent yet), so the session stays resumable */
        if (opt_resume && !tls_session) { /* a TLS 1.3 ticket arrives after the handshake */
            SSL_SESSION *s = SSL_get1_session(c->ssl);
            if (s && SSL_SESSION_is_resumable(s)) tls_session = s;
            else if (s) SSL_SESSION_free(s);
        }
    }
#endif
    conn_release(c);
    n_closed_clean++;
    if (CYCLES) {
        if (now >= win_start && now < win_end) {
            n_done++;
            hist_add(hist2, &hist2_over, &hist2_max, (now - c->t_start) / 1000);
        }
        if (!phase_stop_new) start_conn(c, now);
    }
}

/* Returns bytes consumed, or -1 when the connection was released. */
static long cli_process(cconn *c, const uint8_t *d, size_t n, uint64_t now) {
    size_t pos = 0;
    const uint32_t gen0 = c->gen; /* a failed send may release the slot and start a new one */
#define GONE() (c->gen != gen0 || c->state == C_FREE)
    if (c->state == C_HS) {
        const uint8_t *e = memmem(d, n, "\r\n\r\n", 4);
        if (!e) {
            if (n > MAX_HEAD) {
                conn_fail(c, E_PROTOCOL, "handshake response head too large", now);
                return -1;
            }
            return 0;
        }
        size_t hl = (size_t)(e - d) + 4;
        if (n < 12 || memcmp(d, "HTTP/1.1 101", 12) != 0) {
            const uint8_t *eol = memchr(d, '\r', hl);
            size_t sl = eol ? (size_t)(eol - d) : hl;
            if (sl > 100) sl = 100;
            char st[128];
            memcpy(st, d, sl);
            st[sl] = 0;
            if (!first_status[0]) snprintf(first_status, sizeof first_status, "%s", st);
            conn_fail(c, E_HS_STATUS, st, now);
            return -1;
        }
        const char *v;
        size_t vl;
        if (!find_header(d, hl, "sec-websocket-accept", &v, &vl) || vl != strlen(c->accept) ||
            memcmp(v, c->accept, vl) != 0) {
            conn_fail(c, E_HS_ACCEPT, NULL, now);
            return -1;
        }
        pos = hl;
        on_open(c, now);
        if (GONE()) return -1;
    }
    while (pos < n) {
        frame_t f;
        long long fl = parse_frame(d + pos, n - pos, &f);
        if (fl < 0) {
            conn_fail(c, E_PROTOCOL, "frame too large", now);
            return -1;
        }
        if (fl == 0) break;
        if (f.masked) {
            conn_fail(c, E_PROTOCOL, "masked frame from the server", now);
            return -1;
        }
        const uint8_t *pl = d + pos + f.hlen;
        pos += (size_t)fl;
        if (c->state == C_EOF_WAIT) continue; /* after its Close the peer owes nothing more */
        switch (f.opcode) {
        case 0x9: { /* Ping -> Pong */
            uint8_t fr[14 + 125], mask[4];
            uint32_t m = (uint32_t)rng();
            memcpy(mask, &m, 4);
            size_t pn = f.plen > 125 ? 125 : f.plen;
            size_t h = frame_header(fr, 0x8A, pn, mask);
            mask_copy(fr + h, pl, pn, mask);
            if (cli_send(c, fr, h + pn, now) < 0 || GONE()) return -1;
            break;
        }
        case 0xA:
            break;
        case 0x8:
            if (c->state == C_CLOSE_WAIT) {
                c->state = C_EOF_WAIT;
                c->deadline = now + CLOSE_TIMEOUT_NS;
            } else {
                char det[64];
                int code = f.plen >= 2 ? (pl[0] << 8 | pl[1]) : 1005;
                snprintf(det, sizeof det, "close code %d", code);
                conn_fail(c, E_CLOSED, det, now);
                return -1;
            }
            break;
        default:
            if (c->state != C_OPEN) break; /* data racing our Close: ignore */
            if (mode != M_ECHO || !c->inflight) {
                conn_fail(c, E_PROTOCOL, "unexpected data frame", now);
                return -1;
            }
            if (f.b0 != 0x82 || f.plen != opt_size || memcmp(pl, payload_ref, opt_size) != 0) {
                conn_fail(c, E_MISMATCH, NULL, now);
                return -1;
            }
            uint64_t t_sent = c->t_sent[c->sent_head];
            c->sent_head = (c->sent_head + 1) % MAX_INFLIGHT;
            c->inflight--;
            if (now >= win_start && now < win_end) {
                n_done++;
                hist_add(hist, &hist_over, &hist_max, (now - t_sent) / 1000);
            }
            if (phase_stop_new) {
                if (!c->inflight) send_close(c, now);
            } else {
                send_message(c, now);
            }
            if (GONE()) return -1;
        }
    }
    return (long)pos;
#undef GONE
}

static void cli_read(cconn *c, uint64_t now) {
    ssize_t r = io_recv(c, scratch, sizeof scratch);
    if (r == 0) {
        if (c->state == C_EOF_WAIT) on_closed(c, now);
        else conn_fail(c, E_EOF, NULL, now);
        return;
    }
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        conn_fail(c, E_RESET, strerror(errno), now);
        return;
    }
    if (!buf_used(&c->in)) {
        long used = cli_process(c, scratch, (size_t)r, now);
        if (used >= 0 && (size_t)used < (size_t)r) buf_append(&c->in, scratch + used, (size_t)r - (size_t)used);
    } else {
        buf_append(&c->in, scratch, (size_t)r);
        long used = cli_process(c, c->in.p + c->in.off, buf_used(&c->in), now);
        if (used >= 0) buf_consume(&c->in, (size_t)used);
    }
}

static void cli_event(cconn *c, uint32_t ev, uint64_t now) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            char d[128];
            snprintf(d, sizeof d, "%s", strerror(err));
            conn_fail(c, E_CONNECT, d, now);
            return;
        }
        if (!(ev & EPOLLOUT)) return;
        on_connected(c, now);
        return;
    }
    if (c->state == C_TLS) {
        on_connected(c, now);
        return;
    }
    if ((ev & EPOLLOUT) && c->out_on) {
        uint32_t gen0 = c->gen;
        cli_flush(c, now);
        if (c->state == C_FREE || c->gen != gen0) return;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) cli_read(c, now);
}

static void sweep_deadlines(uint64_t now) {
    for (int i = 0; i < opt_conns; i++) {
        cconn *c = &conns[i];
        if (c->state == C_FREE || now < c->deadline) continue;
        switch (c->state) {
        case C_CONNECTING:
        case C_TLS:
        case C_HS:
            conn_fail(c, E_TIMEOUT_HS, NULL, now);
            break;
        case C_OPEN:
            conn_fail(c, E_TIMEOUT_ECHO, NULL, now);
            break;
        default:
            conn_fail(c, E_TIMEOUT_CLOSE, NULL, now);
        }
    }
}

static void print_errors(FILE *o) {
    uint64_t total = 0;
    fprintf(o, "\"errors\":{");
    int first = 1;
    for (int i = 0; i < E_COUNT; i++) {
        total += errors[i];
        if (!errors[i]) continue;
        fprintf(o, "%s\"%s\":%llu", first ? "" : ",", ERR_NAMES[i], (unsigned long long)errors[i]);
        first = 0;
    }
    fprintf(o, "},\"errors_total\":%llu", (unsigned long long)total);
    /* first_error is built from strerror and our own text: no quotes or backslashes */
    fprintf(o, ",\"first_error\":\"%s\"", first_error);
}

static void print_tls(FILE *o) {
#ifdef WSLOAD_TLS
    if (opt_tls)
        fprintf(o, "\"tls_handshakes\":%llu,\"tls_resumed\":%llu,", (unsigned long long)n_tls_handshakes,
                (unsigned long long)n_tls_resumed);
#else
    (void)o;
#endif
}

static void pump(int timeout_ms) {
    static struct epoll_event evs[1024];
    int n = epoll_wait(cli_ep, evs, 1024, timeout_ms);
    if (n < 0) {
        if (errno == EINTR) return;
        die("epoll_wait: %s", strerror(errno));
    }
    uint64_t now = now_ns();
    for (int i = 0; i < n; i++) {
        uint32_t idx = (uint32_t)(evs[i].data.u64 >> 32), gen = (uint32_t)evs[i].data.u64;
        if (idx >= (uint32_t)opt_conns) continue;
        cconn *c = &conns[idx];
        if (c->gen != gen || c->state == C_FREE) continue; /* a stale event for a closed fd */
        cli_event(c, evs[i].events, now);
    }
}

static double secs(uint64_t ns) { return (double)ns / 1e9; }

/* A progress line for the driver, which samples the proxy's CPU when it reads it. */
static int announce(const char *event, uint64_t since_start) {
    printf("{\"event\":\"%s\",\"t_s\":%.3f}\n", event, secs(since_start));
    fflush(stdout);
    return 1;
}

static int run_client(void) {
    raise_nofile();
    install_signals();
    long lim = nofile_limit();
    if (lim > 0 && lim < opt_conns + 32)
        fprintf(stderr, "wsload: warning: RLIMIT_NOFILE %ld is below --conns %d + 32\n", lim, opt_conns);
    rng_state ^= now_ns() ^ ((uint64_t)getpid() << 32);
    cli_ep = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)opt_conns, sizeof *conns);
    hist = calloc(HIST_US, sizeof *hist);
    hist2 = calloc(HIST_US, sizeof *hist2);
    if (!conns || !hist || !hist2) die("out of memory");
    for (int i = 0; i < opt_conns; i++) conns[i].fd = -1;
    if (mode == M_ECHO) {
        payload_ref = malloc(opt_size ? opt_size : 1);
        for (size_t i = 0; i < opt_size; i++) payload_ref[i] = (uint8_t)('a' + i % 26);
        for (int i = 0; i < opt_conns; i++) {
            cconn *c = &conns[i];
            c->msg = malloc(14 + opt_size);
            uint8_t zero[4] = {0, 0, 0, 0};
            c->msghdr = frame_header(c->msg, 0x82, opt_size, zero);
            c->msglen = c->msghdr + opt_size;
        }
    }
    uint64_t t0 = now_ns();
    if (mode == M_ECHO) {
        for (int i = 0; i < opt_conns; i++) start_conn(&conns[i], t0);
        /* wait until every connection is open or failed */
        while (n_settled < (uint64_t)opt_conns && !stop_flag) {
            pump(50);
            sweep_deadlines(now_ns());
        }
        uint64_t ready = now_ns();
        win_start = ready + (uint64_t)(opt_warmup * 1e9);
        win_end = win_start + (uint64_t)(opt_duration * 1e9);
        if (n_opened == 0) win_start = win_end = ready; /* nothing to measure: report now */
        uint64_t last_sweep = ready;
        int announced = 0;
        while (!stop_flag) {
            uint64_t now = now_ns();
            if (!announced && now >= win_start) announced = announce("window_start", now - t0);
            if (now >= win_end) break;
            uint64_t wait = (announced ? win_end : win_start) - now;
            pump(wait > 100000000ull ? 100 : (int)(wait / 1000000) + 1);
            now = now_ns();
            if (now - last_sweep > 100000000ull) {
                sweep_deadlines(now);
                last_sweep = now;
            }
        }
        announce("window_end", now_ns() - t0);
        phase_stop_new = 1;
        uint64_t now = now_ns();
        for (int i = 0; i < opt_conns; i++)
            if (conns[i].state == C_OPEN && !conns[i].inflight) send_close(&conns[i], now);
        uint64_t end = now + CLOSE_TIMEOUT_NS + 1000000000ull;
        while (n_live > 0 && now_ns() < end) {
            pump(50);
            sweep_deadlines(now_ns());
        }
        double dur = win_end > win_start ? secs(win_end - win_start) : 0;
        printf("{\"mode\":\"echo\",\"conns\":%d,\"opened\":%llu,\"size\":%zu,\"duration_s\":%.3f,"
               "\"messages\":%llu,\"messages_per_s\":%.1f,\"p50_us\":%.0f,\"p99_us\":%.0f,"
               "\"max_us\":%llu,\"dropped\":%llu,\"closed_clean\":%llu,",
               opt_conns, (unsigned long long)n_opened, opt_size, dur, (unsigned long long)n_done,
               dur > 0 ? (double)n_done / dur : 0.0, hist_pct(hist, hist_over, hist_max, 0.50),
               hist_pct(hist, hist_over, hist_max, 0.99), (unsigned long long)hist_max,
               (unsigned long long)n_dropped, (unsigned long long)n_closed_clean);
        if (first_status[0]) printf("\"first_status\":\"%s\",", first_status);
        print_tls(stdout);
        print_errors(stdout);
        printf("}\n");
        fflush(stdout);
    } else if (CYCLES) {
        if (opt_warmup < 0) opt_warmup = 1;
        win_start = t0 + (uint64_t)(opt_warmup * 1e9);
        win_end = win_start + (uint64_t)(opt_duration * 1e9);
        for (int i = 0; i < opt_conns; i++) start_conn(&conns[i], t0);
        uint64_t last_sweep = t0;
        int announced = 0;
        while (!stop_flag) {
            uint64_t now = now_ns();
            if (!announced && now >= win_start) announced = announce("window_start", now - t0);
            if (now >= win_end) break;
            /* restart slots that gave up (socket/connect errors), at most every 10 ms */
            if (n_live < opt_conns)
                for (int i = 0; i < opt_conns; i++)
                    if (conns[i].state == C_FREE) start_conn(&conns[i], now);
            pump(10);
            now = now_ns();
            if (now - last_sweep > 100000000ull) {
                sweep_deadlines(now);
                last_sweep = now;
            }
        }
        announce("window_end", now_ns() - t0);
        phase_stop_new = 1;
        uint64_t end = now_ns() + CLOSE_TIMEOUT_NS + 1000000000ull;
        while (n_live > 0 && now_ns() < end) {
            pump(50);
            sweep_deadlines(now_ns());
        }
        double dur = secs(win_end - win_start);
        printf("{\"mode\":\"%s\",\"conns\":%d,\"duration_s\":%.3f,\"handshakes\":%llu,"
               "\"handshakes_per_s\":%.1f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%llu,"
               "\"cycle_p50_us\":%.0f,\"cycle_p99_us\":%.0f,",
               mode == M_TLS ? "tls" : "handshake", opt_conns, dur, (unsigned long long)n_done,
               dur > 0 ? (double)n_done / dur : 0.0,
               hist_pct(hist, hist_over, hist_max, 0.50), hist_pct(hist, hist_over, hist_max, 0.99),
               (unsigned long long)hist_max, hist_pct(hist2, hist2_over, hist2_max, 0.50),
               hist_pct(hist2, hist2_over, hist2_max, 0.99));
        if (first_status[0]) printf("\"first_status\":\"%s\",", first_status);
        print_tls(stdout);
        print_errors(stdout);
        printf("}\n");
        fflush(stdout);
    } else { /* idle */
        int started = 0;
        uint64_t last_sweep = t0;
        while (n_settled < (uint64_t)opt_conns && !stop_flag) {
            uint64_t now = now_ns();
            long allowed = (long)(secs(now - t0) * opt_rate) + 1;
            if (allowed > opt_conns) allowed = opt_conns;
            while (started < allowed) start_conn(&conns[started++], now);
            pump(started < opt_conns ? 2 : 50);
            now = now_ns();
            if (now - last_sweep > 100000000ull) {
                sweep_deadlines(now);
                last_sweep = now;
            }
        }
        uint64_t up = now_ns();
        long open_now = 0;
        for (int i = 0; i < opt_conns; i++) open_now += conns[i].state == C_OPEN;
        printf("{\"mode\":\"idle\",\"phase\":\"open\",\"t_s\":%.3f,\"open\":%ld,\"opened\":%llu,"
               "\"failed\":%llu}\n",
               secs(up - t0), open_now, (unsigned long long)n_opened, (unsigned long long)n_failed);
        fflush(stdout);
        uint64_t hold_end = up + (uint64_t)(opt_hold * 1e9), next_report = up + 5000000000ull;
        while (!stop_flag) {
            uint64_t now = now_ns();
            if (now >= hold_end) break;
            pump(100);
            now = now_ns();
            if (now >= next_report && now < hold_end) {
                open_now = 0;
                for (int i = 0; i < opt_conns; i++) open_now += conns[i].state == C_OPEN;
                printf("{\"mode\":\"idle\",\"phase\":\"hold\",\"t_s\":%.3f,\"open\":%ld,"
                       "\"dropped\":%llu}\n",
                       secs(now - t0), open_now, (unsigned long long)n_dropped);
                fflush(stdout);
                next_report += 5000000000ull;
            }
        }
        open_now = 0;
        for (int i = 0; i < opt_conns; i++) open_now += conns[i].state == C_OPEN;
        long open_at_end = open_now;
        phase_stop_new = 1;
        uint64_t now = now_ns();
        for (int i = 0; i < opt_conns; i++)
            if (conns[i].state == C_OPEN) send_close(&conns[i], now);
        uint64_t end = now + CLOSE_TIMEOUT_NS + 5000000000ull;
        while (n_live > 0 && now_ns() < end) {
            pump(50);
            sweep_deadlines(now_ns());
        }
        printf("{\"mode\":\"idle\",\"phase\":\"done\",\"conns\":%d,\"opened\":%llu,\"failed\":%llu,"
               "\"open_at_end\":%ld,\"dropped\":%llu,\"closed_clean\":%llu,\"nofile\":%ld,",
               opt_conns, (unsigned long long)n_opened, (unsigned long long)n_failed, open_at_end,
               (unsigned long long)n_dropped, (unsigned long long)n_closed_clean, nofile_limit());
        if (first_status[0]) printf("\"first_status\":\"%s\",", first_status);
        print_tls(stdout);
        print_errors(stdout);
        printf("}\n");
        fflush(stdout);
    }
    for (int i = 0; i < opt_conns; i++)
        if (conns[i].state != C_FREE) conn_release(&conns[i]);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* command line                                                                                */
/* ------------------------------------------------------------------------------------------ */

static void parse_url(const char *url) {
    const char *p = url;
    size_t scheme = 5;
#ifdef WSLOAD_TLS
    if (strncmp(p, "wss://", 6) == 0) {
        opt_tls = 1;
        scheme = 6;
    } else
#endif
    if (strncmp(p, "ws://", 5) != 0) die("--url must start with ws:// (got %s)", url);
    p += scheme;
    const char *hend = p + strcspn(p, ":/");
    if ((size_t)(hend - p) != 9 || strncmp(p, "127.0.0.1", 9) != 0)
        die("--url host must be 127.0.0.1: this tool only talks to loopback (got %s)", url);
    p = hend;
    if (*p != ':') die("--url needs an explicit port (ws://127.0.0.1:PORT/)");
    p++;
    char *end;
    long port = strtol(p, &end, 10);
    if (end == p || port <= 0 || port > 65535) die("bad port in --url %s", url);
    opt_port = (int)port;
    if (*end == '/') snprintf(opt_path, sizeof opt_path, "%s", end);
    else if (*end) die("bad --url %s", url);
    if (strpbrk(opt_path, " \r\n")) die("bad path in --url");
}

static void usage(void) {
    fprintf(stderr,
            "usage:\n"
            "  wsload server --port P\n"
            "  wsload echo --url ws://127.0.0.1:P/ [--host H] [--conns 100] [--size 32]\n"
            "              [--duration 10] [--warmup 2] [--inflight 1]\n"
            "  (wsload-tls: wss:// URLs too, [--sni NAME]; handshake and tls [--resume 1])\n"
            "  wsload-tls tls --url wss://127.0.0.1:P/ [--conns 50] [--duration 10] [--resume 1]\n"
            "  wsload handshake --url ws://127.0.0.1:P/ [--host H] [--conns 50] [--duration 10]\n"
            "              [--warmup 1]\n"
            "  wsload idle --url ws://127.0.0.1:P/ [--host H] [--conns 9000] [--hold 20]\n"
            "              [--rate 2000]\n"
            "  (client modes: [--header \"Name: value\"], repeatable)\n"
            "  wsload selftest\n");
    exit(2);
}

static int selftest(void) {
    char acc[32];
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
    ws_accept(key, strlen(key), acc);
    int ok = strcmp(acc, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0; /* RFC 6455 section 1.3 */
    uint8_t d[20];
    char hex[41];
    sha1((const uint8_t *)"abc", 3, d);
    for (int i = 0; i < 20; i++) sprintf(hex + 2 * i, "%02x", d[i]);
    ok &= strcmp(hex, "a9993e364706816aba3e25717850c26c9cd0d89d") == 0;
    const char *long_msg = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha1((const uint8_t *)long_msg, strlen(long_msg), d);
    for (int i = 0; i < 20; i++) sprintf(hex + 2 * i, "%02x", d[i]);
    ok &= strcmp(hex, "84983e441c3bd26ebaae4aa1f95129e5e54670f1") == 0;
    printf("{\"selftest\":%s}\n", ok ? "true" : "false");
    return ok ? 0 : 1;
}

static void add_header(const char *line) {
    const char *colon = strchr(line, ':');
    if (!colon || colon == line || strpbrk(line, "\r\n") || strcspn(line, " \t") < (size_t)(colon - line))
        die("--header must be \"Name: value\" on one line (got %s)", line);
    size_t used = strlen(opt_headers);
    if (used + strlen(line) + 3 > sizeof opt_headers) die("--header: too many or too long");
    snprintf(opt_headers + used, sizeof opt_headers - used, "%s\r\n", line);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *cmd = argv[1];
    int server_port = 0;
    const char *url = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) die("option %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--port")) server_port = atoi(v);
        else if (!strcmp(a, "--url")) url = v;
        else if (!strcmp(a, "--host")) snprintf(opt_host, sizeof opt_host, "%s", v);
        else if (!strcmp(a, "--conns")) opt_conns = atoi(v);
        else if (!strcmp(a, "--size")) opt_size = (size_t)atol(v);
        else if (!strcmp(a, "--duration")) opt_duration = atof(v);
        else if (!strcmp(a, "--warmup")) opt_warmup = atof(v);
        else if (!strcmp(a, "--hold")) opt_hold = atof(v);
        else if (!strcmp(a, "--rate")) opt_rate = atof(v);
        else if (!strcmp(a, "--inflight")) opt_inflight = atoi(v);
        else if (!strcmp(a, "--header")) add_header(v);
#ifdef WSLOAD_TLS
        else if (!strcmp(a, "--sni")) snprintf(opt_sni, sizeof opt_sni, "%s", v);
        else if (!strcmp(a, "--resume")) opt_resume = atoi(v);
#endif
        else die("unknown option %s", a);
    }
    if (!strcmp(cmd, "selftest")) return selftest();
    if (!strcmp(cmd, "server")) {
        if (server_port <= 0 || server_port > 65535) die("server needs --port P");
        return run_server(server_port);
    }
    if (!strcmp(cmd, "echo")) mode = M_ECHO;
    else if (!strcmp(cmd, "handshake")) mode = M_HANDSHAKE;
    else if (!strcmp(cmd, "idle")) mode = M_IDLE;
#ifdef WSLOAD_TLS
    else if (!strcmp(cmd, "tls")) mode = M_TLS;
#endif
    else usage();
    if (!url) die("%s needs --url ws://127.0.0.1:PORT/", cmd);
    parse_url(url);
    if (!opt_host[0]) snprintf(opt_host, sizeof opt_host, "127.0.0.1:%d", opt_port);
    if (strpbrk(opt_host, " \r\n")) die("bad --host");
    if (opt_conns <= 0 || opt_conns > 1000000) die("bad --conns");
    if (opt_size > MAX_FRAME) die("--size too large");
    if (opt_duration <= 0) die("bad --duration");
    if (opt_rate <= 0) die("bad --rate");
    if (opt_warmup < 0) opt_warmup = mode == M_ECHO ? 2 : opt_warmup;
    if (opt_inflight < 1 || opt_inflight > MAX_INFLIGHT) die("--inflight must be 1..%d", MAX_INFLIGHT);
#ifdef WSLOAD_TLS
    if (mode == M_TLS && !opt_tls) die("tls needs a wss:// URL");
    if (opt_tls) {
        if (!opt_sni[0]) {
            snprintf(opt_sni, sizeof opt_sni, "%s", opt_host);
            char *colon = strrchr(opt_sni, ':');
            if (colon && !strchr(opt_sni, ']')) *colon = 0;
        }
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (!tls_ctx) die("SSL_CTX_new failed");
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
        /* the client's own session cache is not used: --resume offers one session explicitly */
        SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
        const char *v = getenv("WSLOAD_TLS_VERSION"); /* "1.2" or "1.3": pin the version */
        if (v && !strcmp(v, "1.2")) SSL_CTX_set_max_proto_version(tls_ctx, TLS1_2_VERSION);
        if (v && !strcmp(v, "1.3")) SSL_CTX_set_min_proto_version(tls_ctx, TLS1_3_VERSION);
    }
#endif
    return run_client();
}
