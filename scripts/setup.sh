#!/usr/bin/env bash
# Installs dynakv's Debian 12 build dependencies (clang and its libFuzzer runtime for scripts/fuzz.sh)
# and builds it (release build in build/).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  g++ cmake ninja-build pkg-config libopenblas-dev liblapacke-dev \
  libgtest-dev libgmock-dev googletest libbenchmark-dev nlohmann-json3-dev python3 python3-matplotlib \
  python3-numpy clang libclang-rt-14-dev >/dev/null
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
echo "built: build/dynakv"
