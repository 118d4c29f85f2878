#!/usr/bin/env bash
# Installs dynakv's Debian 12 build dependencies (clang and its libFuzzer runtime for scripts/fuzz.sh,
# pybind11 for the Python module, cpp-httplib for the server) and builds it (release build in
# build/); installs the Python module where Debian's python3 finds it, and the openai npm package
# the server's end-to-end tests drive it with (tests/node/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  g++ cmake ninja-build pkg-config libopenblas-dev liblapacke-dev \
  libgtest-dev libgmock-dev googletest libbenchmark-dev nlohmann-json3-dev libcpp-httplib-dev \
  python3 python3-matplotlib python3-numpy clang libclang-rt-14-dev python3-dev pybind11-dev \
  python3-pybind11 >/dev/null
# Node.js for the server's client tests: Debian's, unless a node with npm is already installed.
if ! command -v npm >/dev/null; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --prefix tests/node --no-audit --no-fund
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
echo "built: build/dynakv"
# The Python module (build/python/dynakv*.so, docs/python.md) into /usr/bin/python3's site folder.
if compgen -G "build/python/dynakv*.so" >/dev/null; then
  $SUDO cmake --install build --component python
  echo "installed: the dynakv Python module (/usr/bin/python3 -c 'import dynakv')"
fi
