// One conformance suite for every registered KV method and every eviction wrapper over every storage
// method (the registry's list, so a new method is tested the moment it is registered; Variants()
// adds further flag sets of a storage method, under every wrapper too): appending,
// attention against a double-precision reference on what the cache stores, attention weights,
// byte accounting, retention, clearing, and refusing what does not fit.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <random>

#include "core/threads.h"
#include "kv/eviction.h"
#include "kv/profile.h"
#include "kv/registry.h"
#include "ops/attention.h"

namespace dk {
namespace {

using ::testing::HasSubstr;

const KvShape kShape{2, 4, 2, 32, 16};  // 2 layers, GQA 4/2, head size 32: D = 64
constexpr uint64_t kFingerprint = 0xC0FFEE;
constexpr int kCapacity = 48;

std::string ProfilePath() {
  static const std::string path = [] {
    std::mt19937_64 rng(5);
    std::normal_distribution<double> nd(0.0, 1.0);
    DynaKvProfile p;
    p.model_fingerprint = kFingerprint;
    p.model_name = "conformance";
    p.n_layer = kShape.n_layer;
    p.n_head_kv = kShape.n_head_kv;
    p.head_dim = kShape.head_dim;
    const int D = p.kv_dim();
    p.levels = DefaultLevels(D);
    for (auto* sets : {&p.k, &p.v}) {
      sets->resize(p.n_layer);
      for (BasisSet& b : *sets) {  // Gram-Schmidt on random columns
        std::vector<double> u(static_cast<size_t>(D) * D);
        for (int j = 0; j < D; ++j) {
          std::vector<double> v(D);
          for (double& x : v) x = nd(rng);
          for (int k = 0; k < j; ++k) {
            double dot = 0;
            for (int i = 0; i < D; ++i) dot += v[i] * u[i * D + k];
            for (int i = 0; i < D; ++i) v[i] -= dot * u[i * D + k];
          }
          double norm = 0;
          for (double x : v) norm += x * x;
          for (int i = 0; i < D; ++i) u[i * D + j] = v[i] / std::sqrt(norm);
        }
        b.basis.assign(u.begin(), u.end());
        b.mean.assign(D, 0.1f);
        for (int i = 0; i < D; ++i) b.eigenvalues.push_back(D - i);
      }
    }
    const std::string file = ::testing::TempDir() + "dk_conformance.dkv";
    EXPECT_TRUE(SaveProfile(p, file).ok());
    return file;
  }();
  return path;
}

// The flags each method is tested with. A registered method missing here fails the suite.
std::map<std::string, std::map<std::string, std::string>> Flags() {
  return {
      {"full", {}},
      {"dynakv", {{"--profile", ProfilePath()}, {"--rank-policy", "energy"}, {"--kv-budget", "0.4"}}},
      {"snapkv", {{"--evict-keep", "0.5"}, {"--snapkv-window", "4"}, {"--snapkv-pool", "3"}}},
      {"streamingllm", {{"--evict-keep", "0.5"}, {"--sinks", "2"}}},
      {"h2o", {{"--evict-keep", "0.5"}}},
      {"q8_0", {}},
      {"q4_0", {}},
      // Groups of 8 fill within the suite's batches (13, 1, 1, 9 tokens). A filled group takes less
      // room than its tokens did in the fp16 residual (at 4 bits, 16 bytes per channel for 8 tokens'
      // keys and values, against 32), yet the bytes still grow with every batch, as step 1 checks:
      // 36, 40, 44, 48 x D after the four batches.
      {"kivi", {{"--kivi-bits", "4"}, {"--kivi-group", "8"}}},
  };
}

// Further flag sets of storage methods, run through the same suite, alone and under every wrapper:
// the rotated layouts, 2-bit KIVI with a residual of two groups (groups of 4 at 2 bits: bytes
// after the batches 40, 44, 48, 60 x D, still growing), and DynaKV's batch-invariant policies
// (uniform ranks, energy at a fixed tau; the energy budget of Flags() bisects per batch), and
// rank x precision (transform-coded latents) at a uniform byte budget.
struct Variant {
  std::string label, method;
  std::map<std::string, std::string> flags;
};

std::vector<Variant> Variants() {
  return {
      {"q8_0_hadamard", "q8_0", {{"--hadamard", "1"}}},
      {"q4_0_hadamard", "q4_0", {{"--hadamard", "1"}}},
      {"kivi_2bit_hadamard",
       "kivi",
       {{"--kivi-bits", "2"}, {"--kivi-group", "4"}, {"--kivi-residual", "8"}, {"--hadamard", "1"}}},
      {"dynakv_uniform", "dynakv", {{"--profile", ProfilePath()}, {"--rank-policy", "uniform"}, {"--rank", "20"}}},
      {"dynakv_energy_tau", "dynakv", {{"--profile", ProfilePath()}, {"--rank-policy", "energy"}, {"--tau", "0.9"}}},
      {"dynakv_tc",
       "dynakv",
       {{"--profile", ProfilePath()}, {"--rank-policy", "uniform"}, {"--kv-budget", "0.25"}, {"--kv-dtype", "tc"}}},
  };
}

struct Combo {
  std::string storage, wrapper;
  std::string variant;  // a label of Variants(), or empty: the method's Flags()
  std::string Name() const { return (variant.empty() ? storage : variant) + (wrapper.empty() ? "" : "+" + wrapper); }
};

// Names the combination in gtest's messages (instead of the struct's bytes).
void PrintTo(const Combo& c, std::ostream* os) { *os << c.Name(); }

std::vector<Combo> AllCombos() {
  std::vector<Combo> combos;
  auto add = [&](const std::string& storage, const std::string& variant) {
    combos.push_back({storage, "", variant});
    for (const KvMethod* w : KvMethods())
      if (w->is_wrapper()) combos.push_back({storage, w->name, variant});
  };
  for (const KvMethod* m : KvMethods())
    if (!m->is_wrapper()) add(m->name, "");
  for (const Variant& v : Variants()) add(v.method, v.label);
  return combos;
}

StatusOr<std::unique_ptr<KvCache>> Make(const Combo& c, int capacity = kCapacity) {
  KvConfig config;
  config.method = c.storage;
  config.evict = c.wrapper;
  auto flags = Flags();
  for (const Variant& v : Variants())
    if (v.label == c.variant) flags[c.storage] = v.flags;
  for (const std::string& m : {c.storage, c.wrapper}) {
    if (m.empty()) continue;
    auto it = flags.find(m);
    if (it == flags.end()) return Internal("no conformance flags for method '" + m + "': add them to Flags()");
    for (const auto& [flag, value] : it->second) config.Set(flag, value);
  }
  return CreateKvCache(config, KvModelInfo{kShape, kFingerprint, "conformance-model"}, capacity);
}

// How far a kept row may move when the storage keeps it. Every storage method keeps its rows bit for
// bit, except KIVI: its key groups span tokens, so retention dequantizes and re-appends the kept
// rows. Step 4 keeps 5 rows, fewer than a residual (8 in both KIVI flag sets), so all 5 land in
// the fp16 residual, rounded once: |fp16(y) - y| <= u16 |y| (+ 2^-25 among the subnormals) per
// number y as stored. Rotated (--hadamard), ReadKeys returns H y: the error H e of a head has
// |(H e)_i| <= ||e||_2 <= u16 ||y||_2 + sqrt(d) 2^-25, with ||y||_2 = the head's norm as read;
// the two transforms round (log2 d + 1) times each, 2 * 6 * 2^-24 < 2^-19 relative to that norm.
// Both cases: |after - before| <= (2^-11 + 2^-19) ||head||_2 + 2^-22 (> sqrt(32) 2^-25).
bool RetainRequantizes(const Combo& c) { return c.storage == "kivi"; }

void ExpectKeptRow(const Combo& c, const float* after, const float* before, int s) {
  for (int g = 0; g < kShape.n_head_kv; ++g) {
    const int d = kShape.head_dim;
    double norm = 0;
    for (int e = 0; e < d; ++e) norm += static_cast<double>(before[g * d + e]) * before[g * d + e];
    const double tol = RetainRequantizes(c) ? (std::ldexp(1.0, -11) + std::ldexp(1.0, -19)) * std::sqrt(norm) +
                                                  std::ldexp(1.0, -22)
                                            : 0.0;
    for (int e = 0; e < d; ++e)
      EXPECT_LE(std::fabs(after[g * d + e] - before[g * d + e]), tol)
          << c.Name() << " kept row " << s << ", KV head " << g << ", element " << e;
  }
}

struct Batch {
  int n;
  std::vector<float> k, v, x, q;
};

Batch RandomBatch(int n, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Batch b{n, {}, {}, {}, {}};
  for (auto* buf : {&b.k, &b.v}) buf->resize(static_cast<size_t>(n) * kShape.kv_dim());
  b.x.resize(static_cast<size_t>(n) * kShape.n_embd);
  b.q.resize(static_cast<size_t>(n) * kShape.q_dim());
  for (auto* buf : {&b.k, &b.v, &b.x, &b.q})
    for (float& e : *buf) e = nd(rng);
  return b;
}

// Causal attention in double over what the cache stores (ReadKeys / ReadValues): query i of the
// batch sees the stored tokens before the batch and the batch's tokens up to i.
std::vector<double> Reference(const KvCache& cache, int layer, const Batch& b) {
  const int T = cache.Stored(layer), D = kShape.kv_dim(), d = kShape.head_dim, Hq = kShape.n_head;
  const int group = Hq / kShape.n_head_kv;
  std::vector<float> K(static_cast<size_t>(T) * D), V(K.size());
  cache.ReadKeys(layer, 0, T, K.data());
  cache.ReadValues(layer, 0, T, V.data());
  std::vector<double> out(static_cast<size_t>(b.n) * Hq * d, 0.0);
  for (int i = 0; i < b.n; ++i)
    for (int h = 0; h < Hq; ++h) {
      const int visible = T - b.n + i + 1, col = h / group * d;
      std::vector<double> s(visible);
      double mx = -1e300, sum = 0;
      for (int t = 0; t < visible; ++t) {
        double dot = 0;
        for (int e = 0; e < d; ++e)
          dot += static_cast<double>(b.q[(static_cast<size_t>(i) * Hq + h) * d + e]) * K[static_cast<size_t>(t) * D + col + e];
        s[t] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, s[t]);
      }
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int e = 0; e < d; ++e) {
        double acc = 0;
        for (int t = 0; t < visible; ++t) acc += s[t] * V[static_cast<size_t>(t) * D + col + e];
        out[(static_cast<size_t>(i) * Hq + h) * d + e] = acc / sum;
      }
    }
  return out;
}

