/* libFuzzer target: the engine's TLS (tls.c) as the front door and the pumps use it: a server
 * session from tls_new_session() on memory BIOs, its handshake stepped as door.c's tls_step
 * does, plaintext through tls_recv/tls_send, the end through tls_close, a TlsConn on the way.
 *
 * Input byte 0 picks the mode and one of three TlsServers (built once, through the type as
 * Python builds them; see servers below):
 *   raw: the rest is what a client sends (records, starting with a ClientHello), fed in
 *     pieces of byte 1's size so records are cut anywhere; the server's answers are dropped;
 *   client: an OpenSSL client in the same process, its SNI name, ALPN list, version and
 *     resumption (the ticket kept from an earlier run) taken from the input, handshakes with
 *     the server; the outcome and the certificate chosen are checked against the rules in
 *     tls.c's header; then a script sends bytes both ways (and KeyUpdates, closes), and what
 *     arrives must be what was sent, in order, nothing lost before a close_notify.
 * The server writes into a BIO pair of an input-chosen size, so its sends and handshake stop
 * half way (WANT_WRITE) as on a full socket. After every call into engine code the thread's
 * OpenSSL error queue must be empty: Python's ssl module (the backends' TLS) reads it too. */

#include "driver.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOT_A_FD (1 << 20)  /* tls_new_session's socket BIO is replaced before any I/O */

static void __attribute__((noreturn))
fail(const char *what)
{
    fprintf(stderr, "fuzz_tls: %s\n", what);
    abort();
}

/* After engine code: nothing may be left on the queue Python's ssl shares. */
static void
queue_empty(const char *after)
{
    unsigned long code = ERR_peek_error();
    if (code) {
        char text[256];
        ERR_error_string_n(code, text, sizeof(text));
        fprintf(stderr, "fuzz_tls: OpenSSL error queue not empty after %s: %s\n", after, text);
        abort();
    }
}

/* -- the servers, made once ------------------------------------------------------------------ */

typedef struct {
    const char *cn;  /* the certificate's common name: what the checks compare */
    PyObject *cert, *key;
} Pem;

enum { CERT_A, CERT_WILD, CERT_STAR, CERT_DEFAULT, CERT_ACME, CERT_EXTRA, CERTS };
static Pem pems[CERTS];

typedef struct {
    PyObject *server;   /* the TlsServer */
    PyObject *engine;   /* an Engine whose set_tls() holds it (sessions count on it) */
    int index;          /* which of the three configurations */
    int star, fallback, challenges, min13, tickets;
} Server;

#define SERVERS 3
static Server servers[SERVERS];
static PyObject *keys[3];      /* 80-byte ticket keys; server 1 rotates among them */
static SSL_CTX *client_ctx;
static SSL_SESSION *saved;     /* the client's last session (a ticket), across runs */

/* Inputs that once found bugs of tls.c (regressions/fuzz_tls/): a reload during a handshake,
 * a rotation to no ticket keys. Always made now that tls.c is fixed. */
static int
pending(void)
{
    return 1;
}

static PyObject *
pem_of(int (*write)(BIO *, void *), void *obj)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *p;
    if (b == NULL || !write(b, obj))
        fail("PEM");
    long n = BIO_get_mem_data(b, &p);
    PyObject *bytes = PyBytes_FromStringAndSize(p, n);
    BIO_free(b);
    if (bytes == NULL)
        fail("PEM bytes");
    return bytes;
}

static int
write_cert(BIO *b, void *x)
{
    return PEM_write_bio_X509(b, x);
}

static int
write_key(BIO *b, void *k)
{
    return PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL);
}

static void
make_pem(Pem *pem, const char *cn, EVP_PKEY *key, long serial)
{
    X509 *x = X509_new();
    X509_NAME *name = X509_get_subject_name(x);
    if (x == NULL || !X509_set_version(x, 2)
        || !ASN1_INTEGER_set(X509_get_serialNumber(x), serial)
        || !X509_gmtime_adj(X509_getm_notBefore(x), -3600)
        || !X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365)
        || !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1,
                                       -1, 0)
        || !X509_set_issuer_name(x, name) || !X509_set_pubkey(x, key)
        || !X509_sign(x, key, EVP_sha256()))
        fail("certificate");
    pem->cn = cn;
    pem->cert = pem_of(write_cert, x);
    pem->key = pem_of(write_key, key);
    X509_free(x);
}

