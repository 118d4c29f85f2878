// No input crashes or hangs dynakv, and no NaN comes out of it: non-finite weights are refused at
// load naming the tensor, a forward pass that overflows stops naming the layer, results do not
// depend on -t beyond the documented bound (docs/architecture.md, Threads), and tests/bad_inputs.sh
// reruns every bad input of the code review against the CLI.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <random>

#include "core/threads.h"
#include "eval/calibrate.h"
#include "eval/generate.h"
#include "eval/perplexity.h"
#include "eval/sampler.h"
#include "gguf_writer.h"
#include "kv/full_cache.h"
#include "kv/registry.h"
#include "model/ggml_types.h"
#include "model/llama.h"
#include "ops/ops.h"
#include "test_util.h"

namespace dk {
namespace {

using test::DataPath;
using test::GgufWriter;
using ::testing::HasSubstr;
using W = GgufWriter;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- a tiny synthetic llama: E = 32, 4 query heads and 2 KV heads of 8, F = 64, 3 layers ----

constexpr uint64_t kE = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8, kF = 64, kVocab = 8, kLayers = 3;

// Per tensor: how to store it (F32 unless overridden) and edits to its values or raw bytes.
struct TinyModel {
  std::map<std::string, std::function<void(W&, const std::string&, const std::vector<uint64_t>&,
                                            std::vector<float>&)>> store;
  std::map<std::string, std::pair<size_t, float>> set;  // tensor -> (element, value)
  std::map<std::string, float> fill;                     // tensor -> every element

