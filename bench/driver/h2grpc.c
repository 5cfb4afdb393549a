/*
 * h2grpc: a small load generator for gRPC unary calls over cleartext HTTP/2.
 *
 * Why it exists: h2load posts one fixed body, but Authorize is idempotent by
 * request_id and Closeout by permit_id, so a fixed body measures the cheaper
 * replay path. This driver sends a different pre-built body with every call
 * (bodies are prepared by the Python harness before the clock starts) and
 * stays as cheap per call as h2load: one thread, epoll, no HPACK state of its
 * own (request headers are literals, response headers are skipped).
 *
 * A call counts as OK when its stream ends after at least one complete gRPC
 * message arrived; an error status has no message (trailers only) and counts
 * as an error, as does a reset stream.
 *
 * Output: one JSON object on stdout. With --out, every OK response message is
 * appended to a file as <u32 request index LE><u32 length LE><bytes>.
 *
 * Build: cc -O2 -o h2grpc h2grpc.c   (libc only)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define RING 65536u                 /* stream slots per connection (power of two) */
#define RECV_WINDOW (1u << 30)      /* what we let the server send before an update */
#define MAX_HEADERS 16

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

typedef struct {
    uint32_t sid;       /* 0 = free slot */
    uint32_t req;       /* request index (into the bodies) */
    uint64_t t0;        /* ns, when the call was due (open loop) or written */
    uint32_t got;       /* DATA payload bytes received */
    int counted;        /* started after the warm-up */
    buf_t body;         /* response bytes, only with --out */
} stream_t;

typedef struct {
    int fd;
    buf_t w;
    size_t woff;
    buf_t r;
    size_t roff;
    uint32_t next_sid;
    int64_t send_window;        /* connection-level, bytes we may still send */
    int64_t peer_init_window;   /* stream-level initial window of the server */
    uint32_t peer_max_streams;
    uint32_t inflight;
    uint64_t consumed;          /* received DATA bytes not yet given back */
    int goaway;
    stream_t *streams;
} conn_t;

static struct {
    const char *host;
    int port;
    const char *path;
    const char *bodies_path;
    const char *out_path;
    int conns;
    int streams;            /* in flight per connection (closed loop) */
    uint64_t n;             /* counted requests */
    uint64_t warmup;        /* uncounted requests first */
    double duration;        /* seconds of counted load (0 = until n) */
    double rps;             /* open loop total rate (0 = closed loop) */
    int max_inflight;       /* per connection, open loop */
    double timeout;         /* hard stop, seconds */
    int cycle;              /* reuse bodies when there are fewer than requests */
    const char *headers[MAX_HEADERS];
    int nheaders;
} opt;

static uint8_t *bodies;
static size_t *body_off, *body_len;
static size_t nbodies;

static uint8_t hdr_block[2048];
static size_t hdr_len;

