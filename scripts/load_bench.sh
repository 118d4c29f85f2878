#!/bin/sh
# Perplexity wall time and CPU use at 1 and 2 threads, on an idle machine and beside N busy loops
# (a server's other slots, a shared CI runner). Reproduces the thread pool's collapse under load.
#
#   scripts/load_bench.sh [DYNAKV_BINARY]
#   env: BUSY=2 (busy loops in the loaded runs), THREADS="1 2", TIMEOUT=300 (s per run),
#        MODEL=tests/data/stories260K.gguf, TEXT=tests/data/valid.txt, CTX=128, MODES="idle loaded",
#        EXTRA="" (more flags for the perplexity command)
#
# Prints one line per run: mode, threads, wall seconds, CPU % (user+sys over wall, 100 = one core),
# exit status (124 = hit the timeout) and the final perplexity.
set -u
BIN=${1:-build/dynakv}
BUSY=${BUSY:-2}
THREADS=${THREADS:-"1 2"}
TIMEOUT=${TIMEOUT:-300}
MODEL=${MODEL:-tests/data/stories260K.gguf}
TEXT=${TEXT:-tests/data/valid.txt}
CTX=${CTX:-128}
MODES=${MODES:-"idle loaded"}
EXTRA=${EXTRA:-}

if [ ! -x "$BIN" ]; then
  echo "load_bench: $BIN is not an executable (build it, or pass the binary's path)" >&2
  exit 2
fi
command -v /usr/bin/time >/dev/null 2>&1 || { echo "load_bench: /usr/bin/time is required" >&2; exit 2; }

tmp=$(mktemp -d)
busy_pids=""
stop_busy() {
  for p in $busy_pids; do kill "$p" 2>/dev/null; done
  for p in $busy_pids; do wait "$p" 2>/dev/null; done
  busy_pids=""
}
trap 'stop_busy; rm -rf "$tmp"' EXIT INT TERM

echo "binary $BIN, model $MODEL, text $TEXT, -c $CTX, busy loops when loaded: $BUSY, $(nproc) CPUs"
printf '%-7s %7s %9s %7s %5s %s\n' mode threads wall_s cpu_pct rc ppl
for mode in $MODES; do
  if [ "$mode" = loaded ]; then
    i=0
    while [ "$i" -lt "$BUSY" ]; do
      sh -c 'while :; do :; done' &
      busy_pids="$busy_pids $!"
      i=$((i + 1))
    done
    sleep 1
  fi
  for t in $THREADS; do
    # shellcheck disable=SC2086
    /usr/bin/time -f '%e %U %S' -o "$tmp/time" timeout "$TIMEOUT" \
      "$BIN" perplexity -m "$MODEL" -f "$TEXT" -c "$CTX" -t "$t" $EXTRA >"$tmp/out" 2>"$tmp/err"
    rc=$?
    set -- $(tail -n 1 "$tmp/time")
    wall=${1:-0}
    cpu=$(awk -v w="$wall" -v u="${2:-0}" -v s="${3:-0}" 'BEGIN { if (w > 0) printf "%.0f", 100 * (u + s) / w; else print "?" }')
    ppl=$(grep -o 'PPL = [0-9.]*' "$tmp/out" "$tmp/err" 2>/dev/null | tail -n 1 | sed 's/.*PPL = //')
    printf '%-7s %7s %9s %7s %5s %s\n' "$mode" "$t" "$wall" "$cpu" "$rc" "${ppl:--}"
  done
  stop_busy
done
