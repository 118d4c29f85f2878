#!/usr/bin/env bash
# Serving throughput of `dynakv serve` (release build) with the full cache and with DynaKV at a
# quarter of it: requests/s and tokens/s at 1, 4 and S concurrent clients (greedy completions,
# none refused), the KV bytes in use from /metrics after each level, then the mixed load test
# (good, malformed and hung-up requests from 32 clients) with its counts. Prints a table; the raw
# JSON of every run lands in $OUT (default results/serve-bench/).
#
#   scripts/serve_bench.sh                 # the shipped model; a profile calibrated on the spot
#   MODEL=m.gguf PROFILE=p.dkv RANK_POLICY=router scripts/serve_bench.sh
# Environment: BUILD (build), MODEL, PROFILE (calibrated here when unset), RANK_POLICY (uniform),
# BUDGET (0.25), S (slots, 4), REQUESTS (per level, 48), MAX_TOKENS (32), THREADS (nproc), CTX (512).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-tests/data/brown-kjv-llama-6M-v2-f16.gguf}
RANK_POLICY=${RANK_POLICY:-uniform}
BUDGET=${BUDGET:-0.25}
S=${S:-4}
REQUESTS=${REQUESTS:-48}
MAX_TOKENS=${MAX_TOKENS:-32}
THREADS=${THREADS:-$(nproc)}
CTX=${CTX:-512}
OUT=${OUT:-results/serve-bench}
DK="$BUILD/dynakv"
[ -x "$DK" ] || { echo "serve_bench: $DK is missing: build first (cmake --build $BUILD)" >&2; exit 1; }
command -v node >/dev/null || { echo "serve_bench: node is missing (scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$OUT"
tmp=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if [ -z "${PROFILE:-}" ]; then
  PROFILE="$tmp/bench.dkv"
  echo "calibrating a profile (20 chunks of tests/data/calib.txt) ..." >&2
  "$DK" calibrate -m "$MODEL" -f tests/data/calib.txt --chunks 20 -t "$THREADS" -o "$PROFILE" >/dev/null 2>&1
fi

# start_server NAME FLAGS...: runs `dynakv serve` on a free port, waits for /health, sets $url.
start_server() {
  local log="$OUT/$1-server.log"
  shift
  "$DK" serve -m "$MODEL" --port 0 -c "$CTX" -t "$THREADS" --parallel "$S" "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 600); do
    port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$log")
    if [ -n "$port" ] && node -e "fetch('http://127.0.0.1:$port/health').then(r => process.exit(r.status === 200 ? 0 : 1), () => process.exit(1))"; then
      url="http://127.0.0.1:$port"
      return
    fi
    sleep 0.1
  done
  echo "serve_bench: the server did not start:" >&2
  cat "$log" >&2
  exit 1
}

stop_server() {
  kill -TERM "$server_pid"
  wait "$server_pid"
  server_pid=""
}

run_config() {
  local name=$1
  shift
  start_server "$name" --queue 64 "$@"
  for c in 1 4 "$S"; do
    node tests/node/load.mjs --url "$url" --clients "$c" --requests "$REQUESTS" --mix 1,0,0 \
      --max-tokens "$MAX_TOKENS" --seconds 120 >"$OUT/$name-c$c.json"
  done
  stop_server
  start_server "$name-load" --queue 24 "$@"
  node tests/node/load.mjs --url "$url" --clients 32 --requests 256 --seconds 60 --max-tokens 16 >"$OUT/$name-load.json"
  stop_server
}

run_config full
run_config dynakv --kv dynakv --profile "$PROFILE" --rank-policy "$RANK_POLICY" --kv-budget "$BUDGET"

python3 - "$OUT" "$S" <<'EOF'
import json, sys
out, s = sys.argv[1], sys.argv[2]
print(f"{'cache':8} {'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'KV bytes in use':>16} {'KV fraction':>11}")
for name in ("full", "dynakv"):
    for c in ("1", "4", s):
        r = json.load(open(f"{out}/{name}-c{c}.json"))
        m = r["metrics"]
        print(f"{name:8} {c:>7} {r['ok']:>8} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>9.1f} "
              f"{int(m['dynakv_kv_bytes_used']):>16} {m['dynakv_kv_fraction']:>11.3f}")
print()
print(f"{'load test':10} {'sent':>5} {'ok':>5} {'400':>5} {'503':>5} {'hung up':>8} {'crashed':>8} {'seconds':>8} {'health':>7}")
for name in ("full", "dynakv"):
    r = json.load(open(f"{out}/{name}-load.json"))
    print(f"{name:10} {r['sent']:>5} {r['ok']:>5} {r['rejected_400']:>5} {r['rejected_503']:>5} {r['hung_up']:>8} "
          f"{r['crashed']:>8} {r['seconds']:>8.1f} {r['health']:>7}")
EOF
