/* The front door: accepting on the worker's listening sockets, the first read of each new
 * connection, and the split of a WebSocket handshake head.
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

static int
is_tchar(uint8_t c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int
is_value_char(uint8_t c)
{
    return c == '\t' || (c >= 0x20 && c != 0x7f);  /* obs-text (0x80-0xff) included */
}

int
lower_equals(const uint8_t *p, uint32_t n, const char *word)
{
    size_t len = strlen(word);
    if (n != len)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != (uint8_t)word[i])
            return 0;
    }
    return 1;
}

/* The header fields of a head, from `p + at` up to and including its empty line, split into
 * h (name and value offsets; a value without the spaces before it, with those after it, as
 * llhttp gives it to the HTTP path). 0 if any line is not a
 * plain `name: value` CRLF line, or there are too many. */
int
split_fields(const uint8_t *p, uint32_t at, uint32_t end, SplitHead *h)
{
    h->count = 0;
    for (;;) {
        if (at + 2 > end)
            return 0;
        if (p[at] == '\r')
            return p[at + 1] == '\n' && at + 2 == end;  /* the empty line ends the head */
        if (h->count == MAX_FAST_FIELDS)
            return 0;
        uint32_t name = at;
        while (at < end && is_tchar(p[at]))
            at++;
        if (at == name || at >= end || p[at] != ':')
            return 0;
        uint32_t name_len = at - name;
        at++;
        while (at < end && (p[at] == ' ' || p[at] == '\t'))
            at++;
        uint32_t value = at;
        while (at < end && is_value_char(p[at]))
            at++;
        if (at + 1 >= end || p[at] != '\r' || p[at + 1] != '\n')
            return 0;
        h->name_off[h->count] = name;
        h->name_len[h->count] = name_len;
        h->value_off[h->count] = value;
        h->value_len[h->count] = at - value;
        h->count++;
        at += 2;
    }
}

/* Whether a comma-separated header value names `token` (case-insensitively). */
int
has_token(const uint8_t *p, uint32_t n, const char *token)
{
    uint32_t i = 0;
    while (i <= n) {
        uint32_t start = i;
        while (i < n && p[i] != ',')
            i++;
        uint32_t a = start, b = i;
        while (a < b && (p[a] == ' ' || p[a] == '\t'))
            a++;
        while (b > a && (p[b - 1] == ' ' || p[b - 1] == '\t'))
            b--;
        if (lower_equals(p + a, b - a, token))
            return 1;
        i++;
    }
    return 0;
}

/* The length of the HTTP head at p[0:n] up to its empty line, or 0 if it is not all there. */
uint32_t
head_end(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i + 3 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n')
            return i + 4;
    return 0;
}

/* 1 when p[0:n] begins with a whole `GET target HTTP/1.1` head with an Upgrade field naming
 * websocket, every line of it plain (see split_fields); h then holds its parts. */
int
split_head(const uint8_t *p, uint32_t n, SplitHead *h)
{
    if (n < 16 || memcmp(p, "GET ", 4) != 0)
        return 0;
    uint32_t end = head_end(p, n);
    if (end == 0)
        return 0;
    h->method_len = 3;
    h->target_off = 4;
    uint32_t at = 4;
    while (at < end && p[at] > 0x20 && p[at] < 0x7f)
        at++;
    h->target_len = at - 4;
    if (h->target_len == 0 || end - at < 12 || memcmp(p + at, " HTTP/1.1\r\n", 11) != 0)
        return 0;
    if (!split_fields(p, at + 11, end, h))
        return 0;
    h->head_len = end;
    for (uint32_t i = 0; i < h->count; i++)
        if (lower_equals(p + h->name_off[i], h->name_len[i], "upgrade")
            && has_token(p + h->value_off[i], h->value_len[i], "websocket"))
            return 1;
    return 0;
}

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

/* (method, target, [(name, value), ...], head length) of a split head. */
static PyObject *
head_tuple(const uint8_t *p, const SplitHead *h)
{
    PyObject *fields = PyList_New(h->count);
    if (fields == NULL)
        return NULL;
    for (uint32_t i = 0; i < h->count; i++) {
        PyObject *field = Py_BuildValue(
            "(y#y#)", p + h->name_off[i], (Py_ssize_t)h->name_len[i], p + h->value_off[i],
            (Py_ssize_t)h->value_len[i]);
        if (field == NULL) {
            Py_DECREF(fields);
            return NULL;
        }
        PyList_SET_ITEM(fields, i, field);
    }
    return Py_BuildValue("(y#y#NI)", p, (Py_ssize_t)h->method_len, p + h->target_off,
                         (Py_ssize_t)h->target_len, fields, h->head_len);
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
