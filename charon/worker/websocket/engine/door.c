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
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
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
    a->ssl = NULL;
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
wait_first_read(EngineObject *e, int fd, const struct sockaddr_storage *peer, SSL *ssl)
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
    w->ssl = ssl;
    w->handshaking = ssl != NULL;
    w->interest = ev.events;
    e->waiting_at[fd] = e->waiting_len;
    return 0;
}

/* A connection goes to Python with nothing read: its first read comes to uvloop (or, TLS,
 * to the pump Python puts between the session and uvloop). */
static void
arrive_unread(EngineObject *e, int fd, const struct sockaddr_storage *peer, SSL *ssl)
{
    Arrival *a = &e->arrivals[e->arrivals_len++];
    a->fd = fd;
    a->peer = *peer;
    a->data = NULL;
    a->len = 0;
    a->ssl = ssl;
}

/* -- TLS: the handshake, then the first read of plaintext -------------------------------------- */

static void
set_interest(EngineObject *e, Waiting *w, uint32_t events)
{
    events |= EPOLLRDHUP;
    if (w->interest == events)
        return;
    struct epoll_event ev;
    ev.events = events;
    ev.data.u64 = ((uint64_t)w->fd << 2) | WAITING_TAG;
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, w->fd, &ev) == 0)
        w->interest = events;
}

/* A TLS connection that ends before its first request: nobody to answer. */
static void
drop_waiting(EngineObject *e, int index, int counted)
{
    Waiting w = e->waiting[index];
    waiting_remove(e, index);
    tls_close(w.ssl, 1);
    close(w.fd);
    e->accepted--;
    if (counted >= 0)
        e->tls_counts[counted]++;
}

/* Go on with a TLS connection's handshake, then read its first plaintext; a whole first read
 * makes it an arrival like a plain connection's. */
static void
tls_step(EngineObject *e, int index)
{
    Waiting *w = &e->waiting[index];
    if (w->handshaking) {
        int r = SSL_do_handshake(w->ssl);
        if (r != 1) {
            int err = SSL_get_error(w->ssl, r);
            ERR_clear_error();
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                set_interest(e, w, err == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN);
            else
                drop_waiting(e, index, TLS_FAILED);
            return;
        }
        w->handshaking = 0;
        tls_release_server(w->ssl);  /* (a TlsServer's dealloc runs no Python code) */
        w->since = e->now;  /* from here, WAIT_LIMIT for the first request, as plain */
        e->tls_counts[SSL_session_reused(w->ssl) ? TLS_RESUMED : TLS_FULL]++;
    }
    int drained;
    ssize_t got = tls_recv(w->ssl, e->buf, FIRST_READ, &drained);
    if (got == -2) {
        set_interest(e, w, drained == 2 ? EPOLLOUT : EPOLLIN);
        return;
    }
    if (got <= 0) {
        drop_waiting(e, index, -1);
        return;
    }
    Waiting done = *w;
    waiting_remove(e, index);
    Arrival *a = &e->arrivals[e->arrivals_len];
    a->data = PyMem_Malloc((size_t)got);
    if (a->data == NULL) {
        tls_close(done.ssl, 1);
        close(done.fd);
        e->accepted--;
        return;
    }
    memcpy(a->data, e->buf, (size_t)got);
    a->len = (uint32_t)got;
    a->fd = done.fd;
    a->peer = done.peer;
    a->ssl = done.ssl;
    e->arrivals_len++;
}

/* Take new connections from a listening socket that epoll says is readable. */
void
accept_ready(EngineObject *e, int listen_fd, int tls)
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
        if (tls) {
            /* As uvloop does for plain connections: a response cut in two records must not
             * wait for the client's delayed ACK. */
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            SSL *ssl = tls_new_session(e, fd);
            if (ssl == NULL || wait_first_read(e, fd, &peer, ssl) < 0) {
                tls_close(ssl, 1);
                close(fd);
                e->accepted--;
                continue;
            }
            tls_step(e, e->waiting_len - 1);  /* the ClientHello is usually there already */
            continue;
        }
        /* Most clients send their request with the connect: one read now spares uvloop a
         * wake-up, and tells a WebSocket handshake from anything else. */
        if (read_first(e, fd, &peer) && wait_first_read(e, fd, &peer, NULL) < 0)
            arrive_unread(e, fd, &peer, NULL);
    }
}

