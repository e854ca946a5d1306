/* The front door: accepting on the worker's listening sockets and the first read of each new
 * connection (the split of a WebSocket handshake head is head.c's).
 *
 * Every accepted connection goes to Python (run()'s arrivals) with what its first read got.
 * Python serves it as HTTP (uvloop takes the fd, the bytes are fed to the parser first), or,
 * when the read holds a whole handshake head that split_head() took apart cleanly, may open a
 * tunnel that dials the backend from here. split_head() is strict on purpose: anything it does
 * not accept (obs-fold, a bare CR or LF, a NUL, odd spacing, another method or version) goes
 * the HTTP way, where llhttp and plan_request give the answer the protocol notes ask for. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#define ACCEPTS_PER_EVENT 16

/* Read what a new connection sent; 0 if it became an arrival, 1 if it sent nothing yet. */
static int
read_first(EngineObject *e, int fd, const struct sockaddr_storage *peer)
{
    ssize_t got;
    do {
        got = recv(fd, e->buf, FIRST_READ, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 1;
    if (got < 0) {
        close(fd);  /* reset before a byte came: nobody to answer */
        e->accepted--;
        return 0;
    }
    Arrival *a = &e->arrivals[e->arrivals_len];
    a->fd = fd;
    a->peer = *peer;
    a->len = (uint32_t)got;  /* 0: the client closed without a word; uvloop sees the EOF */
    a->data = NULL;
    if (a->len) {
        a->data = PyMem_Malloc(a->len);
        if (a->data == NULL) {
            close(fd);
            e->accepted--;
            return 0;
        }
        memcpy(a->data, e->buf, a->len);
    }
    e->arrivals_len++;
    return 0;
}

static void
waiting_remove(EngineObject *e, int index)
{
    Waiting *w = &e->waiting[index];
    e->waiting_at[w->fd] = 0;
    struct epoll_event dummy = {0};
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, w->fd, &dummy);
    e->waiting_len--;
    if (index != e->waiting_len) {
        *w = e->waiting[e->waiting_len];
        e->waiting_at[w->fd] = index + 1;
    }
}

/* A connection that sent nothing yet waits in the epoll set (a client's request usually
 * follows its connect within microseconds), for WAIT_LIMIT at most; -1 if it cannot. */
static int
wait_first_read(EngineObject *e, int fd, const struct sockaddr_storage *peer)
{
    if (fd >= e->waiting_at_cap) {
        int cap = e->waiting_at_cap ? e->waiting_at_cap : 1024;
        while (cap <= fd)
            cap *= 2;
        int *at = PyMem_Realloc(e->waiting_at, (size_t)cap * sizeof(int));
        if (at == NULL)
            return -1;
        memset(at + e->waiting_at_cap, 0, (size_t)(cap - e->waiting_at_cap) * sizeof(int));
        e->waiting_at = at;
        e->waiting_at_cap = cap;
    }
    if (e->waiting_len == e->waiting_cap) {
        int cap = e->waiting_cap ? 2 * e->waiting_cap : 64;
        Waiting *w = PyMem_Realloc(e->waiting, (size_t)cap * sizeof(Waiting));
        if (w == NULL)
            return -1;
        e->waiting = w;
        e->waiting_cap = cap;
    }
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = ((uint64_t)fd << 2) | WAITING_TAG;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -1;
    Waiting *w = &e->waiting[e->waiting_len++];
    w->fd = fd;
    w->since = e->now;
    w->peer = *peer;
    e->waiting_at[fd] = e->waiting_len;
    return 0;
}

/* A connection goes to Python with nothing read: its first read comes to uvloop. */
static void
arrive_unread(EngineObject *e, int fd, const struct sockaddr_storage *peer)
{
    Arrival *a = &e->arrivals[e->arrivals_len++];
    a->fd = fd;
    a->peer = *peer;
    a->data = NULL;
    a->len = 0;
}

/* Take new connections from a listening socket that epoll says is readable. */
void
accept_ready(EngineObject *e, int listen_fd)
{
    for (int i = 0; i < ACCEPTS_PER_EVENT && e->arrivals_len < MAX_ARRIVALS; i++) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer);
        int fd = accept4(listen_fd, (struct sockaddr *)&peer, &peer_len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Level-triggered: it would be reported again at once. Python puts it back
                 * after a pause (see Listeners). */
                struct epoll_event dummy = {0};
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, listen_fd, &dummy);
                e->accept_errno = errno;
            }
            return;  /* EAGAIN: the queue is empty (another worker may have taken it) */
        }
        e->accepted++;
        /* Most clients send their request with the connect: one read now spares uvloop a
         * wake-up, and tells a WebSocket handshake from anything else. */
        if (read_first(e, fd, &peer) && wait_first_read(e, fd, &peer) < 0)
            arrive_unread(e, fd, &peer);
    }
}

