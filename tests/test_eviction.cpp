// The eviction wrappers keep exactly the tokens a plain reference implementation (written here from
// the papers' descriptions, in double) picks on small fixed cases: SnapKV per KV head and global,
// StreamingLLM, H2O at the end of the prompt and through decoding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "core/threads.h"
#include "kv/eviction.h"
#include "kv/registry.h"

namespace dk {
namespace {

const KvShape kShape{1, 4, 2, 8, 4};  // one layer, GQA 4/2, head size 8
constexpr int kT = 24;                // prompt tokens

struct Rows {
  std::vector<float> k, v, q, x;  // [n][D], [n][D], [n][Hq*d], [n][E]
};

Rows Random(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Rows r;
  r.k.resize(static_cast<size_t>(n) * kShape.kv_dim());
  r.v.resize(r.k.size());
  r.q.resize(static_cast<size_t>(n) * kShape.q_dim());
  r.x.resize(static_cast<size_t>(n) * kShape.n_embd);
  for (auto* b : {&r.k, &r.v, &r.q, &r.x})
    for (float& e : *b) e = 2.0f * nd(rng);
  return r;
}

std::unique_ptr<KvCache> Make(const std::string& evict, std::map<std::string, std::string> flags) {
  KvConfig c;
  c.Set("--kv-dtype", "f32");
  c.evict = evict;
  for (const auto& [f, v] : flags) c.Set(f, v);
  auto made = CreateKvCache(c, KvModelInfo{kShape, 1, "m"}, 64);
  EXPECT_TRUE(made.ok()) << made.status().ToString();
  return std::move(made).value();
}

void Feed(KvCache& cache, const Rows& r, int first, int n, ThreadPool& pool) {
  auto plan = cache.Plan(n);
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(cache.Apply(*plan).ok());
  std::vector<float> out(static_cast<size_t>(n) * kShape.q_dim());
  const size_t D = kShape.kv_dim(), Q = kShape.q_dim(), E = kShape.n_embd;
  cache.Write(0, *plan, r.k.data() + first * D, r.v.data() + first * D, r.x.data() + first * E);
  cache.Attend(0, *plan, r.q.data() + first * Q, out.data(), pool);
}

// Attention weights, in double, of query token i of `r` over the keys of the tokens in `keys`
// (original indices), causal: only keys at indices <= i. probs[h][j] for keys[j].
std::vector<std::vector<double>> Weights(const Rows& r, int i, const std::vector<int>& keys) {
  const int d = kShape.head_dim, Hq = kShape.n_head, group = Hq / kShape.n_head_kv, D = kShape.kv_dim();
  std::vector<std::vector<double>> p(Hq, std::vector<double>(keys.size(), 0.0));
  for (int h = 0; h < Hq; ++h) {
    double mx = -1e300, sum = 0;
    std::vector<double> s(keys.size(), -1e300);
    for (size_t j = 0; j < keys.size(); ++j) {
      if (keys[j] > i) continue;
      double dot = 0;
      for (int e = 0; e < d; ++e)
        dot += static_cast<double>(r.q[(static_cast<size_t>(i) * Hq + h) * d + e]) *
               r.k[static_cast<size_t>(keys[j]) * D + h / group * d + e];
      s[j] = dot / std::sqrt(static_cast<double>(d));
      mx = std::max(mx, s[j]);
    }
    for (size_t j = 0; j < keys.size(); ++j)
      if (keys[j] <= i) sum += (p[h][j] = std::exp(s[j] - mx));
    for (double& x : p[h]) x /= sum;
  }
  return p;
}

std::vector<int> Iota(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// The k best of score[0..n) (ties: the earlier), sorted.
std::vector<int> Best(const std::vector<double>& score, int n, int k) {
  std::vector<int> idx = Iota(n);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

// SnapKV from the paper: the window's queries vote (summed attention) over the prefix, the votes
// are average-pooled (kernel k, zero padding), the top B - w prefix tokens plus the window are kept.
std::vector<std::vector<int>> SnapKvReference(const Rows& r, int T, int w, int k, int B, bool per_head) {
  const int Hq = kShape.n_head, group = Hq / kShape.n_head_kv, prefix = T - w;
  const int sets = per_head ? kShape.n_head_kv : 1;
  std::vector<std::vector<double>> votes(sets, std::vector<double>(prefix, 0.0));
  for (int i = T - w; i < T; ++i) {
    const auto p = Weights(r, i, Iota(T));
    for (int h = 0; h < Hq; ++h)
      for (int t = 0; t < prefix; ++t) votes[per_head ? h / group : 0][t] += p[h][t];
  }
  std::vector<std::vector<int>> keep(sets);
  for (int s = 0; s < sets; ++s) {
    std::vector<double> pooled(prefix, 0.0);
    for (int t = 0; t < prefix; ++t) {
      for (int j = t - k / 2; j <= t + k / 2; ++j)
        if (j >= 0 && j < prefix) pooled[t] += votes[s][j];
      pooled[t] /= k;
    }
    keep[s] = Best(pooled, prefix, B - w);
    for (int t = prefix; t < T; ++t) keep[s].push_back(t);
  }
  return keep;
}

void ExpectKept(const KvCache& cache, const std::vector<std::vector<int>>& want, const std::string& what) {
  const auto& e = dynamic_cast<const EvictingKvCache&>(cache);
  ASSERT_EQ(e.sets(), static_cast<int>(want.size())) << what;
  for (int s = 0; s < e.sets(); ++s) EXPECT_EQ(e.Positions(0, s), want[s]) << what << ", set " << s;
}

TEST(Eviction, SnapKvKeepsWhatTheReferencePicks) {
  ThreadPool pool(1);
  const Rows r = Random(kT, 3);
  for (bool global : {false, true}) {
    std::map<std::string, std::string> flags = {{"--evict-keep", "0.5"}, {"--snapkv-window", "5"}, {"--snapkv-pool", "3"}};
    if (global) flags["--evict-global"] = "1";
    auto cache = Make("snapkv", flags);
    Feed(*cache, r, 0, 20, pool);  // the prompt in two batches: the window spans both
    Feed(*cache, r, 20, 4, pool);
    ASSERT_TRUE(cache->EndPrompt(pool).ok());
    ExpectKept(*cache, SnapKvReference(r, kT, 5, 3, 12, !global), global ? "global" : "per head");
  }
}

TEST(Eviction, StreamingLlmKeepsSinksAndTheRecentWindow) {
  ThreadPool pool(1);
  const Rows r = Random(kT + 3, 4);
  auto cache = Make("streamingllm", {{"--evict-keep", "0.25"}, {"--sinks", "2"}});
  Feed(*cache, r, 0, kT, pool);
  ASSERT_TRUE(cache->EndPrompt(pool).ok());
  ExpectKept(*cache, {{0, 1, 20, 21, 22, 23}}, "prompt end");  // B = 6: 2 sinks + the last 4
  for (int i = 0; i < 3; ++i) Feed(*cache, r, kT + i, 1, pool);
  ExpectKept(*cache, {{0, 1, 23, 24, 25, 26}}, "after 3 decoded tokens");
}

// H2O from the paper: every query's attention weights accumulate on the tokens it attends; the
// budget keeps the last r tokens and the heaviest B - r others; each decode step drops the lightest.
TEST(Eviction, H2oKeepsWhatTheReferencePicks) {
  ThreadPool pool(1);
  const int extra = 4, B = 8, recent = 4;
  const Rows r = Random(kT + extra, 5);
  auto cache = Make("h2o", {{"--evict-keep", std::to_string(B / static_cast<double>(kT))}, {"--h2o-recent", "0.5"}});
  Feed(*cache, r, 0, kT, pool);
  ASSERT_TRUE(cache->EndPrompt(pool).ok());
  // Reference, per KV head.
  const int Hq = kShape.n_head, group = Hq / kShape.n_head_kv, sets = kShape.n_head_kv;
  std::vector<std::vector<int>> kept(sets, Iota(kT));
  std::vector<std::vector<double>> acc(sets, std::vector<double>(kT, 0.0));
  for (int i = 0; i < kT; ++i) {
    const auto p = Weights(r, i, Iota(kT));
    for (int h = 0; h < Hq; ++h)
      for (int t = 0; t < kT; ++t) acc[h / group][t] += p[h][t];
  }
  auto evict_to = [&](int s) {
    const int T = static_cast<int>(kept[s].size());
    std::vector<int> keep = Best(acc[s], T - recent, B - recent);
    for (int t = T - recent; t < T; ++t) keep.push_back(t);
    std::vector<int> k2;
    std::vector<double> a2;
    for (int j : keep) {
      k2.push_back(kept[s][j]);
      a2.push_back(acc[s][j]);
    }
    kept[s] = k2;
    acc[s] = a2;
  };
  for (int s = 0; s < sets; ++s) evict_to(s);
  ExpectKept(*cache, kept, "prompt end");
  for (int i = kT; i < kT + extra; ++i) {
    Feed(*cache, r, i, 1, pool);
    for (int s = 0; s < sets; ++s) {
      kept[s].push_back(i);
      acc[s].push_back(0.0);
      const auto p = Weights(r, i, kept[s]);
      for (int h = s * group; h < (s + 1) * group; ++h)
        for (size_t j = 0; j < kept[s].size(); ++j) acc[s][j] += p[h][j];
      evict_to(s);
    }
    ExpectKept(*cache, kept, "decode step " + std::to_string(i - kT + 1));
  }
}

}  // namespace
}  // namespace dk
