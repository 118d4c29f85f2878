// The router training stack: the whole training graph (model/train_graph) with DynaKV's relaxed
// cache (train/relaxed_cache) checked by central differences in double on a tiny random model;
// float against double; the graph's forward against the engine's; the relaxed cache with one-hot
// choices against the real DynaKV cache with the router policy; the Cayley map; checkpoints; and
// training itself: resume equals an uninterrupted run, and a trained router meets its target on
// held-out text.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "core/threads.h"
#include "eval/calibrate.h"
#include "eval/passkey.h"
#include "eval/perplexity.h"
#include "eval/rankmap.h"
#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"
#include "kv/profile.h"
#include "kv/registry.h"
#include "model/llama.h"
#include "model/train_graph.h"
#include "ops/grad.h"
#include "test_util.h"
#include "train/cayley.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/optimizer.h"
#include "train/relaxed_cache.h"
#include "train/trainer.h"

namespace dk {
namespace {

using ::testing::HasSubstr;

// ---- A tiny random model and profile --------------------------------------------------------------

ModelConfig TinyConfig() {
  ModelConfig c;
  c.arch = "llama";
  c.name = "tiny";
  c.n_vocab = 11;
  c.n_embd = 8;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_head_kv = 2;
  c.head_dim = 4;
  c.n_ff = 12;
  c.n_ctx_train = 64;
  c.n_rot = 4;
  c.rms_eps = 1e-5f;
  return c;
}

// Gram-Schmidt on random vectors, in double: an orthonormal basis [D][D] (columns).
std::vector<double> RandomOrthonormal(int D, std::mt19937_64& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> u(static_cast<size_t>(D) * D);
  for (int j = 0; j < D; ++j) {
    std::vector<double> v(D);
    for (double& x : v) x = nd(rng);
    for (int k = 0; k < j; ++k) {
      double dot = 0.0;
      for (int i = 0; i < D; ++i) dot += v[i] * u[i * D + k];
      for (int i = 0; i < D; ++i) v[i] -= dot * u[i * D + k];
    }
    double norm = 0.0;
    for (double x : v) norm += x * x;
    for (int i = 0; i < D; ++i) u[i * D + j] = v[i] / std::sqrt(norm);
  }
  return u;
}

DynaKvProfile TinyProfile(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  DynaKvProfile p;
  p.n_layer = c.n_layer;
  p.n_head_kv = c.n_head_kv;
  p.head_dim = c.head_dim;
  const int D = p.kv_dim();
  p.levels = {1, 2, 4, 6, D};
  for (auto* sets : {&p.k, &p.v}) {
    sets->resize(c.n_layer);
    for (BasisSet& b : *sets) {
      const std::vector<double> u = RandomOrthonormal(D, rng);
      b.basis.assign(u.begin(), u.end());
      for (int i = 0; i < D; ++i) b.mean.push_back(static_cast<float>(0.3 * nd(rng)));
      for (int i = 0; i < D; ++i) b.eigenvalues.push_back(D - i);
    }
  }
  return p;
}

// Everything for one loss evaluation on the tiny model in precision T.
template <typename T>
struct Tiny {
  static constexpr int B = 2, S = 5;  // sequences, tokens each
  ModelConfig config = TinyConfig();
  OwnedGraphWeights<T> weights = OwnedGraphWeights<T>::Random(config, 7);
  DynaKvProfile profile = TinyProfile(config, 11);
  ParamStore<T> params;
  RelaxedDynaKvCache<T> relax;
  TrainGraph<T> graph;
  ThreadPool pool{1};
  std::vector<int32_t> tokens, targets;
  std::vector<T> teacher, dlogits;
  double lambda = 3.0, target = 0.5, w_kl = 1.0, w_ce = 0.5, tau = 0.7;

  explicit Tiny(bool train_bases, bool tc = false)
      : relax(profile, config.n_embd, DynaKvCache::CostFor(profile.kv_dim(), KvDtype::kF16),
              RelaxedCacheOptions{3, 0.5, train_bases, 1.0, tc}, params),
        graph(weights.view(), B, S) {
    relax.InitParams(5);
    std::mt19937_64 rng(3);
    std::normal_distribution<double> nd(0.0, 1.0);
    // Larger router weights than InitParams' so that every path carries a visible gradient, and a
    // small rotation so that the Cayley map is not at its identity.
    for (T& x : params.values()) x = static_cast<T>(static_cast<double>(x) + 0.3 * nd(rng));
    const int N = B * S, V = config.n_vocab;
    for (int i = 0; i < N; ++i) tokens.push_back(static_cast<int32_t>(rng() % V));
    for (int i = 0; i < N; ++i) targets.push_back(i % S == S - 1 ? -1 : tokens[i + 1]);
    teacher.resize(static_cast<size_t>(N) * V);
    for (T& x : teacher) x = static_cast<T>(2.0 * nd(rng));
    dlogits.resize(teacher.size());
  }

