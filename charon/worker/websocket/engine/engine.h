/* The WebSocket tunnel engine (the extension charon.worker.websocket._engine): after the
 * handshake, both sockets of every tunnel of a worker leave uvloop for one epoll set run here,
 * so that one Python call (Engine.run) reads, walks and writes many messages of many tunnels.
 * Dispatching each message through Python costs ~3 us, a third of nginx's whole cost per
 * message; this code removes that.
 *
 * Per tunnel and direction the engine walks frame headers as they pass (RFC 6455 5.2): opcode,
 * FIN, mask bit, length; payloads are skipped except the first two bytes of a Close (its code)
 * and a Pong the proxy waits for. Bytes are forwarded unchanged. The policy (when to close,
 * ping, time out) stays in Python (tunnel.py); rare events go back to it from run().
 *
 * Lifetime: a Tunnel holds a reference to its Engine (the epoll fd outlives every tunnel); the
 * Engine holds references only to tunnels with a report pending or still flushing after
 * finish(), so Python may drop a tunnel at any time: its dealloc unregisters and closes.
 * No Python code runs while events are handled (reports and releases wait until the end of
 * run()), so a tunnel cannot vanish under the loop.
 *
 * The front door: the engine also serves the worker's listening sockets. It accepts, reads
 * once, and hands every connection to Python (run()'s arrivals); a connection whose first read
 * holds a whole WebSocket handshake comes with its head split into fields, and Python may make
 * it a Tunnel that dials the backend itself (dial.c): the handshake's every socket operation
 * is then done here, none in uvloop. Python keeps the policy: it judges the backend's 101
 * (Tunnel.switch starts the tunnel), and the head split takes only what llhttp takes alike.
 *
 * Files: sockets.c (buffers, sends, epoll interest, closing), walk.c (frame walking, reads,
 * events), door.c (accepting, the first read), head.c (the head split), dial.c (the backend
 * connect, the handshake request, reading the answer; Tunnel.dial, answer_head, switch and
 * hand_back), engine_type.c (the Engine type and the module) and tunnel_type.c (the Tunnel
 * type). */

#ifndef CHARON_ENGINE_H
#define CHARON_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/ssl.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#define READ_SIZE (64 * 1024)  /* the engine's one read buffer */
#define MAX_EVENTS 256
#define READS_PER_EVENT 4      /* full reads in a row before serving other sockets */
#define MAX_HEADER 14
#define MAX_CONTROL 125
#define MAX_INJECT 4096        /* queued proxy frames per direction (a few control frames) */
#define DEFAULT_FLUSH_LIMIT 5.0

#define OP_CLOSE 0x8
#define OP_PONG 0xA

#define CLIENT 0
#define BACKEND 1

/* What run() reports (flags of one tunnel). */
#define EV_CLIENT_LOST 1
#define EV_BACKEND_LOST 2
#define EV_REFUSED 4
#define EV_SWITCHING 8   /* a dialled tunnel got a 101: Python decides (switch/hand_back) */
#define EV_HANDED_BACK 16 /* a dial ended without a tunnel: Python takes the sockets back */

/* Epoll data tags: a tunnel's address | side (objects are 8-aligned), 0 for the wake-up,
 * a listening socket's fd << 3 | LISTEN_TAG (| TLS_TAG for a TLS listener), a new connection
 * that had sent nothing yet (or is in its TLS handshake) fd << 2 | WAITING_TAG. */
#define LISTEN_TAG 2
#define WAITING_TAG 3
#define TLS_TAG 4
#define WAIT_LIMIT 0.5        /* seconds a silent new connection waits before going to Python */

#define FIRST_READ 16384      /* the front door's one read of a new connection */
#define MAX_ARRIVALS 64       /* connections accepted per run() */
#define MAX_FAST_FIELDS 100   /* header fields of a head the front door splits */
#define MAX_RESPONSE_HEAD 16384

/* A connection accepted by the front door, until run() hands it to Python. */
typedef struct {
    int fd;
    struct sockaddr_storage peer;
    uint8_t *data;           /* the first read (PyMem), len bytes */
    uint32_t len;
    SSL *ssl;                /* a TLS connection's session (handshake done), else NULL */
} Arrival;

/* A new connection whose first read found nothing yet, or whose TLS handshake is under way
 * (door.c). */
typedef struct {
    int fd;
    double since;            /* accepted (or, TLS, handshake done: waiting for data) */
    struct sockaddr_storage peer;
    SSL *ssl;                /* TLS: the session being set up, else NULL */
    uint8_t handshaking;     /* TLS: the handshake is not over */
    uint32_t interest;       /* the epoll events asked for */
} Waiting;

