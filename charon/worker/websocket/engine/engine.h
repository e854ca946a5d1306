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
 * Files: sockets.c (buffers, sends, epoll interest, closing), walk.c (frame walking, reads,
 * events), engine_type.c and tunnel_type.c (the Python types and the module). */

#ifndef CHARON_ENGINE_H
#define CHARON_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <sys/epoll.h>
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
    uint8_t events;          /* EV_* waiting for run() to report */
    uint16_t refused_code;
    int8_t first_close;      /* side whose Close passed first, -1: none yet */
    Walker w[2];
    OutBuf out[2];           /* by source side: bytes waiting for the other side */
    uint8_t *inject[2];      /* by destination side: proxy frames waiting for a boundary */
    uint16_t inject_len[2];
    PongWatch *pong;
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
    struct epoll_event events[MAX_EVENTS];
};

extern PyTypeObject EngineType;
extern PyTypeObject TunnelType;

static inline double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* sockets.c */
void notify(TunnelObject *t, uint8_t what);
int release_later(EngineObject *e, TunnelObject *t);
void flush_list_remove(TunnelObject *t);
void out_free(OutBuf *o);
void close_side(TunnelObject *t, int side, int reset);
void side_lost(TunnelObject *t, int side);
int emit(TunnelObject *t, int dst, const uint8_t *p, size_t n);
int flush_out(TunnelObject *t, int dst);
int reading(TunnelObject *t, int side);
int register_sides(TunnelObject *t);
void queue_again(TunnelObject *t);
void finish_progress(TunnelObject *t);

/* walk.c */
int flush_inject(TunnelObject *t, int dst);
void progress(TunnelObject *t);
int feed(TunnelObject *t, int src, const uint8_t *p, size_t n);
void handle_event(TunnelObject *t, int side, uint32_t ev);

#endif