  std::string Write(const std::string& name) const {
    W w;
    w.Add("general.architecture", W::Str("llama")).Add("general.name", W::Str("tiny"));
    w.Add("llama.embedding_length", W::U32(kE)).Add("llama.block_count", W::U32(kLayers));
    w.Add("llama.feed_forward_length", W::U32(kF)).Add("llama.attention.head_count", W::U32(kHeads));
    w.Add("llama.attention.head_count_kv", W::U32(kKvHeads)).Add("llama.context_length", W::U32(64));
    w.Add("tokenizer.ggml.model", W::Str("llama"));
    w.Add("tokenizer.ggml.tokens", W::StrArray({"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b", "c", "d"}));
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 0.2f);
    auto add = [&](const std::string& t, std::vector<uint64_t> dims, bool norm) {
      uint64_t n = 1;
      for (uint64_t d : dims) n *= d;
      std::vector<float> x(n);
      for (float& v : x) v = norm ? 1.0f : nd(rng);
      if (auto it = fill.find(t); it != fill.end()) std::fill(x.begin(), x.end(), it->second);
      if (auto it = set.find(t); it != set.end()) x[it->second.first] = it->second.second;
      if (auto it = store.find(t); it != store.end()) {
        it->second(w, t, dims, x);
      } else {
        w.AddTensorF32(t, dims, x);
      }
    };
    add("token_embd.weight", {kE, kVocab}, false);
    add("output_norm.weight", {kE}, true);
    add("output.weight", {kE, kVocab}, false);
    const uint64_t Q = kHeads * kHeadDim, KV = kKvHeads * kHeadDim;
    for (uint64_t l = 0; l < kLayers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      add(p + "attn_norm.weight", {kE}, true);
      add(p + "attn_q.weight", {kE, Q}, false);
      add(p + "attn_k.weight", {kE, KV}, false);
      add(p + "attn_v.weight", {kE, KV}, false);
      add(p + "attn_output.weight", {Q, kE}, false);
      add(p + "ffn_norm.weight", {kE}, true);
      add(p + "ffn_gate.weight", {kE, kF}, false);
      add(p + "ffn_up.weight", {kE, kF}, false);
      add(p + "ffn_down.weight", {kF, kE}, false);
    }
    return w.WriteTemp(name);
  }
};

// Loads, removes the file, returns the status (ok or the error).
StatusOr<std::unique_ptr<Model>> LoadTemp(const std::string& path) {
  auto m = Model::Load(path);
  std::remove(path.c_str());
  return m;
}

void ExpectRefused(const TinyModel& tm, const std::string& tensor, const std::string& what) {
  auto m = LoadTemp(tm.Write("nonfinite.gguf"));
  ASSERT_FALSE(m.ok()) << tensor << ": " << what << " was accepted";
  EXPECT_EQ(m.status().code(), Code::kCorrupt);
  EXPECT_THAT(m.status().message(), HasSubstr("tensor '" + tensor + "'"));
  EXPECT_THAT(m.status().message(), HasSubstr(what));
  EXPECT_THAT(m.status().message(), HasSubstr("nonfinite.gguf"));
}

TEST(NonFiniteWeights, TinyModelLoadsAndRuns) {
  auto m = LoadTemp(TinyModel().Write("tiny.gguf"));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  FullKvCache cache((*m)->config().kv_shape(), 16, KvDtype::kF32);
  ForwardState st((*m)->config(), 4);
  std::vector<float> logits(4 * kVocab);
  ThreadPool pool(1);
  const int32_t toks[4] = {1, 4, 5, 6};
  ASSERT_TRUE((*m)->Forward(toks, 4, cache, st, logits.data(), true, pool).ok());
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

TEST(NonFiniteWeights, RefusedAtLoadNamingTheTensorAndElement) {
  TinyModel nan;
  nan.set["blk.1.attn_k.weight"] = {3, kNan};
  ExpectRefused(nan, "blk.1.attn_k.weight", "element 3 is nan");

  TinyModel neg_inf;  // a tensor used straight from the mapped file
  neg_inf.set["output_norm.weight"] = {31, -kInf};
  ExpectRefused(neg_inf, "output_norm.weight", "element 31 is -inf");

  TinyModel f16;  // F16: +inf (0x7c00) at element 9
  f16.store["blk.0.ffn_gate.weight"] = [](W& w, const std::string& t, const std::vector<uint64_t>& dims,
                                          std::vector<float>& x) {
    std::vector<uint16_t> bits;
    for (float v : x) bits.push_back(Fp32ToFp16(v));
    bits[9] = 0x7C00;
    w.AddTensorBits16(t, dims, GgmlType::kF16, bits);
  };
  ExpectRefused(f16, "blk.0.ffn_gate.weight", "element 9 is inf");

  TinyModel bf16;  // BF16: a NaN (0x7fc1) at element 0
  bf16.store["blk.2.ffn_down.weight"] = [](W& w, const std::string& t, const std::vector<uint64_t>& dims,
                                           std::vector<float>& x) {
    std::vector<uint16_t> bits(x.size(), 0x3F80);  // 1.0
    bits[0] = 0x7FC1;
    w.AddTensorBits16(t, dims, GgmlType::kBF16, bits);
  };
  ExpectRefused(bf16, "blk.2.ffn_down.weight", "element 0 is nan");

  TinyModel q8;  // Q8_0: block 5's scale d is NaN (the int8 values are fine)
  q8.store["blk.0.ffn_up.weight"] = [](W& w, const std::string& t, const std::vector<uint64_t>& dims,
                                       std::vector<float>& x) {
    std::vector<uint8_t> raw = W::QuantizeQ8_0(x);
    test::PatchPod<uint16_t>(&raw, 5 * 34, 0x7E00);
    w.AddTensorRaw(t, dims, static_cast<uint32_t>(GgmlType::kQ8_0), raw);
  };
  ExpectRefused(q8, "blk.0.ffn_up.weight", "q8_0 block 5 (elements 160..191): scale d is nan");

  // The same types with finite values load (the check is not a false alarm).
  TinyModel fine;
  fine.store["blk.0.ffn_gate.weight"] = [](W& w, const std::string& t, const std::vector<uint64_t>& dims,
                                           std::vector<float>& x) { w.AddTensorF16(t, dims, x); };
  fine.store["blk.0.ffn_up.weight"] = [](W& w, const std::string& t, const std::vector<uint64_t>& dims,
                                         std::vector<float>& x) { w.AddTensorQ8_0(t, dims, x); };
  auto m = LoadTemp(fine.Write("fine.gguf"));
  EXPECT_TRUE(m.ok()) << m.status().ToString();
}

TEST(NonFiniteWeights, CheckFiniteCoversEveryLoadableType) {
  // F32 at every position of a long row (the vectorized scan and its tail).
  for (int64_t n : {1, 7, 1024, 1500, 4097}) {
    std::vector<float> x(static_cast<size_t>(n), 0.5f);
    EXPECT_TRUE(CheckFinite(GgmlType::kF32, x.data(), n).ok());
    for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
      std::vector<float> y = x;
      y[static_cast<size_t>(at)] = kInf;
      Status s = CheckFinite(GgmlType::kF32, y.data(), n);
      ASSERT_FALSE(s.ok()) << n << " " << at;
      EXPECT_THAT(s.message(), HasSubstr("element " + std::to_string(at) + " is inf"));
    }
  }
  // Largest finite values are finite.
  const float big[2] = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
  EXPECT_TRUE(CheckFinite(GgmlType::kF32, big, 2).ok());
  const uint16_t h_max[2] = {0x7BFF, 0xFBFF}, h_ninf[2] = {0x3C00, 0xFC00};
  EXPECT_TRUE(CheckFinite(GgmlType::kF16, h_max, 2).ok());
  EXPECT_THAT(CheckFinite(GgmlType::kF16, h_ninf, 2).message(), HasSubstr("element 1 is -inf"));
  const uint16_t b_max[1] = {0x7F7F}, b_inf[1] = {0x7F80};
  EXPECT_TRUE(CheckFinite(GgmlType::kBF16, b_max, 1).ok());
  EXPECT_THAT(CheckFinite(GgmlType::kBF16, b_inf, 1).message(), HasSubstr("element 0 is inf"));
  // Quantized: the fp16 scales (q4_0: d; q4_K: d and dmin).
  std::vector<uint8_t> q4(2 * 18, 0x11);
  test::PatchPod<uint16_t>(&q4, 0, 0x3C00);
  test::PatchPod<uint16_t>(&q4, 18, 0x3C00);
  EXPECT_TRUE(CheckFinite(GgmlType::kQ4_0, q4.data(), 64).ok());
  test::PatchPod<uint16_t>(&q4, 18, 0xFC00);
  EXPECT_THAT(CheckFinite(GgmlType::kQ4_0, q4.data(), 64).message(),
              HasSubstr("q4_0 block 1 (elements 32..63): scale d is -inf"));
  std::vector<uint8_t> qk(144, 0);
  EXPECT_TRUE(CheckFinite(GgmlType::kQ4_K, qk.data(), 256).ok());
  test::PatchPod<uint16_t>(&qk, 2, 0x7C01);
  EXPECT_THAT(CheckFinite(GgmlType::kQ4_K, qk.data(), 256).message(), HasSubstr("scale dmin is nan"));
  // Types that cannot be loaded are not silently passed.
  EXPECT_EQ(CheckFinite(GgmlType::kQ2_K, qk.data(), 256).code(), Code::kUnimplemented);
}

TEST(NonFiniteActivations, FirstNonFiniteFindsTheFirstOne) {
  std::vector<float> x(3000, 1.0f);
  EXPECT_EQ(FirstNonFinite(x.data(), 3000), -1);
  EXPECT_EQ(FirstNonFinite(x.data(), 0), -1);
  x[2999] = -kInf;
  x[2100] = kNan;
  EXPECT_EQ(FirstNonFinite(x.data(), 3000), 2100);
  EXPECT_EQ(FirstNonFinite(x.data(), 2100), -1);
  x[5] = kInf;
  EXPECT_EQ(FirstNonFinite(x.data(), 3000), 5);
}

// Finite weights whose products overflow fp32 in layer 1: every entry point stops with a status
// naming the layer, never a NaN perplexity.
TEST(NonFiniteActivations, ForwardStopsAtTheLayerThatOverflowed) {
  TinyModel tm;
  tm.fill["blk.1.ffn_norm.weight"] = 3e38f;
  auto m = LoadTemp(tm.Write("overflow.gguf"));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const Model& model = **m;
  ThreadPool pool(1);
  FullKvCache cache(model.config().kv_shape(), 64, KvDtype::kF16);
  ForwardState st(model.config(), 8);
  std::vector<float> logits(8 * kVocab);
  const int32_t toks[4] = {1, 4, 5, 6};
  Status s = model.Forward(toks, 4, cache, st, logits.data(), true, pool);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kOutOfRange);
  EXPECT_THAT(s.message(), HasSubstr("layer 1 output: non-finite value"));
  EXPECT_THAT(s.message(), HasSubstr("token position 0"));

