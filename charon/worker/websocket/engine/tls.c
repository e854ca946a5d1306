/* TLS for the front door and the tunnels: OpenSSL sessions owned by the engine from the first
 * byte, so a wss tunnel is copied here like a ws one (Python's ssl cannot hand a session to C).
 *
 * Python keeps the policy: which certificate serves which names, the ciphers, the ticket keys
 * and their rotation (charon/worker/tlsserver.py) are given to a TlsServer, which builds one
 * SSL_CTX per certificate. A handshake starts on the server's base context; the ClientHello
 * callback reads the SNI name (and an ACME tls-alpn-01 offer) and moves the session to the
 * context of the certificate for that name: the exact name, then "*.parent", then the
 * catch-all "*", then the default certificate; none: an unrecognized_name alert, never
 * another host's certificate. Session tickets are sealed with keys Python derives from a secret
 * every worker shares, so a ticket from one worker resumes on any other.
 *
 * TlsConn carries a session from the front door to Python (what it negotiated) and on to a
 * Tunnel (attach_tls). Every OpenSSL error is taken off the thread's error queue here: Python's
 * ssl module (the backends' TLS) reads the same queue. */

#include "engine.h"  /* first: Python.h before the system headers */

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <string.h>
#include <strings.h>

#define MAX_TICKET_KEYS 4
#define MAX_NAME 255
#define TLS_RECORD 16384      /* the largest plaintext of one record */

static const unsigned char ALPN_HTTP[] = "\x08http/1.1";
static const unsigned char ALPN_ACME[] = "\x0a" "acme-tls/1";

typedef struct {
    unsigned char name[16], aes[32], hmac[32];
} TicketKey;

typedef struct {
    char *name;     /* lowercase: "a.example.com", "*.example.com" or "*" */
    SSL_CTX *ctx;   /* a reference of its own */
} NamedContext;

struct TlsServerObject {
    PyObject_HEAD
    SSL_CTX *base;              /* every session starts here */
    NamedContext *names;        /* sorted by name, for bsearch */
    int name_count;
    NamedContext *challenges;   /* ACME tls-alpn-01 certificates by name, sorted */
    int challenge_count;
    SSL_CTX *fallback;          /* [tls] default_certificate, or NULL */
    TicketKey keys[MAX_TICKET_KEYS];  /* keys[0] seals new tickets; all open old ones */
    int key_count;
    double handshake_timeout;
};

/* SSL ex_data slot: the TlsServer a session started with, a reference of the session's own: a
 * reload (set_tls) may drop the server while a handshake is under way, and the ClientHello and
 * ticket callbacks still read it. */
static int session_index = -1;

static void
drop_session_server(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                    void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    Py_XDECREF((PyObject *)ptr);  /* (every SSL_free is engine code: the GIL is held) */
}

static void
clear_errors(void)
{
    ERR_clear_error();
}

static int
set_openssl_error(const char *what)
{
    unsigned long code = ERR_peek_last_error();
    char reason[256] = "";
    if (code)
        ERR_error_string_n(code, reason, sizeof(reason));
    clear_errors();
    PyErr_Format(PyExc_ValueError, "%s: %s", what, code ? reason : "failed");
    return -1;
}

/* -- choosing a context ---------------------------------------------------------------------- */

static int
compare_names(const void *a, const void *b)
{
    return strcmp(((const NamedContext *)a)->name, ((const NamedContext *)b)->name);
}

static SSL_CTX *
find_name(const NamedContext *table, int count, const char *name)
{
    NamedContext key = {(char *)name, NULL};
    const NamedContext *found = count ? bsearch(&key, table, (size_t)count, sizeof(*table),
                                                compare_names) : NULL;
    return found ? found->ctx : NULL;
}

/* The context for an SNI name (lowercase): exact, then one wildcard label, then "*". */
static SSL_CTX *
context_for(const TlsServerObject *srv, const char *name)
{
    SSL_CTX *ctx = find_name(srv->names, srv->name_count, name);
    if (ctx == NULL) {
        const char *dot = strchr(name, '.');
        if (dot != NULL && dot[1] != '\0') {
            char wildcard[MAX_NAME + 2];
            snprintf(wildcard, sizeof(wildcard), "*%s", dot);
            ctx = find_name(srv->names, srv->name_count, wildcard);
        }
    }
    if (ctx == NULL)
        ctx = find_name(srv->names, srv->name_count, "*");
    return ctx;
}