  // The training loss at the current parameters (soft relaxed choices, fixed noise); with
  // `backward`, the gradients in params.grads() and graph.input_grad().
  double Loss(bool backward) {
    relax.Prepare(RouterMode::kGumbelSoft, tau, 42);
    EXPECT_TRUE(graph.Forward(tokens.data(), &relax, pool).ok());
    const int N = B * S;
    const DistillLossSums s = DistillLoss(graph.logits(), teacher.data(), targets.data(), N, config.n_vocab,
                                          static_cast<T>(w_kl), static_cast<T>(w_ce), static_cast<T>(1.0 / N),
                                          dlogits.data(), pool);
    const double gap = relax.expected_fraction() - target;
    if (backward) {
      relax.set_fraction_grad(2.0 * lambda * gap);
      params.ZeroGrad();
      graph.Backward(dlogits.data(), &relax, pool);
    }
    return (w_kl * s.kl + w_ce * s.ce) / N + lambda * gap * gap;
  }
};

// Central differences in double: the truncation error is h^2/6 |L'''| (L''' = O(10) here, so
// ~2e-10 at h = 1e-5) and the rounding error eps |L| / h ~ 2e-16 * 10 / 1e-5 = 2e-10; an absolute
// tolerance of 1e-7 plus 1e-6 relative leaves a wide margin while catching any wrong term (a
// missing term errs by O(|gradient|)).
constexpr double kH = 1e-5;
double GradTol(double g) { return 1e-7 + 1e-6 * std::fabs(g); }

// With tc latents (rank x precision) the keys and values a level stores are quantized: the
// gradient is exact for the choice probabilities (dL/dp_j = <dL/dx^, x^_j>) but passes the latent
// straight through its quantizer, so it is exact only for what does not move a quantized latent:
// the last layer's router. That is checked there, and the other gradients are not compared.
void CheckModelGradients(bool train_bases, bool tc = false) {
  Tiny<double> t(train_bases, tc);
  t.Loss(true);
  const std::vector<double> grad = t.params.grads();
  int checked = 0;
  const std::string last = "layer" + std::to_string(t.config.n_layer - 1) + ".router";
  // Every tensor, a few entries each (all of the small ones).
  for (const auto& tensor : t.params.tensors()) {
    if (tc && tensor.name.rfind(last, 0) != 0) continue;
    const size_t step = std::max<size_t>(1, tensor.size / 7);
    for (size_t i = 0; i < tensor.size; i += step) {
      double& x = t.params.values()[tensor.offset + i];
      const double saved = x;
      x = saved + kH;
      const double up = t.Loss(false);
      x = saved - kH;
      const double down = t.Loss(false);
      x = saved;
      const double numeric = (up - down) / (2 * kH);
      EXPECT_NEAR(grad[tensor.offset + i], numeric, GradTol(numeric)) << tensor.name << "[" << i << "]";
      ++checked;
    }
  }
  if (tc) {
    EXPECT_GT(checked, 20);
    return;
  }
  // The input embeddings: dL/d tok_embd[token] sums input_grad over the rows holding that token.
  t.Loss(true);
  const ModelConfig& c = t.config;
  for (int row : {0, 3, 7}) {
    const int tok = t.tokens[row];
    for (int e = 0; e < c.n_embd; e += 3) {
      double analytic = 0.0;
      for (size_t r = 0; r < t.tokens.size(); ++r)
        if (t.tokens[r] == tok) analytic += t.graph.input_grad()[r * c.n_embd + e];
      double& x = t.weights.tok_embd()[static_cast<size_t>(tok) * c.n_embd + e];
      const double saved = x;
      x = saved + kH;
      const double up = t.Loss(false);
      x = saved - kH;
      const double down = t.Loss(false);
      x = saved;
      const double numeric = (up - down) / (2 * kH);
      EXPECT_NEAR(analytic, numeric, GradTol(numeric)) << "embedding of token " << tok << " [" << e << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 60);
}

TEST(TrainGrad, WholeModelWithRouterMatchesCentralDifferences) { CheckModelGradients(false); }

TEST(TrainGrad, WholeModelWithTrainedBasesMatchesCentralDifferences) { CheckModelGradients(true); }

TEST(TrainGrad, TcRouterMatchesCentralDifferences) { CheckModelGradients(false, true); }

// The tc relaxation stores what the cache would: level j's keys are the decoded transform code of
// rank levels[j], not the plain low-rank prefix, so the loss differs from the rank-only one.
TEST(TrainGrad, TcRelaxationQuantizesTheLatents) {
  Tiny<double> plain(false), tc(false, true);
  const double a = plain.Loss(false), b = tc.Loss(false);
  EXPECT_GT(std::fabs(a - b), 1e-6 * std::fabs(a)) << a << " vs " << b;
}

TEST(TrainGrad, FloatGraphMatchesDouble) {
  Tiny<double> d(true);
  Tiny<float> f(true);
  const double ld = d.Loss(true), lf = f.Loss(true);
  // Float rounding through ~40 chained ops of width <= 12: relative errors of a few hundred ulps.
  EXPECT_NEAR(lf, ld, 1e-4 * std::fabs(ld));
  double gmax = 0.0;
  for (double g : d.params.grads()) gmax = std::max(gmax, std::fabs(g));
  for (size_t i = 0; i < d.params.size(); ++i)
    EXPECT_NEAR(f.params.grads()[i], d.params.grads()[i], 1e-3 * gmax) << "parameter " << i;
  const size_t n = static_cast<size_t>(d.graph.rows()) * d.config.n_vocab;
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(f.graph.logits()[i], d.graph.logits()[i], 1e-4) << "logit " << i;
}

TEST(TrainGrad, CayleyIsOrthogonalAndItsGradientMatches) {
  const int D = 5;
  std::mt19937_64 rng(9);
  std::normal_distribution<double> nd(0.0, 0.4);
  std::vector<double> w(D * D), q(D * D), minv(D * D), r(D * D);
  for (double& x : w) x = nd(rng);
  for (double& x : r) x = nd(rng);
  ASSERT_TRUE(CayleyForward(w.data(), D, q.data(), minv.data()).ok());
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) {
      double g = 0.0;
      for (int k = 0; k < D; ++k) g += q[k * D + i] * q[k * D + j];
      EXPECT_NEAR(g, i == j ? 1.0 : 0.0, 1e-13) << "Q^T Q at " << i << "," << j;
    }
  // L = sum r * Q(W)
  auto loss = [&] {
    std::vector<double> qq(D * D), mm(D * D);
    EXPECT_TRUE(CayleyForward(w.data(), D, qq.data(), mm.data()).ok());
    double s = 0.0;
    for (int i = 0; i < D * D; ++i) s += r[i] * qq[i];
    return s;
  };
  std::vector<double> dw(D * D, 0.0);
  CayleyBackward(q.data(), minv.data(), r.data(), D, dw.data());
  for (int i = 0; i < D * D; ++i) {
    const double saved = w[i];
    w[i] = saved + kH;
    const double up = loss();
    w[i] = saved - kH;
    const double down = loss();
    w[i] = saved;
    EXPECT_NEAR(dw[i], (up - down) / (2 * kH), GradTol(dw[i])) << "W[" << i << "]";
  }
}

// ---- Against the engine, on the test model ------------------------------------------------------

const Model& TheModel() {
  static std::unique_ptr<Model> model = [] {
    auto m = Model::Load(test::DataPath("brown-kjv-llama-6M-f32.gguf"));
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return std::move(m).value();
  }();
  return *model;
}

std::vector<int32_t> Tokens(const char* file, size_t offset, size_t n) {
  const std::string text = test::ReadText(test::DataPath(file)).substr(offset, 40 * n);
  std::vector<int32_t> t = TheModel().tokenizer().Encode(text, true);
  t.resize(n);
  return t;
}

// A PCA profile of the test model, from a slice of the calibration text (computed once).
const DynaKvProfile& TheProfile() {
  static DynaKvProfile p = [] {
    ThreadPool pool(2);
    const std::vector<int32_t> tokens = Tokens("calib.txt", 0, 1024);
    CalibrateOptions o;
    o.n_ctx = 256;
    auto r = Calibrate(TheModel(), tokens, o, pool);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return std::move(r).value();
  }();
  return p;
}

TEST(TrainGraphEngine, ForwardMatchesTheEngine) {
  ThreadPool pool(2);
  const int T = 96;
  const std::vector<int32_t> tokens = Tokens("valid.txt", 0, T);
  const ModelGraphWeights weights(TheModel());
  TrainGraph<float> graph(weights.view(), 1, T);
  // The size checked before allocating is the size allocated.
  EXPECT_EQ(TrainGraph<float>::BytesFor(TheModel().config(), 1, T), graph.bytes());
  EXPECT_EQ(TrainGraph<double>::BytesFor(TheModel().config(), 3, 40),
            TrainGraph<double>(OwnedGraphWeights<double>::Random(TheModel().config(), 1).view(), 3, 40).bytes());
  ASSERT_TRUE(graph.Forward(tokens.data(), nullptr, pool).ok());
  const ModelConfig& c = TheModel().config();
  FullKvCache cache(c.kv_shape(), T, KvDtype::kF32);
  ForwardState st(c, T);
  std::vector<float> logits(static_cast<size_t>(T) * c.n_vocab);
  ASSERT_TRUE(TheModel().Forward(tokens.data(), T, cache, st, logits.data(), true, pool).ok());
  // Same arithmetic in another order (GEMM blocking, attention kernels): float rounding through 6
  // layers, logits of magnitude ~10: agreement to ~1e-3 absolute.
  double worst = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(logits[i] - graph.logits()[i])));
  EXPECT_LT(worst, 2e-3);
}

