// One block of DynaKV's tc decode attention, piece by piece: decoding the block's records
// (TcDecode) and the block's two products with every query head (LatentScores, LatentAccumulate),
// the register-blocked kernels (AVX-512, AVX2) against their scalar references, on the Llama-3-8B shape (32 query
// heads, D = 1024, a block of 64 tokens) at the widths a 12.5 % / 25 % code covers there.
//
//   build/bench_latent [google-benchmark flags]
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "ops/latent_block.h"
#include "ops/tcode.h"

namespace {

constexpr int kHeads = 32, kD = 1024, kTokens = 64;
constexpr int64_t kLd = kD + 16;

struct Block {
  std::vector<float> q, z, s, acc;
  std::vector<int> width;
  explicit Block(int w) : q(kHeads * kLd), z(kTokens * kLd), s(kHeads * kTokens), acc(kHeads * kLd), width(kTokens, w) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    for (float& v : q) v = nd(rng);
    for (int t = 0; t < kTokens; ++t)
      for (int j = 0; j < w; ++j) z[t * kLd + j] = nd(rng);
    for (float& v : s) v = 0.01f * nd(rng);
  }
};

void BM_Scores(benchmark::State& state, dk::QdotIsa isa) {
  if (!dk::CpuHasQdotIsa(isa)) return state.SkipWithError("this CPU lacks the instruction set");
  Block b(static_cast<int>(state.range(0)));
  for (auto _ : state) {
    dk::LatentScores(isa, b.q.data(), kLd, kHeads, b.z.data(), kLd, b.width.data(), kTokens, b.s.data(), kTokens);
    benchmark::DoNotOptimize(b.s.data());
  }
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(kHeads) * kTokens * state.range(0) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Accumulate(benchmark::State& state, dk::QdotIsa isa) {
  if (!dk::CpuHasQdotIsa(isa)) return state.SkipWithError("this CPU lacks the instruction set");
  Block b(static_cast<int>(state.range(0)));
  for (auto _ : state) {
    dk::LatentAccumulate(isa, b.s.data(), kTokens, kHeads, b.z.data(), kLd, b.width.data(), kTokens, b.acc.data(),
                         kLd);
    benchmark::DoNotOptimize(b.acc.data());
  }
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(kHeads) * kTokens * state.range(0) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// Decoding 64 records of the allocation a flat spectrum gets at 2 r bytes (r = range(0)).
template <bool kFast>
void BM_Decode(benchmark::State& state) {
  std::vector<double> ev(kD);
  for (int j = 0; j < kD; ++j) ev[j] = 1.0 / (1.0 + 0.01 * j);
  const dk::TcAllocation a = dk::TcLadder(ev, kD)[state.range(0) - 1];
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> z(kD), out(kTokens * kLd);
  std::vector<uint8_t> rec(static_cast<size_t>(kTokens) * a.bytes);
  for (int t = 0; t < kTokens; ++t) {
    for (float& v : z) v = nd(rng);
    dk::TcEncode(z.data(), a, kD, rec.data() + static_cast<size_t>(t) * a.bytes);
  }
  for (auto _ : state) {
    for (int t = 0; t < kTokens; ++t)
      (kFast ? dk::TcDecode : dk::scalar::TcDecode)(rec.data() + static_cast<size_t>(t) * a.bytes, a, kD,
                                                   out.data() + t * kLd);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["coords"] = a.coords;
  state.counters["Gcoord/s"] = benchmark::Counter(static_cast<double>(kTokens) * a.coords * 1e-9,
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_CAPTURE(BM_Scores, avx512, dk::QdotIsa::kAvx512Vnni)->Arg(256)->Arg(640);
BENCHMARK_CAPTURE(BM_Scores, avx2, dk::QdotIsa::kAvx2)->Arg(256)->Arg(640);
BENCHMARK_CAPTURE(BM_Scores, scalar, dk::QdotIsa::kScalar)->Arg(256)->Arg(640);
BENCHMARK_CAPTURE(BM_Accumulate, avx512, dk::QdotIsa::kAvx512Vnni)->Arg(256)->Arg(640);
BENCHMARK_CAPTURE(BM_Accumulate, avx2, dk::QdotIsa::kAvx2)->Arg(256)->Arg(640);
BENCHMARK_CAPTURE(BM_Accumulate, scalar, dk::QdotIsa::kScalar)->Arg(256)->Arg(640);
BENCHMARK(BM_Decode<true>)->Name("decode/avx2")->Arg(128)->Arg(256);
BENCHMARK(BM_Decode<false>)->Name("decode/scalar")->Arg(128)->Arg(256);

}  // namespace

BENCHMARK_MAIN();