static PyObject *
item(const char *names, PyObject *cert, PyObject *key)
{
    PyObject *text = PyUnicode_FromString(names);
    PyObject *split = text ? PyUnicode_Split(text, NULL, -1) : NULL;
    Py_XDECREF(text);
    PyObject *t = Py_BuildValue("(NOO)", split, cert, key);
    if (t == NULL)
        fail("item");
    return t;
}

/* Server 0: exact and wildcard names, no default (unknown names get an alert), a challenge
 * certificate, two ticket keys. Server 1: the same plus "*" and a default (which "*" hides),
 * one ticket key that runs rotate. Server 2: a default, no "*", no challenges, TLS 1.3 only,
 * no tickets. The "a.test" certificate comes with a chain certificate. */
static void
make_server(Server *s, int i)
{
    s->index = i;
    s->star = i == 1;
    s->fallback = i != 0;
    s->challenges = i != 2;
    s->min13 = i == 2;
    s->tickets = i != 2;
    PyObject *chain = PyBytes_FromFormat("%s%s", PyBytes_AS_STRING(pems[CERT_A].cert),
                                         PyBytes_AS_STRING(pems[CERT_EXTRA].cert));
    PyObject *certs = PyList_New(0);
    PyList_Append(certs, item("a.test", chain, pems[CERT_A].key));
    PyList_Append(certs, item("*.wild.test b.test", pems[CERT_WILD].cert, pems[CERT_WILD].key));
    if (s->star)
        PyList_Append(certs, item("*", pems[CERT_STAR].cert, pems[CERT_STAR].key));
    PyObject *challenges = PyList_New(0);
    if (s->challenges)
        PyList_Append(challenges, item("a.test acme.test", pems[CERT_ACME].cert,
                                       pems[CERT_ACME].key));
    PyObject *fallback = s->fallback ? Py_BuildValue("(OO)", pems[CERT_DEFAULT].cert,
                                                     pems[CERT_DEFAULT].key)
                                     : Py_NewRef(Py_None);
    PyObject *tickets = i == 0 ? Py_BuildValue("[OO]", keys[0], keys[1])
                      : i == 1 ? Py_BuildValue("[O]", keys[0]) : PyList_New(0);
    s->server = PyObject_CallFunction((PyObject *)&TlsServerType, "OOOsiOd", certs, fallback,
                                      challenges,
                                      "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-"
                                      "SHA384:ECDHE-ECDSA-CHACHA20-POLY1305",
                                      s->min13 ? TLS1_3_VERSION : TLS1_2_VERSION, tickets, 10.0);
    if (s->server == NULL) {
        PyErr_Print();
        fail("TlsServer");
    }
    queue_empty("TlsServer()");
    Py_DECREF(chain);
    Py_DECREF(certs);
    Py_DECREF(challenges);
    Py_DECREF(fallback);
    Py_DECREF(tickets);
    s->engine = new_engine();
    PyObject *r = PyObject_CallMethod(s->engine, "set_tls", "O", s->server);
    if (r == NULL)
        fail("set_tls");
    Py_DECREF(r);
}