// A router whose choices do not depend much on the token, with a strong preference per layer.
Router TestRouter(const DynaKvProfile& p, int n_embd, uint64_t seed) {
  ParamStore<float> params;
  RelaxedDynaKvCache<float> relax(p, n_embd, DynaKvCache::CostFor(p.kv_dim(), KvDtype::kF32),
                                  RelaxedCacheOptions{16, 0.3, false, 1.0}, params);
  relax.InitParams(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (float& x : params.values()) x += static_cast<float>(0.5 * nd(rng));
  DynaKvProfile out = p;
  relax.Export(&out);
  return *out.router;
}

// tc: the relaxation's decoded codes are the cache's (one codec; a code can flip only where float
// rounding puts a number on a quantizer boundary).
void CheckRelaxedArgmaxMatchesTheRouterCache(bool tc) {
  ThreadPool pool(2);
  const int T = 128;
  const ModelConfig& c = TheModel().config();
  DynaKvProfile p = TheProfile();
  p.router = TestRouter(p, c.n_embd, 21);
  // Training graph, one-hot choices without noise (what the router policy does at inference).
  ParamStore<float> params;
  const RecordCost cost =
      tc ? DynaKvCache::CostFor(p.kv_dim(), LatentFormat{LatentFormat::kTc, 0}) : DynaKvCache::CostFor(p.kv_dim(), KvDtype::kF32);
  RelaxedDynaKvCache<float> relax(p, c.n_embd, cost, RelaxedCacheOptions{16, 0.3, false, 1.0, tc}, params);
  relax.LoadParams(p);
  relax.Prepare(RouterMode::kArgmax, 1.0, 0);
  const std::vector<int32_t> tokens = Tokens("valid.txt", 5000, T);
  const ModelGraphWeights weights(TheModel());
  TrainGraph<float> graph(weights.view(), 1, T);
  ASSERT_TRUE(graph.Forward(tokens.data(), &relax, pool).ok());
  // The engine with the DynaKV cache (f32 latents) and the router policy.
  KvConfig kc;
  kc.method = "dynakv";
  kc.Set("--kv-dtype", tc ? "tc" : "f32").Set("--rank-policy", "router");
  auto cache = CreateDynaKvCacheFromProfile(kc, KvModelInfo{c.kv_shape(), TheModel().fingerprint(), "m"}, T,
                                            std::make_shared<const DynaKvProfile>(p), "p");
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  ForwardState st(c, T);
  std::vector<float> logits(static_cast<size_t>(T) * c.n_vocab);
  ASSERT_TRUE(TheModel().Forward(tokens.data(), T, **cache, st, logits.data(), true, pool).ok());
  int agree = 0, total = 0;
  const int L = static_cast<int>(p.levels.size());
  std::vector<int> seen(L, 0);
  for (int l = 0; l < c.n_layer; ++l)
    for (int t = 0; t < T; ++t) {
      const TokenRanks r = (*cache)->Ranks(l, t);
      const float* lk = &relax.logits_k(l)[static_cast<size_t>(t) * L];
      const float* lv = &relax.logits_v(l)[static_cast<size_t>(t) * L];
      const int jk = RouterChoice(lk, p.levels.data(), L, 0.0), jv = RouterChoice(lv, p.levels.data(), L, 0.0);
      agree += (p.levels[jk] == r.r_k) + (p.levels[jv] == r.r_v);
      total += 2;
      ++seen[jk];
    }
  // The router reads hidden states that agree to float rounding; only a near-tie can flip a choice.
  EXPECT_GE(agree, total * 99 / 100) << agree << " of " << total;
  EXPECT_GE(std::count_if(seen.begin(), seen.end(), [](int n) { return n > 0; }), 2) << "router too trivial";
  double worst = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(logits[i] - graph.logits()[i])));
  EXPECT_LT(worst, 5e-2) << "relaxed one-hot cache and the real cache disagree";
}

