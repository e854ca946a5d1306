/* libFuzzer target: a dialling tunnel (Tunnel.dial): the backend's answer
 * (dial.c: the head's end, the 101 handed to Python, which switches or takes it back), then the
 * tunnel it opens, under a script of reads cut anywhere,
 * slow peers, FINs, resets, proxy frames, Pong watches and finish(): the frame walker
 * (walk.c) and the buffers and closing (sockets.c, tunnel_type.c). */

#include "driver.h"
#include "model.h"

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    driver_init();
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Input in = {data, size};
    model_reset();
    drive_tunnel(&in, 1);
    return 0;
}