static int
keep_session(SSL *ssl, SSL_SESSION *session)
{
    SSL_SESSION_free(saved);
    saved = session;
    return 1;  /* the reference is ours */
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    driver_init();
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (key == NULL)
        fail("key");
    const char *cns[CERTS] = {"a", "wild", "star", "default", "acme", "extra"};
    for (int i = 0; i < CERTS; i++)
        make_pem(&pems[i], cns[i], key, i + 1);
    EVP_PKEY_free(key);
    for (int i = 0; i < 3; i++) {
        unsigned char k[80];
        memset(k, 'a' + i, sizeof(k));
        keys[i] = PyBytes_FromStringAndSize((const char *)k, sizeof(k));
    }
    for (int i = 0; i < SERVERS; i++)
        make_server(&servers[i], i);
    client_ctx = SSL_CTX_new(TLS_client_method());
    if (client_ctx == NULL)
        fail("client context");
    SSL_CTX_set_verify(client_ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(client_ctx,
                                   SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(client_ctx, keep_session);
    ERR_clear_error();
    return 0;
}

/* -- the engine's side of a session ---------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} Bytes;

static void
bytes_add(Bytes *b, const uint8_t *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (b->p == NULL)
            abort();
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

typedef struct {
    EngineObject *engine;
    SSL *ssl;            /* the server session (engine code's), NULL once closed */
    BIO *in;             /* memory BIO: what the client sent, for the server to read */
    BIO *out;            /* the harness's end of the server's BIO pair */
    int handshaking, first_read, failed, eof;
    Bytes got;           /* plaintext tls_recv returned, in order */
    Bytes pending;       /* plaintext the engine still has to send (an OutBuf) */
    Bytes taken;         /* plaintext tls_send took */
    Bytes offered;       /* everything ever put in pending, in order */
} Side;

static uint8_t read_buf[READ_SIZE];

static SSL *
new_session(Side *s, Server *srv, size_t out_size)
{
    ERR_clear_error();
    SSL *ssl = tls_new_session((EngineObject *)srv->engine, NOT_A_FD);
    queue_empty("tls_new_session");
    if (ssl == NULL)
        fail("tls_new_session");
    BIO *w;
    s->in = BIO_new(BIO_s_mem());
    if (s->in == NULL || !BIO_new_bio_pair(&w, out_size, &s->out, 1))
        fail("BIO");
    BIO_up_ref(s->in);  /* the SSL's reference and ours */
    SSL_set_bio(ssl, s->in, w);
    s->engine = (EngineObject *)srv->engine;
    s->ssl = ssl;
    s->handshaking = 1;
    s->first_read = 1;
    return ssl;
}

/* Reads as door.c's tls_step (the first) and walk.c (the pump's) do, until nothing is left. */
static void
server_read(Side *s)
{
    for (int rounds = 0; rounds < 64 && s->ssl && !s->failed && !s->eof; rounds++) {
        int drained;
        ERR_clear_error();
        ssize_t got = tls_recv(s->ssl, read_buf, s->first_read ? FIRST_READ : READ_SIZE,
                               &drained);
        queue_empty("tls_recv");
        s->first_read = 0;
        if (got > 0) {
            bytes_add(&s->got, read_buf, (size_t)got);
            continue;
        }
        if (got == 0)
            s->eof = 1;
        else if (got == -1)
            s->failed = 1;
        else if (got != -2 || drained == 0)
            fail("tls_recv: an unexpected answer");
        return;  /* -2: epoll would say when (drained 2: once there is room) */
    }
}

/* door.c's tls_step: the handshake, then the first read. */
static void
server_step(Side *s)
{
    if (s->ssl == NULL || s->failed)
        return;
    if (s->handshaking) {
        ERR_clear_error();
        int r = SSL_do_handshake(s->ssl);
        if (r != 1) {
            int err = SSL_get_error(s->ssl, r);
            ERR_clear_error();
            if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
                s->failed = 1;
            return;
        }
        queue_empty("a handshake");  /* door.c clears nothing after a success */
        s->handshaking = 0;
        tls_release_server(s->ssl);
    }
    server_read(s);
}

/* The engine's OutBuf toward the client: what tls_send takes leaves it; the rest is offered
 * again, from a buffer that moved (the engine's compacts and grows). */
static void
server_flush(Side *s)
{
    if (s->ssl == NULL || s->handshaking || s->failed || s->pending.len == 0)
        return;
    uint8_t *copy = malloc(s->pending.len);
    memcpy(copy, s->pending.p, s->pending.len);
    ERR_clear_error();
    ssize_t n = tls_send(s->ssl, copy, s->pending.len);
    queue_empty("tls_send");
    free(copy);
    if (n < 0) {
        s->failed = 1;
        return;
    }
    if ((size_t)n > s->pending.len)
        fail("tls_send took more than it was given");
    bytes_add(&s->taken, s->pending.p, (size_t)n);
    memmove(s->pending.p, s->pending.p + n, s->pending.len - (size_t)n);
    s->pending.len -= (size_t)n;
}

static void
server_close(Side *s, int quiet)
{
    ERR_clear_error();
    tls_close(s->ssl, quiet);
    queue_empty("tls_close");
    s->ssl = NULL;
}

static void
side_free(Side *s)
{
    if (s->ssl)
        server_close(s, 1);
    BIO_free(s->in);
    BIO_free(s->out);
    free(s->got.p);
    free(s->pending.p);
    free(s->taken.p);
    free(s->offered.p);
}

/* -- raw mode: any bytes as the client's -------------------------------------------------- */

static void
raw(Input *in, Server *srv)
{
    Side s;
    memset(&s, 0, sizeof(s));
    int piece = take_byte(in);
    int out_size = take_byte(in);
    new_session(&s, srv, out_size <= 0 ? 1 << 16 : (size_t)out_size * 64);
    size_t step = piece <= 0 ? in->n : (size_t)piece;
    while (in->n > 0 && s.ssl && !s.failed && !s.eof) {
        const uint8_t *p;
        size_t n = take_bytes(in, step ? step : 1, &p);
        BIO_write(s.in, p, (int)n);
        server_step(&s);
        /* what the server answers goes nowhere (its socket drains) */
        char sink[4096];
        while (BIO_read(s.out, sink, sizeof(sink)) > 0) {
        }
        if (!s.handshaking)
            server_flush(&s);
        ERR_clear_error();
    }
    if (s.ssl && !s.failed) {
        BIO_set_mem_eof_return(s.in, 0);  /* the client's FIN */
        server_step(&s);
    }
    if (getenv("FUZZ_TLS_TRACE"))
        fprintf(stderr, "raw: handshake %s, %zu bytes read\n",
                s.failed ? "failed" : s.handshaking ? "under way" : "done", s.got.len);
    if (s.ssl) {
        if (!s.handshaking && !s.failed) {
            bytes_add(&s.pending, (const uint8_t *)"HTTP/1.1 400 Bad Request\r\n\r\n", 28);
            server_flush(&s);
        }
        server_close(&s, s.failed || s.eof);
    }
    side_free(&s);
}

/* -- client mode: a real handshake, then bytes both ways ----------------------------------- */

/* The certificate tls.c's rules choose (its common name), or NULL: an unrecognized_name
 * alert. `name` is the SNI name as the client sent it (NULL: none). */
static const char *
expected_cn(const Server *srv, const char *name, int offers_acme)
{
    char low[300];
    int have = 0;
    if (name != NULL) {
        size_t n = strlen(name);
        for (size_t i = 0; i < n; i++)
            low[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] + 32 : name[i]);
        low[n] = '\0';
        if (n && low[n - 1] == '.')
            low[n - 1] = '\0';
        have = low[0] != '\0';
    }
    if (have) {
        if (srv->challenges && offers_acme
            && (strcmp(low, "a.test") == 0 || strcmp(low, "acme.test") == 0))
            return "acme";
        if (strcmp(low, "a.test") == 0)
            return "a";
        if (strcmp(low, "b.test") == 0 || strcmp(low, "*.wild.test") == 0)
            return "wild";
        const char *dot = strchr(low, '.');
        if (dot != NULL && strcmp(dot, ".wild.test") == 0)
            return "wild";
    }
    if (srv->star)
        return "star";
    return srv->fallback ? "default" : NULL;
}