TEST(TrainGraphEngine, RelaxedArgmaxMatchesTheRouterCache) { CheckRelaxedArgmaxMatchesTheRouterCache(false); }

TEST(TrainGraphEngine, RelaxedArgmaxMatchesTheTcRouterCache) { CheckRelaxedArgmaxMatchesTheRouterCache(true); }

// ---- Checkpoints -----------------------------------------------------------------------------------

// Retrieval documents longer than a training sequence are shortened, not dropped: the key
// sentences and the question survive whole, in order, with less haystack between them.
TEST(TrainData, LongDocumentsAreShortenedAroundTheirKeys) {
  const Tokenizer& tok = TheModel().tokenizer();
  const std::vector<std::string> words = SplitWords(test::ReadText(test::DataPath("valid.txt")).substr(0, 40000));
  auto hay = [&](size_t b, size_t n) {
    std::string s;
    for (size_t i = b; i < b + n; ++i) s += (s.empty() ? "" : " ") + words[i];
    return s;
  };
  const std::string key = "The pass key is 48213. Remember it. 48213 is the pass key.";
  const std::string other = "The secret code is 11111. Remember it. 11111 is the secret code.";
  const std::string question = "What is the pass key? The pass key is 48213.";
  const std::string doc = hay(0, 300) + " " + other + " " + hay(300, 500) + " " + key + " " + hay(800, 400) + " " + question;
  const int full = static_cast<int>(tok.Encode(doc, false).size());
  ASSERT_GT(full, 1000);
  const std::string cut = ShortenDocument(doc, tok, 400);
  ASSERT_FALSE(cut.empty());
  EXPECT_LE(static_cast<int>(tok.Encode(cut, false).size()), 400);
  EXPECT_GT(static_cast<int>(tok.Encode(cut, false).size()), 250) << "as much haystack as fits";
  const size_t a = cut.find(other), b = cut.find(key), c = cut.find(question);
  ASSERT_NE(a, std::string::npos);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(c, std::string::npos);
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
  EXPECT_TRUE(cut.ends_with(question));
  EXPECT_EQ(ShortenDocument(doc, tok, 20), "") << "the protected parts alone are longer";
  // Through MakeTrainData: counted as shortened, none skipped.
  auto d = MakeTrainData(tok, test::ReadText(test::DataPath("calib.txt")).substr(0, 60000), doc + "\n\n" + key, 512);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->docs.size(), 2u);
  EXPECT_EQ(d->shortened_docs, 1);
  EXPECT_EQ(d->skipped_docs, 0);
  EXPECT_LE(d->docs[0].size(), 511u);
}