// Runs one batch through every layer: Plan, Apply, Write, Attend; checks Attend against the
// reference. Returns the outputs of the last layer.
std::vector<float> RunBatch(KvCache& cache, const Batch& b, ThreadPool& pool, const std::string& what) {
  auto plan = cache.Plan(b.n);
  EXPECT_TRUE(plan.ok()) << what << ": " << plan.status().ToString();
  if (!plan.ok()) return {};
  EXPECT_TRUE(cache.Apply(*plan).ok()) << what;
  std::vector<float> out(static_cast<size_t>(b.n) * kShape.q_dim());
  for (int l = 0; l < kShape.n_layer; ++l) {
    cache.Write(l, *plan, b.k.data(), b.v.data(), b.x.data());
    // The reference reads the cache before Attend: eviction during decode happens after it.
    const std::vector<double> want = Reference(cache, l, b);
    cache.Attend(l, *plan, b.q.data(), out.data(), pool);
    // Softmax weights in [0, 1] summing to 1 over values of magnitude ~3: float rounding of the dot
    // products (d = 32 terms) and of the T-term sums leaves errors of ~1e-5; 1e-3 is a wide margin
    // that still catches any wrong weight or row.
    double worst = 0;
    for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(out[i] - want[i]));
    EXPECT_LT(worst, 1e-3) << what << ": attention differs from the reference on the stored keys/values, layer " << l;
  }
  return out;
}

