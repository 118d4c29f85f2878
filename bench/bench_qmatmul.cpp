// MatMulWT on weights as stored: the dot-product kernels (fp32 activations, or 8-bit activations
// with each integer kernel) against dequantized tiles + sgemm, for
// batches of n = 1..64 rows, on the shapes of the evaluation model's matrices taken from a
// llama.cpp-quantized file (default: the Q4_K_M one), and the F32 file's sgemv/sgemm for scale.
// Chooses DotMaxRows (ops/qmatmul.cpp): the largest n where the dot products still win.
//
//   build/bench_qmatmul [--model=M.gguf] [--threads=1] [google-benchmark flags]
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "core/threads.h"
#include "model/llama.h"
#include "ops/qdot.h"
#include "ops/qmatmul.h"

namespace {

std::string g_model = std::string(DK_BENCH_DATA) + "/brown-kjv-llama-6M-v2-q4_k_m.gguf";
int g_threads = 1;
std::unique_ptr<dk::Model> g_loaded;

// How the product runs: dot products on fp32 activations, 8-bit activations with the AVX2 or the
// AVX-512 VNNI kernels, or dequantized tiles + sgemm.
enum class Path { kDots, kQ8Avx2, kQ8Vnni, kTiles };
constexpr const char* kPathNames[] = {"dots", "q8-avx2", "q8-avx512vnni", "tiles"};

void BM_MatMul(benchmark::State& state, int which, Path path) {
  const dk::LayerWeights& l = g_loaded->layer(1);
  const dk::WeightMatrix& w = which == 0 ? l.wq : which == 1 ? l.w_up : which == 2 ? l.w_down : g_loaded->output();
  const int n = static_cast<int>(state.range(0));
  std::vector<float> x(static_cast<size_t>(n * w.cols)), y(static_cast<size_t>(n * w.rows));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  for (float& v : x) v = nd(rng);
  dk::ThreadPool pool(g_threads);
  dk::SetBlasThreads(g_threads);
  dk::SetDotMaxRows(path == Path::kTiles ? 0 : 1 << 20);
  dk::SetActMode(path == Path::kQ8Avx2 || path == Path::kQ8Vnni ? dk::ActMode::kQ8 : dk::ActMode::kF32);
  dk::SetQdotIsa(path == Path::kQ8Vnni ? dk::QdotIsa::kAvx512Vnni : dk::QdotIsa::kAvx2);
  if (path == Path::kQ8Vnni && dk::ActiveQdotIsa() != dk::QdotIsa::kAvx512Vnni) {
    state.SkipWithError("this CPU has no AVX-512 VNNI");
    return;
  }
  for (auto _ : state) {
    dk::MatMulWT(x.data(), w, y.data(), n, false, &pool);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(n) * state.iterations(), benchmark::Counter::kIsRate);
  state.SetLabel(dk::WeightTypeName(w.type));
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--model=", 8) == 0) g_model = argv[i] + 8;
    if (std::strncmp(argv[i], "--threads=", 10) == 0) g_threads = std::atoi(argv[i] + 10);
  }
  auto m = dk::Model::Load(g_model);
  if (!m.ok()) {
    std::fprintf(stderr, "bench_qmatmul: %s\n", m.status().ToString().c_str());
    return 1;
  }
  g_loaded = std::move(m).value();
  const char* names[] = {"wq", "w_up", "w_down", "output"};
  for (int which = 0; which < 4; ++which) {
    for (Path path : {Path::kDots, Path::kQ8Avx2, Path::kQ8Vnni, Path::kTiles}) {
      benchmark::RegisterBenchmark((std::string(names[which]) + "/" + kPathNames[static_cast<int>(path)]).c_str(),
                                   BM_MatMul, which, path)
          ->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Arg(32)->Arg(64);
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