/* The host name of a server_name extension (RFC 6066 3), lowercased; 0 if there is none. */
static int
sni_name(const unsigned char *p, size_t len, char *out)
{
    if (len < 2 || (size_t)((p[0] << 8) | p[1]) != len - 2)
        return 0;
    p += 2;
    len -= 2;
    while (len >= 3) {
        unsigned type = p[0];
        size_t n = (size_t)((p[1] << 8) | p[2]);
        if (n > len - 3)
            return 0;
        if (type == 0) {  /* host_name */
            if (n == 0 || n > MAX_NAME)
                return 0;
            for (size_t i = 0; i < n; i++) {
                unsigned char c = p[3 + i];
                if (c == 0)
                    return 0;
                out[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            }
            out[n] = '\0';
            if (out[n - 1] == '.')  /* an absolute name: the same host */
                out[n - 1] = '\0';
            return out[0] != '\0';
        }
        p += 3 + n;
        len -= 3 + n;
    }
    return 0;
}

/* Whether an ALPN list (RFC 7301 3.1, with its 2-byte length) offers `proto` (length-prefixed). */
static int
alpn_offers(const unsigned char *p, size_t len, const unsigned char *proto)
{
    if (len < 2)
        return 0;
    p += 2;
    len -= 2;
    while (len > 0) {
        size_t n = p[0];
        if (n + 1 > len)
            return 0;
        if (n == proto[0] && memcmp(p + 1, proto + 1, n) == 0)
            return 1;
        p += n + 1;
        len -= n + 1;
    }
    return 0;
}

static int
client_hello(SSL *ssl, int *alert, void *arg)
{
    (void)arg;  /* the session's server is in its ex_data (a reload may replace the engine's) */
    TlsServerObject *srv = SSL_get_ex_data(ssl, session_index);
    EngineObject *e = SSL_get_app_data(ssl);
    if (srv == NULL) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_CLIENT_HELLO_ERROR;
    }
    const unsigned char *p;
    size_t len;
    char name[MAX_NAME + 1];
    int have_name = SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p, &len)
                    && sni_name(p, len, name);
    SSL_CTX *ctx = NULL;
    if (have_name && srv->challenge_count
        && SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_application_layer_protocol_negotiation,
                                     &p, &len)
        && alpn_offers(p, len, ALPN_ACME)) {
        ctx = find_name(srv->challenges, srv->challenge_count, name);
    }
    if (ctx == NULL)
        ctx = have_name ? context_for(srv, name) : find_name(srv->names, srv->name_count, "*");
    if (ctx == NULL)
        ctx = srv->fallback;
    if (ctx == NULL) {
        if (e != NULL)
            e->tls_counts[TLS_UNKNOWN_NAME]++;
        *alert = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_CLIENT_HELLO_ERROR;
    }
    if (SSL_set_SSL_CTX(ssl, ctx) == NULL) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_CLIENT_HELLO_ERROR;
    }
    return SSL_CLIENT_HELLO_SUCCESS;
}

/* ALPN: http/1.1 whenever offered (h2 does not exist here yet); an ACME validation's context
 * answers only acme-tls/1. A client that offers neither gets no_application_protocol. */
static int
alpn_select(SSL *ssl __attribute__((unused)), const unsigned char **out, unsigned char *outlen, const unsigned char *in,
            unsigned int inlen, void *arg)
{
    const unsigned char *want = arg;
    const unsigned char *p = in;
    while (p < in + inlen) {
        unsigned n = p[0];
        if (p + 1 + n > in + inlen)
            break;
        if (n == want[0] && memcmp(p + 1, want + 1, n) == 0) {
            *out = p + 1;
            *outlen = (unsigned char)n;
            return SSL_TLSEXT_ERR_OK;
        }
        p += 1 + n;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* Session tickets: keys[0] seals, any known key opens (2: open, and send a fresh ticket). */
static int
ticket_key(SSL *ssl, unsigned char name[16], unsigned char *iv, EVP_CIPHER_CTX *cipher,
           EVP_MAC_CTX *mac, int enc)
{
    TlsServerObject *srv = SSL_get_ex_data(ssl, session_index);
    if (srv == NULL || srv->key_count == 0)
        return 0;  /* no keys (set_ticket_keys([])): no ticket, not a failed handshake */
    const TicketKey *k = NULL;
    int index = 0;
    if (enc) {
        k = &srv->keys[0];
        memcpy(name, k->name, 16);
        if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) <= 0)
            return -1;
    }
    else {
        for (index = 0; index < srv->key_count; index++)
            if (memcmp(name, srv->keys[index].name, 16) == 0)
                break;
        if (index == srv->key_count)
            return 0;  /* unknown (expired) key: a full handshake */
        k = &srv->keys[index];
    }
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)k->hmac, 32);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (!EVP_MAC_CTX_set_params(mac, params))
        return -1;
    int ok = enc ? EVP_EncryptInit_ex(cipher, EVP_aes_256_cbc(), NULL, k->aes, iv)
                 : EVP_DecryptInit_ex(cipher, EVP_aes_256_cbc(), NULL, k->aes, iv);
    if (!ok)
        return -1;
    return enc || index == 0 ? 1 : 2;
}