TEST(TrainCheckpoint, RoundTripAndDamage) {
  Checkpoint c{0x1234, 17, {1.0f, -2.0f, 3.5f}, {0.1f, 0.2f, 0.3f}, {1e-3f, 2e-3f, 3e-3f}, std::nullopt};
  const std::string path = ::testing::TempDir() + "dk_ckpt_test.ckpt";
  ASSERT_TRUE(SaveCheckpoint(c, path).ok());
  auto r = LoadCheckpoint(path);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config_hash, c.config_hash);
  EXPECT_EQ(r->step, c.step);
  EXPECT_EQ(r->params, c.params);
  EXPECT_EQ(r->m, c.m);
  EXPECT_EQ(r->v, c.v);
  EXPECT_FALSE(r->last.has_value());
  c.last = LastStepMetrics{0.5, 0.25, 3.0, 0.3};
  ASSERT_TRUE(SaveCheckpoint(c, path).ok());
  r = LoadCheckpoint(path);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_TRUE(r->last.has_value());
  EXPECT_EQ(r->last->loss, 0.5);
  EXPECT_EQ(r->last->kl, 0.25);
  EXPECT_EQ(r->last->ce, 3.0);
  EXPECT_EQ(r->last->fraction, 0.3);
  std::string bytes = test::ReadText(path);
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string bad = bytes;
    bad[i] ^= 0x10;
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(bad.data(), 1, bad.size(), f);
    std::fclose(f);
    auto b = LoadCheckpoint(path);
    EXPECT_FALSE(b.ok()) << "flipped byte " << i << " accepted";
    if (!b.ok()) {
      EXPECT_THAT(b.status().message(), HasSubstr(path));
    }
  }
  std::remove(path.c_str());
}

// ---- AdamW --------------------------------------------------------------------------------------------

