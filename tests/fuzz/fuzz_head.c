/* libFuzzer target: the front door's head splitter (door.c: head_end, split_head,
 * split_fields, has_token) on any bytes. What it accepts must be what its callers rely on:
 * every part inside the head, the head inside the read, names made of token characters,
 * values free of CR, LF and NUL, and an Upgrade field naming websocket. */

#include "driver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void
fail(const char *why)
{
    fprintf(stderr, "split_head: %s\n", why);
    abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 16)
        return 0;
    /* A copy of exactly size bytes: a read past it is an overflow ASan sees. */
    uint8_t *p = malloc(size ? size : 1);
    memcpy(p, data, size);
    uint32_t n = (uint32_t)size;
    uint32_t end = head_end(p, n);
    if (end && (end > n || end < 4 || memcmp(p + end - 4, "\r\n\r\n", 4) != 0))
        fail("head_end");
    SplitHead h;
    if (split_head(p, n, &h)) {
        if (h.head_len != end || h.target_len == 0 || h.count > MAX_FAST_FIELDS)
            fail("lengths");
        int upgrade = 0;
        for (uint32_t i = 0; i < h.count; i++) {
            if (h.name_len[i] == 0 || h.name_off[i] + h.name_len[i] > end
                || h.value_off[i] + h.value_len[i] > end)
                fail("a part outside the head");
            if (p[h.name_off[i] + h.name_len[i]] != ':')
                fail("a name not ended by its colon");
            for (uint32_t k = 0; k < h.value_len[i]; k++) {
                uint8_t c = p[h.value_off[i] + k];
                if (c == '\r' || c == '\n' || c == 0)
                    fail("CR, LF or NUL in a value");
            }
            if (lower_equals(p + h.name_off[i], h.name_len[i], "upgrade")
                && has_token(p + h.value_off[i], h.value_len[i], "websocket"))
                upgrade = 1;
        }
        if (!upgrade)
            fail("no Upgrade: websocket");
    }
    /* The response side's use of split_fields (dial.c), from every line start. */
    for (uint32_t at = 0; at < n && at < 64; at++) {
        SplitHead r;
        if (split_fields(p, at, n, &r) && (r.count > MAX_FAST_FIELDS || n - at < 2))
            fail("split_fields");
    }
    has_token(p, n, "websocket");
    free(p);
    return 0;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    driver_init();
    return 0;
}