/* -- building contexts ----------------------------------------------------------------------- */

typedef struct {
    int min_version;
    const char *ciphers;
    int tickets;
} Settings;

static SSL_CTX *
new_context(const Settings *s, const unsigned char *alpn)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        return NULL;
    /* Partial writes and a moving buffer: the engine's out-buffers compact as they drain.
     * Released buffers: an idle TLS tunnel keeps no 16 KiB read and write buffers. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                              | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION
                                 | (s->tickets ? 0 : SSL_OP_NO_TICKET));
    /* Workers share no session cache: resumption is by ticket only. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    static const unsigned char sid[] = "charon";
    if (!SSL_CTX_set_min_proto_version(ctx, s->min_version)
        || !SSL_CTX_set_cipher_list(ctx, s->ciphers)
        || !SSL_CTX_set_session_id_context(ctx, sid, sizeof(sid) - 1)
        || !SSL_CTX_set_dh_auto(ctx, 1)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, (void *)alpn);
    if (s->tickets)
        SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_key);
    return ctx;
}

/* A context serving the PEM chain (leaf first) and key in `cert` and `key`. */
static SSL_CTX *
certificate_context(const Settings *s, const unsigned char *alpn,
                    Py_buffer *cert, Py_buffer *key)
{
    SSL_CTX *ctx = new_context(s, alpn);
    BIO *bio = NULL;
    X509 *x = NULL;
    EVP_PKEY *pkey = NULL;
    if (ctx == NULL)
        goto fail;
    bio = BIO_new_mem_buf(cert->buf, (int)cert->len);
    if (bio == NULL || (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL
        || !SSL_CTX_use_certificate(ctx, x))
        goto fail;
    X509_free(x);
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL)
        if (!SSL_CTX_add0_chain_cert(ctx, x))  /* takes x on success */
            goto fail;
    clear_errors();  /* the end of the PEM text reads as an error */
    BIO_free(bio);
    bio = BIO_new_mem_buf(key->buf, (int)key->len);
    if (bio == NULL || (pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL
        || !SSL_CTX_use_PrivateKey(ctx, pkey) || !SSL_CTX_check_private_key(ctx))
        goto fail;
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    return ctx;
fail:
    X509_free(x);
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    SSL_CTX_free(ctx);
    return NULL;
}

static void
free_names(NamedContext *table, int count)
{
    for (int i = 0; i < count; i++) {
        PyMem_Free(table[i].name);
        SSL_CTX_free(table[i].ctx);
    }
    PyMem_Free(table);
}

/* `items`: a list of (names, cert PEM, key PEM); every name of an item maps to its context. */
static int
build_names(const Settings *s, const unsigned char *alpn, PyObject *items,
            NamedContext **table_out, int *count_out)
{
    PyObject *seq = PySequence_Fast(items, "expected a list of (names, cert, key)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    NamedContext *table = NULL;
    int count = 0, cap = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *names;
        Py_buffer cert, key;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "Oy*y*", &names, &cert, &key))
            goto fail;
        SSL_CTX *ctx = certificate_context(s, alpn, &cert, &key);
        PyBuffer_Release(&cert);
        PyBuffer_Release(&key);
        if (ctx == NULL) {
            set_openssl_error("cannot use a certificate and key");
            goto fail;
        }
        PyObject *names_seq = PySequence_Fast(names, "names must be a sequence of str");
        if (names_seq == NULL) {
            SSL_CTX_free(ctx);
            goto fail;
        }
        for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(names_seq); j++) {
            const char *name = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(names_seq, j));
            if (name == NULL || strlen(name) > MAX_NAME + 1) {
                if (name != NULL)
                    PyErr_SetString(PyExc_ValueError, "name too long");
                Py_DECREF(names_seq);
                SSL_CTX_free(ctx);
                goto fail;
            }
            if (count == cap) {
                cap = cap ? 2 * cap : 16;
                NamedContext *t = PyMem_Realloc(table, (size_t)cap * sizeof(*t));
                if (t == NULL) {
                    PyErr_NoMemory();
                    Py_DECREF(names_seq);
                    SSL_CTX_free(ctx);
                    goto fail;
                }
                table = t;
            }
            size_t len = strlen(name);
            char *copy = PyMem_Malloc(len + 1);
            if (copy == NULL) {
                PyErr_NoMemory();
                Py_DECREF(names_seq);
                SSL_CTX_free(ctx);
                goto fail;
            }
            memcpy(copy, name, len + 1);
            SSL_CTX_up_ref(ctx);
            table[count].name = copy;
            table[count].ctx = ctx;
            count++;
        }
        Py_DECREF(names_seq);
        SSL_CTX_free(ctx);  /* the table holds its references */
    }
    Py_DECREF(seq);
    if (count)
        qsort(table, (size_t)count, sizeof(*table), compare_names);
    *table_out = table;
    *count_out = count;
    return 0;
