// The two non-cryptographic hashes of the code base, each defined once: FNV-1a over bytes (model
// fingerprints, training configuration hashes) and SplitMix64 (reproducible random streams: the
// random-weight models of make-gguf, the training's Gumbel noise).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dk {

constexpr uint64_t kFnv1aOffset = 14695981039346656037ull;
constexpr uint64_t kFnv1aPrime = 1099511628211ull;

// 64-bit FNV-1a of n bytes, continuing from h (kFnv1aOffset to start a hash).
inline uint64_t Fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * kFnv1aPrime;
  return h;
}

constexpr uint64_t kSplitMixGamma = 0x9e3779b97f4a7c15ull;

// SplitMix64's output function (Steele, Lea and Flood 2014) of its state z.
inline uint64_t SplitMixFinalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A stateless mix of one key: what a SplitMix64 seeded with x returns first.
inline uint64_t Mix64(uint64_t x) { return SplitMixFinalize(x + kSplitMixGamma); }

// The generator: every Next() advances the state by the gamma and returns its finalized value.
struct SplitMix64 {
  uint64_t state = 0;
  uint64_t Next() { return SplitMixFinalize(state += kSplitMixGamma); }
};

}  // namespace dk
