#!/usr/bin/env bash
# Install Charon into ./.venv on a fresh Debian machine (run as root, or as a user with sudo).
#   deploy/bootstrap.sh          runtime only
#   deploy/bootstrap.sh --test   plus what the tests need (used by tests/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

. deploy/apt.sh  # as_root, apt_get (waits for the dpkg lock)

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
    apt_get update -qq
    apt_get install -y -qq "${apt_packages[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The exact versions tested (constraints.txt); pyproject.toml only gives compatible ranges.
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
else
    .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
echo "charon installed in $(pwd)/.venv: run .venv/bin/charon demo"