static int
alpn_has(const uint8_t *list, size_t len, const char *proto)
{
    size_t want = strlen(proto);
    for (size_t i = 0; i < len; i += 1 + list[i])
        if (list[i] == want && i + 1 + want <= len && memcmp(list + i + 1, proto, want) == 0)
            return 1;
    return 0;
}

static int
cn_is(X509 *x, const char *cn)
{
    char text[64] = "";
    if (x == NULL)
        return 0;
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, text, sizeof(text));
    return strcmp(text, cn) == 0;
}

typedef struct {
    SSL *ssl;
    BIO *in, *out;   /* memory BIOs: from the server, to the server */
    int done, failed, closed;
    Bytes sent;      /* plaintext the client wrote */
    Bytes got;       /* plaintext the client read */
} Client;

/* The client's records reach the server in pieces of `piece` bytes, a step after each. */
static int
to_server(Client *c, Side *s, size_t piece)
{
    uint8_t buf[4096];
    int moved = 0, n;
    size_t cut = piece ? piece : sizeof(buf);
    if (cut > sizeof(buf))
        cut = sizeof(buf);
    while ((n = BIO_read(c->out, buf, (int)cut)) > 0) {
        moved = 1;
        BIO_write(s->in, buf, n);
        server_step(s);
    }
    return moved;
}

