/* The Engine type: one epoll set per worker, served by run(); and the module. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"flush_limit", NULL};
    double flush_limit = DEFAULT_FLUSH_LIMIT;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|d:Engine", kwlist, &flush_limit))
        return NULL;
    EngineObject *e = (EngineObject *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->epfd = e->wakefd = -1;
    e->flush_limit = flush_limit;
    e->buf = PyMem_Malloc(READ_SIZE);
    if (e->buf == NULL) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd >= 0)
        e->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->epfd < 0 || e->wakefd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.u64 = 0;  /* no tunnel: the wake-up */
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    e->now = monotonic();
    return (PyObject *)e;
}

static int
Engine_traverse(EngineObject *e, visitproc visit, void *arg)
{
    for (TunnelObject *t = e->notify; t; t = t->next_notify)
        Py_VISIT(t);
    for (TunnelObject *t = e->flushing; t; t = t->next_flush)
        Py_VISIT(t);
    for (TunnelObject *t = e->again; t; t = t->next_again)
        Py_VISIT(t);
    return 0;
}

/* Drop the engine's references: flushing tunnels are cut, reports are forgotten. */
static int
Engine_clear(EngineObject *e)
{
    while (e->notify) {
        TunnelObject *t = e->notify;
        e->notify = t->next_notify;
        t->next_notify = NULL;
        t->notified = 0;
        t->events = 0;
        Py_DECREF(t);
    }
    while (e->again) {
        TunnelObject *t = e->again;
        e->again = t->next_again;
        t->next_again = NULL;
        t->queued = 0;
        Py_DECREF(t);
    }
    while (e->flushing) {
        TunnelObject *t = e->flushing;
        flush_list_remove(t);
        close_side(t, CLIENT, 1);
        close_side(t, BACKEND, 1);
        Py_DECREF(t);
    }
    return 0;
}

static void
Engine_dealloc(EngineObject *e)
{
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    free_arrivals(e);
    free_waiting(e);
    if (e->wakefd >= 0)
        close(e->wakefd);
    if (e->epfd >= 0)
        close(e->epfd);
    PyMem_Free(e->buf);
    PyMem_Free(e->release);
    Py_CLEAR(e->tls);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *
Engine_fileno(EngineObject *e, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(e->epfd);
}

/* Take the reports queued since the last run: None, or a list of (tunnel, flags, code). */
static PyObject *
take_reports(EngineObject *e)
{
    PyObject *list = NULL;
    int failed = 0;
    while (e->notify) {
        TunnelObject *t = e->notify;
        e->notify = t->next_notify;
        t->next_notify = NULL;
        t->notified = 0;
        uint8_t events = t->events;
        t->events = 0;
        if (!t->finishing && events && !failed) {
            if (list == NULL)
                list = PyList_New(0);
            PyObject *item = list ? Py_BuildValue("(OBH)", (PyObject *)t, events,
                                                  t->refused_code) : NULL;
            if (item == NULL || PyList_Append(list, item) < 0)
                failed = 1;
            Py_XDECREF(item);
        }
        Py_DECREF(t);  /* the list's tuple holds its own */
    }
    if (failed) {
        Py_XDECREF(list);
        return NULL;
    }
    if (list == NULL)
        Py_RETURN_NONE;
    return list;
}

/* Drop the references put aside while events were handled. */
static void
drain_release(EngineObject *e)
{
    Py_ssize_t count = e->release_len;
    e->release_len = 0;
    for (Py_ssize_t i = 0; i < count; i++)
        Py_DECREF(e->release[i]);
}

static PyObject *
Engine_run(EngineObject *e, PyObject *Py_UNUSED(ignored))
{
    int n;
    do {
        n = epoll_wait(e->epfd, e->events, MAX_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    e->in_run = 1;
    e->now = monotonic();
    /* The wake-up is cleared before anything is served: what is queued from here on sets it
     * again, for the next run. */
    for (int i = 0; i < n; i++) {
        if (e->events[i].data.u64 == 0) {
            uint64_t count;
            ssize_t r;
            do {
                r = read(e->wakefd, &count, sizeof(count));
            } while (r < 0 && errno == EINTR);
        }
    }
    TunnelObject *again = e->again;
    e->again = NULL;
    for (int i = 0; i < n; i++) {
        uint64_t data = e->events[i].data.u64;
        if ((data & 3) == WAITING_TAG)
            first_read_ready(e, (int)(data >> 2));
        else if (data & LISTEN_TAG)
            accept_ready(e, (int)(data >> 3), (data & TLS_TAG) != 0);
        else if (data != 0) {
            TunnelObject *t = (TunnelObject *)(uintptr_t)(data & ~(uint64_t)1);
            handle_event(t, (int)(data & 1), e->events[i].events);
        }
    }
    while (again) {
        TunnelObject *t = again;
        again = t->next_again;
        t->next_again = NULL;
        t->queued = 0;
        progress(t);
        if (release_later(e, t) < 0)
            PyErr_Clear();  /* a leaked reference: the tunnel is only kept longer */
    }
    e->in_run = 0;
    /* Python code may run from here on (reference drops, allocations): the loop is done. */
    PyObject *arrivals = Py_NewRef(Py_None);
    if (e->arrivals_len) {
        Py_DECREF(arrivals);
        arrivals = take_arrivals(e);
    }
    PyObject *reports = take_reports(e);
    drain_release(e);
    if (reports == NULL || arrivals == NULL) {
        Py_XDECREF(reports);
        Py_XDECREF(arrivals);
        return NULL;
    }
    if (reports == Py_None && arrivals == Py_None && e->accepted == 0) {
        Py_DECREF(arrivals);
        return reports;
    }
    int accepted = e->accepted;
    e->accepted = 0;
    return Py_BuildValue("(NNi)", reports, arrivals, accepted);
}

static int
listen_arg(EngineObject *e, PyObject *arg, int *fd)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (v < 0 || v > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not an fd");
        return 0;
    }
    *fd = (int)v;
    return e->epfd >= 0;
}

static PyObject *
Engine_listen(EngineObject *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "tls", NULL};
    PyObject *arg;
    int tls = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:listen", kwlist, &arg, &tls))
        return NULL;
    int fd;
    if (!listen_arg(e, arg, &fd))
        return NULL;
    struct epoll_event ev;
    ev.events = EPOLLIN;  /* level-triggered: accept_ready() takes a bounded number a turn */
    ev.data.u64 = ((uint64_t)fd << 3) | (tls ? TLS_TAG : 0) | LISTEN_TAG;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 && errno != EEXIST)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
Engine_unlisten(EngineObject *e, PyObject *arg)
{
    int fd;
    if (!listen_arg(e, arg, &fd))
        return NULL;
    /* (the epoll data, TLS or not, does not matter to a delete) */
    struct epoll_event dummy = {0};
    if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, &dummy) < 0 && errno != ENOENT)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
