/* What the fuzz targets share: the embedded interpreter, a cursor over the input, and a
 * tunnel driven by a script of socket events and Python calls (driver.c). */

#ifndef CHARON_FUZZ_DRIVER_H
#define CHARON_FUZZ_DRIVER_H

#include "engine.h"  /* first: Python.h before the system headers */

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *p;
    size_t n;
} Input;

int take_byte(Input *in);  /* -1 at the end */
size_t take_bytes(Input *in, size_t want, const uint8_t **out);

void driver_init(void);
PyObject *new_engine(void);
void drop_engine(PyObject *engine);
/* Run a tunnel (started, or dialling when dial is set) through the rest of the input. */
void drive_tunnel(Input *in, int dial);
void check_all_closed(void);

#endif