  std::vector<int32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = 3 + static_cast<int32_t>(i % 5);
  cache.Clear();
  auto ppl = ComputePerplexity(model, tokens, cache, nullptr, PerplexityOptions{16, 16, 2}, pool);
  ASSERT_FALSE(ppl.ok());
  EXPECT_THAT(ppl.status().message(), HasSubstr("layer 1 output"));

  cache.Clear();
  Sampler sampler(SamplerOptions{0.0f, 0, 1.0f, 1});
  auto gen = Generate(model, {1, 4, 5}, 4, 8, cache, sampler, pool, nullptr);
  ASSERT_FALSE(gen.ok());
  EXPECT_THAT(gen.status().message(), HasSubstr("layer 1 output"));

  auto cal = Calibrate(model, tokens, CalibrateOptions{16, 16, 2, {}}, pool);
  ASSERT_FALSE(cal.ok());
  EXPECT_THAT(cal.status().message(), HasSubstr("layer 1 output"));
}

// ---- -t 1 against -t 2 (docs/architecture.md, Threads) ----

double Perplexity(const Model& m, const std::vector<int32_t>& tokens, int threads, const KvConfig& kv,
                  const PerplexityOptions& opt) {
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);  // as every command: OpenBLAS beside the pool, not inside it
  auto cache = CreateKvCache(kv, KvModelInfo{m.config().kv_shape(), m.fingerprint(), "stories260K.gguf"}, opt.n_ctx);
  EXPECT_TRUE(cache.ok()) << cache.status().ToString();
  if (!cache.ok()) return 0.0;
  auto r = ComputePerplexity(m, tokens, **cache, nullptr, opt, pool);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r->ppl : 0.0;
}