fail:
    Py_DECREF(seq);
    free_names(table, count);
    return -1;
}

static void
TlsServer_dealloc(TlsServerObject *srv)
{
    free_names(srv->names, srv->name_count);
    free_names(srv->challenges, srv->challenge_count);
    SSL_CTX_free(srv->fallback);
    SSL_CTX_free(srv->base);
    OPENSSL_cleanse(srv->keys, sizeof(srv->keys));
    Py_TYPE(srv)->tp_free((PyObject *)srv);
}

static int
set_keys(TlsServerObject *srv, PyObject *keys)
{
    PyObject *seq = PySequence_Fast(keys, "ticket keys must be a list of 80-byte keys");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_TICKET_KEYS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d ticket keys", MAX_TICKET_KEYS);
        return -1;
    }
    TicketKey fresh[MAX_TICKET_KEYS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(k) || PyBytes_GET_SIZE(k) != 80) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "a ticket key is 80 bytes (name, AES, HMAC)");
            return -1;
        }
        const char *b = PyBytes_AS_STRING(k);
        memcpy(fresh[i].name, b, 16);
        memcpy(fresh[i].aes, b + 16, 32);
        memcpy(fresh[i].hmac, b + 48, 32);
    }
    Py_DECREF(seq);
    memcpy(srv->keys, fresh, sizeof(fresh));
    srv->key_count = (int)n;
    OPENSSL_cleanse(fresh, sizeof(fresh));
    return 0;
}

static PyObject *
TlsServer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"certificates", "default", "challenges", "ciphers", "min_version",
                             "ticket_keys", "handshake_timeout", NULL};
    PyObject *certs, *fallback, *challenges, *keys;
    const char *ciphers;
    int min_version;
    double timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOsiOd:TlsServer", kwlist, &certs, &fallback,
                                     &challenges, &ciphers, &min_version, &keys, &timeout))
        return NULL;
    if (min_version != TLS1_2_VERSION && min_version != TLS1_3_VERSION) {
        PyErr_SetString(PyExc_ValueError, "min_version: 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3)");
        return NULL;
    }
    TlsServerObject *srv = (TlsServerObject *)type->tp_alloc(type, 0);
    if (srv == NULL)
        return NULL;
    srv->handshake_timeout = timeout;
    Settings s = {min_version, ciphers, PySequence_Check(keys) && PySequence_Size(keys) > 0};
    if (set_keys(srv, keys) < 0)
        goto fail;
    srv->base = new_context(&s, ALPN_HTTP);
    if (srv->base == NULL) {
        set_openssl_error("cannot make a TLS context");
        goto fail;
    }
    SSL_CTX_set_client_hello_cb(srv->base, client_hello, NULL);
    if (build_names(&s, ALPN_HTTP, certs, &srv->names, &srv->name_count) < 0
        || build_names(&s, ALPN_ACME, challenges, &srv->challenges,
                       &srv->challenge_count) < 0)
        goto fail;
    if (fallback != Py_None) {
        Py_buffer cert, key;
        if (!PyArg_ParseTuple(fallback, "y*y*", &cert, &key))
            goto fail;
        srv->fallback = certificate_context(&s, ALPN_HTTP, &cert, &key);
        PyBuffer_Release(&cert);
        PyBuffer_Release(&key);
        if (srv->fallback == NULL) {
            set_openssl_error("cannot use the default certificate");
            goto fail;
        }
    }
    clear_errors();
    return (PyObject *)srv;
