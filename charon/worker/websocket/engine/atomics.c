/* 64-bit atomics over a shared writable buffer (the workers' memfd tables, worker/limits/):
 * the one thing Python cannot do itself. Python keeps the policy (what a word means, when to
 * retry); this file only loads, compares-and-swaps and adds aligned 64-bit words, sequentially
 * consistent, bounds-checked. The buffer is taken for the call only (an mmap stays closable). */

#include "engine.h"

#include <stdint.h>

/* The word at `index` of `obj`'s writable buffer, or NULL with an exception set (the buffer
 * is released on failure; on success the caller releases `view`). */
static int64_t *
word_at(PyObject *obj, PyObject *index_obj, Py_buffer *view)
{
    Py_ssize_t index = PyNumber_AsSsize_t(index_obj, PyExc_IndexError);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((uintptr_t)view->buf % sizeof(int64_t) != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the buffer is not 8-byte aligned");
        return NULL;
    }
    Py_ssize_t words = view->len / (Py_ssize_t)sizeof(int64_t);
    if (index < 0 || index >= words) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_IndexError, "word index out of range");
        return NULL;
    }
    return (int64_t *)view->buf + index;
}

static int
take_int64(PyObject *obj, int64_t *out)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)v;
    return 0;
}

PyObject *
engine_atomic_load(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "atomic_load(buffer, index)");
        return NULL;
    }
    Py_buffer view;
    int64_t *w = word_at(args[0], args[1], &view);
    if (w == NULL)
        return NULL;
    int64_t v = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(v);
}

PyObject *
engine_atomic_cas(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "atomic_cas(buffer, index, expected, new)");
        return NULL;
    }
    int64_t expected, desired;
    if (take_int64(args[2], &expected) < 0 || take_int64(args[3], &desired) < 0)
        return NULL;
    Py_buffer view;
    int64_t *w = word_at(args[0], args[1], &view);
    if (w == NULL)
        return NULL;
    int done = __atomic_compare_exchange_n(w, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                           __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyBool_FromLong(done);
}

PyObject *
engine_atomic_add(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "atomic_add(buffer, index, delta)");
        return NULL;
    }
    int64_t delta;
    if (take_int64(args[2], &delta) < 0)
        return NULL;
    Py_buffer view;
    int64_t *w = word_at(args[0], args[1], &view);
    if (w == NULL)
        return NULL;
    /* Wrapping (two's complement) on overflow, done unsigned: signed overflow is undefined. */
    uint64_t v = __atomic_add_fetch((uint64_t *)w, (uint64_t)delta, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong((int64_t)v);
}
