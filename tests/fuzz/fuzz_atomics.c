/* libFuzzer target: the shared tables' atomics (atomics.c) under random sequences of loads,
 * compare-and-swaps and adds on a buffer of a few words, checked against a plain array: every
 * result and every word must match the model; an index outside the buffer (negative, huge,
 * not an int) must raise IndexError and change nothing; a misaligned view ValueError; a
 * read-only buffer BufferError. */

#include "driver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORDS 32

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    driver_init();
    return 0;
}

static void
fail(const char *why)
{
    fprintf(stderr, "atomics: %s\n", why);
    abort();
}

static int64_t
take_i64(Input *in)
{
    const uint8_t *p;
    size_t n = take_bytes(in, 8, &p);
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = v << 8 | p[i];
    return (int64_t)v;
}

/* The call's result, or NULL with `expected` raised (then cleared); any other outcome aborts. */
static PyObject *
call(PyObject *(*fn)(PyObject *, PyObject *const *, Py_ssize_t), PyObject *const *args,
     Py_ssize_t n, PyObject *expected)
{
    PyObject *r = fn(NULL, args, n);
    if (expected == NULL) {
        if (r == NULL) {
            PyErr_Print();
            fail("an exception from a valid call");
        }
        return r;
    }
    if (r != NULL || !PyErr_ExceptionMatches(expected))
        fail("not the expected exception");
    PyErr_Clear();
    return NULL;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Input in = {data, size};
    int a = take_byte(&in), b = take_byte(&in);
    if (a < 0 || b < 0)
        return 0;
    Py_ssize_t words = 1 + a % MAX_WORDS;
    int offset = b % 8 ? (b & 0x80 ? b % 8 : 0) : 0; /* mostly aligned */
    int64_t model[MAX_WORDS] = {0};
    PyObject *array = PyByteArray_FromStringAndSize(NULL, (words + 1) * 8);
    if (array == NULL)
        abort();
    char *base = PyByteArray_AS_STRING(array);
    memset(base, 0, (size_t)(words + 1) * 8);
    /* A view starting `offset` bytes in: aligned only if the array's storage plus it is. */
    PyObject *whole = PyMemoryView_FromObject(array);
    PyObject *buffer = PySequence_GetSlice(whole, offset, offset + words * 8);
    Py_DECREF(whole);
    if (buffer == NULL)
        abort();
    int aligned = ((uintptr_t)base + (uintptr_t)offset) % 8 == 0;
    PyObject *readonly = PyBytes_FromStringAndSize(NULL, 8);
    if (readonly == NULL)
        abort();
    memset(PyBytes_AS_STRING(readonly), 0, 8);

    int op;
    while ((op = take_byte(&in)) >= 0) {
        int raw = take_byte(&in);
        if (raw < 0)
            break;
        /* Mostly in range; else negative, just past the end, huge, or not an int at all. */
        PyObject *index;
        Py_ssize_t i = raw % words;
        int valid = aligned;
        switch (raw >> 6) {
        case 0:
        case 1:
            index = PyLong_FromSsize_t(i);
            break;
        case 2:
            index = PyLong_FromSsize_t(raw & 1 ? -1 - i : words + i);
            valid = 0;
            break;
        default:
            index = raw & 1 ? PyLong_FromUnsignedLongLong((uint64_t)take_i64(&in) | 1ULL << 63)
                            : PyUnicode_FromString("0");
            valid = 0;
        }
        if (index == NULL)
            abort();
        PyObject *target = buffer;
        PyObject *expected = NULL;
        if ((op & 0x30) == 0x30) {
            target = readonly;
            expected = valid ? PyExc_BufferError : NULL;
        }
        if (expected == NULL && !valid) {
            /* The index is read first (a str: TypeError, past Py_ssize_t: IndexError), then
             * the buffer's alignment, then the bounds. */
            if ((raw >> 6) == 3)
                expected = raw & 1 ? PyExc_IndexError : PyExc_TypeError;
            else if (!aligned)
                expected = PyExc_ValueError;
            else
                expected = PyExc_IndexError;
        }
        /* (a read-only buffer with a bad index: which check comes first is not the point) */
        int loose = target == readonly && !valid;
        int64_t x = take_i64(&in), y = take_i64(&in);
        PyObject *vx = PyLong_FromLongLong(x), *vy = PyLong_FromLongLong(y);
        PyObject *r = NULL;
        switch (op % 3) {
        case 0: {
            PyObject *args[] = {target, index};
            r = loose ? engine_atomic_load(NULL, args, 2) : call(engine_atomic_load, args, 2, expected);
            if (r != NULL && PyLong_AsLongLong(r) != model[i])
                fail("load");
            break;
        }
        case 1: {
            /* The expected value is the model's word half the time (a CAS that succeeds). */
            int64_t want = op & 0x40 ? model[i] : x;
            PyObject *vw = PyLong_FromLongLong(want);
            PyObject *args[] = {target, index, vw, vy};
            r = loose ? engine_atomic_cas(NULL, args, 4) : call(engine_atomic_cas, args, 4, expected);
            if (r != NULL) {
                int swapped = r == Py_True;
                if (swapped != (want == model[i]))
                    fail("cas result");
                if (swapped)
                    model[i] = y;
            }
            Py_DECREF(vw);
            break;
        }
        default: {
            PyObject *args[] = {target, index, vx};
            r = loose ? engine_atomic_add(NULL, args, 3) : call(engine_atomic_add, args, 3, expected);
            if (r != NULL) {
                model[i] = (int64_t)((uint64_t)model[i] + (uint64_t)x);
                if (PyLong_AsLongLong(r) != model[i])
                    fail("add");
            }
        }
        }
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
        Py_DECREF(vx);
        Py_DECREF(vy);
        Py_DECREF(index);
        /* Every word as the model says; the guard word past the view untouched. */
        for (Py_ssize_t k = 0; k < words; k++) {
            int64_t w;
            memcpy(&w, base + offset + k * 8, 8);
            if (w != model[k])
                fail("a word differs from the model");
        }
        for (int k = 0; k < 8 - offset; k++)
            if (base[offset + words * 8 + k] != 0)
                fail("a byte past the buffer changed");
    }
    /* Wrong argument counts are refused. */
    PyObject *args[] = {buffer, buffer, buffer, buffer};
    call(engine_atomic_load, args, 1, PyExc_TypeError);
    call(engine_atomic_cas, args, 3, PyExc_TypeError);
    call(engine_atomic_add, args, 4, PyExc_TypeError);
    Py_DECREF(readonly);
    Py_DECREF(buffer);
    Py_DECREF(array);
    return 0;
}