class Conformance : public ::testing::TestWithParam<Combo> {};

TEST_P(Conformance, AppendAttendRetainClearAndRefuse) {
  const Combo c = GetParam();
  auto made = Make(c);
  ASSERT_TRUE(made.ok()) << c.Name() << ": " << made.status().ToString();
  KvCache& cache = **made;
  ThreadPool pool(2);
  std::mt19937_64 rng(17);
  const std::vector<Batch> batches = {RandomBatch(13, rng), RandomBatch(1, rng), RandomBatch(1, rng),
                                      RandomBatch(9, rng)};
  // 1. Append and attend; stored counts and bytes grow with every batch (before any eviction).
  size_t bytes = 0;
  int seen = 0;
  std::vector<std::vector<float>> first_outputs;
  for (size_t i = 0; i < batches.size(); ++i) {
    first_outputs.push_back(RunBatch(cache, batches[i], pool, c.Name() + " batch " + std::to_string(i)));
    seen += batches[i].n;
    EXPECT_EQ(cache.n_tokens(), seen) << c.Name();
    for (int l = 0; l < kShape.n_layer; ++l) EXPECT_EQ(cache.Stored(l), seen) << c.Name() << " layer " << l;
    EXPECT_GT(cache.BytesUsed(), bytes) << c.Name() << " batch " << i;
    bytes = cache.BytesUsed();
    EXPECT_LE(cache.BytesUsed(), cache.BytesReserved()) << c.Name();
  }
  // 2. Attention weights: rows sum to 1 over the visible tokens.
  {
    const int T = cache.Stored(0), nq = 3;
    std::vector<float> probs(static_cast<size_t>(nq) * kShape.n_head * T);
    cache.Scores(0, batches[3].q.data() + 6 * kShape.q_dim(), nq, probs.data());
    for (int i = 0; i < nq; ++i)
      for (int h = 0; h < kShape.n_head; ++h) {
        double sum = 0;
        for (int t = 0; t < T; ++t) sum += probs[(static_cast<size_t>(i) * kShape.n_head + h) * T + t];
        EXPECT_NEAR(sum, 1.0, 1e-5) << c.Name() << " query " << i << " head " << h;
        // The queries are those of the last 3 tokens: only the last one sees the last token.
        if (i < nq - 1) {
          EXPECT_EQ(probs[(static_cast<size_t>(i) * kShape.n_head + h) * T + T - 1], 0.0f)
              << c.Name() << ": a query sees a token after it";
        }
      }
  }
  // 3. End of the prompt: eviction wrappers keep their budget, storage methods keep everything.
  ASSERT_TRUE(cache.EndPrompt(pool).ok()) << c.Name();
  const int kept = cache.Stored(0);
  if (c.wrapper.empty()) {
    EXPECT_EQ(kept, seen) << c.Name();
  } else {
    EXPECT_EQ(kept, static_cast<int>(std::lround(0.5 * seen))) << c.Name();
    EXPECT_LT(cache.BytesUsed(), bytes) << c.Name() << ": eviction freed nothing";
    // A decode step after the prompt attends over what was kept.
    Batch d = RandomBatch(1, rng);
    RunBatch(cache, d, pool, c.Name() + " after eviction");
    EXPECT_EQ(cache.Stored(0), c.wrapper == "snapkv" ? kept + 1 : kept) << c.Name();
  }
  // 4. Retain on the storage itself: the kept rows are the rows read before, in order (KIVI: up to
  //    one fp16 rounding, see ExpectKeptRow).
  if (c.wrapper.empty()) {
    const int T = cache.Stored(1), D = kShape.kv_dim();
    std::vector<float> before(static_cast<size_t>(T) * D), after;
    cache.ReadKeys(1, 0, T, before.data());
    const std::vector<int> keep = {0, 2, 3, 7, T - 1};
    ASSERT_TRUE(cache.Retain(1, {keep}).ok()) << c.Name();
    EXPECT_EQ(cache.Stored(1), 5) << c.Name();
    after.resize(static_cast<size_t>(5) * D);
    cache.ReadKeys(1, 0, 5, after.data());
    for (int s = 0; s < 5; ++s)
      ExpectKeptRow(c, after.data() + static_cast<size_t>(s) * D, before.data() + static_cast<size_t>(keep[s]) * D, s);
    EXPECT_FALSE(cache.Retain(1, {{3, 1}}).ok()) << c.Name() << ": decreasing indices accepted";
    EXPECT_FALSE(cache.Retain(1, {{0, 99}}).ok()) << c.Name() << ": an index past the stored tokens accepted";
    EXPECT_FALSE(cache.Retain(7, {{0}}).ok()) << c.Name() << ": a layer that does not exist accepted";
  }
  // 5. Clear: nothing stored, and the same input gives the same output, bit for bit.
  cache.Clear();
  EXPECT_EQ(cache.n_tokens(), 0) << c.Name();
  for (int l = 0; l < kShape.n_layer; ++l) EXPECT_EQ(cache.Stored(l), 0) << c.Name();
  EXPECT_EQ(cache.BytesUsed(), 0u) << c.Name();
  for (size_t i = 0; i < batches.size(); ++i)
    EXPECT_EQ(RunBatch(cache, batches[i], pool, c.Name() + " again"), first_outputs[i]) << c.Name() << " batch " << i;
  // 6. Capacity: what does not fit is refused, and nothing changes.
  const int left = kCapacity - cache.n_tokens();
  auto over = cache.Plan(left + 1);
  ASSERT_FALSE(over.ok()) << c.Name();
  EXPECT_EQ(over.status().code(), Code::kResourceExhausted) << c.Name();
  EXPECT_TRUE(cache.Plan(left).ok()) << c.Name();
}