static uint64_t issued, completed, ok_count, err_count, rst_count, counted_done;
static uint64_t t_measure_start, t_last_done;
static uint32_t *lat_us;
static size_t lat_n, lat_cap;
static FILE *out_fp;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "h2grpc: %s: %s\n", msg, strerror(errno));
    exit(3);
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("out of memory");
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void frame_header(buf_t *b, uint32_t len, uint8_t type, uint8_t flags, uint32_t sid) {
    uint8_t h[9] = {(uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len, type, flags,
                    (uint8_t)(sid >> 24) & 0x7f, (uint8_t)(sid >> 16), (uint8_t)(sid >> 8),
                    (uint8_t)sid};
    buf_put(b, h, 9);
}

/* HPACK integer with an N-bit prefix (RFC 7541 section 5.1). */
static void hp_int(uint8_t first, int bits, size_t value) {
    size_t max = (1u << bits) - 1;
    if (value < max) {
        hdr_block[hdr_len++] = first | (uint8_t)value;
        return;
    }
    hdr_block[hdr_len++] = first | (uint8_t)max;
    value -= max;
    while (value >= 128) {
        hdr_block[hdr_len++] = (uint8_t)(value % 128 + 128);
        value /= 128;
    }
    hdr_block[hdr_len++] = (uint8_t)value;
}

static void hp_str(const char *s, size_t n) {
    if (hdr_len + n + 8 > sizeof hdr_block) {
        fprintf(stderr, "h2grpc: request headers too long\n");
        exit(2);
    }
    hp_int(0, 7, n);  /* no Huffman coding */
    memcpy(hdr_block + hdr_len, s, n);
    hdr_len += n;
}

/* Literal header fields without indexing: the block is the same for every call. */
static void build_headers(void) {
    char authority[300];
    snprintf(authority, sizeof authority, "%s:%d", opt.host, opt.port);
    hdr_block[hdr_len++] = 0x83;                    /* :method POST  (static 3) */
    hdr_block[hdr_len++] = 0x86;                    /* :scheme http  (static 6) */
    hp_int(0x00, 4, 4);                             /* :path         (name 4) */
    hp_str(opt.path, strlen(opt.path));
    hp_int(0x00, 4, 1);                             /* :authority    (name 1) */
    hp_str(authority, strlen(authority));
    hp_int(0x00, 4, 31);                            /* content-type  (name 31) */
    hp_str("application/grpc", 16);
    hdr_block[hdr_len++] = 0x00;                    /* te: trailers  (new name) */
    hp_str("te", 2);
    hp_str("trailers", 8);
    for (int i = 0; i < opt.nheaders; i++) {
        const char *h = opt.headers[i];
        const char *colon = strchr(h, ':');
        if (!colon) {
            fprintf(stderr, "h2grpc: header %s has no ':'\n", h);
            exit(2);
        }
        const char *v = colon + 1;
        while (*v == ' ') v++;
        hdr_block[hdr_len++] = 0x00;
        hp_str(h, (size_t)(colon - h));
        hp_str(v, strlen(v));
    }
}

static void load_bodies(void) {
    int fd = open(opt.bodies_path, O_RDONLY);
    if (fd < 0) die(opt.bodies_path);
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    size_t size = (size_t)st.st_size;
    bodies = malloc(size ? size : 1);
    if (!bodies) die("out of memory");
    size_t got = 0;
    while (got < size) {
        ssize_t k = read(fd, bodies + got, size - got);
        if (k <= 0) die("read bodies");
        got += (size_t)k;
    }
    close(fd);
    size_t cap = 1024;
    body_off = malloc(cap * sizeof *body_off);
    body_len = malloc(cap * sizeof *body_len);
    for (size_t pos = 0; pos < size;) {
        if (pos + 5 > size) break;
        size_t mlen = ((size_t)bodies[pos + 1] << 24) | ((size_t)bodies[pos + 2] << 16) |
                      ((size_t)bodies[pos + 3] << 8) | bodies[pos + 4];
        if (pos + 5 + mlen > size) break;
        if (nbodies == cap) {
            cap *= 2;
            body_off = realloc(body_off, cap * sizeof *body_off);
            body_len = realloc(body_len, cap * sizeof *body_len);
            if (!body_off || !body_len) die("out of memory");
        }
        body_off[nbodies] = pos;
        body_len[nbodies] = 5 + mlen;
        if (5 + mlen > 16384) {
            fprintf(stderr, "h2grpc: body %zu is larger than one frame\n", nbodies);
            exit(2);
        }
        nbodies++;
        pos += 5 + mlen;
    }
    if (nbodies == 0) {
        fprintf(stderr, "h2grpc: %s holds no length-prefixed message\n", opt.bodies_path);
        exit(2);
    }
}

static int connect_one(void) {
    struct addrinfo hints = {0}, *res;
    char port[16];
    snprintf(port, sizeof port, "%d", opt.port);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(opt.host, port, &hints, &res) != 0) {
        fprintf(stderr, "h2grpc: cannot resolve %s\n", opt.host);
        exit(3);
    }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) die("connect");
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void conn_start(conn_t *c) {
    memset(c, 0, sizeof *c);
    c->fd = connect_one();
    c->next_sid = 1;
    c->send_window = 65535;
    c->peer_init_window = 65535;
    c->peer_max_streams = 0xffffffffu;
    c->streams = calloc(RING, sizeof(stream_t));
    if (!c->streams) die("out of memory");
    buf_put(&c->w, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
    uint8_t settings[12] = {0, 2, 0, 0, 0, 0,  /* ENABLE_PUSH = 0 */
                            0, 4, (uint8_t)(RECV_WINDOW >> 24), (uint8_t)(RECV_WINDOW >> 16),
                            (uint8_t)(RECV_WINDOW >> 8), (uint8_t)RECV_WINDOW};
    frame_header(&c->w, 12, 0x4, 0, 0);
    buf_put(&c->w, settings, 12);
    uint32_t inc = RECV_WINDOW - 65535;
    uint8_t wu[4] = {(uint8_t)(inc >> 24), (uint8_t)(inc >> 16), (uint8_t)(inc >> 8),
                     (uint8_t)inc};
    frame_header(&c->w, 4, 0x8, 0, 0);
    buf_put(&c->w, wu, 4);
}

static int conn_flush(conn_t *c) {
    while (c->woff < c->w.len) {
        ssize_t k = write(c->fd, c->w.p + c->woff, c->w.len - c->woff);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            die("write");
        }
        c->woff += (size_t)k;
    }
    c->w.len = 0;
    c->woff = 0;
    return 1;
}

