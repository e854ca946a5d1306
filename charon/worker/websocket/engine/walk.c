/* Walking the frames of one direction as bytes are read, and serving one epoll event. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

static void
frame_end(TunnelObject *t, int src)
{
    Walker *w = &t->w[src];
    if (w->opcode < OP_CLOSE) {  /* message bytes; control frames are not messages */
        if (w->fin)
            w->messages++;
    }
    else if (w->opcode == OP_CLOSE) {
        w->close_code = w->close_got < 2 ? 1005 : (w->close_bytes[0] << 8 | w->close_bytes[1]);
        if (t->first_close < 0)
            t->first_close = (int8_t)src;
    }
    else if (w->opcode == OP_PONG)
        w->pongs++;
}

/* The held Pong candidate is complete: consumed if it answers our Ping, else forwarded. */
static int
pong_decide(TunnelObject *t)
{
    PongWatch *pw = t->pong;
    const uint8_t *key = pw->frame + 2, *body = pw->frame + 6;
    int match = 1;
    for (int i = 0; i < pw->len; i++)
        if ((uint8_t)(body[i] ^ key[i & 3]) != pw->payload[i])
            match = 0;
    t->w[CLIENT].holding = 0;
    if (match) {
        PyMem_Free(pw);
        t->pong = NULL;
        return 0;
    }
    return emit(t, BACKEND, pw->frame, pw->have);
}

int
flush_inject(TunnelObject *t, int dst)
{
    if (!t->inject_len[dst])
        return 0;
    uint8_t *p = t->inject[dst];
    uint16_t n = t->inject_len[dst];
    t->inject[dst] = NULL;
    t->inject_len[dst] = 0;
    int r = emit(t, dst, p, n);
    PyMem_Free(p);
    return r;
}

/* Walk n bytes read from `src` and forward them. Returns 0 to go on reading, -1 to stop:
 * the destination is gone, or a frame broke the rules (the bytes before it went through). */
