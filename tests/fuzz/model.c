/* The socket model (model.h). */

#include "model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <unistd.h>

ModelSocket model[MODEL_FDS];
int model_connect_errno;
int model_accept_left;

static void
misuse(const char *what, int fd)
{
    fprintf(stderr, "model: %s on fd %d\n", what, fd);
    abort();
}

ModelSocket *
model_at(int fd)
{
    if (fd < MODEL_FD_BASE)
        return NULL;
    if (fd >= MODEL_FD_BASE + MODEL_FDS || !model[fd - MODEL_FD_BASE].used)
        misuse("an fd the model never gave", fd);
    return &model[fd - MODEL_FD_BASE];
}

static ModelSocket *
open_at(int fd, const char *what)
{
    ModelSocket *m = model_at(fd);
    if (m != NULL && m->closed)
        misuse(what, fd);
    return m;
}

void
model_free(void)
{
    for (int i = 0; i < MODEL_FDS; i++) {
        free(model[i].in);
        free(model[i].out);
    }
    memset(model, 0, sizeof(model));
}

void
model_reset(void)
{
    model_free();
    model_connect_errno = 0;
    model_accept_left = 0;
}

int
model_new_fd(void)
{
    for (int i = 0; i < MODEL_FDS; i++)
        if (!model[i].used) {
            model[i].used = 1;
            model[i].room = 1 << 20;
            return MODEL_FD_BASE + i;
        }
    return -1;
}

static void
grow(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    size_t cap2 = *cap ? *cap : 256;
    while (cap2 < need)
        cap2 *= 2;
    uint8_t *b = realloc(*buf, cap2);
    if (b == NULL)
        abort();
    *buf = b;
    *cap = cap2;
}

void
model_give(int fd, const uint8_t *p, size_t n)
{
    ModelSocket *m = model_at(fd);
    if (n == 0)
        return;
    if (m->in_off == m->in_len)
        m->in_off = m->in_len = 0;
    grow(&m->in, &m->in_cap, m->in_len + n);
    memcpy(m->in + m->in_len, p, n);
    m->in_len += n;
}

ssize_t
model_recv(int fd, void *buf, size_t n, int flags)
{
    ModelSocket *m = open_at(fd, "recv");
    if (m == NULL)
        return recv(fd, buf, n, flags);
    m->reads++;
    size_t have = m->in_len - m->in_off;
    if (have) {
        if (n > have)
            n = have;
        memcpy(buf, m->in + m->in_off, n);
        m->in_off += n;
        return (ssize_t)n;
    }
    if (m->error) {
        errno = m->error;
        return -1;
    }
    if (m->eof)
        return 0;
    errno = EAGAIN;
    return -1;
}

ssize_t
model_read(int fd, void *buf, size_t n)
{
    if (fd >= MODEL_FD_BASE)
        return model_recv(fd, buf, n, 0);
    return read(fd, buf, n);
}

ssize_t
model_send(int fd, const void *p, size_t n, int flags)
{
    ModelSocket *m = open_at(fd, "send");
    if (m == NULL)
        return send(fd, p, n, flags);
    m->sends++;
    if (m->error) {
        errno = m->error;
        return -1;
    }
    if (m->room == 0) {
        errno = EAGAIN;
        return -1;
    }
    if (n > m->room)
        n = m->room;
    grow(&m->out, &m->out_cap, m->out_len + n);
    memcpy(m->out + m->out_len, p, n);
    m->out_len += n;
    m->room -= n;
    return (ssize_t)n;
}

ssize_t
model_write(int fd, const void *p, size_t n)
{
    if (fd >= MODEL_FD_BASE)
        return model_send(fd, p, n, 0);
    return write(fd, p, n);
}

int
model_close(int fd)
{
    ModelSocket *m = open_at(fd, "close");
    if (m == NULL)
        return close(fd);
    m->closed = 1;
    m->registered = 0;  /* a close takes the fd out of every epoll set */
    return 0;
}

int
model_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    ModelSocket *m = open_at(fd, "epoll_ctl");
    if (m == NULL)
        return epoll_ctl(epfd, op, fd, ev);
    if (op == EPOLL_CTL_ADD) {
        if (m->registered) {
            errno = EEXIST;
            return -1;
        }
        m->registered = 1;
    }
    else if (op == EPOLL_CTL_DEL) {
        if (!m->registered) {
            errno = ENOENT;
            return -1;
        }
        m->registered = 0;
    }
    return 0;
}

int
model_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout)
{
    (void)epfd, (void)events, (void)max, (void)timeout;
    return 0;  /* the targets deliver events themselves */
}

int
model_setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
    if (open_at(fd, "setsockopt") == NULL)
        return setsockopt(fd, level, name, value, len);
    return 0;
}

int
model_socket(int domain, int type, int protocol)
{
    (void)domain, (void)type, (void)protocol;
    int fd = model_new_fd();
    if (fd < 0) {
        errno = EMFILE;
        return -1;
    }
    return fd;
}

int
model_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    (void)addr, (void)len;
    open_at(fd, "connect");
    errno = model_connect_errno ? model_connect_errno : EINPROGRESS;
    return -1;
}

int
model_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    (void)flags;
    open_at(fd, "accept4");
    if (model_accept_left <= 0) {
        errno = EAGAIN;
        return -1;
    }
    int c = model_new_fd();
    if (c < 0) {
        errno = EMFILE;
        return -1;
    }
    model_accept_left--;
    memset(addr, 0, *len);
    addr->sa_family = AF_INET;
    *len = sizeof(struct sockaddr_in);
    return c;
}
