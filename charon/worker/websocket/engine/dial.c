/* A tunnel that dials its backend: connect, send the handshake request Python wrote, read the
 * answer's head. C copies bytes, Python keeps the policy: a head that is a 101 goes to Python
 * (EV_SWITCHING), which checks it with llhttp and the HTTP path's switching_response() and
 * starts the tunnel here (Tunnel.switch) or takes the sockets back; anything else is handed
 * back at once (EV_HANDED_BACK), where the HTTP path relays the answer or answers 502/504. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <unistd.h>

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

/* Python accepted the 101: the tunnel runs from here, as Tunnel.start() would start it, with
 * `head` (Python's 101 for the client) first. -1 (errno set) if the client cannot join. */
static int
open_dialled(TunnelObject *t, const uint8_t *head, size_t head_len)
{
    if (register_side(t, CLIENT) < 0)
        return -1;
    DialState *d = t->dial;
    t->dial = NULL;  /* events go to the walk from here on */
    /* The client's socket just joined the set: epoll reports it at once if it holds bytes,
     * so no read is tried on a guess (nginx's way: a read that would find nothing is a
     * system call saved). Both sockets can take the first bytes; the backend's may hold more
     * (or the FIN) with no new edge to come. */
    t->rd_ready[CLIENT] = 0;
    t->rd_ready[BACKEND] = d->more;
    t->wr_ready[CLIENT] = t->wr_ready[BACKEND] = 1;
    t->started = 1;
    t->last_traffic = t->engine->now;
    begin_streams(t, head, head_len, d->response + d->head_len, d->response_len - d->head_len,
                  d->client_tail, d->client_tail_len);
    dial_state_free(d);
    progress(t);
    return 0;
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
    const uint8_t *p = d->response;
    if (end < 16 || memcmp(p, "HTTP/1.1 101", 12) != 0 || (p[12] != ' ' && p[12] != '\r')) {
        hand_back(t, -1);  /* no 101: the HTTP path relays it */
        return;
    }
    d->head_len = end;
    d->more = (uint8_t)(eof || more);
    d->asking = 1;  /* the backend's events wait for Python's answer */
    notify(t, EV_SWITCHING);
}

void
dial_event(TunnelObject *t, int side, uint32_t ev)
{
    DialState *d = t->dial;
    int fd = t->fd[BACKEND];
    if (side != BACKEND || fd < 0 || d->error)
        return;
    if (d->asking) {  /* (edge-triggered: an edge now is remembered for the tunnel's start) */
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            d->more = 1;
        return;
    }
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
    Py_buffer request, client_tail;
    if (!tunnel_ready(t)
        || !PyArg_ParseTuple(args, "siy*y*:dial", &host, &port, &request, &client_tail))
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
    else if (request.len == 0)
        PyErr_SetString(PyExc_ValueError, "dial() needs a request");
    else if ((d = PyMem_Calloc(1, sizeof(DialState))) == NULL)
        PyErr_NoMemory();
    else {
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
    PyBuffer_Release(&client_tail);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* The backend's 101 head, while Python decides on it (after EV_SWITCHING). */
PyObject *
Tunnel_answer_head(TunnelObject *t, PyObject *Py_UNUSED(ignored))
{
    if (!tunnel_ready(t))
        return NULL;
    if (t->dial == NULL || !t->dial->asking) {
        PyErr_SetString(PyExc_RuntimeError, "no 101 waits for a decision");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)t->dial->response, t->dial->head_len);
}

/* Python accepted the 101: start the tunnel with `head` for the client. False if the client's
 * socket cannot join the epoll set (Python then hands the connection back). */
PyObject *
Tunnel_switch(TunnelObject *t, PyObject *arg)
{
    if (!tunnel_ready(t))
        return NULL;
    if (t->dial == NULL || !t->dial->asking) {
        PyErr_SetString(PyExc_RuntimeError, "no 101 waits for a decision");
        return NULL;
    }
    Py_buffer head;
    if (PyObject_GetBuffer(arg, &head, PyBUF_SIMPLE) < 0)
        return NULL;
    int opened = open_dialled(t, head.buf, (size_t)head.len) == 0;
    PyBuffer_Release(&head);
    return PyBool_FromLong(opened);
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
