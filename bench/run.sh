#!/usr/bin/env bash
# Charon vs nginx vs the direct backend, in one run. Options: bench/run.sh --help
# Installs nginx and wrk from Debian if missing (as root, or via sudo when not root).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
if [ ! -x "$py" ]; then
    py="$(command -v python3)"
    echo "[bench] no .venv/bin/python; using $py (Charon needs the venv)" >&2
fi
exec "$py" "$here/run.py" "$@"
