#!/usr/bin/env bash
# Soak of `dynakv serve`: 32 clients of mixed load (tests/node/load.mjs: greedy completions checked
# against the text the idle server gave, malformed requests, streams hung up on) and a hostile
# client (tests/node/hostile.mjs: 100,000-deep JSON, oversized chunked bodies, slow request heads,
# invalid UTF-8, huge max_tokens) for SECONDS, against a DynaKV cache. Prints resident memory at
# start, every minute and at the end, both clients' counts, the metrics, and how long SIGTERM took;
# exits non-zero if the server crashed, a greedy answer changed, a hostile request got an
# unexpected answer, a stream stayed open or a slot stayed busy.
#
#   scripts/soak.sh [SECONDS=600]
#   env: BIN=build/dynakv MODEL=tests/data/brown-kjv-llama-6M-v2-f16.gguf
#        KV="--kv dynakv --profile <calibrated here> --rank-policy uniform --kv-budget 0.25"
#        PARALLEL=4 QUEUE=24 CLIENTS=32 OUT=<temp dir> (the logs and JSON are kept there)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-600}
BIN=${BIN:-build/dynakv}
MODEL=${MODEL:-tests/data/brown-kjv-llama-6M-v2-f16.gguf}
PARALLEL=${PARALLEL:-4}
QUEUE=${QUEUE:-24}
CLIENTS=${CLIENTS:-32}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "soak: $BIN is not built" >&2; exit 2; }
[ -d tests/node/node_modules ] || { echo "soak: npm ci --prefix tests/node first" >&2; exit 2; }

if [ -z "${KV:-}" ]; then
  "$BIN" calibrate -m "$MODEL" -f tests/data/calib.txt --chunks 20 -t 2 -o "$OUT/soak.dkv" >"$OUT/calibrate.log" 2>&1
  KV="--kv dynakv --profile $OUT/soak.dkv --rank-policy uniform --kv-budget 0.25"
fi

"$BIN" serve --port 0 -m "$MODEL" -c 512 -t 2 --parallel "$PARALLEL" --queue "$QUEUE" $KV >"$OUT/server.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 300); do
  port=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$OUT/server.log" | head -1 | sed 's/.*://') || true
  [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
  sleep 0.2
done
url="http://127.0.0.1:$port"
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
echo "server pid $pid at $url ($KV), $PARALLEL slots, queue $QUEUE; out: $OUT"

# The expected greedy answers: what the idle server answers, one request at a time.
python3 - "$url" "$OUT/expected.json" <<'EOF'
import json, sys, urllib.request
url, path = sys.argv[1], sys.argv[2]
prompts = ['In the beginning God created', 'The Fulton County Grand Jury said', 'And God said, Let there be',
           'It recommended that Fulton legislators act', 'Blessed is the man that walketh not']
out = {'max_tokens': 16, 'prompts': []}
for p in prompts:
    req = urllib.request.Request(url + '/v1/completions', data=json.dumps(
        {'prompt': p, 'max_tokens': 16, 'temperature': 0}).encode(), headers={'Content-Type': 'application/json'})
    out['prompts'].append({'prompt': p, 'text': json.load(urllib.request.urlopen(req))['choices'][0]['text']})
json.dump(out, open(path, 'w'))
EOF

rss_start=$(rss)
echo "resident memory at start: ${rss_start} kB"
node tests/node/load.mjs --url "$url" --expected "$OUT/expected.json" --clients "$CLIENTS" --requests 100000000 \
  --seconds "$SECONDS_RUN" >"$OUT/load.json" 2>"$OUT/load.err" &
load=$!
node tests/node/hostile.mjs --url "$url" --seconds "$SECONDS_RUN" >"$OUT/hostile.json" 2>"$OUT/hostile.err" &
hostile=$!
elapsed=0
while kill -0 $load 2>/dev/null || kill -0 $hostile 2>/dev/null; do
  sleep 5
  elapsed=$((elapsed + 5))
  if [ $((elapsed % 60)) -eq 0 ]; then
    kill -0 $pid 2>/dev/null || { echo "soak: the server died"; tail -20 "$OUT/server.log"; exit 1; }
    echo "  ${elapsed} s: resident $(rss) kB"
  fi
done
wait $load || true
wait $hostile || true
sleep 2  # hung-up streams are noticed at their next token
rss_end=$(rss)
curl -s "$url/metrics" >"$OUT/metrics.txt"
health=$(curl -s -o /dev/null -w '%{http_code}' "$url/health")
t0=$(date +%s.%N)
kill -TERM $pid
rc=0
wait $pid || rc=$?
t1=$(date +%s.%N)
trap - EXIT

python3 - "$OUT" "$rss_start" "$rss_end" "$health" "$rc" "$t0" "$t1" <<'EOF'
import json, re, sys
out, rss0, rss1, health, rc, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
load = json.load(open(out + '/load.json'))
hostile = json.load(open(out + '/hostile.json'))
metrics = {}
for line in open(out + '/metrics.txt'):
    m = re.match(r'^([a-z_]+(?:\{[^}]*\})?) ([-0-9.e+]+)$', line.strip())
    if m:
        metrics[m.group(1)] = float(m.group(2))
accounted = sum(load[k] for k in ('ok', 'wrong', 'rejected_400', 'rejected_503', 'hung_up', 'crashed'))
print(f"load: sent {load['sent']}, correct {load['ok']}, wrong {load['wrong']}, 400 {load['rejected_400']}, "
      f"503 {load['rejected_503']}, hung up {load['hung_up']}, crashed {load['crashed']} in {load['seconds']:.0f} s")
print(f"hostile: sent {hostile['sent']}, as expected {hostile['as_expected']}, unexpected {hostile['unexpected']}: "
      + ', '.join(f"{k} {v['as_expected']}/{v['sent']}" for k, v in sorted(hostile['by_kind'].items())))
for p in hostile['problems'][:5] + load.get('problems', [])[:5]:
    print('  problem:', p)
busy, queued = metrics.get('dynakv_slots_busy', -1), metrics.get('dynakv_queue_length', -1)
print(f"resident memory: {rss0} kB at start, {rss1} kB at the end; /health {health}; slots busy {busy:.0f}, "
      f"queue {queued:.0f}; SIGTERM: exit {rc} after {t1 - t0:.2f} s")
for k, v in sorted(metrics.items()):
    if k.startswith('dynakv_requests_total') or k.startswith('dynakv_prompt_tokens') or k.startswith('dynakv_streams'):
        print(f"  {k} {v:g}")
# Every request either client sent (and the 5 that made expected.json) is counted once by the
# server: slow heads that never completed are counted as endpoint "other", status 400.
served = sum(v for k, v in metrics.items() if k.startswith('dynakv_requests_total') and
             not ('"/health"' in k or '"/metrics"' in k))
print(f"requests counted by the server: {served:.0f}, sent by the clients: {load['sent'] + hostile['sent'] + 5}")
fail = []
if served != load['sent'] + hostile['sent'] + 5: fail.append('metrics')
if load['crashed'] or load['wrong'] or accounted != load['sent']: fail.append('load')
if hostile['unexpected']: fail.append('hostile')
if health != '200' or busy != 0 or queued != 0: fail.append('server state')
if rc != 0: fail.append('exit status')
print('soak: ' + ('FAILED: ' + ', '.join(fail) if fail else 'passed'))
sys.exit(1 if fail else 0)
EOF
