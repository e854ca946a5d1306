/* The Tunnel type (Python's Tunnel subclasses it); its dial() and hand_back() are in dial.c. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static PyObject *
Tunnel_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    TunnelObject *t = (TunnelObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->fd[0] = t->fd[1] = -1;
    t->first_close = -1;
    t->w[0].close_code = t->w[1].close_code = -1;
    return (PyObject *)t;
}

static int
Tunnel_init(TunnelObject *t, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "client_fd", "backend_fd", "max_frame_size", "adopt",
                             "raw", NULL};
    PyObject *engine;
    int fds[2];
    unsigned long long max_size;
    int adopt = 0, raw = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iiK|pp:Tunnel", kwlist, &EngineType, &engine,
                                     &fds[0], &fds[1], &max_size, &adopt, &raw))
        return -1;
    if (t->engine != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Tunnel already initialised");
        return -1;
    }
    /* adopt: the fds are the tunnel's own from here on (the front door's client socket, and
     * -1 for a backend to dial). Else own copies: the transports that held these fds are
     * closed by the caller. Every recv and send passes MSG_DONTWAIT, so the copies' blocking
     * mode (shared with the original's open file) is never relied on: no F_GETFL/F_SETFL. */
    for (int s = 0; s < 2 && adopt; s++)
        t->fd[s] = fds[s];
    t->adopted = (uint8_t)adopt;
    t->raw = (uint8_t)raw;
    for (int s = 0; s < 2 && !adopt; s++) {
        int fd = fcntl(fds[s], F_DUPFD_CLOEXEC, 0);
        if (fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            if (s == 1) {
                close(t->fd[0]);
                t->fd[0] = -1;
            }
            return -1;
        }
        t->fd[s] = fd;
    }
    Py_INCREF(engine);
    t->engine = (EngineObject *)engine;
    t->w[CLIENT].must_mask = 1;
    t->w[CLIENT].max_size = max_size;
    t->w[BACKEND].max_size = UINT64_MAX;
    t->last_traffic = t->engine->now;
    return 0;
}

static int
Tunnel_traverse(TunnelObject *t, visitproc visit, void *arg)
{
    Py_VISIT(t->engine);
    return 0;
}

/* No tp_clear: the engine reference is needed to unregister in dealloc, and cycles through
 * the engine are broken by Engine_clear. */

static void
Tunnel_dealloc(TunnelObject *t)
{
    PyObject_GC_UnTrack(t);
    if (t->engine) {
        close_side(t, CLIENT, 0);
        close_side(t, BACKEND, 0);
    }
    for (int s = 0; s < 2; s++) {
        out_free(&t->out[s]);
        PyMem_Free(t->inject[s]);
        tls_close(t->ssl[s], 1);  /* (handed back and never taken) */
        t->ssl[s] = NULL;
    }
    PyMem_Free(t->pong);
    dial_free(t);
    Py_CLEAR(t->engine);
    /* A Python subclass's type reference is dropped by its own dealloc (subtype_dealloc). */
    Py_TYPE(t)->tp_free((PyObject *)t);
}

int
tunnel_ready(TunnelObject *t)
{
    if (t->engine == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Tunnel not initialised");
        return 0;
    }
    return 1;
}

static int
side_arg(PyObject *arg, int *side)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (v != CLIENT && v != BACKEND) {
        PyErr_SetString(PyExc_ValueError, "side must be CLIENT (0) or BACKEND (1)");
        return 0;
    }
    *side = (int)v;
    return 1;
}