/* TLS handshake results counted by the front door (Engine.take_tls_counts). */
enum { TLS_FULL, TLS_RESUMED, TLS_FAILED, TLS_TIMEOUT, TLS_UNKNOWN_NAME, TLS_COUNTS };

typedef struct TlsServerObject TlsServerObject;

/* A request head as split by head.c: offsets into the first read. */
typedef struct {
    uint32_t method_len, target_off, target_len, head_len;
    uint32_t count;
    uint32_t name_off[MAX_FAST_FIELDS], name_len[MAX_FAST_FIELDS];
    uint32_t value_off[MAX_FAST_FIELDS], value_len[MAX_FAST_FIELDS];
} SplitHead;

/* A tunnel's backend connect and handshake, until the 101 or a hand-back (dial.c). */
typedef struct {
    uint8_t *request;        /* the handshake request for the backend, then nothing */
    uint32_t request_len, request_sent;
    uint8_t *response;       /* what the backend sent so far (MAX_RESPONSE_HEAD at most) */
    uint32_t response_len;
    uint8_t *client_tail;    /* bytes the client sent past its head */
    uint32_t client_tail_len;
    uint32_t head_len;       /* of the 101 waiting for Python's decision */
    uint8_t asking;          /* a 101 came: Python decides, the backend's events wait */
    uint8_t more;            /* the backend's socket may hold more than was read */
    uint8_t connected;
    int error;               /* errno of a failed connect or read; -1: the answer is no 101 */
    double connected_at;
} DialState;

typedef struct {
    uint8_t *data;
    uint32_t off, len;  /* bytes data[off:off+len] wait for the destination */
} OutBuf;

/* The frame state of one direction, named by its source side. */
typedef struct {
    uint64_t remaining;  /* payload bytes of the current frame still to come */
    uint64_t max_size;
    uint64_t messages, payload_bytes, pongs;
    int32_t close_code;  /* -1 until a Close frame has passed */
    uint16_t error;      /* the close code of a rule the walk stopped at */
    uint8_t opcode, fin, masked, must_mask;
    uint8_t mask[4];
    uint8_t close_got, close_bytes[2];
    uint8_t hold_len;    /* the start of a header cut by the end of a read, not yet sent */
    uint8_t hold[MAX_HEADER];
    uint8_t holding;     /* the current frame is the Pong being watched for: kept back */
} Walker;

/* A Pong the proxy waits for (its Ping's payload), and the candidate frame held meanwhile. */
typedef struct {
    uint8_t len;
    uint8_t payload[MAX_CONTROL];
    uint16_t have;
    uint8_t frame[6 + MAX_CONTROL];
} PongWatch;

typedef struct EngineObject EngineObject;

typedef struct TunnelObject {
    PyObject_HEAD
    EngineObject *engine;
    int fd[2];
    uint8_t registered[2];
    /* Edge-triggered epoll: what the last events said and no read or send has disproved yet:
     * the socket may have bytes (or an EOF) to read / room to write. */
    uint8_t rd_ready[2], wr_ready[2];
    uint8_t rd_end[2];       /* the peer's FIN (or an error) is queued behind the bytes */
    uint8_t finishing, started, lost_any, notified, flushing, queued;
    uint8_t handed_back;     /* the sockets went back to Python: nothing to close here */
    uint8_t adopted;         /* the fds are no copies: closing them leaves the epoll set */
    uint8_t raw;             /* no frames: bytes copied as they are (a TLS connection's pump) */
    SSL *ssl[2];             /* a side that is TLS: its reads and sends go through OpenSSL */
    uint8_t events;          /* EV_* waiting for run() to report */
    uint16_t refused_code;
    int8_t first_close;      /* side whose Close passed first, -1: none yet */
    Walker w[2];
    OutBuf out[2];           /* by source side: bytes waiting for the other side */
    uint8_t *inject[2];      /* by destination side: proxy frames waiting for a boundary */
    uint16_t inject_len[2];
    PongWatch *pong;
    DialState *dial;         /* while dialling the backend (NULL otherwise) */
    double last_traffic;
    double flush_deadline;
    struct TunnelObject *next_notify;
    struct TunnelObject *next_again;
    struct TunnelObject *prev_flush, *next_flush;
} TunnelObject;