// Three steps of AdamW on three numbers: a decayed tensor {1, -2} and an undecayed one {0.25} at half
// the learning rate (lr 0.1, no warm-up, cosine to 0.01 over 10 steps, clip 1, weight decay 0.01).
// Step 0 by hand: the gradient {0.5, -4, 3} has norm sqrt(25.25) > 1, so it is scaled to norm 1;
// after the bias corrections m/sqrt(v) is each number's sign, so w -= lr (sign + 0.01 w):
// 1 - 0.1 (1 + 0.01) = 0.899, -2 - 0.1 (-1 - 0.02) = -1.898, 0.25 - 0.05 = 0.2. Steps 1 and 2
// (gradients {0.1, 0.2, 0}, unclipped, and {-0.3, 0, 0.05}) are Loshchilov and Hutter's algorithm
// written out in double precision; the moments are stored in float, hence the tolerance.
TEST(AdamW, ThreeStepsMatchTheAlgorithmByHand) {
  ParamStore<float> p;
  const size_t w = p.Add("w", 2, /*decay=*/true), b = p.Add("b", 1, /*decay=*/false, /*lr_scale=*/0.5);
  p.value(w)[0] = 1.0f;
  p.value(w)[1] = -2.0f;
  p.value(b)[0] = 0.25f;
  AdamWOptions o;
  o.lr = 0.1;
  o.warmup = 0;
  o.min_lr_ratio = 0.1;
  o.weight_decay = 0.01;
  o.clip = 1.0;
  AdamW adam(o, p.size());
  const float grads[3][3] = {{0.5f, -4.0f, 3.0f}, {0.1f, 0.2f, 0.0f}, {-0.3f, 0.0f, 0.05f}};
  const double want[3][3] = {{0.899, -1.898, 0.2},
                             {0.800310897, -1.850332530, 0.167234976},
                             {0.822374741, -1.815543419, 0.141206602}};
  const double norms[3] = {5.024937811, 0.223606798, 0.304138127};
  EXPECT_NEAR(LearningRate(o, 1, 10), 0.0977975432, 1e-9);
  for (int step = 0; step < 3; ++step) {
    std::copy(grads[step], grads[step] + 3, p.grads().begin());
    EXPECT_NEAR(adam.Step(p, step, 10), norms[step], 1e-6) << "step " << step;
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(p.values()[i], want[step][i], 2e-6) << "step " << step << " number " << i;
  }
}

// ---- Training ----------------------------------------------------------------------------------------

TrainData SmallData(int seq_len) {
  auto d = MakeTrainData(TheModel().tokenizer(), test::ReadText(test::DataPath("calib.txt")).substr(0, 60000), "",
                         seq_len);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return std::move(d).value();
}

// The options of the training tests' 30-step runs at 25 % (sequences of 128 tokens).
TrainRouterOptions ShortRunAtAQuarter() {
  TrainRouterOptions o;
  o.target = 0.25;
  o.steps = 30;
  o.batch = 2;
  o.seq_len = 128;
  o.hidden = 16;
  o.calib_seqs = 8;
  return o;
}

TEST(TrainRouter, ResumedRunEqualsUninterrupted) {
  ThreadPool pool(2);
  SetBlasThreads(2);
  const TrainData data = SmallData(48);
  TrainRouterOptions o;
  o.steps = 6;
  o.batch = 1;
  o.seq_len = 48;
  o.hidden = 8;
  o.calib_seqs = 2;
  o.adam.warmup = 2;
  o.checkpoint_path = ::testing::TempDir() + "dk_resume_test.ckpt";
  std::remove(o.checkpoint_path.c_str());
  auto whole = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  ASSERT_TRUE(whole->finished);
  std::remove(o.checkpoint_path.c_str());

  o.resume = true;
  o.stop_after = 4;
  auto first = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_FALSE(first->finished);
  EXPECT_EQ(first->steps_done, 4);
  o.stop_after = -1;
  auto rest = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(rest.ok()) << rest.status().ToString();
  EXPECT_EQ(rest->start_step, 4);
  ASSERT_TRUE(rest->finished);
  EXPECT_EQ(rest->params, whole->params) << "resumed parameters differ from the uninterrupted run";
  EXPECT_EQ(SerializeProfile(rest->profile), SerializeProfile(whole->profile));
  // Resumed once more, after its last step: nothing is trained, and the profile is the same, the
  // last step's metrics in its training info included (they were dropped: the checkpoint held none).
  auto again = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->start_step, 6);
  EXPECT_TRUE(again->history.empty());
  ASSERT_TRUE(again->profile.router);
  EXPECT_THAT(again->profile.router->info, HasSubstr("\"last_step\""));
  EXPECT_EQ(again->profile.router->info, whole->profile.router->info);
  EXPECT_EQ(SerializeProfile(again->profile), SerializeProfile(whole->profile));

  // A checkpoint of another configuration is refused.
  o.seed = 2;
  auto other = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_FALSE(other.ok());
  EXPECT_THAT(other.status().message(), HasSubstr("another configuration"));
  std::remove(o.checkpoint_path.c_str());
}

