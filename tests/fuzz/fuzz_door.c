/* libFuzzer target: the front door (door.c) under a script of connections: accepted with a
 * first read of any bytes, silent ones that wait and then speak or expire, a full fd table,
 * connections Python accepted itself and admits (a PROXY listener's, plain or TLS: with no
 * TlsServer set, admit refuses a TLS one and Python closes it), and Engine.run() handing the
 * arrivals (heads split) to Python, which closes them. At the end every connection is closed
 * exactly once. */

#include "driver.h"
#include "model.h"

#include <errno.h>
#include <string.h>

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    driver_init();
    return 0;
}

/* Python's side of run(): take the arrivals and close them (uvloop would own them). */
static void
run_and_take(PyObject *engine)
{
    PyObject *out = PyObject_CallMethod(engine, "run", NULL);
    if (out == NULL) {
        PyErr_Print();
        abort();
    }
    if (PyTuple_Check(out) && PyTuple_GET_ITEM(out, 1) != Py_None) {
        PyObject *arrivals = PyTuple_GET_ITEM(out, 1);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arrivals); i++)
            model_close((int)PyLong_AsLong(PyTuple_GET_ITEM(PyList_GET_ITEM(arrivals, i), 0)));
    }
    Py_DECREF(out);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Input in = {data, size};
    model_reset();
    PyObject *engine = new_engine();
    EngineObject *e = (EngineObject *)engine;
    int lfd = model_new_fd();
    PyObject *r = PyObject_CallMethod(engine, "listen", "i", lfd);
    if (r == NULL)
        abort();
    Py_DECREF(r);
    for (int steps = 0; steps < 128; steps++) {
        int op = take_byte(&in);
        if (op < 0)
            break;
        const uint8_t *p;
        size_t n;
        switch (op % 5) {
        case 0:  /* connections arrive, the first with bytes already sent */
            n = take_bytes(&in, (size_t)take_byte(&in) & 0xff, &p);
            model_accept_left = 1 + (op >> 3);
            for (int i = 0; i < MODEL_FDS; i++)
                if (!model[i].used) {
                    /* the next fd accept4 gives: what its client sent with the connect */
                    model[i].used = 1;
                    model_give(MODEL_FD_BASE + i, p, n);
                    model[i].used = 0;
                    break;
                }
            e->in_run = 1;
            accept_ready(e, lfd, 0);
            e->in_run = 0;
            model_accept_left = 0;
            break;
        case 1: {  /* a waiting connection speaks (or is reset, or closes) */
            int fd = MODEL_FD_BASE + (op >> 3) % MODEL_FDS;
            if (!model[fd - MODEL_FD_BASE].used || model[fd - MODEL_FD_BASE].closed)
                break;
            n = take_bytes(&in, (size_t)take_byte(&in) & 0xff, &p);
            if (n)
                model_give(fd, p, n);
            else if (op & 4)
                model[fd - MODEL_FD_BASE].error = ECONNRESET;
            else
                model[fd - MODEL_FD_BASE].eof = 1;
            if (model[fd - MODEL_FD_BASE].registered) {
                e->in_run = 1;
                first_read_ready(e, fd);
                e->in_run = 0;
            }
            break;
        }
        case 2:  /* time passes */
            expire_waiting(e, e->now + WAIT_LIMIT * (op >> 3));
            break;
        case 4:
            if (op & 8) {  /* Python admits a connection it accepted (bytes may follow) */
                int fd = model_new_fd();
                if (fd < 0)
                    break;
                n = take_bytes(&in, (size_t)take_byte(&in) & 0xff, &p);
                if (n)
                    model_give(fd, p, n);
                PyObject *r = PyObject_CallMethod(engine, "admit", "isi", fd,
                                                  op & 16 ? "2001:db8::1" : "192.0.2.1",
                                                  (op & 32) != 0);
                if (r == NULL) {
                    PyErr_Clear();
                    model_close(fd);  /* refused: still Python's */
                }
                Py_XDECREF(r);
                break;
            }
            /* fall through */
        default:
            run_and_take(engine);
            break;
        }
    }
    drop_engine(engine);
    model_close(lfd);
    check_all_closed();
    return 0;
}
