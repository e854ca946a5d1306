/* The fuzz targets' common part (driver.h). A tunnel is driven the way the worker drives it:
 * socket events through handle_event() (what epoll would report), then Engine.run() (the
 * tunnels queued on a read budget, reports, references dropped), and Python's calls (inject,
 * expect_pong, finish, hand_back) through the Python API. After each step the bytes forwarded
 * in each direction must be a prefix of the bytes the other side sent, unless the proxy added
 * frames of its own to that direction: the walker may hold bytes back, never change them; and
 * the payload bytes counted in a direction are never more than the bytes sent in it. */

#include "driver.h"

#include "model.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

PyMODINIT_FUNC PyInit__engine(void);

/* The 101 Python writes for the client once it accepted the backend's (the accept value of
 * REQUEST's key). */
static const char SWITCHED[] =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
static const char REQUEST[] =
    "GET /chat HTTP/1.1\r\nHost: backend\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

int
take_byte(Input *in)
{
    if (in->n == 0)
        return -1;
    in->n--;
    return *in->p++;
}

size_t
take_bytes(Input *in, size_t want, const uint8_t **out)
{
    if (want > in->n)
        want = in->n;
    *out = in->p;
    in->p += want;
    in->n -= want;
    return want;
}

void
driver_init(void)
{
    /* The plain allocator: pymalloc's pools would hide overflows from AddressSanitizer. */
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    if (PyStatus_Exception(Py_PreInitialize(&pre)))
        abort();
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.install_signal_handlers = 0;  /* libFuzzer's */
    PyStatus st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st) || PyInit__engine() == NULL)
        abort();
}

PyObject *
new_engine(void)
{
    PyObject *e = PyObject_CallNoArgs((PyObject *)&EngineType);
    if (e == NULL)
        abort();
    return e;
}

void
drop_engine(PyObject *engine)
{
    /* A finished tunnel still flushing and its engine hold each other: the collector's
     * Engine_clear ends that, as in a worker. */
    int cycle = Py_REFCNT(engine) > 1;
    Py_DECREF(engine);
    if (cycle)
        PyGC_Collect();
}

void
check_all_closed(void)
{
    for (int i = 0; i < MODEL_FDS; i++)
        if (model[i].used && (!model[i].closed || model[i].registered)) {
            fprintf(stderr, "model fd %d left open or registered\n", MODEL_FD_BASE + i);
            abort();
        }
}

/* Bytes a side's peer sent, in order (to check what reached the other side against). */
typedef struct {
    uint8_t *p;
    size_t len, cap;
    int added;  /* the proxy wrote frames of its own toward the other side */
    size_t checked;  /* the other side's first bytes already found equal */
} Log;

static void
log_add(Log *l, const uint8_t *p, size_t n)
{
    if (n == 0)
        return;
    if (l->len + n > l->cap) {
        size_t cap = l->cap ? l->cap : 1024;
        while (cap < l->len + n)
            cap *= 2;
        l->p = realloc(l->p, cap);
        if (l->p == NULL)
            abort();
        l->cap = cap;
    }
    memcpy(l->p + l->len, p, n);
    l->len += n;
}

static void
check_prefix(Log *src, const ModelSocket *dst)
{
    if (src->added || dst->out_len == src->checked)
        return;
    size_t from = src->checked;  /* each byte compared once: scripts send megabytes */
    src->checked = dst->out_len;
    if (dst->out_len > src->len
        || memcmp(dst->out + from, src->p + from, dst->out_len - from) != 0) {
        fprintf(stderr, "forwarded bytes are not a prefix of the bytes sent\n");
        abort();
    }
}

typedef struct {
    PyObject *engine;
    PyObject *tunnel;
    int fd[2];
    Log log[2];
    int handed_back;
    Input *in;  /* what decides on a 101 (switch or hand back), as Python would */
} Run;

/* Tunnel.hand_back() as Python calls it: the sockets are Python's, which closes them (or
 * uvloop takes them). */
static void
take_back(Run *r)
{
    PyObject *back = PyObject_CallMethod(r->tunnel, "hand_back", NULL);
    if (back == NULL) {
        PyErr_Print();
        abort();
    }
    for (int s = 0; s < 2; s++) {
        int fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(back, s));
        if (fd >= 0)
            model_close(fd);
    }
    Py_DECREF(back);
    r->handed_back = 1;
}

