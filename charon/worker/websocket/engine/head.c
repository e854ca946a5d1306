/* The split of an HTTP head (a client's WebSocket handshake at the front door, a backend's
 * answer to a dial), and split_head() for Python (the differential test against llhttp:
 * tests/test_head_splitter_differential.py).
 *
 * llhttp is the parser of record: split_head() takes a head only if llhttp takes it the same
 * way (same method, target, fields and length). It is stricter on purpose: anything unusual
 * goes the HTTP way, where llhttp and plan_request give the answer the protocol notes ask for. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <string.h>

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
    if (n < 16 || memcmp(p, "GET /", 5) != 0)
        return 0;  /* origin-form only: llhttp checks an absolute-form target's scheme, host... */
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
    int websocket = 0;
    for (uint32_t i = 0; i < h->count; i++) {
        const uint8_t *name = p + h->name_off[i];
        uint32_t nl = h->name_len[i];
        /* llhttp checks a body's framing fields (an invalid or repeated length, both, ...)
         * and a handshake has no body: a head with either goes the HTTP way. */
        if (lower_equals(name, nl, "content-length") || lower_equals(name, nl, "transfer-encoding"))
            return 0;
        if (!websocket && lower_equals(name, nl, "upgrade"))
            websocket = has_token(p + h->value_off[i], h->value_len[i], "websocket");
    }
    return websocket;
}

/* (method, target, [(name, value), ...], head length) of a split head. */
PyObject *
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

/* split_head(data) -> (method, target, fields, head length) or None, for tests. */
PyObject *
engine_split_head(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result;
    SplitHead h;
    if (b.len > 0 && b.len <= UINT32_MAX && split_head(b.buf, (uint32_t)b.len, &h))
        result = head_tuple(b.buf, &h);
    else
        result = Py_NewRef(Py_None);
    PyBuffer_Release(&b);
    return result;
}