Engine_admit(EngineObject *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "peer_ip", "tls", NULL};
    PyObject *arg;
    const char *ip;
    int tls = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Os|p:admit", kwlist, &arg, &ip, &tls))
        return NULL;
    int fd;
    if (!listen_arg(e, arg, &fd))
        return NULL;
    struct sockaddr_storage peer;
    memset(&peer, 0, sizeof(peer));
    struct sockaddr_in *in4 = (struct sockaddr_in *)&peer;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&peer;
    if (inet_pton(AF_INET, ip, &in4->sin_addr) == 1)
        peer.ss_family = AF_INET;
    else if (inet_pton(AF_INET6, ip, &in6->sin6_addr) == 1)
        peer.ss_family = AF_INET6;
    else {
        PyErr_SetString(PyExc_ValueError, "not an IP address");
        return NULL;
    }
    if (tls && e->tls == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no TlsServer for a TLS connection");
        return NULL;
    }
    e->now = monotonic();  /* (its wait is timed from now, not from the last run) */
    if (door_admit(e, fd, &peer, tls) < 0)
        return PyErr_NoMemory();  /* (what is left: an allocation or epoll_ctl failing) */
    Py_RETURN_NONE;
}

static PyObject *
Engine_take_accept_error(EngineObject *e, PyObject *Py_UNUSED(ignored))
{
    int err = e->accept_errno;
    e->accept_errno = 0;
    return PyLong_FromLong(err);
}

static PyObject *
Engine_expire(EngineObject *e, PyObject *Py_UNUSED(ignored))
{
    /* Finished tunnels whose peer has not taken their last bytes within the limit: cut. */
    double now = monotonic();
    Py_ssize_t cut = 0;
    TunnelObject *t = e->flushing;
    e->in_run = 1;  /* references are dropped after the walk: a dealloc may run Python code */
    while (t) {
        TunnelObject *next = t->next_flush;
        if (t->flush_deadline <= now) {
            flush_list_remove(t);
            close_side(t, CLIENT, 1);
            close_side(t, BACKEND, 1);
            cut++;
            if (release_later(e, t) < 0)
                PyErr_Clear();
        }
        t = next;
    }
    e->in_run = 0;
    drain_release(e);
    if (e->waiting_len) {
        int before = e->arrivals_len;
        expire_waiting(e, now);
        if (e->arrivals_len > before)
            wake(e);  /* run() hands them over */
    }
    return PyLong_FromSsize_t(cut);
}