/* A dialled 101 waits for Python (dialled.py: _switching): it reads the head, then either
 * starts the tunnel with the head it writes for the client, or takes the sockets back. */
static void
decide_101(Run *r)
{
    PyObject *head = PyObject_CallMethod(r->tunnel, "answer_head", NULL);
    if (head == NULL || !PyBytes_Check(head)) {
        PyErr_Print();
        abort();
    }
    Py_DECREF(head);
    int choice = take_byte(r->in);
    if (choice >= 0 && (choice & 1)) {
        take_back(r);  /* a 101 the HTTP path would refuse: it answers 502 */
        return;
    }
    PyObject *opened = PyObject_CallMethod(r->tunnel, "switch", "(y#)", SWITCHED,
                                           (Py_ssize_t)(sizeof(SWITCHED) - 1));
    if (opened == NULL) {
        PyErr_Print();
        abort();
    }
    int ok = PyObject_IsTrue(opened);
    Py_DECREF(opened);
    if (!ok)
        take_back(r);
}

/* Engine.run(): the queued tunnels, the reports, the dropped references. */
static void
engine_run(Run *r)
{
    PyObject *out = PyObject_CallMethod(r->engine, "run", NULL);
    if (out == NULL) {
        PyErr_Print();
        abort();
    }
    PyObject *reports = PyTuple_Check(out) ? PyTuple_GET_ITEM(out, 0) : out;
    if (reports != Py_None) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(reports); i++) {
            PyObject *item = PyList_GET_ITEM(reports, i);
            long flags = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
            if ((flags & EV_SWITCHING) && !r->handed_back)
                decide_101(r);
            if ((flags & EV_HANDED_BACK) && !r->handed_back)
                take_back(r);
        }
    }
    Py_DECREF(out);
}

static void
call(PyObject *tunnel, const char *name, const char *format, ...)
{
    va_list va;
    va_start(va, format);
    PyObject *method = PyObject_GetAttrString(tunnel, name);
    PyObject *args = method ? Py_VaBuildValue(format, va) : NULL;
    va_end(va);
    PyObject *res = args ? PyObject_CallObject(method, args) : NULL;
    Py_XDECREF(method);
    Py_XDECREF(args);
    if (res == NULL) {
        /* Refusals Python gets and handles (a full inject queue, a wrong state). */
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)
            && !PyErr_ExceptionMatches(PyExc_RuntimeError)
            && !PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Print();
            abort();
        }
        PyErr_Clear();
    }
    Py_XDECREF(res);
}

static void
event(Run *r, int side, uint32_t ev)
{
    TunnelObject *t = (TunnelObject *)r->tunnel;
    EngineObject *e = (EngineObject *)r->engine;
    if (!r->handed_back && t->registered[side]) {
        /* As run() serves an epoll event. */
        e->in_run = 1;
        handle_event(t, side, ev);
        e->in_run = 0;
    }
    engine_run(r);
}

