#!/usr/bin/env bash
# Install Charon into ./.venv on a fresh Debian machine (run as root, or as a user with sudo).
#   deploy/bootstrap.sh          runtime only
#   deploy/bootstrap.sh --test   plus what the tests need (used by tests/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=()
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || apt_packages+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
# The WebSocket tunnel engine is a C extension: a compiler, the C library's and Python's headers.
if ! command -v gcc >/dev/null 2>&1; then
    apt_packages+=(gcc libc6-dev)
elif ! echo '#include <sys/epoll.h>' | gcc -E -x c - >/dev/null 2>&1; then
    apt_packages+=(libc6-dev)
fi
# The engine terminates TLS itself (it links OpenSSL): libssl's headers.
echo '#include <openssl/ssl.h>' | gcc -E -x c - >/dev/null 2>&1 || apt_packages+=(libssl-dev)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || apt_packages+=(python3-dev)
if [ "${#apt_packages[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    .venv/bin/python -m pip install -q -e .
fi
echo "charon installed in $(pwd)/.venv: run .venv/bin/charon demo"
