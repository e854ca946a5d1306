/* The sockets of the tunnels: buffers for slow readers, sends, epoll interest, closing, and
 * the engine's lists of tunnels it holds references to. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void
wake(EngineObject *e)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(e->wakefd, &one, sizeof(one));
    } while (r < 0 && errno == EINTR);
    /* EAGAIN: the counter is already non-zero, the engine is already readable. */
}

void
notify(TunnelObject *t, uint8_t what)
{
    EngineObject *e = t->engine;
    t->events |= what;
    if (t->notified)
        return;
    t->notified = 1;
    Py_INCREF(t);
    t->next_notify = e->notify;
    e->notify = t;
    if (!e->in_run)
        wake(e);
}

/* Drop a reference the engine held, now if that cannot run Python code under run()'s loop,
 * else once the loop is over. Returns -1 only on memory exhaustion (then it leaks the ref). */
int
release_later(EngineObject *e, TunnelObject *t)
{
    if (!e->in_run) {
        Py_DECREF(t);
        return 0;
    }
    if (e->release_len == e->release_cap) {
        Py_ssize_t cap = e->release_cap ? 2 * e->release_cap : 64;
        TunnelObject **r = PyMem_Realloc(e->release, (size_t)cap * sizeof(*r));
        if (r == NULL)
            return -1;
        e->release = r;
        e->release_cap = cap;
    }
    e->release[e->release_len++] = t;
    return 0;
}

void
flush_list_remove(TunnelObject *t)
{
    EngineObject *e = t->engine;
    if (t->prev_flush)
        t->prev_flush->next_flush = t->next_flush;
    else
        e->flushing = t->next_flush;
    if (t->next_flush)
        t->next_flush->prev_flush = t->prev_flush;
    t->prev_flush = t->next_flush = NULL;
    t->flushing = 0;
    e->flushing_count--;
}

/* -- sockets ------------------------------------------------------------------------------- */

void
out_free(OutBuf *o)
{
    PyMem_Free(o->data);
    o->data = NULL;
    o->off = o->len = 0;
}

static int
out_append(OutBuf *o, const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    if (o->off) {  /* what was sent already is not kept */
        memmove(o->data, o->data + o->off, o->len);
        o->off = 0;
    }
    size_t need = (size_t)o->off + o->len + n;
    if (need > UINT32_MAX)
        return -1;
    /* Sized to what it holds: a slow reader never makes a tunnel keep more than one read
     * plus a few control frames (the source is not read while this is non-empty). */
    uint8_t *d = PyMem_Realloc(o->data, need);
    if (d == NULL)
        return -1;
    memcpy(d + o->off + o->len, p, n);
    o->data = d;
    o->len += (uint32_t)n;
    return 0;
}

