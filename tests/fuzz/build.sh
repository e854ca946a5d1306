#!/usr/bin/env bash
# Builds the engine's libFuzzer targets into OUT (default tests/fuzz/out): the engine's own .c
# files compiled by clang with AddressSanitizer and UndefinedBehaviorSanitizer, their socket
# calls renamed to the model's (syms.txt, model.c), linked with the Python the tests run
# (PYTHON, default python3) since the engine is a CPython extension. Needs Debian's clang and
# libclang-rt-*-dev (tests/setup.sh installs them).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
engine="$here/../../charon/worker/websocket/engine"
out="${1:-$here/out}"
python="${PYTHON:-python3}"
cc="${CC:-clang}"
mkdir -p "$out/obj"

read -r pyinc pylib pyver pylibpl < <("$python" -c 'import sysconfig as s; print(s.get_paths()["include"], s.get_config_var("LIBDIR"), s.get_config_var("LDVERSION"), s.get_config_var("LIBPL"))')
if [ -e "$pylib/libpython$pyver.so" ]; then
    pylink="-L$pylib -lpython$pyver -Wl,-rpath,$pylib"
else  # a Python built without --enable-shared: its static library (python3-config --embed)
    pylink="-L$pylibpl -lpython$pyver $("$python" -c 'import sysconfig as s; print(s.get_config_var("LIBS"), s.get_config_var("SYSLIBS"))') -Wl,-E"
fi
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
cflags="-g -O1 -fno-omit-frame-pointer $san -I$pyinc -I$engine -I$here -Wall -Wno-unused-parameter"

for src in "$engine"/*.c; do
    obj="$out/obj/$(basename "${src%.c}").o"
    # The engine's calls instrumented for coverage too (fuzzer-no-link), then renamed.
    $cc $cflags -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
    objcopy --redefine-syms="$here/syms.txt" "$obj"
done
for src in model driver; do
    $cc $cflags -c "$here/$src.c" -o "$out/obj/$src.o"
done
for target in fuzz_head fuzz_tunnel fuzz_dial fuzz_door fuzz_tls fuzz_atomics; do
    $cc $cflags -fsanitize=fuzzer "$here/$target.c" "$out"/obj/*.o \
        $pylink -lssl -lcrypto -lm -o "$out/$target"
done
echo "built in $out"
