// Engine speed: prefill and decode tokens/s, attention time per token, KV bytes per token, for
// each cache configuration, at 1 and 2 threads and context 128 / 1024 — all in one run so
// ratios against the full cache are measured under the same machine noise.
//
//   build/bench_engine [--model=M.gguf[,M2.gguf...]] [--profile=P.dkv] [--kv=full,dynakv:uniform:0.5,...]
//                      [--ctx=128,1024] [--threads=1,2] [--acts=q8|f32] [--isa=avx2|avx512vnni|scalar]
//                      [--dot-max-rows=N] [google-benchmark flags, e.g. --benchmark_repetitions=3]
// A kv spec is "full", "full-f32", or "dynakv:<policy>:<fraction>" (needs --profile). With several
// models (weights as stored: one file per type), benchmark names carry the model's file name,
// prefill/<model>/<kv>/threads:T/ctx:C, so that every type is measured in the same run.
// --acts, --isa and --dot-max-rows choose the products' kernels (ops/qmatmul.h, ops/qdot.h).
#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <sstream>

#include "core/threads.h"
#include "kv/registry.h"
#include "kv/timed_cache.h"
#include "model/llama.h"
#include "ops/qdot.h"
#include "ops/qmatmul.h"

namespace {

std::vector<std::string> g_models = {std::string(DK_BENCH_DATA) + "/brown-kjv-llama-6M-f32.gguf"};
std::string g_profile;
std::vector<std::string> g_kv_specs = {"full"};
std::vector<int64_t> g_contexts = {128, 1024};
std::vector<int64_t> g_threads = {1, 2};
std::map<std::string, std::unique_ptr<dk::Model>> g_loaded;

const dk::Model& GetModel(const std::string& path) {
  auto& slot = g_loaded[path];
  if (!slot) {
    auto m = dk::Model::Load(path);
    if (!m.ok()) {
      std::fprintf(stderr, "bench_engine: %s\n", m.status().ToString().c_str());
      std::exit(1);
    }
    slot = std::move(m).value();
  }
  return *slot;
}

// A benchmark's model and kv spec.
struct Case {
  std::string model;
  std::string spec;
};

std::vector<int64_t> ParseInts(const std::string& list) {
  std::vector<int64_t> v;
  std::stringstream ss(list);
  for (std::string s; std::getline(ss, s, ',');) v.push_back(std::stoll(s));
  return v;
}

dk::KvConfig ParseSpec(const std::string& spec) {
  dk::KvConfig c;
  if (spec == "full") return c;
  if (spec == "full-f32") return c.Set("--kv-dtype", "f32");
  std::stringstream ss(spec);
  std::string method, policy, frac;
  std::getline(ss, method, ':');
  std::getline(ss, policy, ':');
  std::getline(ss, frac, ':');
  c.method = method;
  return c.Set("--rank-policy", policy).Set("--kv-budget", frac).Set("--profile", g_profile);
}

std::unique_ptr<dk::TimedKvCache> MakeCache(const Case& c, int capacity, benchmark::State& state) {
  const dk::Model& m = GetModel(c.model);
  auto cache = dk::CreateKvCache(ParseSpec(c.spec), dk::KvModelInfo{m.config().kv_shape(), m.fingerprint(), c.model},
                                 capacity);
  if (!cache.ok()) {
    state.SkipWithError(cache.status().ToString().c_str());
    return nullptr;
  }
  return std::make_unique<dk::TimedKvCache>(std::move(cache).value());
}

// Deterministic pseudo-text: token ids spread over the vocabulary (content does not change speed).
std::vector<int32_t> Tokens(int n, int vocab) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = 3 + static_cast<int32_t>((i * 2654435761u) % (vocab - 3));
  return t;
}