// The router is trained at a target, calibrated on training sequences, and measured on held-out
// text: its argmax lands within 2 % of the target, and --kv-budget meets another fraction as
// closely (both are offsets calibrated on training text, with no feedback from the text at hand:
// rank_policy_router.cpp says why).
TEST(TrainRouter, MeetsItsTargetOnHeldOutText) {
  ThreadPool pool(2);
  SetBlasThreads(2);
  const TrainData data = SmallData(128);
  TrainRouterOptions o = ShortRunAtAQuarter();
  auto r = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto profile = std::make_shared<const DynaKvProfile>(r->profile);
  const ModelConfig& c = TheModel().config();
  const std::vector<int32_t> held_out = Tokens("valid.txt", 0, 4 * 128);
  for (double budget : {-1.0, 0.125}) {
    KvConfig kc;
    kc.method = "dynakv";
    kc.Set("--rank-policy", "router");
    if (budget > 0) kc.Set("--kv-budget", std::to_string(budget));
    auto cache = CreateDynaKvCacheFromProfile(kc, KvModelInfo{c.kv_shape(), TheModel().fingerprint(), "m"}, 128,
                                              profile, "p");
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    PerplexityOptions po;
    po.n_ctx = 128;
    auto ppl = ComputePerplexity(TheModel(), held_out, **cache, nullptr, po, pool);
    ASSERT_TRUE(ppl.ok()) << ppl.status().ToString();
    const double want = budget > 0 ? budget : o.target;
    EXPECT_NEAR(ppl->kv_fraction, want, 0.02 * want) << "budget " << budget;
  }
}

// Training teaches the router something: on held-out text its KL from the full cache is below that
// of the same router untrained (a learning rate of 1e-30: its initial weights, with the same calibrated
// offsets, so it meets the same target) and below the energy policy's at the fraction the trained
// router realised. A trainer whose step did nothing met its target all the same (the final offset
// calibration alone does that), so only this catches it.
TEST(TrainRouter, LowersKlBelowTheUntrainedRouterAndEnergy) {
  ThreadPool pool(2);
  SetBlasThreads(2);
  const TrainData data = SmallData(128);
  TrainRouterOptions o = ShortRunAtAQuarter();
  const ModelConfig& c = TheModel().config();
  const std::vector<int32_t> held_out = Tokens("valid.txt", 0, 8 * 128);
  PerplexityOptions po;
  po.n_ctx = 128;
  auto kl_of = [&](const KvConfig& kc, std::shared_ptr<const DynaKvProfile> profile, double* fraction) {
    auto cache = CreateDynaKvCacheFromProfile(kc, KvModelInfo{c.kv_shape(), TheModel().fingerprint(), "m"}, 128,
                                              std::move(profile), "p");
    EXPECT_TRUE(cache.ok()) << cache.status().ToString();
    FullKvCache full(c.kv_shape(), 128, KvDtype::kF16);
    auto r = ComputePerplexity(TheModel(), held_out, **cache, &full, po, pool);
    EXPECT_TRUE(r.ok() && r->has_kl) << r.status().ToString();
    if (fraction != nullptr) *fraction = r->kv_fraction;
    return r->kl_mean;
  };
  KvConfig router;
  router.method = "dynakv";
  router.Set("--rank-policy", "router");
  auto trained = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(trained.ok()) << trained.status().ToString();
  o.steps = 1;
  o.adam.lr = 1e-30;  // one step that moves nothing (a learning rate of 0 is refused)
  auto untrained = TrainRouter(TheModel(), TheProfile(), data, o, pool);
  ASSERT_TRUE(untrained.ok()) << untrained.status().ToString();
  double f_trained = 0, f_untrained = 0;
  const double kl_trained = kl_of(router, std::make_shared<const DynaKvProfile>(trained->profile), &f_trained);
  const double kl_untrained = kl_of(router, std::make_shared<const DynaKvProfile>(untrained->profile), &f_untrained);
  KvConfig energy;
  energy.method = "dynakv";
  energy.Set("--rank-policy", "energy");
  energy.Set("--kv-budget", std::to_string(f_trained));
  double f_energy = 0;
  const double kl_energy = kl_of(energy, std::make_shared<const DynaKvProfile>(TheProfile()), &f_energy);
  std::printf("held-out KL: trained router %.4f (fraction %.4f), untrained %.4f (%.4f), energy %.4f (%.4f)\n",
              kl_trained, f_trained, kl_untrained, f_untrained, kl_energy, f_energy);
  EXPECT_NEAR(f_untrained, f_trained, 0.02 * o.target);
  EXPECT_NEAR(f_energy, f_trained, 0.02 * o.target);
  EXPECT_LT(kl_trained, kl_untrained);
  EXPECT_LT(kl_trained, kl_energy);
}

// ---- The commands ------------------------------------------------------------------------------------