// A cache that says it is batch-invariant (KvCache::BatchInvariant, what the server's prefix reuse
// relies on) stores the same bits for the same tokens however they were batched and wherever
// prompts ended: 30 tokens as one prompt, or as a prompt of 7, two decode steps, a second prompt of
// 12 and one of 9 (a chat's next turns). Then one more token attends alike in both.
TEST_P(Conformance, BatchInvariantCachesStoreTheSameWhateverTheBatches) {
  const Combo c = GetParam();
  std::mt19937_64 rng(29);
  const Batch all = RandomBatch(30, rng), next = RandomBatch(1, rng);
  auto slice = [&](int first, int n) {
    Batch b{n, {}, {}, {}, {}};
    auto cut = [&](const std::vector<float>& src, std::vector<float>* dst, int width) {
      dst->assign(src.begin() + static_cast<ptrdiff_t>(first) * width, src.begin() + static_cast<ptrdiff_t>(first + n) * width);
    };
    cut(all.k, &b.k, kShape.kv_dim());
    cut(all.v, &b.v, kShape.kv_dim());
    cut(all.x, &b.x, kShape.n_embd);
    cut(all.q, &b.q, kShape.q_dim());
    return b;
  };
  auto one = Make(c), cut = Make(c);
  ASSERT_TRUE(one.ok() && cut.ok()) << c.Name();
  if (!(*one)->BatchInvariant()) {
    // Only what the documentation names: eviction, and DynaKV's energy policy with a byte budget.
    EXPECT_TRUE(!c.wrapper.empty() || (c.storage == "dynakv" && c.variant.empty())) << c.Name();
    return;
  }
  ThreadPool pool(2);
  RunBatch(**one, all, pool, c.Name() + " in one batch");
  ASSERT_TRUE((*one)->EndPrompt(pool).ok());
  int first = 0;
  for (const auto& [n, prompt_ends] : std::vector<std::pair<int, bool>>{{7, true}, {1, false}, {1, false}, {12, true}, {9, true}}) {
    RunBatch(**cut, slice(first, n), pool, c.Name() + " in pieces");
    if (prompt_ends) {
      ASSERT_TRUE((*cut)->EndPrompt(pool).ok());
    }
    first += n;
  }
  ASSERT_EQ(first, all.n);
  EXPECT_EQ((*one)->BytesUsed(), (*cut)->BytesUsed()) << c.Name();
  const int D = kShape.kv_dim();
  for (int l = 0; l < kShape.n_layer; ++l) {
    ASSERT_EQ((*one)->Stored(l), (*cut)->Stored(l)) << c.Name();
    const int T = (*one)->Stored(l);
    std::vector<float> a(static_cast<size_t>(T) * D), b(a.size());
    (*one)->ReadKeys(l, 0, T, a.data());
    (*cut)->ReadKeys(l, 0, T, b.data());
    EXPECT_EQ(a, b) << c.Name() << ": keys of layer " << l << " depend on the batches";
    (*one)->ReadValues(l, 0, T, a.data());
    (*cut)->ReadValues(l, 0, T, b.data());
    EXPECT_EQ(a, b) << c.Name() << ": values of layer " << l << " depend on the batches";
  }
  EXPECT_EQ(RunBatch(**one, next, pool, c.Name() + " next"), RunBatch(**cut, next, pool, c.Name() + " next"))
      << c.Name();
}