struct EngineObject {
    PyObject_HEAD
    int epfd;
    int wakefd;              /* made readable when a report is queued outside run() */
    int in_run;
    double now;
    double flush_limit;
    uint8_t *buf;
    TunnelObject *notify;    /* tunnels with a report (each holds a reference) */
    TunnelObject *again;     /* tunnels that stopped reading on a budget (each holds one) */
    TunnelObject *flushing;  /* finished tunnels still flushing (each holds a reference) */
    Py_ssize_t flushing_count;
    TunnelObject **release;  /* references to drop once run() is done with the events */
    Py_ssize_t release_len, release_cap;
    Arrival arrivals[MAX_ARRIVALS];
    int arrivals_len;
    int accept_errno;        /* a listening socket hit EMFILE/ENFILE (it left the set) */
    int accepted;            /* connections the front door took in minus those it closed,
                              * since the last run(): Python's count of open connections */
    Waiting *waiting;        /* silent new connections, in no order */
    int waiting_len, waiting_cap;
    int *waiting_at;         /* by fd: index in waiting + 1, 0 if not waiting */
    int waiting_at_cap;
    TlsServerObject *tls;    /* certificates and settings of the TLS listeners (a reference) */
    uint64_t tls_counts[TLS_COUNTS];
    struct epoll_event events[MAX_EVENTS];
};

extern PyTypeObject EngineType;
extern PyTypeObject TunnelType;
extern PyTypeObject TlsServerType;
extern PyTypeObject TlsConnType;

static inline double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* sockets.c */
void wake(EngineObject *e);
void notify(TunnelObject *t, uint8_t what);
int release_later(EngineObject *e, TunnelObject *t);
void flush_list_remove(TunnelObject *t);
void out_free(OutBuf *o);
void close_side(TunnelObject *t, int side, int reset);
void side_lost(TunnelObject *t, int side);
int emit(TunnelObject *t, int dst, const uint8_t *p, size_t n);
int flush_out(TunnelObject *t, int dst);
int reading(TunnelObject *t, int side);
int register_side(TunnelObject *t, int side);
int register_sides(TunnelObject *t);
void queue_again(TunnelObject *t);
void finish_progress(TunnelObject *t);

/* tls.c */
SSL *tls_new_session(EngineObject *e, int fd);
double tls_handshake_timeout(const TlsServerObject *srv);
void tls_release_server(SSL *ssl);
ssize_t tls_recv(SSL *ssl, uint8_t *buf, size_t cap, int *drained);
ssize_t tls_send(SSL *ssl, const uint8_t *p, size_t n);
void tls_close(SSL *ssl, int quiet);
PyObject *tls_conn_new(SSL *ssl);
int tls_module_init(void);
SSL *tls_conn_take(PyObject *conn);

/* door.c */
void accept_ready(EngineObject *e, int listen_fd, int tls);
int door_admit(EngineObject *e, int fd, const struct sockaddr_storage *peer, int tls);
void first_read_ready(EngineObject *e, int fd);
void expire_waiting(EngineObject *e, double now);
void free_waiting(EngineObject *e);
PyObject *take_arrivals(EngineObject *e);
void free_arrivals(EngineObject *e);

/* head.c */
uint32_t head_end(const uint8_t *p, uint32_t n);
int split_head(const uint8_t *p, uint32_t n, SplitHead *h);
int split_fields(const uint8_t *p, uint32_t at, uint32_t end, SplitHead *h);
int has_token(const uint8_t *p, uint32_t n, const char *token);
int lower_equals(const uint8_t *p, uint32_t n, const char *word);
PyObject *head_tuple(const uint8_t *p, const SplitHead *h);
PyObject *engine_split_head(PyObject *module, PyObject *arg);

/* atomics.c: 64-bit words of a shared buffer (the workers' memfd tables) */
PyObject *engine_atomic_load(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *engine_atomic_cas(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *engine_atomic_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* tunnel_type.c */
int tunnel_ready(TunnelObject *t);

/* dial.c */
PyObject *Tunnel_dial(TunnelObject *t, PyObject *args);
PyObject *Tunnel_hand_back(TunnelObject *t, PyObject *Py_UNUSED(ignored));
PyObject *Tunnel_answer_head(TunnelObject *t, PyObject *Py_UNUSED(ignored));
PyObject *Tunnel_switch(TunnelObject *t, PyObject *arg);
int dial_start(TunnelObject *t, const struct sockaddr *addr, socklen_t addr_len);
void dial_event(TunnelObject *t, int side, uint32_t ev);
void dial_free(TunnelObject *t);

/* walk.c */
int flush_inject(TunnelObject *t, int dst);
void progress(TunnelObject *t);
int feed(TunnelObject *t, int src, const uint8_t *p, size_t n);
void handle_event(TunnelObject *t, int side, uint32_t ev);
void begin_streams(TunnelObject *t, const uint8_t *head, size_t head_len,
                   const uint8_t *backend_tail, size_t backend_tail_len,
                   const uint8_t *client_tail, size_t client_tail_len);

#endif