fail:
    clear_errors();
    Py_DECREF(srv);
    return NULL;
}

static PyObject *
TlsServer_set_ticket_keys(TlsServerObject *srv, PyObject *keys)
{
    if (srv->base == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TlsServer not initialised");
        return NULL;
    }
    if (set_keys(srv, keys) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
TlsServer_get_names(TlsServerObject *srv, void *Py_UNUSED(c))
{
    PyObject *list = PyList_New(srv->name_count);
    for (int i = 0; list != NULL && i < srv->name_count; i++) {
        PyObject *s = PyUnicode_FromString(srv->names[i].name);
        if (s == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, s);
    }
    return list;
}

static PyMethodDef TlsServer_methods[] = {
    {"set_ticket_keys", (PyCFunction)TlsServer_set_ticket_keys, METH_O,
     "Replace the session ticket keys (80 bytes each: name, AES-256, HMAC-SHA256); the first "
     "seals new tickets."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef TlsServer_getset[] = {
    {"names", (getter)TlsServer_get_names, NULL, "the names with a certificate, sorted", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TlsServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "charon.worker.websocket._engine.TlsServer",
    .tp_basicsize = sizeof(TlsServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TlsServer(certificates, default, challenges, ciphers, min_version, ticket_keys, "
              "handshake_timeout): the certificates and settings of the TLS listeners.",
    .tp_new = TlsServer_new,
    .tp_dealloc = (destructor)TlsServer_dealloc,
    .tp_methods = TlsServer_methods,
    .tp_getset = TlsServer_getset,
};

/* -- sessions -------------------------------------------------------------------------------- */

SSL *
tls_new_session(EngineObject *e, int fd)
{
    if (e->tls == NULL)
        return NULL;
    SSL *ssl = SSL_new(e->tls->base);
    if (ssl == NULL || !SSL_set_fd(ssl, fd) || !SSL_set_ex_data(ssl, session_index, e->tls)) {
        SSL_free(ssl);
        clear_errors();
        return NULL;
    }
    Py_INCREF(e->tls);  /* the session's: drop_session_server gives it back at SSL_free */
    SSL_set_app_data(ssl, e);
    SSL_set_accept_state(ssl);
    return ssl;
}

/* The handshake is over: the session's callbacks no longer run (no renegotiation, no tickets
 * sent later), so it lets its TlsServer go; a long tunnel must not keep every certificate of
 * an old config. */
void
tls_release_server(SSL *ssl)
{
    PyObject *srv = SSL_get_ex_data(ssl, session_index);
    if (srv != NULL) {
        SSL_set_ex_data(ssl, session_index, NULL);
        Py_DECREF(srv);
    }
}

double
tls_handshake_timeout(const TlsServerObject *srv)
{
    return srv ? srv->handshake_timeout : 10.0;
}

/* Read plaintext into buf, whole records while at least one more fits. Bytes read (> 0), 0 at
 * the peer's close_notify or EOF, -1 on an error, -2 if nothing is there now. *drained: the
 * socket was empty (1) or OpenSSL must write first (2), else 0 (more may be there). */
ssize_t
tls_recv(SSL *ssl, uint8_t *buf, size_t cap, int *drained)
{
    size_t got = 0;
    *drained = 0;
    while (cap - got >= TLS_RECORD) {
        int r = SSL_read(ssl, buf + got, (int)(cap - got));
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        int err = SSL_get_error(ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            *drained = err == SSL_ERROR_WANT_READ ? 1 : 2;
            break;
        }
        clear_errors();
        if (got)
            return (ssize_t)got;  /* the end (it stays) is read next time */
        return err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL ? 0 : -1;
    }
    clear_errors();
    return got ? (ssize_t)got : -2;
}

/* Send plaintext: how many bytes OpenSSL took (a retry must offer the same bytes first), or -1
 * if the peer is gone. */
ssize_t
tls_send(SSL *ssl, const uint8_t *p, size_t n)
{
    size_t sent = 0;
    while (sent < n) {
        size_t chunk = n - sent > INT32_MAX ? INT32_MAX : n - sent;
        int r = SSL_write(ssl, p + sent, (int)chunk);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        int err = SSL_get_error(ssl, r);
        clear_errors();
        if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ)
            break;
        return -1;
    }
    return (ssize_t)sent;
}

/* The end of a session: a close_notify unless `quiet` (a reset, or a peer that is gone), then
 * free. The socket is the caller's to close. */
void
tls_close(SSL *ssl, int quiet)
{
    if (ssl == NULL)
        return;
    if (!quiet && SSL_is_init_finished(ssl))
        SSL_shutdown(ssl);  /* non-blocking, once: no wait for the peer's close_notify */
    SSL_free(ssl);
    clear_errors();
}

/* -- TlsConn: a session on its way from the front door to a tunnel --------------------------- */

typedef struct {
    PyObject_HEAD
    SSL *ssl;
} TlsConnObject;

PyObject *
tls_conn_new(SSL *ssl)
{
    TlsConnObject *c = PyObject_New(TlsConnObject, &TlsConnType);
    if (c != NULL)
        c->ssl = ssl;
    return (PyObject *)c;
}

/* The session, now the caller's (NULL with an exception if there is none). */
SSL *
tls_conn_take(PyObject *conn)
{
    if (!PyObject_TypeCheck(conn, &TlsConnType)) {
        PyErr_SetString(PyExc_TypeError, "expected a TlsConn");
        return NULL;
    }
    TlsConnObject *c = (TlsConnObject *)conn;
    SSL *ssl = c->ssl;
    c->ssl = NULL;
    if (ssl == NULL)
        PyErr_SetString(PyExc_RuntimeError, "this TlsConn's session was taken already");
    return ssl;
}

static void
TlsConn_dealloc(TlsConnObject *c)
{
    tls_close(c->ssl, 1);
    PyObject_Free(c);
}

static PyObject *
TlsConn_info(TlsConnObject *c, PyObject *Py_UNUSED(ignored))
{
    if (c->ssl == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this TlsConn's session was taken already");
        return NULL;
    }
    const char *name = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
    PyObject *server_name = Py_NewRef(Py_None);
    if (name != NULL) {
        /* As the certificate was chosen: lowercase, without an absolute name's dot. */
        char lower[MAX_NAME + 1];
        size_t n = strlen(name);
        if (n > MAX_NAME)
            n = MAX_NAME;
        for (size_t i = 0; i < n; i++)
            lower[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] + 32 : name[i]);
        if (n && lower[n - 1] == '.')
            n--;
        Py_DECREF(server_name);
        server_name = PyUnicode_DecodeLatin1(lower, (Py_ssize_t)n, "replace");
        if (server_name == NULL)
            return NULL;
    }
    PyObject *proto = Py_NewRef(Py_None);
    if (alpn_len) {
        Py_DECREF(proto);
        proto = PyUnicode_DecodeLatin1((const char *)alpn, (Py_ssize_t)alpn_len, "replace");
        if (proto == NULL) {
            Py_DECREF(server_name);
            return NULL;
        }
    }
    return Py_BuildValue("(NNssO)", server_name, proto, SSL_get_version(c->ssl),
                         SSL_get_cipher_name(c->ssl),
                         SSL_session_reused(c->ssl) ? Py_True : Py_False);
}

static PyMethodDef TlsConn_methods[] = {
    {"info", (PyCFunction)TlsConn_info, METH_NOARGS,
     "(server name or None, ALPN protocol or None, version, cipher, resumed)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject TlsConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "charon.worker.websocket._engine.TlsConn",
    .tp_basicsize = sizeof(TlsConnObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A TLS session the front door set up, until a Tunnel takes it (attach_tls).",
    .tp_dealloc = (destructor)TlsConn_dealloc,
    .tp_methods = TlsConn_methods,
};

int
tls_module_init(void)
{
    session_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, drop_session_server);
    return session_index < 0 ? -1 : 0;
}
