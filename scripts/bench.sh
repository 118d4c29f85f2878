#!/usr/bin/env bash
# Speed benchmarks (Google Benchmark), all configurations in one run so ratios share the noise.
#  1. the engine: prefill and decode tokens/s, full fp16 cache, 1 and 2 threads, context 128 / 1024
#  2. DynaKV: decode tokens/s and attention time per token, full vs dynakv at fractions
#     0.5 / 0.25 / 0.125 (uniform and energy policies), 1 and 2 threads, context 256 / 1024
# Needs a profile (scripts/results.py calibrates one). JSON output goes to results/bench-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-results/brown-kjv-llama-6M.dkv}
reps=${REPS:-3}
mkdir -p results
ninja -C build bench_engine >/dev/null
build/bench_engine --ctx=128,1024 --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true \
  --benchmark_out=results/bench-engine.json --benchmark_out_format=json
kv=full
for f in 0.5 0.25 0.125; do kv="$kv,dynakv:uniform:$f,dynakv:energy:$f"; done
build/bench_engine --profile="$profile" --kv="$kv" --ctx=256,1024 --benchmark_filter='^decode' \
  --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true \
  --benchmark_out=results/bench-dynakv.json --benchmark_out_format=json
