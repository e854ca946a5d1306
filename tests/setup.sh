#!/usr/bin/env bash
# Everything the test suite needs, installed by the project itself (root or sudo):
# Charon with its test extras in ./.venv, and the real peers the tests start (nginx,
# Prometheus with promtool and Pebble, the ACME test server, from Debian, the Autobahn suite
# from ../shared/autobahn when that folder exists, else a note saying how to get it), and
# systemd's tools for tests/test_systemd.py (systemd-analyze, systemd-socket-activate; the
# package installs no running systemd here). apt waits for the dpkg lock (deploy/apt.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

. deploy/apt.sh  # as_root, apt_get (waits for the dpkg lock)

deploy/bootstrap.sh --test  # Charon and the test extras, at the versions of constraints.txt

need=()
# clang with the libFuzzer and sanitizer runtimes for the engine's fuzz targets
# (tests/test_engine_fuzz.py), objcopy for their socket model (binutils, already with gcc).
for cmd_pkg in nginx:nginx-light wrk:wrk curl:curl promtool:prometheus systemd-analyze:systemd \
        pebble:pebble \
        clang:clang objcopy:binutils; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt_get update -qq
    apt_get install -y -qq "${need[@]}"
fi

if ! [ -e "$(clang -print-file-name=libclang_rt.fuzzer-x86_64.a)" ]; then
    apt_get update -qq
    apt_get install -y -qq "libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev"
fi

# Headless Chromium for the live log page test (tests/test_live_log_page.py), without the
# desktop extras it recommends.
if [ ! -x /usr/bin/chromium ]; then
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends chromium
fi

if [ -x ../shared/autobahn/setup_autobahn.sh ]; then
    ../shared/autobahn/setup_autobahn.sh >/dev/null
else
    cat >&2 <<EOF
NOTE: the Autobahn|Testsuite harness is missing, so tests/test_autobahn.py will be skipped.
  It is not part of this repository: it lives in the project's shared folder, as
  $(cd .. && pwd)/shared/autobahn (setup_autobahn.sh, backend.sh, autobahn_through.sh and
  the Python 3 patches in autobahn-py3/). Copy or link that folder there, e.g.
    mkdir -p ../shared && cp -r /path/to/shared/autobahn ../shared/
  then run tests/setup.sh again (setup_autobahn.sh builds its venv, about 15 s).
EOF
fi
echo "test dependencies ready"