INSTANTIATE_TEST_SUITE_P(AllMethods, Conformance, ::testing::ValuesIn(AllCombos()),
                         [](const ::testing::TestParamInfo<Combo>& p) {
                           std::string n = p.param.Name();
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// Decode over more tokens than one tile of the decode path (kDecodeTile, ops/attention.h), with
// pools that split the query heads sharing a KV head into runs (1, 3 and 8 threads for 2 KV heads
// of 2 query heads): every storage method still attends as the reference says, and the methods on
// the shared decode path give the same bits whatever the split (each head's arithmetic is its own).
TEST(ConformanceDecode, TilesAndHeadSplitsAgreeWithTheReference) {
  for (const Combo& c : AllCombos()) {
    if (!c.wrapper.empty()) continue;
    std::vector<float> first;
    for (const int threads : {1, 3, 8}) {
      auto made = Make(c, 400);
      ASSERT_TRUE(made.ok()) << c.Name() << ": " << made.status().ToString();
      KvCache& cache = **made;
      ThreadPool pool(threads);
      std::mt19937_64 rng(23);
      RunBatch(cache, RandomBatch(300, rng), pool, c.Name() + " prompt");
      std::vector<float> out;
      for (int step = 0; step < 3; ++step)
        out = RunBatch(cache, RandomBatch(1, rng), pool, c.Name() + " decode, " + std::to_string(threads) + " threads");
      if (first.empty()) first = out;
      // The shared decode skeleton (full, q8_0, q4_0, KIVI); DynaKV's latent kernels cut the work
      // their own way and are held to the reference only.
      if (c.storage != "dynakv") {
        EXPECT_EQ(out, first) << c.Name() << ": " << threads << " threads give other bits";
      }
    }
  }
}

TEST(ConformanceDecode, SplitsCoverEveryQueryHeadOnce) {
  for (const int n : {1, 2, 5})
    for (const int n_head_kv : {1, 2, 8})
      for (const int group : {1, 3, 4, 7})
        for (const int threads : {1, 2, 3, 16, 64}) {
          const DecodeSplit s = SplitDecode(n, n_head_kv, group, threads);
          std::vector<int> seen(static_cast<size_t>(n) * n_head_kv * group, 0);
          for (int64_t i = 0; i < s.items; ++i) {
            const DecodeItem it = s.At(i);
            ASSERT_GT(it.heads, 0);
            ASSERT_EQ(it.head0 / group, it.kv_head);
            ASSERT_LE(it.head0 + it.heads, (it.kv_head + 1) * group);
            for (int h = it.head0; h < it.head0 + it.heads; ++h) ++seen[static_cast<size_t>(it.query) * n_head_kv * group + h];
          }
          for (int x : seen) ASSERT_EQ(x, 1) << n << " " << n_head_kv << " " << group << " " << threads;
          EXPECT_GE(s.items, std::min<int64_t>(threads, static_cast<int64_t>(n) * n_head_kv * group));
        }
}

TEST(ConformanceRegistry, EveryMethodHasTestFlagsAndUnknownFlagsAreRefused) {
  const auto flags = Flags();
  for (const KvMethod* m : KvMethods()) EXPECT_TRUE(flags.count(m->name)) << m->name << " has no conformance flags";
  KvConfig c;
  c.Set("--sinks", "3");
  EXPECT_THAT(ValidateKvConfig(c).message(), HasSubstr("--evict streamingllm"));
  c = KvConfig();
  c.evict = "nope";
  EXPECT_THAT(ValidateKvConfig(c).message(), HasSubstr("--evict: unknown eviction method 'nope'"));
  c.evict = "snapkv";
  auto missing = CreateKvCache(c, KvModelInfo{kShape, kFingerprint, "m"}, 8);
  EXPECT_THAT(missing.status().message(), HasSubstr("--evict-keep"));
}

}  // namespace
}  // namespace dk
