/* A tunnel that dials its backend: connect, send the handshake request Python wrote, read the
 * answer's head and check it (protocol notes decision 2). A valid 101 starts the tunnel here
 * (EV_OPENED); anything else is handed back to Python with the sockets and the bytes read
 * (EV_HANDED_BACK), where the HTTP path relays the answer or answers 502/504 itself. The
 * checks are strict: a 101 that is unusual in any way goes back to Python too, whose checks
 * (handshake.switching_response) decide; what passes here is what passes there. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <unistd.h>

static const char SWITCHING[] =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";

static void
dial_state_free(DialState *d)
{
    PyMem_Free(d->request);
    PyMem_Free(d->response);
    PyMem_Free(d->client_tail);
    PyMem_Free(d);
}

void
dial_free(TunnelObject *t)
{
    if (t->dial != NULL) {
        dial_state_free(t->dial);
        t->dial = NULL;
    }
}

static void
set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Open the backend connection (t->dial is filled in). -1 with errno set if it failed at once. */
int
dial_start(TunnelObject *t, const struct sockaddr *addr, socklen_t addr_len)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_nodelay(fd);
    int r;
    do {
        r = connect(fd, addr, addr_len);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EINPROGRESS) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    t->fd[BACKEND] = fd;
    if (register_side(t, BACKEND) < 0) {  /* the client joins with the 101 */
        int saved = errno;
        close(fd);
        t->fd[BACKEND] = -1;
        errno = saved;
        return -1;
    }
    set_nodelay(t->fd[CLIENT]);
    return 0;
}

/* No tunnel after all: Python takes the sockets back (Tunnel.hand_back); until it does, the
 * backend's events are ignored (dial_event stops at the error). */
static void
hand_back(TunnelObject *t, int error)
{
    t->dial->error = error;
    notify(t, EV_HANDED_BACK);
}

/* Backend fields the proxy does not relay with a 101 (handshake.py's _NOT_RELAYED): it writes
 * Upgrade and Connection itself, and a 101 frames no message. */