void
close_side(TunnelObject *t, int side, int reset)
{
    int fd = t->fd[side];
    if (fd < 0)
        return;
    if (t->registered[side]) {
        struct epoll_event dummy = {0};
        /* Explicitly: a dup elsewhere (uvloop's fd until its close) would keep us registered.
         * An adopted fd has no other copy: its close takes it out of the set. */
        if (!t->adopted)
            epoll_ctl(t->engine->epfd, EPOLL_CTL_DEL, fd, &dummy);
        t->registered[side] = 0;
    }
    if (reset) {
        /* A peer that never read: an RST frees the kernel's copy of what it never took. */
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    if (t->ssl[side] != NULL) {
        /* A close_notify when the peer may still read it (not on a reset or a lost peer). */
        tls_close(t->ssl[side], reset || t->rd_end[side]);
        t->ssl[side] = NULL;
    }
    close(fd);  /* not retried on EINTR: Linux has released the fd either way */
    t->fd[side] = -1;
    t->rd_ready[side] = t->wr_ready[side] = 0;
    out_free(&t->out[1 - side]);  /* bytes for it can no longer go anywhere */
    PyMem_Free(t->inject[side]);
    t->inject[side] = NULL;
    t->inject_len[side] = 0;
}

/* A side's connection ended (EOF, reset, error): Python hears of it from run(). */
void
side_lost(TunnelObject *t, int side)
{
    if (t->fd[side] < 0)
        return;
    close_side(t, side, 0);
    t->lost_any = 1;
    if (!t->finishing)
        notify(t, side == CLIENT ? EV_CLIENT_LOST : EV_BACKEND_LOST);
}

/* Send without blocking: the number of bytes the socket took, or -1 if the peer is gone. */
static ssize_t
send_some(TunnelObject *t, int dst, const uint8_t *p, size_t n)
{
    if (t->ssl[dst] != NULL)
        return tls_send(t->ssl[dst], p, n);
    int fd = t->fd[dst];
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = send(fd, p + sent, n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        return -1;
    }
    return (ssize_t)sent;
}

/* Bytes toward `dst`, in order after whatever waits for it. -1: dst is gone. */
int
emit(TunnelObject *t, int dst, const uint8_t *p, size_t n)
{
    OutBuf *o = &t->out[1 - dst];
    if (t->fd[dst] < 0)
        return -1;
    if (n == 0)
        return 0;
    if (o->len == 0 && t->wr_ready[dst]) {
        ssize_t sent = send_some(t, dst, p, n);
        if (sent < 0) {
            side_lost(t, dst);
            return -1;
        }
        p += sent;
        n -= (size_t)sent;
        if (n)
            t->wr_ready[dst] = 0;  /* full: the next EPOLLOUT edge says when to go on */
    }
    if (n && out_append(o, p, n) < 0) {
        /* Out of memory: losing bytes would corrupt the stream, so the tunnel ends. */
        side_lost(t, dst);
        return -1;
    }
    return 0;
}

/* Send what waits for `dst`. -1: dst is gone. */
int
flush_out(TunnelObject *t, int dst)
{
    OutBuf *o = &t->out[1 - dst];
    if (o->len == 0 || t->fd[dst] < 0)
        return 0;
    ssize_t sent = send_some(t, dst, o->data + o->off, o->len);
    if (sent < 0) {
        side_lost(t, dst);
        return -1;
    }
    o->off += (uint32_t)sent;
    o->len -= (uint32_t)sent;
    if (o->len == 0)
        out_free(o);  /* an idle tunnel keeps no buffer */
    else
        t->wr_ready[dst] = 0;
    return 0;
}

int
reading(TunnelObject *t, int side)
{
    return t->started && !t->finishing && !t->lost_any && t->fd[side] >= 0
           && t->w[side].error == 0 && t->out[side].len == 0;
}

/* A socket joins the epoll set once, edge-triggered: no epoll_ctl when a direction blocks
 * or drains, and no second look at every ready socket by the next epoll_wait. */
int
register_side(TunnelObject *t, int s)
{
    if (t->fd[s] < 0 || t->registered[s])
        return 0;
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = (uint64_t)(uintptr_t)t | (uint64_t)s;  /* objects are 8-aligned */
    if (epoll_ctl(t->engine->epfd, EPOLL_CTL_ADD, t->fd[s], &ev) < 0)
        return -1;
    t->registered[s] = 1;
    return 0;
}

int
register_sides(TunnelObject *t)
{
    return register_side(t, CLIENT) < 0 || register_side(t, BACKEND) < 0 ? -1 : 0;
}

/* A tunnel that stopped reading on its budget while bytes may remain: no new edge will come
 * for them, so the engine serves it again on its next run (and makes sure there is one). */
void
queue_again(TunnelObject *t)
{
    EngineObject *e = t->engine;
    if (t->queued)
        return;
    t->queued = 1;
    Py_INCREF(t);
    t->next_again = e->again;
    e->again = t;
    wake(e);
}

/* After a finished tunnel's step: close each side once nothing waits for it. */
void
finish_progress(TunnelObject *t)
{
    for (int s = 0; s < 2; s++)
        if (t->fd[s] >= 0 && t->out[1 - s].len == 0)
            close_side(t, s, 0);
    if (t->flushing && t->fd[CLIENT] < 0 && t->fd[BACKEND] < 0) {
        flush_list_remove(t);
        if (release_later(t->engine, t) < 0)
            PyErr_Clear();  /* a leaked reference of a closed tunnel: harmless */
    }
}