// train-router end to end on the test model (a few steps), then the router policy, rankmap and
// info on its output; and the errors a user meets first.
TEST(TrainRouterCli, TrainsAndTheProfileServesTheRouter) {
  const std::string dir = ::testing::TempDir();
  const std::string model = test::DataPath("brown-kjv-llama-6M-f32.gguf"), text = test::DataPath("calib.txt");
  const std::string base = dir + "dk_cli_base.dkv", out = dir + "dk_cli_router.dkv", log = dir + "dk_cli_log.jsonl";
  ASSERT_TRUE(SaveProfile(TheProfile(), base).ok());
  auto r = test::RunCli("train-router -m " + model + " --profile " + base + " -f " + text +
                        " --target 0.3 --steps 4 --seq-len 64 --hidden 8 --calib-seqs 2 -t 2 -q -o " + out +
                        " --log " + log);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("calibrated fraction"));
  EXPECT_FALSE(std::ifstream(out + ".ckpt").good()) << "the checkpoint of a finished run is removed";
  const std::string lines = test::ReadText(log);
  EXPECT_EQ(std::count(lines.begin(), lines.end(), '\n'), 4) << "one JSON line per step";
  auto info = test::RunCli("info -m " + model + " --profile " + out);
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_THAT(info.out, HasSubstr("router          hidden width 8, trained for fraction 0.3"));
  auto ppl = test::RunCli("perplexity -m " + model + " -f " + test::DataPath("valid.txt") +
                          " -c 64 --chunks 2 -q --kv dynakv --rank-policy router --kv-budget 0.2 --profile " + out);
  ASSERT_EQ(ppl.exit_code, 0) << ppl.err;
  EXPECT_THAT(ppl.out, HasSubstr("PPL = "));
  const std::string html = dir + "dk_cli_map.html";
  auto map = test::RunCli("rankmap -m " + model + " --profile " + out + " -f " + test::DataPath("valid.txt") +
                          " -n 40 -o " + html);
  ASSERT_EQ(map.exit_code, 0) << map.err;
  EXPECT_THAT(map.out, HasSubstr("mean rank per layer"));
  const std::string page = test::ReadText(html);
  EXPECT_THAT(page, HasSubstr("<!doctype html>"));
  EXPECT_THAT(page, HasSubstr("layer 5"));
  EXPECT_EQ(page.find("http"), std::string::npos) << "the page must not reach the network";

  // A profile without a router, for the router policy: exit 2 naming the fix.
  auto none = test::RunCli("perplexity -m " + model + " -f " + test::DataPath("valid.txt") +
                           " -c 64 --chunks 2 -q --kv dynakv --rank-policy router --profile " + base);
  EXPECT_EQ(none.exit_code, 2) << none.err;
  EXPECT_THAT(none.err, HasSubstr("train-router"));
  // Bad flags, and an output folder that does not exist: refused before any training.
  auto bad = test::RunCli("train-router -m " + model + " --profile " + base + " -f " + text + " --target 1.5 -o " + out);
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("--target"));
  auto nodir = test::RunCli("train-router -m " + model + " --profile " + base + " -f " + text +
                            " -o /nonexistent-dir/x.dkv");
  EXPECT_EQ(nodir.exit_code, 2);
  EXPECT_THAT(nodir.err, HasSubstr("/nonexistent-dir"));
  // A graph larger than the machine: refused with the sizes, before it is allocated.
  auto huge = test::RunCli("train-router -m " + model + " --profile " + base + " -f " + text +
                           " --seq-len 65536 --batch 64 --steps 1 -q -o " + out);
  EXPECT_EQ(huge.exit_code, 1) << huge.err;
  EXPECT_THAT(huge.err, HasSubstr("--seq-len 65536"));
  EXPECT_THAT(huge.err, HasSubstr("of memory is available"));
  for (const std::string& f : {base, out, log, html}) std::remove(f.c_str());
}

TEST(RankMap, PageEscapesTextAndCarriesEveryRank) {
  RankMap m;
  m.title = "t<i>tle";
  m.pieces = {"<s>", " a&b", " \"q\"", "</script>"};
  m.levels = {1, 2, 4};
  m.D = 4;
  m.n_layer = 2;
  m.rk = {1, 2, 4, 4, 2, 2, 1, 4};
  m.rv = {4, 4, 1, 2, 1, 1, 2, 2};
  const std::string html = RankMapHtml(m);
  EXPECT_THAT(html, HasSubstr("t&lt;i&gt;tle"));
  EXPECT_THAT(html, HasSubstr("&lt;/script&gt;"));
  EXPECT_THAT(html, HasSubstr(" a&amp;b"));
  EXPECT_EQ(html.find("</script>", html.find("<script>")), html.rfind("</script>")) << "one script block, closed once";
  EXPECT_THAT(html, HasSubstr("\"rk\":[1,2,4,4,2,2,1,4]"));
  EXPECT_THAT(html, HasSubstr("layer 0: K 1, V 4"));
  EXPECT_DOUBLE_EQ(m.MeanRank(0), (1 + 4 + 2 + 1) / 4.0);
  EXPECT_THAT(RankMapSummary(m, 1, 3), HasSubstr("0: 2.8 / 2.8"));
}

}  // namespace
}  // namespace dk