/* A waiting connection is readable. */
void
first_read_ready(EngineObject *e, int fd)
{
    if (fd >= e->waiting_at_cap || e->waiting_at[fd] == 0 || e->arrivals_len == MAX_ARRIVALS)
        return;  /* (full: level-triggered, it comes again in the next run) */
    int index = e->waiting_at[fd] - 1;
    struct sockaddr_storage peer = e->waiting[index].peer;
    waiting_remove(e, index);
    if (read_first(e, fd, &peer))
        arrive_unread(e, fd, &peer);  /* a wake-up with nothing to read: Python takes it */
}

/* Connections silent for WAIT_LIMIT go to Python (its header timeout takes over). */
void
expire_waiting(EngineObject *e, double now)
{
    for (int i = e->waiting_len - 1; i >= 0 && e->arrivals_len < MAX_ARRIVALS; i--)
        if (e->waiting[i].since + WAIT_LIMIT <= now) {
            int fd = e->waiting[i].fd;
            struct sockaddr_storage peer = e->waiting[i].peer;
            waiting_remove(e, i);
            arrive_unread(e, fd, &peer);
        }
}

/* (at the engine's end: no count is kept any more) */
void
free_waiting(EngineObject *e)
{
    for (int i = 0; i < e->waiting_len; i++)
        close(e->waiting[i].fd);
    e->waiting_len = 0;
    PyMem_Free(e->waiting);
    PyMem_Free(e->waiting_at);
    e->waiting = NULL;
    e->waiting_at = NULL;
}

static PyObject *
peer_ip(const struct sockaddr_storage *ss)
{
    char text[INET6_ADDRSTRLEN] = "";
    if (ss->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, text, sizeof(text));
    else if (ss->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, text, sizeof(text));
    return PyUnicode_FromString(text);
}

/* The arrivals as a list of (fd, peer IP, first read, split head or None); the fds are
 * Python's from here on. On an error, NULL, and those not listed are closed. */
PyObject *
take_arrivals(EngineObject *e)
{
    PyObject *list = PyList_New(0);
    int count = e->arrivals_len;
    e->arrivals_len = 0;
    for (int i = 0; i < count; i++) {
        Arrival *a = &e->arrivals[i];
        PyObject *item = NULL;
        if (list != NULL) {
            SplitHead h;  /* split here, once: Python objects may be made from here on */
            PyObject *head = a->len && split_head(a->data, a->len, &h)
                ? head_tuple(a->data, &h) : Py_NewRef(Py_None);
            if (head != NULL)
                item = Py_BuildValue("(iNy#N)", a->fd, peer_ip(&a->peer),
                                     a->data ? (const char *)a->data : "", (Py_ssize_t)a->len,
                                     head);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        if (list == NULL) {
            close(a->fd);
            e->accepted--;
        }
        PyMem_Free(a->data);
        a->data = NULL;
    }
    return list;
}

/* Close whatever arrived and was not handed over (the engine's end). */
void
free_arrivals(EngineObject *e)
{
    for (int i = 0; i < e->arrivals_len; i++) {
        close(e->arrivals[i].fd);
        PyMem_Free(e->arrivals[i].data);
        e->arrivals[i].data = NULL;
    }
    e->arrivals_len = 0;
}