void
drive_tunnel(Input *in, int dial)
{
    Run r;
    memset(&r, 0, sizeof(r));
    r.in = in;
    r.engine = new_engine();
    int limit_byte = take_byte(in);
    unsigned long long max_size = limit_byte < 0 || limit_byte > 250 ? 1ULL << 62
                                                                     : (unsigned)limit_byte << 4;
    r.fd[CLIENT] = model_new_fd();
    r.fd[BACKEND] = dial ? -1 : model_new_fd();
    r.tunnel = PyObject_CallFunction((PyObject *)&TunnelType, "OiiKi", r.engine, r.fd[CLIENT],
                                     r.fd[BACKEND], max_size, 1);
    if (r.tunnel == NULL)
        abort();
    TunnelObject *t = (TunnelObject *)r.tunnel;
    if (dial) {
        const uint8_t *tail;
        size_t tail_len = take_bytes(in, (size_t)(take_byte(in) & 0x3f), &tail);
        log_add(&r.log[CLIENT], tail, tail_len);
        int connect_fails = take_byte(in);
        model_connect_errno = connect_fails >= 0 && connect_fails < 8 ? ECONNREFUSED : 0;
        call(r.tunnel, "dial", "(siy#y#)", "127.0.0.1", 9, REQUEST,
             (Py_ssize_t)(sizeof(REQUEST) - 1), tail, (Py_ssize_t)tail_len);
        r.fd[BACKEND] = t->fd[BACKEND];
        /* The proxy wrote both first parts itself: the request and the 101 head. */
        r.log[CLIENT].added = r.log[BACKEND].added = 1;
        if (t->dial != NULL && t->dial->error)
            take_back(&r);  /* a connect that failed at once: Python hands it back */
    }
    else {
        call(r.tunnel, "start", "(y#y#y#)", "", (Py_ssize_t)0, "", (Py_ssize_t)0, "",
             (Py_ssize_t)0);
    }

    for (int steps = 0; steps < 256 && !r.handed_back; steps++) {
        int op = take_byte(in);
        if (op < 0)
            break;
        int side = op & 1;
        int fd = r.fd[side];
        ModelSocket *m = fd >= 0 ? model_at(fd) : NULL;
        const uint8_t *p;
        size_t n;
        switch ((op >> 1) % 11) {
        case 0:  /* the side's peer sends a chunk */
            n = take_bytes(in, (size_t)take_byte(in) & 0xff, &p);
            if (m && !m->eof && !m->error) {
                model_give(fd, p, n);
                log_add(&r.log[side], p, n);
            }
            event(&r, side, EPOLLIN);
            break;
        case 1: {  /* a long run of one byte: big payloads, full reads, slow destinations */
            int k = take_byte(in), b = take_byte(in);
            n = (size_t)(k < 0 ? 1 : k + 1) * 1024;
            uint8_t *zeros = malloc(n);
            memset(zeros, b < 0 ? 0 : b, n);
            if (m && !m->eof && !m->error) {
                model_give(fd, zeros, n);
                log_add(&r.log[side], zeros, n);
            }
            free(zeros);
            event(&r, side, EPOLLIN);
            break;
        }
        case 2:  /* the side's peer reads: room in its socket */
            if (m)
                m->room += (size_t)(take_byte(in) + 1) * 512;
            event(&r, side, EPOLLOUT);
            break;
        case 3:  /* the side's peer stops reading */
            if (m)
                m->room = 0;
            break;
        case 4:  /* the peer's FIN */
            if (m)
                m->eof = 1;
            event(&r, side, EPOLLIN | EPOLLRDHUP);
            break;
        case 5:  /* a reset */
            if (m)
                m->error = ECONNRESET;
            event(&r, side, EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP);
            break;
        case 6:  /* a proxy frame toward side (Close, Ping) */
            n = take_bytes(in, (size_t)take_byte(in) & 0x7f, &p);
            r.log[1 - side].added = 1;
            call(r.tunnel, "inject", "(iy#)", side, p, (Py_ssize_t)n);
            engine_run(&r);
            break;
        case 7:  /* a proxy Ping: the client's Pong is consumed */
            n = take_bytes(in, (size_t)take_byte(in) & 0x7f, &p);
            r.log[CLIENT].added = 1;
            call(r.tunnel, "expect_pong", "(y#)", p, (Py_ssize_t)n);
            break;
        case 8:
            call(r.tunnel, "finish", "()");
            engine_run(&r);
            break;
        case 9: {  /* a reload changes the client frame limit (Tunnel.max_frame_size) */
            int k = take_byte(in);
            PyObject *limit = PyLong_FromUnsignedLongLong(k < 0 ? 0 : (unsigned long long)k << 4);
            if (limit == NULL || PyObject_SetAttrString(r.tunnel, "max_frame_size", limit) < 0) {
                PyErr_Print();
                abort();
            }
            Py_DECREF(limit);
            break;
        }
        default:  /* both ways at once, as one epoll batch */
            event(&r, side, EPOLLIN | EPOLLOUT);
            event(&r, 1 - side, EPOLLIN | EPOLLOUT);
            break;
        }
        for (int s = 0; s < 2 && !r.handed_back; s++) {
            if (r.fd[1 - s] >= 0)
                check_prefix(&r.log[s], model_at(r.fd[1 - s]));
            if (t->w[s].payload_bytes > r.log[s].len) {
                fprintf(stderr, "side %d: %llu payload bytes counted, %zu bytes sent\n", s,
                        (unsigned long long)t->w[s].payload_bytes, r.log[s].len);
                abort();
            }
        }
    }
    Py_DECREF(r.tunnel);
    drop_engine(r.engine);
    free(r.log[0].p);
    free(r.log[1].p);
    check_all_closed();
}
