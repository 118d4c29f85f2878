#!/usr/bin/env bash
# Fuzzes the three parsers (GGUF reader, tokenizers, DynaKV profile reader) with libFuzzer under
# ASan+UBSan: configures build-fuzz with clang++, builds the targets in fuzz/, writes their seed
# corpora (build-fuzz/corpus/<target>/, from tests/data; inputs found while fuzzing are added
# there and kept for the next run) and runs each target for the given time, one after another.
#   scripts/fuzz.sh [seconds per target, default 20]
#   FUZZ_TARGETS="gguf profile" scripts/fuzz.sh 60      # a subset
# Prints each target's executions, speed, corpus and coverage (libFuzzer's cov: and ft:), and exits
# non-zero when a target finds a crash, a sanitizer report, a leak, a timeout (10 s) or an input
# that takes more than 2 GB; the input is saved under build-fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
targets=${FUZZ_TARGETS:-"gguf tokenizer profile"}
bins=""
for t in $targets; do bins+=" fuzz_$t"; done
CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDYNAKV_FUZZ=ON \
  -DDYNAKV_BUILD_TESTS=OFF -DDYNAKV_BUILD_BENCH=OFF >/dev/null
# shellcheck disable=SC2086
cmake --build build-fuzz -j"$(nproc)" --target fuzz_make_seeds $bins
build-fuzz/fuzz_make_seeds tests/data build-fuzz/corpus
mkdir -p build-fuzz/artifacts build-fuzz/logs

field() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }
failed=0
printf '%-16s %11s %8s %7s %7s %8s %6s  %s\n' target executions exec/s cov ft corpus new result
for t in $targets; do
  bin=build-fuzz/fuzz_$t log=build-fuzz/logs/fuzz_$t.log
  opts=()
  [ -f "fuzz/$t.dict" ] && opts+=(-dict="fuzz/$t.dict")
  # Text: long inputs only slow the search down (the encoders are linear, checked by the timeout).
  [ "$t" = tokenizer ] && opts+=(-max_len=1024)
  rc=0
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$bin" "build-fuzz/corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/artifacts/fuzz_$t-" "${opts[@]}" >"$log" 2>&1 || rc=$?
  # The last status line: "#N DONE cov: C ft: F corp: U/S lim: L exec/s: E rss: R".
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  result=ok
  if [ "$rc" -ne 0 ]; then result="FAILED (exit $rc, see $log)"; failed=1; fi
  printf '%-16s %11s %8s %7s %7s %8s %6s  %s\n' "fuzz_$t" "$(field number_of_executed_units "$log")" \
    "$(field average_exec_per_sec "$log")" "${cov:-?}" "${ft:-?}" "$(find "build-fuzz/corpus/$t" -type f | wc -l)" \
    "$(field new_units_added "$log")" "$result"
  if [ "$rc" -ne 0 ]; then
    grep -E 'ERROR|SUMMARY|check failed|runtime error|Test unit written' "$log" | head -20 || true
  fi
done
exit $failed