int
feed(TunnelObject *t, int src, const uint8_t *p, size_t n)
{
    if (t->raw)
        return emit(t, 1 - src, p, n);
    Walker *w = &t->w[src];
    int dst = 1 - src;
    size_t pos = 0, seg = 0;  /* p[seg:pos] is walked and not yet sent */

    while (pos < n) {
        if (w->remaining) {
            size_t take = n - pos;
            if (take > w->remaining)
                take = (size_t)w->remaining;
            if (w->opcode == OP_CLOSE) {
                for (size_t k = 0; w->close_got < 2 && k < take; k++, w->close_got++)
                    w->close_bytes[w->close_got] =
                        p[pos + k] ^ (w->masked ? w->mask[w->close_got] : 0);
            }
            if (w->holding) {
                PongWatch *pw = t->pong;
                memcpy(pw->frame + pw->have, p + pos, take);  /* bounded by its length */
                pw->have += (uint16_t)take;
                seg = pos + take;
            }
            if (w->opcode < OP_CLOSE)
                w->payload_bytes += take;  /* what passed, not what a header declared */
            pos += take;
            w->remaining -= take;
            if (w->remaining)
                continue;
            frame_end(t, src);
            if (w->holding && pong_decide(t) < 0)
                return -1;
            if (t->inject_len[dst]) {
                if (emit(t, dst, p + seg, pos - seg) < 0 || flush_inject(t, dst) < 0)
                    return -1;
                seg = pos;
            }
            continue;
        }

        /* A header starts at pos, or continues one held from the previous read. */
        uint8_t hbuf[MAX_HEADER];
        const uint8_t *h;
        size_t have, held = w->hold_len, start = pos;
        if (held) {
            size_t k = n - pos;
            if (k > MAX_HEADER - held)
                k = MAX_HEADER - held;
            memcpy(hbuf, w->hold, held);
            memcpy(hbuf + held, p + pos, k);
            h = hbuf;
            have = held + k;
        }
        else {
            h = p + pos;
            have = n - pos;
        }
        size_t need = 2;
        if (have >= 2) {
            uint8_t len7 = h[1] & 0x7F;
            need += (size_t)((len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((h[1] & 0x80) ? 4 : 0));
        }
        if (have < need) {
            /* Kept back until it is whole: the output stays at a frame boundary meanwhile. */
            if (emit(t, dst, p + seg, start - seg) < 0)
                return -1;
            memcpy(w->hold, h, have);
            w->hold_len = (uint8_t)have;
            return 0;
        }
        uint64_t len = h[1] & 0x7F;
        if (len == 126)
            len = (uint64_t)h[2] << 8 | h[3];
        else if (len == 127) {
            len = 0;
            for (int i = 2; i < 10; i++)
                len = len << 8 | h[i];
        }
        int masked = (h[1] & 0x80) != 0;
        uint16_t error = 0;
        if ((len >> 63) || (w->must_mask && !masked))
            error = 1002;
        else if (len > w->max_size)
            error = 1009;
        if (error) {
            w->hold_len = 0;  /* the bad frame is not forwarded */
            w->error = error;
            if (emit(t, dst, p + seg, start - seg) < 0)
                return -1;
            if (!t->finishing && !t->refused_code) {
                t->refused_code = error;
                notify(t, EV_REFUSED);
            }
            return -1;
        }
        size_t used = need - held;  /* header bytes taken from this read */
        w->hold_len = 0;
        w->fin = (h[0] & 0x80) != 0;
        w->opcode = h[0] & 0x0F;
        w->masked = (uint8_t)masked;
        if (masked)
            memcpy(w->mask, h + need - 4, 4);
        if (w->opcode == OP_CLOSE)
            w->close_got = 0;
        w->remaining = len;

        PongWatch *pw = t->pong;
        if (src == CLIENT && pw != NULL && w->fin && w->opcode == OP_PONG && masked
            && len == pw->len && need == 6) {
            /* Perhaps the answer to our Ping: kept back until its payload can be compared. */
            if (emit(t, dst, p + seg, start - seg) < 0)
                return -1;
            memcpy(pw->frame, h, need);
            pw->have = (uint16_t)need;
            w->holding = 1;
            pos = seg = start + used;
            if (len == 0) {
                frame_end(t, src);
                if (pong_decide(t) < 0)
                    return -1;
            }
            continue;
        }
        if (held) {
            if (emit(t, dst, w->hold, held) < 0)  /* hold still has the held bytes */
                return -1;
            seg = start;
        }
        pos = start + used;
        if (len == 0) {
            frame_end(t, src);
            if (t->inject_len[dst]) {
                if (emit(t, dst, p + seg, pos - seg) < 0 || flush_inject(t, dst) < 0)
                    return -1;
                seg = pos;
            }
        }
    }
    return emit(t, dst, p + seg, n - seg);
}

/* Read what `src` sent and forward it, until the socket is empty, the destination stops
 * taking bytes, or the read budget is spent (then 1: the socket may still hold bytes). */
static int
pump(TunnelObject *t, int src)
{
    EngineObject *e = t->engine;
    for (int i = 0; i < READS_PER_EVENT; i++) {
        if (!reading(t, src))
            return 0;
        ssize_t r;
        int more;
        if (t->ssl[src] != NULL) {
            int drained;
            r = tls_recv(t->ssl[src], e->buf, READ_SIZE, &drained);
            if (r == -2) {
                /* Empty; or OpenSSL must write first: the next EPOLLOUT edge reads again. */
                if (drained == 1)
                    t->rd_ready[src] = 0;
                return 0;
            }
            if (r <= 0) {
                side_lost(t, src);
                return 0;
            }
            more = !drained;
        }
        else {
            r = recv(t->fd[src], e->buf, READ_SIZE, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR) {
                    i--;
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    t->rd_ready[src] = 0;
                else
                    side_lost(t, src);
                return 0;
            }
            if (r == 0) {
                side_lost(t, src);
                return 0;
            }
            /* A short read emptied the socket (bytes arriving later raise a new edge), unless
             * the FIN or an error came with the last edge: that is read next, no edge follows. */
            more = r == READ_SIZE || t->rd_end[src];
        }
        t->last_traffic = e->now;
        if (!more)
            t->rd_ready[src] = 0;
        if (feed(t, src, e->buf, (size_t)r) < 0 || !more)
            return 0;
    }
    return reading(t, src);
}

/* Move what can move: bytes waiting for a writable side first (that may unblock its
 * source), then reads from readable sides. */
void
progress(TunnelObject *t)
{
    for (int s = 0; s < 2; s++)
        if (t->out[1 - s].len && t->wr_ready[s])
            flush_out(t, s);
    int more = 0;
    for (int s = 0; s < 2; s++)
        if (t->rd_ready[s])
            more |= pump(t, s);
    if (t->finishing)
        finish_progress(t);
    else if (more)
        queue_again(t);
}

/* A tunnel's first bytes: the 101 to the client, then the frames that followed it in the
 * backend's last read, then the client's frames pipelined behind its handshake. */
void
begin_streams(TunnelObject *t, const uint8_t *head, size_t head_len, const uint8_t *backend_tail,
              size_t backend_tail_len, const uint8_t *client_tail, size_t client_tail_len)
{
    /* An empty tail may be NULL (a dial's client sent nothing past its head): not walked,
     * since feed's pointer arithmetic on NULL is undefined even with nothing to add. */
    if (emit(t, CLIENT, head, head_len) == 0 && backend_tail_len)
        feed(t, BACKEND, backend_tail, backend_tail_len);
    if (!t->lost_any && !t->w[BACKEND].error && client_tail_len)
        feed(t, CLIENT, client_tail, client_tail_len);
}

void
handle_event(TunnelObject *t, int side, uint32_t ev)
{
    if (t->fd[side] < 0)
        return;  /* closed earlier in this batch */
    if (t->dial != NULL) {
        dial_event(t, side, ev);
        return;
    }
    /* A hang-up or error shows as readable (the read gets the EOF or the error) and
     * writable (the send gets the error); a source whose destination is slow keeps it
     * until it is read again: the bytes before it still go through first. */
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        t->rd_ready[side] = 1;
    if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        t->rd_end[side] = 1;
    if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        t->wr_ready[side] = 1;
    progress(t);
}
