#!/usr/bin/env bash
# The full Autobahn|Testsuite profile (517 cases, permessage-deflate groups 12 and 13 included),
# run directly against the reference echo backend and through Charon, then compared case by case.
# About 10 minutes per run on 2 cores. Needs ../shared/autobahn (see its README).
#   bench/autobahn_full.sh [OUTDIR]        exit 0 when no case scores worse through Charon
set -euo pipefail
cd "$(dirname "$0")/.."
AB="$(cd ../shared/autobahn && pwd)"
OUT="${1:-bench/out/autobahn-full}"
BACKEND_PORT=19301 PROXY_PORT=19302 ADMIN_PORT=19303
mkdir -p "$OUT"
"$AB/setup_autobahn.sh" >/dev/null

conf="$OUT/charon.toml"
cat > "$conf" <<TOML
[server]
listen = ["127.0.0.1:$PROXY_PORT"]
workers = 1
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[[hosts]]
domains = ["127.0.0.1"]
upstream = "http://127.0.0.1:$BACKEND_PORT"
TOML

charon_pid=""
cleanup() {
    [ -n "$charon_pid" ] && kill "$charon_pid" 2>/dev/null && wait "$charon_pid" 2>/dev/null
    "$AB/backend.sh" stop "$BACKEND_PORT" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$AB/backend.sh" start "$BACKEND_PORT" >/dev/null
.venv/bin/python -m charon run --config "$conf" >"$OUT/charon.log" 2>&1 &
charon_pid=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/healthz" >/dev/null && break
    sleep 0.1
done

"$AB/autobahn_through.sh" "ws://127.0.0.1:$BACKEND_PORT/" full "$OUT/direct" --agent direct || true
"$AB/autobahn_through.sh" "ws://127.0.0.1:$PROXY_PORT/" full "$OUT/charon" --agent charon || true
"$AB/ab_summary.py" --compare direct="$OUT/direct" charon="$OUT/charon" | tee "$OUT/compare.txt"
grep -q "No per-case differences" "$OUT/compare.txt"