/* What the server wrote reaches the client (the socket drains: room for the server). */
static int
to_client(Client *c, Side *s)
{
    uint8_t buf[4096];
    int moved = 0, n;
    while ((n = BIO_read(s->out, buf, sizeof(buf))) > 0) {
        moved = 1;
        BIO_write(c->in, buf, n);
    }
    return moved;
}

static void
client_read(Client *c)
{
    uint8_t buf[16384];
    while (!c->failed && !c->closed) {
        int r = SSL_read(c->ssl, buf, sizeof(buf));
        if (r > 0) {
            bytes_add(&c->got, buf, (size_t)r);
            continue;
        }
        int err = SSL_get_error(c->ssl, r);
        if (err == SSL_ERROR_ZERO_RETURN)
            c->closed = 1;
        else if (err != SSL_ERROR_WANT_READ)
            c->failed = 1;
        break;
    }
    ERR_clear_error();
}

static void
check_prefix(const Bytes *got, const Bytes *sent, const char *way)
{
    if (got->len > sent->len || (got->len && memcmp(got->p, sent->p, got->len) != 0)) {
        fprintf(stderr, "fuzz_tls: %s: %zu bytes arrived that are not the %zu sent\n", way,
                got->len, sent->len);
        abort();
    }
}

/* Every byte both ways moved: the server's sends offered again as epoll would let it, the
 * client reading. */
static void
settle(Client *c, Side *s, size_t piece)
{
    for (int rounds = 0; rounds < 100000; rounds++) {
        size_t before = s->pending.len;
        int moved = to_server(c, s, piece);
        server_flush(s);
        moved |= to_client(c, s);
        client_read(c);
        server_read(s);  /* (after a WANT_WRITE the read goes on once there is room) */
        if (!moved && s->pending.len == before)
            break;
    }
}

/* A TlsConn on the way to Python and back, as take_arrivals and attach_tls carry it; what
 * info() says is what was negotiated. */
static void
through_tls_conn(Side *s, const char *sni, int alpn_sent, int *dropped)
{
    ERR_clear_error();
    PyObject *conn = tls_conn_new(s->ssl);
    if (conn == NULL)
        fail("tls_conn_new");
    PyObject *info = PyObject_CallMethod(conn, "info", NULL);
    queue_empty("TlsConn.info");
    if (info == NULL || !PyTuple_Check(info) || PyTuple_GET_SIZE(info) != 5) {
        PyErr_Print();
        fail("TlsConn.info");
    }
    PyObject *name = PyTuple_GET_ITEM(info, 0), *alpn = PyTuple_GET_ITEM(info, 1);
    if (getenv("FUZZ_TLS_TRACE")) {
        fprintf(stderr, "  TlsConn.info: ");
        PyObject_Print(info, stderr, 0);
        fprintf(stderr, "\n");
    }
    int resumed = PyTuple_GET_ITEM(info, 4) == Py_True;
    if (!resumed && (sni == NULL) != (name == Py_None))
        fail("TlsConn.info: the server name does not match the SNI sent");
    if (alpn_sent != (alpn != Py_None))
        fail("TlsConn.info: an ALPN protocol without an offer, or none after one");
    Py_DECREF(info);
    if (*dropped) {
        Py_DECREF(conn);  /* Python drops it (the client went away): the session ends */
        queue_empty("TlsConn dealloc");
        s->ssl = NULL;
        return;
    }
    SSL *back = tls_conn_take(conn);
    queue_empty("tls_conn_take");
    if (back != s->ssl)
        fail("tls_conn_take gave another session");
    Py_DECREF(conn);
}

