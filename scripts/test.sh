#!/usr/bin/env bash
# Runs the whole test suite: the release build (all tests, incl. full-file perplexity parity with
# llama.cpp), then an ASan+UBSan build of the same tests (the long *Slow* ones excluded), then a
# short libFuzzer run of each parser (scripts/fuzz.sh, 15 s per target; DYNAKV_SKIP_FUZZ=1 skips it,
# DYNAKV_FUZZ_SECONDS sets the time).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"
if [ "${DYNAKV_SKIP_SANITIZE:-0}" != "1" ]; then
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDYNAKV_SANITIZE=ON -DDYNAKV_BUILD_BENCH=OFF >/dev/null
  cmake --build build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -E 'Slow'
fi
if [ "${DYNAKV_SKIP_FUZZ:-0}" != "1" ]; then
  ./scripts/fuzz.sh "${DYNAKV_FUZZ_SECONDS:-15}"
fi