// Prefill of ctx tokens from an empty cache in one batch (llama-bench's ppN).
void BM_Prefill(benchmark::State& state, const Case& c) {
  const int threads = static_cast<int>(state.range(0)), ctx = static_cast<int>(state.range(1));
  const dk::Model& m = GetModel(c.model);
  dk::ThreadPool pool(threads);
  dk::ConfigureBlasFor(threads);
  auto cache = MakeCache(c, ctx, state);
  if (!cache) return;
  dk::ForwardState st(m.config(), ctx);
  std::vector<float> logits(m.config().n_vocab);
  const auto toks = Tokens(ctx, m.config().n_vocab);
  for (auto _ : state) {
    cache->Clear();
    if (!m.Forward(toks.data(), ctx, *cache, st, logits.data(), false, pool).ok()) state.SkipWithError("forward failed");
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(ctx), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["attn_us/tok"] = 1e6 * cache->attend_seconds() / (static_cast<double>(state.iterations()) * ctx);
  state.counters["kv_B/tok"] = static_cast<double>(cache->BytesUsed()) / ctx;
}

// Decode: the cache is prefilled to ctx - 32 tokens, then 32 single-token steps end at ctx.
void BM_Decode(benchmark::State& state, const Case& c) {
  const int threads = static_cast<int>(state.range(0)), ctx = static_cast<int>(state.range(1));
  constexpr int kSteps = 32;
  const dk::Model& m = GetModel(c.model);
  dk::ThreadPool pool(threads);
  dk::ConfigureBlasFor(threads);
  auto cache = MakeCache(c, ctx, state);
  if (!cache) return;
  dk::ForwardState st(m.config(), ctx - kSteps);
  std::vector<float> logits(m.config().n_vocab);
  const auto toks = Tokens(ctx, m.config().n_vocab);
  double attn = 0.0;
  for (auto _ : state) {
    state.PauseTiming();
    cache->Clear();
    if (!m.Forward(toks.data(), ctx - kSteps, *cache, st, logits.data(), false, pool).ok()) state.SkipWithError("prefill");
    cache->ResetTimer();
    state.ResumeTiming();
    for (int i = ctx - kSteps; i < ctx; ++i)
      if (!m.Forward(&toks[i], 1, *cache, st, logits.data(), false, pool).ok()) state.SkipWithError("decode failed");
    attn += cache->attend_seconds();
  }
  state.counters["tok/s"] = benchmark::Counter(kSteps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["attn_us/tok"] = 1e6 * attn / (static_cast<double>(state.iterations()) * kSteps);
  state.counters["kv_B/tok"] = static_cast<double>(cache->BytesUsed()) / ctx;
}

void ParseOwnFlags(int* argc, char** argv) {
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) { return a.substr(std::strlen(flag)); };
    if (a.rfind("--model=", 0) == 0) {
      g_models.clear();
      std::stringstream ss(value("--model="));
      for (std::string m; std::getline(ss, m, ',');) g_models.push_back(m);
    } else if (a.rfind("--threads=", 0) == 0) {
      g_threads = ParseInts(value("--threads="));
    } else if (a.rfind("--acts=", 0) == 0) {
      dk::SetActMode(value("--acts=") == "f32" ? dk::ActMode::kF32 : dk::ActMode::kQ8);
    } else if (a.rfind("--isa=", 0) == 0) {
      const std::string v = value("--isa=");
      dk::SetQdotIsa(v == "scalar" ? dk::QdotIsa::kScalar : v == "avx2" ? dk::QdotIsa::kAvx2 : dk::QdotIsa::kAvx512Vnni);
    } else if (a.rfind("--dot-max-rows=", 0) == 0) {
      dk::SetDotMaxRows(std::stoi(value("--dot-max-rows=")));
    } else if (a.rfind("--profile=", 0) == 0) {
      g_profile = value("--profile=");
    } else if (a.rfind("--kv=", 0) == 0) {
      g_kv_specs.clear();
      std::stringstream ss(value("--kv="));
      for (std::string s; std::getline(ss, s, ',');) g_kv_specs.push_back(s);
    } else if (a.rfind("--ctx=", 0) == 0) {
      g_contexts = ParseInts(value("--ctx="));
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
}

}  // namespace

int main(int argc, char** argv) {
  ParseOwnFlags(&argc, argv);
  for (const std::string& model : g_models) {
    std::string tag;  // the file name without .gguf when several models run
    if (g_models.size() > 1) {
      tag = model.substr(model.find_last_of('/') + 1);
      if (tag.size() > 5 && tag.substr(tag.size() - 5) == ".gguf") tag.resize(tag.size() - 5);
      tag += "/";
    }
    for (const std::string& spec : g_kv_specs) {
      const Case c{model, spec};
      benchmark::RegisterBenchmark(("prefill/" + tag + spec).c_str(), BM_Prefill, c)
          ->ArgNames({"threads", "ctx"})
          ->ArgsProduct({g_threads, g_contexts})
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("decode/" + tag + spec).c_str(), BM_Decode, c)
          ->ArgNames({"threads", "ctx"})
          ->ArgsProduct({g_threads, g_contexts})
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