static PyObject *
Engine_set_tls(EngineObject *e, PyObject *arg)
{
    if (arg != Py_None && !PyObject_TypeCheck(arg, &TlsServerType)) {
        PyErr_SetString(PyExc_TypeError, "expected a TlsServer or None");
        return NULL;
    }
    /* Handshakes under way keep their contexts (each session holds references). */
    Py_XSETREF(e->tls, arg == Py_None ? NULL : (TlsServerObject *)Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *
Engine_take_tls_counts(EngineObject *e, PyObject *Py_UNUSED(ignored))
{
    uint64_t *c = e->tls_counts;
    /* A name with no certificate fails the handshake too: counted once, as unknown_name. */
    uint64_t failed = c[TLS_FAILED] > c[TLS_UNKNOWN_NAME] ? c[TLS_FAILED] - c[TLS_UNKNOWN_NAME] : 0;
    PyObject *r = Py_BuildValue("(KKKKK)", (unsigned long long)c[TLS_FULL],
                                (unsigned long long)c[TLS_RESUMED], (unsigned long long)failed,
                                (unsigned long long)c[TLS_TIMEOUT],
                                (unsigned long long)c[TLS_UNKNOWN_NAME]);
    if (r != NULL)
        memset(e->tls_counts, 0, sizeof(e->tls_counts));
    return r;
}

static PyObject *
Engine_get_flushing(EngineObject *e, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(e->flushing_count);
}

static PyObject *
Engine_get_waiting(EngineObject *e, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(e->waiting_len);
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd to watch for reading."},
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Serve the sockets that are ready. None, or (reports, arrivals, accepted): reports None "
     "or a list of (tunnel, flags, refused code); arrivals None or a list of (fd, peer IP, "
     "first read, None or the split WebSocket head (method, target, fields, head length)); "
     "accepted: connections taken in minus those the front door closed itself."},
    {"listen", (PyCFunction)(void (*)(void))Engine_listen, METH_VARARGS | METH_KEYWORDS,
     "listen(fd, tls=False): accept on this listening fd from run() (the caller keeps it "
     "open); tls: its connections are TLS, served with the TlsServer of set_tls()."},
    {"set_tls", (PyCFunction)Engine_set_tls, METH_O,
     "The TlsServer for new TLS connections (None: they are closed)."},
    {"take_tls_counts", (PyCFunction)Engine_take_tls_counts, METH_NOARGS,
     "TLS handshakes since the last call: (full, resumed, failed, timeout, unknown_name)."},
    {"admit", (PyCFunction)(void (*)(void))Engine_admit, METH_VARARGS | METH_KEYWORDS,
     "admit(fd, peer_ip, tls=False): serve a connection accepted elsewhere (a PROXY protocol "
     "listener's, its header consumed) as the front door serves its own, with peer_ip as its "
     "peer; it is counted by the caller, not in run()'s accepted. The fd is the engine's once "
     "this returns; on an exception it is still the caller's."},
    {"unlisten", (PyCFunction)Engine_unlisten, METH_O, "Stop accepting on this fd."},
    {"take_accept_error", (PyCFunction)Engine_take_accept_error, METH_NOARGS,
     "errno of an accept that ran out of fds or memory (its listening fd left the set), or 0."},
    {"expire", (PyCFunction)Engine_expire, METH_NOARGS,
     "Cut finished tunnels that could not flush within flush_limit (how many were cut); "
     "new connections silent for 0.5 s go to the next run()'s arrivals."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"flushing", (getter)Engine_get_flushing, NULL, "finished tunnels still flushing", NULL},
    {"waiting", (getter)Engine_get_waiting, NULL,
     "accepted connections waiting for their first bytes (not yet handed to Python)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "charon.worker.websocket._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One epoll set running the tunnels of a worker.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* -- module -------------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"split_head", (PyCFunction)engine_split_head, METH_O,
     "The front door's split of a handshake head: (method, target, fields, length) or None."},
    {"atomic_load", (PyCFunction)(void (*)(void))engine_atomic_load, METH_FASTCALL,
     "atomic_load(buffer, index): the 64-bit word at index of a writable buffer."},
    {"atomic_cas", (PyCFunction)(void (*)(void))engine_atomic_cas, METH_FASTCALL,
     "atomic_cas(buffer, index, expected, new): True if the word was expected and is now new."},
    {"atomic_add", (PyCFunction)(void (*)(void))engine_atomic_add, METH_FASTCALL,
     "atomic_add(buffer, index, delta): add delta to the word (wrapping); its new value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "charon.worker.websocket._engine",
    .m_doc = "The WebSocket tunnels' byte copying and frame walking, on one epoll set.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__engine(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&TunnelType) < 0
        || PyType_Ready(&TlsServerType) < 0 || PyType_Ready(&TlsConnType) < 0)
        return NULL;
    if (tls_module_init() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL: no ex_data index");
        return NULL;
    }
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0
        || PyModule_AddObjectRef(m, "Tunnel", (PyObject *)&TunnelType) < 0
        || PyModule_AddObjectRef(m, "TlsServer", (PyObject *)&TlsServerType) < 0
        || PyModule_AddObjectRef(m, "TlsConn", (PyObject *)&TlsConnType) < 0
        || PyModule_AddIntConstant(m, "CLIENT", CLIENT) < 0
        || PyModule_AddIntConstant(m, "BACKEND", BACKEND) < 0
        || PyModule_AddIntConstant(m, "CLIENT_LOST", EV_CLIENT_LOST) < 0
        || PyModule_AddIntConstant(m, "BACKEND_LOST", EV_BACKEND_LOST) < 0
        || PyModule_AddIntConstant(m, "REFUSED", EV_REFUSED) < 0
        || PyModule_AddIntConstant(m, "SWITCHING", EV_SWITCHING) < 0
        || PyModule_AddIntConstant(m, "HANDED_BACK", EV_HANDED_BACK) < 0
        || PyModule_AddIntConstant(m, "READ_SIZE", READ_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
