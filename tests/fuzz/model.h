/* A model of the sockets the engine talks to, for the fuzz targets: the engine's objects are
 * built with their socket calls renamed to model_* (objcopy --redefine-sym, see build.sh), so
 * no engine file changes. Model fds are >= MODEL_FD_BASE; any other fd (the engine's real
 * epoll fd and eventfd) goes to the real call. A misuse the kernel would only answer with
 * EBADF (a send, read, epoll_ctl or close on a model fd already closed) aborts: in the
 * engine that would be a use-after-close of a number the kernel may have given to another
 * connection. */

#ifndef CHARON_FUZZ_MODEL_H
#define CHARON_FUZZ_MODEL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#define MODEL_FD_BASE 10000
#define MODEL_FDS 64

typedef struct {
    int used, closed, registered;
    uint8_t *in;             /* what the peer sent and the engine has not read: in[in_off:in_len] */
    size_t in_off, in_len, in_cap;
    int eof;                 /* the peer's FIN follows the bytes */
    int error;               /* an errno the next read (once the bytes are read) and sends get */
    size_t room;             /* bytes a send may still put in the socket */
    uint8_t *out;            /* everything the engine sent to this socket */
    size_t out_len, out_cap;
    int reads, sends;
} ModelSocket;

extern ModelSocket model[MODEL_FDS];
extern int model_connect_errno;    /* 0: a connect goes on in the background (EINPROGRESS) */
extern int model_accept_left;      /* connections the listening model socket still has */

void model_reset(void);
void model_free(void);
int model_new_fd(void);
ModelSocket *model_at(int fd);     /* NULL for a real fd */
int model_close(int fd);
void model_give(int fd, const uint8_t *p, size_t n);  /* the peer sends p[0:n] */

#endif