static void
client_mode(Input *in, Server *srv, int choice, int reload_at)
{
    int opts = take_byte(in), more = take_byte(in), piece = take_byte(in);
    if (opts < 0 || more < 0)
        return;
    /* SNI: none, fixed names (case, a trailing dot, wildcard, unknown), or input bytes */
    static const char *const names[] = {NULL, "a.test", "x.wild.test", "A.Test.", "other.test",
                                        "acme.test", "B.TEST", "*.wild.test", ".wild.test",
                                        "wild.test", "a.b.wild.test", "x.wild.test.."};
    char sni_buf[256];
    const char *sni = NULL;
    int which = opts & 15;
    if (which < (int)(sizeof(names) / sizeof(*names)))
        sni = names[which];
    else {
        const uint8_t *p;
        size_t n = take_bytes(in, (size_t)take_byte(in) & 0xff, &p);
        size_t k = 0;
        for (size_t i = 0; i < n && p[i]; i++)
            sni_buf[k++] = (char)p[i];
        sni_buf[k] = '\0';
        sni = k ? sni_buf : NULL;
    }
    /* ALPN: none, http/1.1, acme-tls/1, both, h2 only, or input bytes */
    uint8_t alpn[256];
    size_t alpn_len = 0;
    static const char *const lists[] = {"", "\x08http/1.1", "\x0a" "acme-tls/1",
                                        "\x02h2\x08http/1.1\x0a" "acme-tls/1", "\x02h2"};
    int list = (opts >> 4) & 7;
    if (list < 5) {
        alpn_len = strlen(lists[list]);
        memcpy(alpn, lists[list], alpn_len);
    }
    else {
        const uint8_t *p;
        alpn_len = take_bytes(in, (size_t)take_byte(in) & 0xff, &p);
        memcpy(alpn, p, alpn_len);
    }
    int max13 = !(more & 1), resume = more & 2, via_conn = more & 4, drop_conn = more & 8;
    size_t out_size = (size_t)(((more >> 4) & 7) + 1) * 2048;  /* 2-16 KiB of socket room */
    if (srv->index == 1 && (more & 0x80)) {  /* a ticket key rotation (as the worker's) */
        PyObject *k = (choice & 0x60) == 0x60 && pending() ? PyList_New(0)
                    : choice & 0x20 ? Py_BuildValue("[OO]", keys[1], keys[0])
                    : choice & 0x40 ? Py_BuildValue("[O]", keys[2])
                                    : Py_BuildValue("[O]", keys[0]);
        ERR_clear_error();
        PyObject *r = PyObject_CallMethod(srv->server, "set_ticket_keys", "O", k);
        queue_empty("set_ticket_keys");
        if (r == NULL)
            fail("set_ticket_keys");
        Py_DECREF(r);
        Py_DECREF(k);
    }

    Client c;
    memset(&c, 0, sizeof(c));
    Side s;
    memset(&s, 0, sizeof(s));
    new_session(&s, srv, out_size);
    c.ssl = SSL_new(client_ctx);
    c.in = BIO_new(BIO_s_mem());
    c.out = BIO_new(BIO_s_mem());
    if (c.ssl == NULL || c.in == NULL || c.out == NULL)
        fail("client");
    BIO_up_ref(c.in);
    BIO_up_ref(c.out);
    SSL_set_bio(c.ssl, c.in, c.out);
    SSL_set_connect_state(c.ssl);
    SSL_set_max_proto_version(c.ssl, max13 ? TLS1_3_VERSION : TLS1_2_VERSION);
    if (sni != NULL && !SSL_set_tlsext_host_name(c.ssl, sni))
        sni = NULL;
    int alpn_sent = alpn_len && SSL_set_alpn_protos(c.ssl, alpn, (unsigned)alpn_len) == 0;
    if (resume && saved != NULL)
        SSL_set_session(c.ssl, saved);
    ERR_clear_error();

    /* the handshake */
    uint64_t unknown_before = s.engine->tls_counts[TLS_UNKNOWN_NAME];
    for (int rounds = 0; rounds < 32 && !c.failed && !s.failed; rounds++) {
        if (rounds == reload_at) {
            /* A reload: the worker gives the engine a new TlsServer and drops the old one
             * (context.py apply_tls); this handshake goes on with the contexts it holds. */
            PyObject *r = PyObject_CallMethod(srv->engine, "set_tls", "O", Py_None);
            if (r == NULL)
                fail("set_tls(None)");
            Py_DECREF(r);
            Py_CLEAR(srv->server);
        }
        if (!c.done) {
            int r = SSL_do_handshake(c.ssl);
            if (r == 1)
                c.done = 1;
            else if (SSL_get_error(c.ssl, r) != SSL_ERROR_WANT_READ)
                c.failed = 1;
            ERR_clear_error();
        }
        int moved = to_server(&c, &s, (size_t)(piece < 0 ? 0 : piece));
        moved |= to_client(&c, &s);
        if (c.done && !s.handshaking)
            break;
        if (!moved && c.done)
            server_step(&s);  /* nothing came: a step as the next epoll event would */
        if (!moved && !c.done && rounds > 2)
            break;
    }
    int ok = c.done && !s.handshaking && !s.failed && s.ssl;
    int acme = alpn_sent && alpn_has(alpn, alpn_len, "acme-tls/1");
    const char *cn = expected_cn(srv, sni, acme);
    const char *proto = cn && strcmp(cn, "acme") == 0 ? "acme-tls/1" : "http/1.1";
    int should = cn != NULL && (!alpn_sent || alpn_has(alpn, alpn_len, proto))
                 && (max13 || !srv->min13);
    if (ok != should) {
        fprintf(stderr, "fuzz_tls: server %d, SNI %s, ALPN sent %d, TLS 1.3 %d: handshake %s, "
                "expected %s (certificate %s)\n", srv->index, sni ? sni : "(none)",
                alpn_sent, max13, ok ? "done" : "failed", should ? "done" : "a failure",
                cn ? cn : "none");
        abort();
    }
    if (getenv("FUZZ_TLS_TRACE"))  /* to see what the seeds reach */
        fprintf(stderr, "server %d SNI %s ALPN %d TLS1.3 %d: %s (%s, %s%s)\n",
                srv->index, sni ? sni : "-", alpn_sent, max13,
                ok ? "done" : "failed", cn ? cn : "none", ok ? SSL_get_version(c.ssl) : "",
                ok && SSL_session_reused(c.ssl) ? " resumed" : "");
    if (cn == NULL && s.engine->tls_counts[TLS_UNKNOWN_NAME] == unknown_before)
        fail("an unknown name was not counted");
    if (ok) {
        if (!cn_is(SSL_get_certificate(s.ssl), cn))
            fail("the server chose another certificate than tls.c's rules say");
        if (!SSL_session_reused(c.ssl) && !cn_is(SSL_get0_peer_certificate(c.ssl), cn))
            fail("the client got another certificate than the rules say");
        const unsigned char *sel;
        unsigned sel_len;
        SSL_get0_alpn_selected(c.ssl, &sel, &sel_len);
        if (alpn_sent && (sel_len != strlen(proto) || memcmp(sel, proto, sel_len) != 0))
            fail("another ALPN protocol than the rules say");
        if (via_conn)
            through_tls_conn(&s, sni, alpn_sent, &drop_conn);
    }

    /* the script: bytes both ways */
    for (int steps = 0; ok && s.ssl && steps < 64 && !c.failed && !c.closed; steps++) {
        int op = take_byte(in);
        if (op < 0)
            break;
        const uint8_t *p;
        size_t n = take_bytes(in, (size_t)take_byte(in) & 0xff, &p);
        uint8_t big[1 << 16];
        if (op & 0x80) {  /* a long run: several records, a full socket */
            size_t want = (size_t)((op >> 3) & 15) * 4096 + 1;
            for (size_t i = 0; i < want; i++)
                big[i] = n ? p[i % n] : (uint8_t)i;
            p = big;
            n = want;
        }
        switch (op & 7) {
        case 0:  /* the client sends */
            if (n && SSL_write(c.ssl, p, (int)n) == (int)n)
                bytes_add(&c.sent, p, n);
            ERR_clear_error();
            to_server(&c, &s, (size_t)(piece < 0 ? 0 : piece));
            check_prefix(&s.got, &c.sent, "client to server");
            break;
        case 1:  /* the engine has bytes for the client; its socket drains or not */
            bytes_add(&s.pending, p, n);
            bytes_add(&s.offered, p, n);
            server_flush(&s);
            if (op & 8) {
                to_client(&c, &s);
                client_read(&c);
            }
            break;
        case 2:  /* the client reads: room again */
            to_client(&c, &s);
            client_read(&c);
            server_flush(&s);
            server_read(&s);
            break;
        case 3:  /* the client asks for a key update (TLS 1.3): the server answers one */
            if (SSL_version(c.ssl) == TLS1_3_VERSION
                && SSL_key_update(c.ssl, SSL_KEY_UPDATE_REQUESTED))
                SSL_do_handshake(c.ssl);
            ERR_clear_error();
            to_server(&c, &s, (size_t)(piece < 0 ? 0 : piece));
            break;
        case 4:  /* the engine closes the session: a close_notify unless quiet */
            settle(&c, &s, (size_t)(piece < 0 ? 0 : piece));
            server_close(&s, op & 8);
            to_client(&c, &s);
            client_read(&c);
            break;
        default:
            settle(&c, &s, (size_t)(piece < 0 ? 0 : piece));
            check_prefix(&s.got, &c.sent, "client to server");
            break;
        }
        /* Bytes may arrive before tls_send counts them: after a WANT_WRITE, SSL_write keeps
         * the records it finished (wnum) and counts them in the retry's answer, which must
         * offer the same bytes (the engine's OutBuf does). */
        check_prefix(&c.got, &s.offered, "server to client");
        if (c.closed && c.got.len < s.taken.len)
            fail("a close_notify came before bytes tls_send had taken");
    }
    /* the end: everything arrives, then a close_notify each way */
    if (ok && !c.failed && s.ssl && !s.failed) {
        settle(&c, &s, (size_t)(piece < 0 ? 0 : piece));
        if (!c.closed && s.pending.len)
            fail("tls_send never took the last bytes");
        check_prefix(&c.got, &s.taken, "server to client");
        if (!c.closed && c.got.len != s.taken.len)
            fail("bytes tls_send took never reached the client");
        if (!s.eof && s.got.len != c.sent.len)
            fail("bytes the client sent never came out of tls_recv");
        if (!c.closed) {
            SSL_shutdown(c.ssl);
            ERR_clear_error();
            to_server(&c, &s, 0);
            server_read(&s);
            if (!s.eof && !s.failed)
                fail("the client's close_notify did not end tls_recv");
            server_close(&s, 1);
            if (s.got.len != c.sent.len)
                fail("bytes before the close_notify were lost");
        }
    }
    if (getenv("FUZZ_TLS_TRACE"))
        fprintf(stderr, "  client sent %zu, server got %zu; server took %zu, client got %zu%s\n",
                c.sent.len, s.got.len, s.taken.len, c.got.len, c.closed ? ", close_notify" : "");
    if (s.ssl)
        server_close(&s, 1);
    to_client(&c, &s);
    client_read(&c);  /* (TLS 1.3 tickets come after the handshake: kept for the next run) */
    SSL_free(c.ssl);
    BIO_free(c.in);
    BIO_free(c.out);
    free(c.sent.p);
    free(c.got.p);
    side_free(&s);
    ERR_clear_error();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Input in = {data, size};
    int choice = take_byte(&in);
    if (choice < 0)
        return 0;
    Server *srv = &servers[(choice & 3) % SERVERS];
    if (!(choice & 4)) {
        raw(&in, srv);
        return 0;
    }
    if (!(choice & 8) || !pending()) {
        client_mode(&in, srv, choice, -1);
        return 0;
    }
    /* a server of its own, replaced during the handshake (at round choice >> 4) */
    Server fresh;
    make_server(&fresh, srv->index);
    client_mode(&in, &fresh, choice, choice >> 4);
    Py_XDECREF(fresh.server);
    Py_DECREF(fresh.engine);
    return 0;
}