static int
not_relayed(const uint8_t *name, uint32_t nl)
{
    static const char *const names[] = {"upgrade", "connection", "keep-alive",
                                        "transfer-encoding", "content-length",
                                        "proxy-connection"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (lower_equals(name, nl, names[i]))
            return 1;
    return 0;
}

/* The 101 for the client if the head p[0:end] is a valid answer to the handshake, else -1.
 * Relayed: every field but those the proxy writes itself or that frame a message. */
static int
switching_head(TunnelObject *t, const uint8_t *p, uint32_t end, uint8_t **out, size_t *out_len)
{
    DialState *d = t->dial;
    SplitHead h;
    uint32_t at = 12;
    if (end < 16 || memcmp(p, "HTTP/1.1 101", 12) != 0 || (p[12] != ' ' && p[12] != '\r'))
        return -1;
    while (at < end && p[at] != '\r' && p[at] != '\n')
        at++;
    if (at + 1 >= end || p[at] != '\r' || p[at + 1] != '\n')
        return -1;
    if (!split_fields(p, at + 2, end, &h))
        return -1;
    int upgrade_ok = 0, connection_ok = 0, accepts = 0, accept_ok = 0, protocol = -1;
    size_t size = sizeof(SWITCHING) - 1 + 2;
    for (uint32_t i = 0; i < h.count; i++) {
        const uint8_t *name = p + h.name_off[i], *value = p + h.value_off[i];
        uint32_t nl = h.name_len[i], vl = h.value_len[i];
        if (not_relayed(name, nl)) {
            if (lower_equals(name, nl, "upgrade"))
                upgrade_ok = has_token(value, vl, "websocket");  /* the last one counts */
            else if (lower_equals(name, nl, "connection"))
                connection_ok |= has_token(value, vl, "upgrade");
            continue;
        }
        if (lower_equals(name, nl, "sec-websocket-accept")) {
            uint32_t n = vl;
            while (n > 0 && (value[n - 1] == ' ' || value[n - 1] == '\t'))
                n--;
            accepts++;
            accept_ok = n == sizeof(d->accept) && memcmp(value, d->accept, n) == 0;
        }
        else if (lower_equals(name, nl, "sec-websocket-protocol") && protocol < 0 && vl > 0)
            protocol = (int)i;
        size += nl + 2 + vl + 2;
    }
    if (!upgrade_ok || !connection_ok || accepts != 1 || !accept_ok)
        return -1;
    uint8_t *head = PyMem_Malloc(size);
    if (head == NULL)
        return -1;
    uint8_t *w = head;
    memcpy(w, SWITCHING, sizeof(SWITCHING) - 1);
    w += sizeof(SWITCHING) - 1;
    for (uint32_t i = 0; i < h.count; i++) {
        const uint8_t *name = p + h.name_off[i];
        uint32_t nl = h.name_len[i], vl = h.value_len[i];
        if (not_relayed(name, nl))
            continue;
        memcpy(w, name, nl);
        w += nl;
        *w++ = ':';
        *w++ = ' ';
        memcpy(w, p + h.value_off[i], vl);
        w += vl;
        *w++ = '\r';
        *w++ = '\n';
    }
    *w++ = '\r';
    *w++ = '\n';
    if (protocol >= 0 && h.value_len[protocol] <= UINT16_MAX) {
        t->subprotocol = PyMem_Malloc(h.value_len[protocol]);
        if (t->subprotocol != NULL) {
            memcpy(t->subprotocol, p + h.value_off[protocol], h.value_len[protocol]);
            t->subprotocol_len = (uint16_t)h.value_len[protocol];
        }
    }
    *out = head;
    *out_len = (size_t)(w - head);
    return 0;
}

/* A valid 101 came: the tunnel runs from here, as Tunnel.start() would start it.
 * backend_more: bytes (or the FIN) may still wait in the backend socket without a new edge. */
static void
open_dialled(TunnelObject *t, uint8_t *head, size_t head_len, uint32_t end, int backend_more)
{
    if (register_side(t, CLIENT) < 0) {
        PyMem_Free(head);
        hand_back(t, errno ? errno : EIO);
        return;
    }
    DialState *d = t->dial;
    t->dial = NULL;  /* events go to the walk from here on */
    /* The client's socket just joined the set: epoll reports it at once if it holds bytes,
     * so no read is tried on a guess (nginx's way: a read that would find nothing is a
     * system call saved). Both sockets can take the first bytes. */
    t->rd_ready[CLIENT] = 0;
    t->rd_ready[BACKEND] = (uint8_t)backend_more;
    t->wr_ready[CLIENT] = t->wr_ready[BACKEND] = 1;
    t->started = 1;
    t->last_traffic = t->engine->now;
    notify(t, EV_OPENED);
    begin_streams(t, head, head_len, d->response + end, d->response_len - end, d->client_tail,
                  d->client_tail_len);
    PyMem_Free(head);
    dial_state_free(d);
    progress(t);
}

static void
answer_ready(TunnelObject *t, int eof, int more)
{
    DialState *d = t->dial;
    uint32_t end = head_end(d->response, d->response_len);
    if (end == 0) {
        if (eof || d->response_len == MAX_RESPONSE_HEAD)
            hand_back(t, d->response_len ? -1 : ECONNRESET);
        return;  /* more of the head to come */
    }
    uint8_t *head;
    size_t head_len;
    if (switching_head(t, d->response, end, &head, &head_len) < 0) {
        hand_back(t, -1);
        return;
    }
    open_dialled(t, head, head_len, end, eof || more);
}

void
dial_event(TunnelObject *t, int side, uint32_t ev)
{
    DialState *d = t->dial;
    int fd = t->fd[BACKEND];
    if (side != BACKEND || fd < 0 || d->error)
        return;
    if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && d->request_sent < d->request_len) {
        while (d->request_sent < d->request_len) {
            ssize_t r = send(fd, d->request + d->request_sent, d->request_len - d->request_sent,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r > 0) {
                d->request_sent += (uint32_t)r;
                if (!d->connected) {
                    d->connected = 1;
                    d->connected_at = t->engine->now;
                }
                continue;
            }
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            hand_back(t, r < 0 ? errno : EIO);  /* refused, reset, unreachable */
            return;
        }
        if (d->request_sent == d->request_len) {
            PyMem_Free(d->request);
            d->request = NULL;
        }
    }
    if (!(ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        return;
    if (d->response == NULL && (d->response = PyMem_Malloc(MAX_RESPONSE_HEAD)) == NULL) {
        hand_back(t, ENOMEM);
        return;
    }
    /* With a hang-up the FIN waits behind the bytes: read on to it (no edge would come). */
    int hangup = (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
    for (;;) {
        uint32_t room = MAX_RESPONSE_HEAD - d->response_len;
        if (room == 0) {
            answer_ready(t, 0, 1);
            return;
        }
        ssize_t r = recv(fd, d->response + d->response_len, room, MSG_DONTWAIT);
        if (r > 0) {
            d->response_len += (uint32_t)r;
            if ((uint32_t)r < room && !hangup) {
                answer_ready(t, 0, 0);  /* a short read emptied the socket */
                return;
            }
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (d->response_len)
                answer_ready(t, 0, 0);
            return;
        }
        if (r < 0 && d->response_len == 0) {
            hand_back(t, errno);  /* refused or reset before any answer */
            return;
        }
        answer_ready(t, 1, 1);  /* the backend closed (or failed) after some bytes */
        return;
    }
}

/* -- the Tunnel methods (Python's side) ---------------------------------------------------- */

static uint8_t *
copy_buffer(const Py_buffer *b, uint32_t *len)
{
    *len = (uint32_t)b->len;
    if (b->len == 0)
        return NULL;
    uint8_t *p = PyMem_Malloc((size_t)b->len);
    if (p != NULL)
        memcpy(p, b->buf, (size_t)b->len);
    return p;
}

PyObject *
Tunnel_dial(TunnelObject *t, PyObject *args)
{
    const char *host;
    int port;
    Py_buffer request, accept, client_tail;
    if (!tunnel_ready(t) || !PyArg_ParseTuple(args, "siy*y*y*:dial", &host, &port, &request, &accept,
                                       &client_tail))
        return NULL;
    struct sockaddr_storage addr;
    socklen_t addr_len = 0;
    memset(&addr, 0, sizeof(addr));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        addr_len = sizeof(*v4);
    }
    else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        addr_len = sizeof(*v6);
    }
    DialState *d = NULL;
    if (addr_len == 0)
        PyErr_SetString(PyExc_ValueError, "dial() takes an IP address");
    else if (t->started || t->dial != NULL || t->fd[CLIENT] < 0 || t->fd[BACKEND] >= 0)
        PyErr_SetString(PyExc_RuntimeError, "only a new tunnel with a client and no backend dials");
    else if (accept.len != sizeof(d->accept) || request.len == 0)
        PyErr_SetString(PyExc_ValueError, "dial() needs a request and a 28-byte accept value");
    else if ((d = PyMem_Calloc(1, sizeof(DialState))) == NULL)
        PyErr_NoMemory();
    else {
        memcpy(d->accept, accept.buf, sizeof(d->accept));
        d->request = copy_buffer(&request, &d->request_len);
        d->client_tail = copy_buffer(&client_tail, &d->client_tail_len);
        t->dial = d;
        if (d->request == NULL || (client_tail.len && d->client_tail == NULL))
            PyErr_NoMemory();
        else if (dial_start(t, (struct sockaddr *)&addr, addr_len) < 0)
            d->error = errno;  /* Python hands it back at once (see dial_error) */
    }
    if (PyErr_Occurred())
        dial_free(t);
    PyBuffer_Release(&request);
    PyBuffer_Release(&accept);
    PyBuffer_Release(&client_tail);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
Tunnel_hand_back(TunnelObject *t, PyObject *Py_UNUSED(ignored))
{
    if (!tunnel_ready(t))
        return NULL;
    if (t->dial == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "only a dialling tunnel hands its sockets back");
        return NULL;
    }
    DialState *d = t->dial;
    if (t->registered[BACKEND]) {
        struct epoll_event dummy = {0};
        epoll_ctl(t->engine->epfd, EPOLL_CTL_DEL, t->fd[BACKEND], &dummy);
        t->registered[BACKEND] = 0;
    }
    PyObject *result = Py_BuildValue("(iiy#)", t->fd[CLIENT], t->fd[BACKEND],
                                     d->response ? (const char *)d->response : "",
                                     (Py_ssize_t)d->response_len);
    if (result == NULL)
        return NULL;
    t->fd[CLIENT] = t->fd[BACKEND] = -1;  /* Python's now */
    t->handed_back = 1;
    dial_free(t);
    return result;
}