static int can_issue(conn_t *c, size_t blen, int limit) {
    if (c->goaway || (int)c->inflight >= limit || c->inflight >= c->peer_max_streams) return 0;
    if ((int64_t)blen > c->send_window || (int64_t)blen > c->peer_init_window) return 0;
    if (c->next_sid > 0x7ffffff0u) return 0;
    return c->streams[(c->next_sid >> 1) & (RING - 1)].sid == 0;
}

static size_t body_index(uint64_t k) { return opt.cycle ? k % nbodies : k; }

static void issue(conn_t *c, uint64_t t0) {
    size_t bi = body_index(issued);
    stream_t *s = &c->streams[(c->next_sid >> 1) & (RING - 1)];
    s->sid = c->next_sid;
    s->req = (uint32_t)bi;
    s->t0 = t0;
    s->got = 0;
    s->counted = issued >= opt.warmup;
    s->body.len = 0;
    frame_header(&c->w, (uint32_t)hdr_len, 0x1, 0x4, c->next_sid);
    buf_put(&c->w, hdr_block, hdr_len);
    frame_header(&c->w, (uint32_t)body_len[bi], 0x0, 0x1, c->next_sid);
    buf_put(&c->w, bodies + body_off[bi], body_len[bi]);
    c->send_window -= (int64_t)body_len[bi];
    c->next_sid += 2;
    c->inflight++;
    issued++;
}

static void finish(conn_t *c, stream_t *s, int reset) {
    uint64_t t = now_ns();
    int good = !reset && s->got >= 5;
    completed++;
    if (s->counted) {
        if (good) ok_count++;
        else err_count++;
        if (reset) rst_count++;
        counted_done++;
        t_last_done = t;
        if (lat_n == lat_cap) {
            lat_cap = lat_cap ? lat_cap * 2 : 65536;
            lat_us = realloc(lat_us, lat_cap * sizeof *lat_us);
            if (!lat_us) die("out of memory");
        }
        uint64_t us = (t - s->t0) / 1000;
        lat_us[lat_n++] = us > 0xffffffffu ? 0xffffffffu : (uint32_t)us;
    }
    if (good && out_fp && s->body.len >= 5) {
        uint32_t hdr[2] = {s->req, (uint32_t)(s->body.len - 5)};
        fwrite(hdr, sizeof hdr, 1, out_fp);
        fwrite(s->body.p + 5, 1, s->body.len - 5, out_fp);
    }
    s->sid = 0;
    c->inflight--;
}