static PyObject *
Tunnel_start(TunnelObject *t, PyObject *args)
{
    Py_buffer head, backend_tail, client_tail;
    if (!tunnel_ready(t) || !PyArg_ParseTuple(args, "y*y*y*:start", &head, &backend_tail, &client_tail))
        return NULL;
    if (t->started) {
        PyErr_SetString(PyExc_RuntimeError, "Tunnel already started");
    }
    else if (register_sides(t) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else {
        /* Until a read or a send says otherwise; epoll reports what is ready already. */
        for (int s = 0; s < 2; s++)
            t->rd_ready[s] = t->wr_ready[s] = 1;
        t->started = 1;
        t->last_traffic = monotonic();
        begin_streams(t, head.buf, (size_t)head.len, backend_tail.buf,
                      (size_t)backend_tail.len, client_tail.buf, (size_t)client_tail.len);
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&backend_tail);
    PyBuffer_Release(&client_tail);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Tunnel_inject(TunnelObject *t, PyObject *args)
{
    PyObject *side_obj;
    Py_buffer frame;
    int side;
    if (!tunnel_ready(t) || !PyArg_ParseTuple(args, "Oy*:inject", &side_obj, &frame))
        return NULL;
    if (!side_arg(side_obj, &side)) {
        PyBuffer_Release(&frame);
        return NULL;
    }
    Walker *w = &t->w[1 - side];
    if (t->fd[side] < 0 || t->finishing) {
        /* nowhere to go */
    }
    else if (t->inject_len[side] + frame.len > MAX_INJECT) {
        PyErr_SetString(PyExc_OverflowError, "too many proxy frames waiting for a boundary");
    }
    else {
        uint8_t *p = PyMem_Realloc(t->inject[side], t->inject_len[side] + (size_t)frame.len);
        if (p == NULL)
            PyErr_NoMemory();
        else {
            memcpy(p + t->inject_len[side], frame.buf, (size_t)frame.len);
            t->inject[side] = p;
            t->inject_len[side] += (uint16_t)frame.len;
            if (w->remaining == 0 || w->holding)
                flush_inject(t, side);
        }
    }
    PyBuffer_Release(&frame);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Tunnel_expect_pong(TunnelObject *t, PyObject *arg)
{
    Py_buffer payload;
    if (!tunnel_ready(t) || PyObject_GetBuffer(arg, &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    if (payload.len < 1 || payload.len > MAX_CONTROL) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError, "a Ping payload has 1 to 125 bytes");
        return NULL;
    }
    if (t->w[CLIENT].holding) {
        /* The frame held for the previous Ping's payload goes on unchanged. */
        PongWatch *pw = t->pong;
        t->w[CLIENT].holding = 0;
        if (pw->have)
            emit(t, BACKEND, pw->frame, pw->have);
    }
    if (t->pong == NULL && (t->pong = PyMem_Malloc(sizeof(PongWatch))) == NULL) {
        PyBuffer_Release(&payload);
        return PyErr_NoMemory();
    }
    t->pong->len = (uint8_t)payload.len;
    t->pong->have = 0;
    memcpy(t->pong->payload, payload.buf, (size_t)payload.len);
    PyBuffer_Release(&payload);
    Py_RETURN_NONE;
}

static PyObject *
Tunnel_attach_tls(TunnelObject *t, PyObject *args)
{
    int side;
    PyObject *side_obj, *conn;
    if (!tunnel_ready(t) || !PyArg_ParseTuple(args, "OO:attach_tls", &side_obj, &conn)
        || !side_arg(side_obj, &side))
        return NULL;
    if (t->ssl[side] != NULL || t->fd[side] < 0 || t->started || t->registered[side]) {
        PyErr_SetString(PyExc_RuntimeError,
                        "attach_tls: only a new tunnel's open side without a session");
        return NULL;
    }
    SSL *ssl = tls_conn_take(conn);
    if (ssl == NULL)
        return NULL;
    t->ssl[side] = ssl;
    Py_RETURN_NONE;
}

/* A handed-back tunnel's session, for the pump that serves its connection as HTTP. */
static PyObject *
Tunnel_take_tls(TunnelObject *t, PyObject *arg)
{
    int side;
    if (!tunnel_ready(t) || !side_arg(arg, &side))
        return NULL;
    if (t->ssl[side] == NULL)
        Py_RETURN_NONE;
    if (t->fd[side] >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "take_tls: the side is still the tunnel's");
        return NULL;
    }
    PyObject *conn = tls_conn_new(t->ssl[side]);
    if (conn != NULL)
        t->ssl[side] = NULL;
    return conn;
}

static PyObject *
Tunnel_finish(TunnelObject *t, PyObject *args)
{
    double limit = -1;
    if (!tunnel_ready(t) || !PyArg_ParseTuple(args, "|d:finish", &limit))
        return NULL;
    if (t->finishing)
        Py_RETURN_NONE;
    t->finishing = 1;
    for (int s = 0; s < 2; s++) {
        t->w[s].hold_len = 0;  /* the start of a frame that will never be whole */
        PyMem_Free(t->inject[s]);
        t->inject[s] = NULL;
        t->inject_len[s] = 0;
    }
    t->w[CLIENT].holding = 0;
    PyMem_Free(t->pong);
    t->pong = NULL;
    if (t->notified)
        t->events = 0;
    finish_progress(t);
    if (t->fd[CLIENT] >= 0 || t->fd[BACKEND] >= 0) {
        /* Bytes still wait for a peer: the engine keeps the tunnel until they are gone or
         * flush_limit has passed (expire()). */
        EngineObject *e = t->engine;
        Py_INCREF(t);
        t->flushing = 1;
        t->flush_deadline = monotonic() + (limit >= 0 ? limit : e->flush_limit);
        t->prev_flush = NULL;
        t->next_flush = e->flushing;
        if (e->flushing)
            e->flushing->prev_flush = t;
        e->flushing = t;
        e->flushing_count++;
    }
    Py_RETURN_NONE;
}

static PyObject *
Tunnel_at_boundary(TunnelObject *t, PyObject *arg)
{
    int side;
    if (!tunnel_ready(t) || !side_arg(arg, &side))
        return NULL;
    Walker *w = &t->w[1 - side];
    return PyBool_FromLong(w->remaining == 0 || w->holding);
}

static PyObject *
Tunnel_injecting(TunnelObject *t, PyObject *arg)
{
    int side;
    if (!tunnel_ready(t) || !side_arg(arg, &side))
        return NULL;
    return PyBool_FromLong(t->inject_len[side] != 0);
}

static PyObject *
close_code_or_none(int32_t code)
{
    if (code < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(code);
}

#define U64_GETTER(name, expr)                                                   \
    static PyObject *Tunnel_get_##name(TunnelObject *t, void *Py_UNUSED(c))      \
    {                                                                            \
        return PyLong_FromUnsignedLongLong((unsigned long long)(expr));         \
    }
U64_GETTER(messages_in, t->w[CLIENT].messages)
U64_GETTER(messages_out, t->w[BACKEND].messages)
U64_GETTER(bytes_in, t->w[CLIENT].payload_bytes)
U64_GETTER(bytes_out, t->w[BACKEND].payload_bytes)
U64_GETTER(pongs_in, t->w[CLIENT].pongs)

static PyObject *
Tunnel_get_client_close_code(TunnelObject *t, void *Py_UNUSED(c))
{
    return close_code_or_none(t->w[CLIENT].close_code);
}

static PyObject *
Tunnel_get_backend_close_code(TunnelObject *t, void *Py_UNUSED(c))
{
    return close_code_or_none(t->w[BACKEND].close_code);
}

static PyObject *
Tunnel_get_first_close(TunnelObject *t, void *Py_UNUSED(c))
{
    if (t->first_close < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(t->first_close);
}

static PyObject *
Tunnel_get_last_traffic(TunnelObject *t, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(t->last_traffic);
}

static PyObject *
Tunnel_get_open_sides(TunnelObject *t, void *Py_UNUSED(c))
{
    return PyLong_FromLong((t->fd[CLIENT] >= 0) + (t->fd[BACKEND] >= 0));
}

static PyObject *
Tunnel_get_connected_at(TunnelObject *t, void *Py_UNUSED(c))
{
    if (t->dial == NULL || !t->dial->connected)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(t->dial->connected_at);
}

static PyObject *
Tunnel_get_dial_error(TunnelObject *t, void *Py_UNUSED(c))
{
    return PyLong_FromLong(t->dial != NULL ? t->dial->error : 0);
}

static PyMethodDef Tunnel_methods[] = {
    {"dial", (PyCFunction)Tunnel_dial, METH_VARARGS,
     "dial(ip, port, request, client_tail): connect to the backend, send the handshake "
     "request, read its answer's head; run() reports SWITCHING (a 101) or HANDED_BACK."},
    {"answer_head", (PyCFunction)Tunnel_answer_head, METH_NOARGS,
     "The backend's 101 head, once run() reported SWITCHING."},
    {"switch", (PyCFunction)Tunnel_switch, METH_O,
     "switch(head): the 101 is accepted; send head to the client and serve. False if the "
     "client cannot join the epoll set (hand the connection back)."},
    {"hand_back", (PyCFunction)Tunnel_hand_back, METH_NOARGS,
     "A dialling tunnel's sockets go back to Python: (client fd, backend fd or -1, the "
     "backend's bytes read)."},
    {"start", (PyCFunction)Tunnel_start, METH_VARARGS,
     "start(head, backend_tail, client_tail): send the 101 head and the tails, then serve."},
    {"inject", (PyCFunction)Tunnel_inject, METH_VARARGS,
     "inject(side, frame): send a frame of the proxy's to side at its next frame boundary."},
    {"expect_pong", (PyCFunction)Tunnel_expect_pong, METH_O,
     "The next masked client Pong carrying this payload is consumed, not forwarded."},
    {"finish", (PyCFunction)Tunnel_finish, METH_VARARGS,
     "finish(limit=flush_limit): stop reading; close each socket once what waits for it is "
     "sent, or after limit seconds."},
    {"attach_tls", (PyCFunction)Tunnel_attach_tls, METH_VARARGS,
     "attach_tls(side, conn): side's bytes go through conn's TLS session from now on (a new "
     "tunnel, before dial or start)."},
    {"take_tls", (PyCFunction)Tunnel_take_tls, METH_O,
     "take_tls(side): a handed-back side's TLS session as a TlsConn, or None."},
    {"at_boundary", (PyCFunction)Tunnel_at_boundary, METH_O,
     "True when a frame may be written to side now."},
    {"injecting", (PyCFunction)Tunnel_injecting, METH_O,
     "True while a proxy frame waits for a frame boundary toward side."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Tunnel_get_max_frame_size(TunnelObject *t, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(t->w[CLIENT].max_size);
}

/* A reload changed the host's limit: the walker compares each client frame header with it,
 * so it holds from the next frame on (a frame already passing is not judged again). */
static int
Tunnel_set_max_frame_size(TunnelObject *t, PyObject *value, void *Py_UNUSED(c))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "max_frame_size cannot be deleted");
        return -1;
    }
    unsigned long long size = PyLong_AsUnsignedLongLong(value);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    t->w[CLIENT].max_size = size;
    return 0;
}

static PyGetSetDef Tunnel_getset[] = {
    {"max_frame_size", (getter)Tunnel_get_max_frame_size, (setter)Tunnel_set_max_frame_size,
     "the largest client frame payload passed (1009 past it)", NULL},
    {"messages_in", (getter)Tunnel_get_messages_in, NULL, "client messages", NULL},
    {"messages_out", (getter)Tunnel_get_messages_out, NULL, "backend messages", NULL},
    {"bytes_in", (getter)Tunnel_get_bytes_in, NULL, "client data payload bytes", NULL},
    {"bytes_out", (getter)Tunnel_get_bytes_out, NULL, "backend data payload bytes", NULL},
    {"pongs_in", (getter)Tunnel_get_pongs_in, NULL, "client Pongs, consumed ones too", NULL},
    {"client_close_code", (getter)Tunnel_get_client_close_code, NULL, "or None", NULL},
    {"backend_close_code", (getter)Tunnel_get_backend_close_code, NULL, "or None", NULL},
    {"first_close", (getter)Tunnel_get_first_close, NULL, "side of the first Close, or None",
     NULL},
    {"last_traffic", (getter)Tunnel_get_last_traffic, NULL, "time.monotonic() of the last read",
     NULL},
    {"open_sides", (getter)Tunnel_get_open_sides, NULL, "sockets not closed yet", NULL},
    {"connected_at", (getter)Tunnel_get_connected_at, NULL,
     "time.monotonic() when the dialled backend took the first request byte, or None", NULL},
    {"dial_error", (getter)Tunnel_get_dial_error, NULL,
     "0 while dialling, errno of a failed connect or read, -1 for an answer not a 101",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TunnelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "charon.worker.websocket._engine.Tunnel",
    .tp_basicsize = sizeof(TunnelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Tunnel(engine, client_fd, backend_fd, max_frame_size): one WebSocket tunnel.",
    .tp_new = Tunnel_new,
    .tp_init = (initproc)Tunnel_init,
    .tp_dealloc = (destructor)Tunnel_dealloc,
    .tp_traverse = (traverseproc)Tunnel_traverse,
    .tp_methods = Tunnel_methods,
    .tp_getset = Tunnel_getset,
};