/* A connection Python accepted itself and gives to the front door as if it had just been
 * accepted here, with `peer` as its peer: one from a PROXY protocol listener, whose header
 * Python read (and consumed exactly: the next byte is the client's first). It waits in the
 * epoll set like a silent new connection (level-triggered: bytes already there are reported at
 * once), so nothing is read here and no arrival is made outside run(). Python counted it when
 * it accepted it: e->accepted is not raised, and goes down as usual if the engine closes it.
 * 0, or -1 with the fd still the caller's. */
int
door_admit(EngineObject *e, int fd, const struct sockaddr_storage *peer, int tls)
{
    SSL *ssl = NULL;
    if (tls) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        ssl = tls_new_session(e, fd);
        if (ssl == NULL)
            return -1;
    }
    if (wait_first_read(e, fd, peer, ssl) < 0) {
        tls_close(ssl, 1);  /* (no byte was sent on it: nothing goes out) */
        return -1;
    }
    return 0;
}

/* A waiting connection is readable. */
void
first_read_ready(EngineObject *e, int fd)
{
    if (fd >= e->waiting_at_cap || e->waiting_at[fd] == 0 || e->arrivals_len == MAX_ARRIVALS)
        return;  /* (full: level-triggered, it comes again in the next run) */
    int index = e->waiting_at[fd] - 1;
    if (e->waiting[index].ssl != NULL) {
        tls_step(e, index);
        return;
    }
    struct sockaddr_storage peer = e->waiting[index].peer;
    waiting_remove(e, index);
    if (read_first(e, fd, &peer))
        arrive_unread(e, fd, &peer, NULL);  /* a wake-up with nothing to read: Python takes it */
}

/* Connections silent for WAIT_LIMIT go to Python (its header timeout takes over); a TLS
 * handshake not over within [tls] handshake_timeout is cut. */
void
expire_waiting(EngineObject *e, double now)
{
    double handshake_limit = tls_handshake_timeout(e->tls);
    for (int i = e->waiting_len - 1; i >= 0 && e->arrivals_len < MAX_ARRIVALS; i--) {
        Waiting *w = &e->waiting[i];
        if (w->handshaking) {
            if (w->since + handshake_limit <= now)
                drop_waiting(e, i, TLS_TIMEOUT);
        }
        else if (w->since + WAIT_LIMIT <= now) {
            int fd = w->fd;
            struct sockaddr_storage peer = w->peer;
            SSL *ssl = w->ssl;
            waiting_remove(e, i);
            arrive_unread(e, fd, &peer, ssl);
        }
    }
}

/* (at the engine's end: no count is kept any more) */
void
free_waiting(EngineObject *e)
{
    for (int i = 0; i < e->waiting_len; i++) {
        tls_close(e->waiting[i].ssl, 1);
        close(e->waiting[i].fd);
    }
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

/* The arrivals as a list of (fd, peer IP, first read, split head or None, TlsConn or None);
 * the fds (and sessions) are Python's from here on. On an error, NULL, and those not listed
 * are closed. */
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
            PyObject *tls = a->ssl != NULL ? tls_conn_new(a->ssl) : Py_NewRef(Py_None);
            if (tls != NULL && tls != Py_None)
                a->ssl = NULL;  /* the TlsConn's */
            if (head != NULL && tls != NULL)
                item = Py_BuildValue("(iNy#OO)", a->fd, peer_ip(&a->peer),
                                     a->data ? (const char *)a->data : "", (Py_ssize_t)a->len,
                                     head, tls);
            Py_XDECREF(head);
            Py_XDECREF(tls);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        if (list == NULL) {
            tls_close(a->ssl, 1);
            a->ssl = NULL;
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
        tls_close(e->arrivals[i].ssl, 1);
        e->arrivals[i].ssl = NULL;
        close(e->arrivals[i].fd);
        PyMem_Free(e->arrivals[i].data);
        e->arrivals[i].data = NULL;
    }
    e->arrivals_len = 0;
}