static stream_t *find_stream(conn_t *c, uint32_t sid) {
    stream_t *s = &c->streams[(sid >> 1) & (RING - 1)];
    return (sid & 1) && s->sid == sid ? s : NULL;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void handle_frame(conn_t *c, uint8_t type, uint8_t flags, uint32_t sid,
                         const uint8_t *p, uint32_t len) {
    switch (type) {
    case 0x0: { /* DATA */
        c->consumed += len;
        stream_t *s = find_stream(c, sid);
        if (s) {
            const uint8_t *d = p;
            uint32_t dl = len;
            if (flags & 0x8) { /* PADDED */
                uint8_t pad = len ? p[0] : 0;
                d = p + 1;
                dl = len > (uint32_t)pad + 1 ? len - pad - 1 : 0;
            }
            s->got += dl;
            if (out_fp) buf_put(&s->body, d, dl);
            if (flags & 0x1) finish(c, s, 0);
        }
        if (c->consumed >= RECV_WINDOW / 2) {
            uint32_t inc = (uint32_t)c->consumed;
            uint8_t wu[4] = {(uint8_t)(inc >> 24), (uint8_t)(inc >> 16), (uint8_t)(inc >> 8),
                             (uint8_t)inc};
            frame_header(&c->w, 4, 0x8, 0, 0);
            buf_put(&c->w, wu, 4);
            c->consumed = 0;
        }
        break;
    }
    case 0x1: { /* HEADERS: content skipped, only the end of the stream matters */
        stream_t *s = find_stream(c, sid);
        if (s && (flags & 0x1)) finish(c, s, 0);
        break;
    }
    case 0x3: { /* RST_STREAM */
        stream_t *s = find_stream(c, sid);
        if (s) finish(c, s, 1);
        break;
    }
    case 0x4: /* SETTINGS */
        if (flags & 0x1) break;
        for (uint32_t i = 0; i + 6 <= len; i += 6) {
            uint16_t id = (uint16_t)((p[i] << 8) | p[i + 1]);
            uint32_t v = be32(p + i + 2);
            if (id == 0x3) c->peer_max_streams = v;
            if (id == 0x4) c->peer_init_window = v;
        }
        frame_header(&c->w, 0, 0x4, 0x1, 0);
        break;
    case 0x6: /* PING */
        if (!(flags & 0x1) && len == 8) {
            frame_header(&c->w, 8, 0x6, 0x1, 0);
            buf_put(&c->w, p, 8);
        }
        break;
    case 0x7: /* GOAWAY */
        c->goaway = 1;
        fprintf(stderr, "h2grpc: server sent GOAWAY (error %u)\n", len >= 8 ? be32(p + 4) : 0);
        break;
    case 0x8: /* WINDOW_UPDATE */
        if (sid == 0 && len >= 4) c->send_window += be32(p) & 0x7fffffffu;
        break;
    default: /* PRIORITY, CONTINUATION, unknown: nothing to do */
        break;
    }
}

static void conn_read(conn_t *c) {
    for (;;) {
        buf_reserve(&c->r, 65536);
        ssize_t k = read(c->fd, c->r.p + c->r.len, c->r.cap - c->r.len);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            die("read");
        }
        if (k == 0) {
            fprintf(stderr, "h2grpc: server closed the connection\n");
            c->goaway = 1;
            /* every stream still open on this connection failed */
            for (uint32_t i = 0; i < RING && c->inflight; i++)
                if (c->streams[i].sid) finish(c, &c->streams[i], 1);
            return;
        }
        c->r.len += (size_t)k;
        while (c->r.len - c->roff >= 9) {
            const uint8_t *h = c->r.p + c->roff;
            uint32_t len = ((uint32_t)h[0] << 16) | ((uint32_t)h[1] << 8) | h[2];
            if (c->r.len - c->roff < 9 + (size_t)len) break;
            handle_frame(c, h[3], h[4], be32(h + 5) & 0x7fffffffu, h + 9, len);
            c->roff += 9 + len;
        }
        if (c->roff == c->r.len) {
            c->r.len = c->roff = 0;
        } else if (c->roff > (1u << 20)) {
            memmove(c->r.p, c->r.p + c->roff, c->r.len - c->roff);
            c->r.len -= c->roff;
            c->roff = 0;
        }
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct(double q) {
    if (!lat_n) return 0;
    size_t i = (size_t)(q * (double)(lat_n - 1) + 0.5);
    return lat_us[i];
}

static void usage(void) {
    fprintf(stderr,
            "usage: h2grpc --port P --path /pkg.Service/Method --bodies FILE [options]\n"
            "  --host H          server address (default 127.0.0.1)\n"
            "  -c N              connections (default 1)\n"
            "  -m N              streams in flight per connection, closed loop (default 32)\n"
            "  -n N              counted calls (default: one per body)\n"
            "  --warmup N        uncounted calls sent first (default 0)\n"
            "  --duration S      stop issuing after S seconds of counted load\n"
            "  --rps R           open loop: R calls per second in total\n"
            "  --max-inflight N  open loop: cap of calls in flight per connection (1024)\n"
            "  --timeout S       hard stop (default 300)\n"
            "  --cycle           reuse bodies when there are fewer bodies than calls\n"
            "  --out FILE        append each OK response message to FILE\n"
            "  -H 'name: value'  extra request header (repeatable)\n");
    exit(2);
}

int main(int argc, char **argv) {
    opt.host = "127.0.0.1";
    opt.conns = 1;
    opt.streams = 32;
    opt.max_inflight = 1024;
    opt.timeout = 300;
    int n_given = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (ARG("--host")) opt.host = v;
        else if (ARG("--port")) opt.port = atoi(v);
        else if (ARG("--path")) opt.path = v;
        else if (ARG("--bodies")) opt.bodies_path = v;
        else if (ARG("--out")) opt.out_path = v;
        else if (ARG("-c")) opt.conns = atoi(v);
        else if (ARG("-m")) opt.streams = atoi(v);
        else if (ARG("-n")) { opt.n = strtoull(v, NULL, 10); n_given = 1; }
        else if (ARG("--warmup")) opt.warmup = strtoull(v, NULL, 10);
        else if (ARG("--duration")) opt.duration = atof(v);
        else if (ARG("--rps")) opt.rps = atof(v);
        else if (ARG("--max-inflight")) opt.max_inflight = atoi(v);
        else if (ARG("--timeout")) opt.timeout = atof(v);
        else if (ARG("-H")) {
            if (opt.nheaders == MAX_HEADERS) usage();
            opt.headers[opt.nheaders++] = v;
        } else if (strcmp(a, "--cycle") == 0) opt.cycle = 1;
        else usage();
#undef ARG
    }
    if (!opt.port || !opt.path || !opt.bodies_path || opt.conns < 1 || opt.streams < 1)
        usage();
    load_bodies();
    if (!n_given && opt.duration > 0 && opt.cycle) opt.n = UINT64_MAX / 2;
    else if (!n_given) opt.n = nbodies > opt.warmup ? nbodies - opt.warmup : 0;
    if (!opt.cycle && opt.warmup + opt.n > nbodies && opt.duration <= 0) {
        fprintf(stderr, "h2grpc: %llu calls need %llu bodies, %s holds %zu (use --cycle)\n",
                (unsigned long long)opt.n, (unsigned long long)(opt.warmup + opt.n),
                opt.bodies_path, nbodies);
        exit(2);
    }
    if (opt.out_path) {
        out_fp = fopen(opt.out_path, "wb");
        if (!out_fp) die(opt.out_path);
    }
    build_headers();

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    conn_t *cs = calloc((size_t)opt.conns, sizeof(conn_t));
    for (int i = 0; i < opt.conns; i++) {
        conn_start(&cs[i]);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) die("epoll_ctl");
        conn_flush(&cs[i]);
    }
    int tfd = -1;
    if (opt.rps > 0) {
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        if (tfd < 0) die("timerfd_create");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0xffffffffu};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev) < 0) die("epoll_ctl");
    }

    uint64_t t_begin = now_ns();
    uint64_t hard_stop = t_begin + (uint64_t)(opt.timeout * 1e9);
    uint64_t total = opt.warmup + opt.n;
    uint64_t t_open = 0;       /* open loop: when call 0 was due */
    int stop_issuing = 0, timed_out = 0, rr = 0;
    uint64_t late = 0;
    struct epoll_event evs[64];

    for (;;) {
        uint64_t t = now_ns();
        if (t > hard_stop) { timed_out = 1; break; }
        if (!t_measure_start && issued >= opt.warmup) t_measure_start = t;
        if (!stop_issuing) {
            if (opt.duration > 0 && t_measure_start &&
                t - t_measure_start >= (uint64_t)(opt.duration * 1e9))
                stop_issuing = 1;
            if (opt.duration <= 0 && issued >= total) stop_issuing = 1;
            if (!opt.cycle && issued >= nbodies) stop_issuing = 1;
        }
        if (!stop_issuing) {
            if (opt.rps > 0) {
                if (!t_open) t_open = t;
                for (;;) {
                    if (stop_issuing || (opt.duration <= 0 && issued >= total) ||
                        (!opt.cycle && issued >= nbodies))
                        break;
                    uint64_t due = t_open + (uint64_t)((double)issued * 1e9 / opt.rps);
                    if (due > t) break;
                    int sent = 0;
                    for (int k = 0; k < opt.conns; k++) {
                        conn_t *c = &cs[(rr + k) % opt.conns];
                        if (can_issue(c, body_len[body_index(issued)], opt.max_inflight)) {
                            if (t - due > 1000000) late++;
                            issue(c, due);
                            rr = (rr + k + 1) % opt.conns;
                            sent = 1;
                            break;
                        }
                    }
                    if (!sent) break;
                    if (!t_measure_start && issued >= opt.warmup) t_measure_start = due;
                }
            } else {
                for (int k = 0; k < opt.conns; k++) {
                    conn_t *c = &cs[k];
                    while (!stop_issuing && issued < total &&
                           (opt.cycle || issued < nbodies) &&
                           can_issue(c, body_len[body_index(issued)], opt.streams)) {
                        issue(c, t);
                        if (!t_measure_start && issued >= opt.warmup) t_measure_start = now_ns();
                    }
                }
            }
        }
        uint32_t inflight = 0;
        int any_alive = 0;
        for (int k = 0; k < opt.conns; k++) {
            if (cs[k].w.len) {
                conn_flush(&cs[k]);
                struct epoll_event ev = {.events = EPOLLIN | (cs[k].w.len ? EPOLLOUT : 0),
                                         .data.u32 = (uint32_t)k};
                epoll_ctl(ep, EPOLL_CTL_MOD, cs[k].fd, &ev);
            }
            inflight += cs[k].inflight;
            any_alive |= !cs[k].goaway;
        }
        if ((stop_issuing || !any_alive) && inflight == 0) break;
        if (!any_alive && inflight == 0) break;

        int wait_ms = 100;
        if (opt.rps > 0 && !stop_issuing) {
            uint64_t due = t_open + (uint64_t)((double)issued * 1e9 / opt.rps);
            struct itimerspec its = {0};
            uint64_t at = due > t ? due : t + 1000;
            its.it_value.tv_sec = (time_t)(at / 1000000000ull);
            its.it_value.tv_nsec = (long)(at % 1000000000ull);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        int ne = epoll_wait(ep, evs, 64, wait_ms);
        if (ne < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < ne; e++) {
            uint32_t k = evs[e].data.u32;
            if (k == 0xffffffffu) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("timerfd read");
                continue;
            }
            if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_read(&cs[k]);
            if (evs[e].events & EPOLLOUT) conn_flush(&cs[k]);
        }
    }

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    if (out_fp) fclose(out_fp);
    qsort(lat_us, lat_n, sizeof *lat_us, cmp_u32);
    double elapsed = t_last_done > t_measure_start ? (t_last_done - t_measure_start) / 1e9 : 0;
    double mean = 0;
    for (size_t i = 0; i < lat_n; i++) mean += lat_us[i];
    mean = lat_n ? mean / (double)lat_n : 0;
    printf("{\"calls\": %llu, \"ok\": %llu, \"errors\": %llu, \"resets\": %llu, "
           "\"elapsed_s\": %.6f, \"rps\": %.1f, \"late\": %llu, \"timed_out\": %s, "
           "\"client_cpu_s\": %.3f, \"wall_s\": %.3f, "
           "\"lat_us\": {\"mean\": %.1f, \"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f, "
           "\"p999\": %.0f, \"max\": %.0f}}\n",
           (unsigned long long)counted_done, (unsigned long long)ok_count,
           (unsigned long long)err_count, (unsigned long long)rst_count, elapsed,
           elapsed > 0 ? (double)counted_done / elapsed : 0.0, (unsigned long long)late,
           timed_out ? "true" : "false", cpu, (now_ns() - t_begin) / 1e9, mean, pct(0.5),
           pct(0.9), pct(0.99), pct(0.999), lat_n ? (double)lat_us[lat_n - 1] : 0.0);
    return timed_out ? 4 : 0;
}
