// Shared by the fuzz targets: a check that stays on in release builds. A failed check is a bug
// (a broken invariant or round trip), so it prints what broke and aborts; libFuzzer then saves
// the input as a crash artifact.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#define FUZZ_CHECK(cond, msg)                                                                     \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "%s:%d: check failed: %s\n  %s\n", __FILE__, __LINE__, #cond,         \
                   std::string(msg).c_str());                                                     \
      std::abort();                                                                               \
    }                                                                                             \
  } while (0)
