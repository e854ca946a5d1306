#!/usr/bin/env bash
# Everything the test suite needs, installed by the project itself (root or sudo):
# Charon with its test extras in ./.venv, and the real peers the tests start (nginx,
# Prometheus with promtool and Pebble, the ACME test server, from Debian, the Autobahn suite
# from ../shared/autobahn when that folder exists), and systemd's tools for tests/test_systemd.py (systemd-analyze,
# systemd-socket-activate; the package installs no running systemd here).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

deploy/bootstrap.sh --test

need=()
# clang with the libFuzzer and sanitizer runtimes for the engine's fuzz targets
# (tests/test_engine_fuzz.py), objcopy for their socket model (binutils, already with gcc).
for cmd_pkg in nginx:nginx-light wrk:wrk curl:curl promtool:prometheus systemd-analyze:systemd \
        pebble:pebble \
        clang:clang objcopy:binutils; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

if ! [ -e "$(clang -print-file-name=libclang_rt.fuzzer-x86_64.a)" ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev"
fi

# Headless Chromium for the live log page test (tests/test_live_log_page.py), without the
# desktop extras it recommends.
if [ ! -x /usr/bin/chromium ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium
fi

if [ -x ../shared/autobahn/setup_autobahn.sh ]; then
    ../shared/autobahn/setup_autobahn.sh >/dev/null
fi
echo "test dependencies ready"