TEST(ThreadCount, BatchesAndDecodeStepsGiveTheSameBits) {
  const ScopedBlasThreads restore(BlasThreads());
  auto loaded = Model::Load(DataPath("stories260K.gguf"));
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const Model& m = **loaded;
  const auto tokens = m.tokenizer().Encode(test::ReadText(DataPath("valid.txt")).substr(0, 60000), true);
  // Batches of tokens: GEMMs, the pool's row-parallel softmax and attention. Same bits.
  const PerplexityOptions batched{128, 128, 4};
  EXPECT_EQ(Perplexity(m, tokens, 1, KvConfig{}, batched), Perplexity(m, tokens, 2, KvConfig{}, batched));
  // One token per step: one whole dot product per output row, whichever thread runs it (MatMulWT's
  // dot kernels; OpenBLAS's sgemv, used before, split n_ff = 172 into halves of 86 rows whose last
  // rows went through its remainder loop and differed by 6.6e-6 relative). Same bits.
  KvConfig snap;
  snap.evict = "snapkv";
  snap.Set("--evict-keep", "0.5");
  const PerplexityOptions decode{128, 128, 4, true, 1};
  EXPECT_EQ(Perplexity(m, tokens, 1, snap, decode), Perplexity(m, tokens, 2, snap, decode));
}

TEST(ThreadCount, CalibrationGivesTheSameBits) {
  const ScopedBlasThreads restore(BlasThreads());
  auto loaded = Model::Load(DataPath("stories260K.gguf"));
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const Model& m = **loaded;
  const auto tokens = m.tokenizer().Encode(test::ReadText(DataPath("valid.txt")).substr(0, 30000), true);
  std::vector<DynaKvProfile> profiles;
  for (int threads : {1, 2}) {
    ThreadPool pool(threads);
    ConfigureBlasFor(threads);
    auto p = Calibrate(m, tokens, CalibrateOptions{128, 128, 4, {}}, pool);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    profiles.push_back(std::move(*p));
  }
  for (size_t l = 0; l < profiles[0].k.size(); ++l) {
    EXPECT_EQ(profiles[0].k[l].basis, profiles[1].k[l].basis) << "layer " << l;
    EXPECT_EQ(profiles[0].v[l].basis, profiles[1].v[l].basis) << "layer " << l;
    EXPECT_EQ(profiles[0].k[l].eigenvalues, profiles[1].k[l].eigenvalues) << "layer " << l;
    EXPECT_EQ(profiles[0].v[l].mean, profiles[1].v[l].mean) << "layer " << l;
  }
}

// ---- the review's bad inputs against the CLI ----

TEST(BadInputsScript, EveryInputOfTheReviewIsRefusedCleanly) {
  const std::string script = std::string(DK_TEST_DATA) + "/../bad_inputs.sh";
  const std::string log = ::testing::TempDir() + "dk_bad_inputs_" + std::to_string(::getpid()) + ".log";
  const std::string cmd = "bash " + script + " " + DK_CLI_PATH + " >" + log + " 2>&1 </dev/null";
  const int rc = std::system(cmd.c_str());
  const std::string out = test::ReadText(log);
  std::remove(log.c_str());
  ASSERT_TRUE(WIFEXITED(rc)) << out;
  EXPECT_EQ(WEXITSTATUS(rc), 0) << out;
  EXPECT_THAT(out, HasSubstr("0 failed")) << out;
}

}  // namespace
}  // namespace dk
