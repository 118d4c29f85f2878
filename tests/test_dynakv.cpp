// The DynaKV cache (src/kv/dynakv_cache.*) and its rank policies (src/kv/rank_policy*.cpp):
//   exactness at full rank against the full cache, latent attention against the explicit
//   reconstruct-then-attend reference (double), byte accounting and budgets, the energy policy's
//   monotonicity, and the factory's errors.
// Profiles are built here, without calibration: exactness holds for ANY orthonormal basis, so a
// random one (Gram-Schmidt in double) serves; budget tests use a PCA basis of real keys/values so
// the energy policy sees realistic spectra.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include "core/threads.h"
#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"
#include "kv/profile.h"
#include "kv/rank_policy.h"
#include "kv/registry.h"
#include "model/llama.h"
#include "test_util.h"

namespace dk {
namespace {

using ::testing::HasSubstr;

constexpr double kEps = std::numeric_limits<float>::epsilon() / 2;  // unit roundoff of fp32, 2^-24

const Model& TheModel() {
  static std::unique_ptr<Model> model = [] {
    auto m = Model::Load(test::DataPath("brown-kjv-llama-6M-f32.gguf"));
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return std::move(m).value();
  }();
  return *model;
}

KvModelInfo Info() { return KvModelInfo{TheModel().config().kv_shape(), TheModel().fingerprint(), "brown-kjv-6M"}; }

std::vector<int32_t> Tokens(const char* file, size_t n) {
  std::string text = test::ReadText(test::DataPath(file)).substr(0, 40 * n);
  std::vector<int32_t> t = TheModel().tokenizer().Encode(text, true);
  EXPECT_GE(t.size(), n) << file;
  t.resize(std::min(t.size(), n));
  return t;
}

DynaKvProfile EmptyProfile() {
  const KvShape s = TheModel().config().kv_shape();
  DynaKvProfile p;
  p.model_fingerprint = TheModel().fingerprint();
  p.model_name = "brown-kjv-llama-6M";
  p.n_layer = s.n_layer;
  p.n_head_kv = s.n_head_kv;
  p.head_dim = s.head_dim;
  p.levels = DefaultLevels(s.kv_dim());
  p.k.resize(s.n_layer);
  p.v.resize(s.n_layer);
  return p;
}

// Random orthonormal D x D basis (modified Gram-Schmidt in double, twice for full orthogonality)
// and a random mean.
BasisSet RandomBasis(int D, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> cols(static_cast<size_t>(D) * D);  // column-major: cols[j * D + i]
  for (double& x : cols) x = nd(rng);
  for (int j = 0; j < D; ++j) {
    double* cj = &cols[static_cast<size_t>(j) * D];
    for (int pass = 0; pass < 2; ++pass) {
      for (int k = 0; k < j; ++k) {
        const double* ck = &cols[static_cast<size_t>(k) * D];
        double dot = 0.0;
        for (int i = 0; i < D; ++i) dot += ck[i] * cj[i];
        for (int i = 0; i < D; ++i) cj[i] -= dot * ck[i];
      }
    }
    double norm = 0.0;
    for (int i = 0; i < D; ++i) norm += cj[i] * cj[i];
    for (int i = 0; i < D; ++i) cj[i] /= std::sqrt(norm);
  }
  BasisSet b;
  b.basis.resize(static_cast<size_t>(D) * D);
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) b.basis[static_cast<size_t>(i) * D + j] = static_cast<float>(cols[static_cast<size_t>(j) * D + i]);
  b.mean.resize(D);
  for (float& m : b.mean) m = static_cast<float>(0.5 * nd(rng));
  b.eigenvalues.resize(D);
  for (int i = 0; i < D; ++i) b.eigenvalues[i] = D - i;
  return b;
}

DynaKvProfile RandomProfile(uint32_t seed) {
  DynaKvProfile p = EmptyProfile();
  std::mt19937 rng(seed);
  for (int l = 0; l < p.n_layer; ++l) {
    p.k[l] = RandomBasis(p.kv_dim(), rng);
    p.v[l] = RandomBasis(p.kv_dim(), rng);
  }
  return p;
}

// Keys and values of a real run: [layer][token][D], from a full f32 cache.
struct KvRows {
  std::vector<std::vector<float>> k, v;
  int n = 0;
};

KvRows RunFull(const std::vector<int32_t>& tokens) {
  const Model& m = TheModel();
  const KvShape s = m.config().kv_shape();
  const int n = static_cast<int>(tokens.size()), D = s.kv_dim();
  FullKvCache full(s, n, KvDtype::kF32);
  ForwardState st(m.config(), 128);
  ThreadPool pool(2);
  std::vector<float> logits(m.config().n_vocab);
  for (int i = 0; i < n; i += 128) {
    const int b = std::min(128, n - i);
    Status status = m.Forward(tokens.data() + i, b, full, st, logits.data(), false, pool);
    EXPECT_TRUE(status.ok()) << status.ToString();
  }
  KvRows r;
  r.n = n;
  r.k.assign(s.n_layer, std::vector<float>(static_cast<size_t>(n) * D));
  r.v.assign(s.n_layer, std::vector<float>(static_cast<size_t>(n) * D));
  for (int l = 0; l < s.n_layer; ++l)
    for (int t = 0; t < n; ++t) {
      full.ReadK(l, t, &r.k[l][static_cast<size_t>(t) * D]);
      full.ReadV(l, t, &r.v[l][static_cast<size_t>(t) * D]);
    }
  return r;
}

// PCA of rows [n][D]: mean, eigenvectors by decreasing eigenvalue (LAPACKE_dsyev).
BasisSet Pca(const std::vector<float>& rows, int n, int D) {
  BasisSet b;
  b.mean.assign(D, 0.0f);
  std::vector<double> mean(D, 0.0), cov(static_cast<size_t>(D) * D, 0.0), w(D);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) mean[i] += rows[static_cast<size_t>(t) * D + i] / n;
  for (int t = 0; t < n; ++t) {
    const float* x = &rows[static_cast<size_t>(t) * D];
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) cov[static_cast<size_t>(i) * D + j] += (x[i] - mean[i]) * (x[j] - mean[j]) / n;
  }
  EXPECT_EQ(LAPACKE_dsyev(LAPACK_ROW_MAJOR, 'V', 'U', D, cov.data(), D, w.data()), 0);
  b.basis.resize(static_cast<size_t>(D) * D);
  b.eigenvalues.resize(D);
  for (int j = 0; j < D; ++j) {  // dsyev: ascending; column j of cov is eigenvector j
    const int src = D - 1 - j;
    b.eigenvalues[j] = std::max(0.0, w[src]);
    for (int i = 0; i < D; ++i) b.basis[static_cast<size_t>(i) * D + j] = static_cast<float>(cov[static_cast<size_t>(i) * D + src]);
  }
  for (int j = 1; j < D; ++j) b.eigenvalues[j] = std::min(b.eigenvalues[j], b.eigenvalues[j - 1]);
  for (int i = 0; i < D; ++i) b.mean[i] = static_cast<float>(mean[i]);
  return b;
}

const DynaKvProfile& PcaProfile() {
  static DynaKvProfile p = [] {
    DynaKvProfile prof = EmptyProfile();
    const KvRows calib = RunFull(Tokens("calib.txt", 512));
    for (int l = 0; l < prof.n_layer; ++l) {
      prof.k[l] = Pca(calib.k[l], calib.n, prof.kv_dim());
      prof.v[l] = Pca(calib.v[l], calib.n, prof.kv_dim());
    }
    return prof;
  }();
  return p;
}

// Evaluation rows (not the calibration text), computed once.
const KvRows& EvalRows() {
  static KvRows r = RunFull(Tokens("valid.txt", 320));
  return r;
}

KvConfig Config(const std::string& policy, int rank, double tau, double budget, const std::string& dtype = "f16") {
  KvConfig c;
  c.method = "dynakv";
  c.Set("--kv-dtype", dtype).Set("--rank-policy", policy);
  if (rank != -1) c.Set("--rank", std::to_string(rank));
  if (tau != -1.0) c.Set("--tau", std::to_string(tau));
  if (budget != -1.0) c.Set("--kv-budget", std::to_string(budget));
  return c;
}

std::unique_ptr<DynaKvCache> MakeCache(const KvConfig& c, const DynaKvProfile& p, int capacity) {
  auto cache = CreateDynaKvCacheFromProfile(c, Info(), capacity, std::make_shared<const DynaKvProfile>(p), "test-profile");
  EXPECT_TRUE(cache.ok()) << cache.status().ToString();
  return cache.ok() ? std::move(cache).value() : nullptr;
}

// A test policy: independent uniform random ranks in [1, D] for K and V.
class RandomRankPolicy final : public RankPolicy {
 public:
  RandomRankPolicy(int D, uint32_t seed) : D_(D), rng_(seed) {}
  std::string name() const override { return "random"; }
  void Choose(int, int n, const float*, const float*, const float*, TokenRanks* out) override {
    std::uniform_int_distribution<int> r(1, D_);
    for (int i = 0; i < n; ++i) out[i] = TokenRanks{r(rng_), r(rng_)};
  }
  double ExpectedElemsPerToken() const override { return D_ / 2.0; }  // forces the arena to grow

 private:
  int D_;
  std::mt19937 rng_;
};

std::vector<float> RandomRows(int n, int width, std::mt19937& rng, double scale) {
  std::normal_distribution<float> nd(0.0f, static_cast<float>(scale));
  std::vector<float> x(static_cast<size_t>(n) * width);
  for (float& e : x) e = nd(rng);
  return x;
}

double MaxAbs(const std::vector<float>& x) {
  double m = 0.0;
  for (float e : x) m = std::max(m, static_cast<double>(std::fabs(e)));
  return m;
}

// Writes rows [t0, t0 + n) of `rows` into every layer of `cache` as one batch.
void WriteBatch(DynaKvCache& cache, const KvRows& rows, int t0, int n) {
  auto plan = cache.Plan(n);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_TRUE(cache.Apply(*plan).ok());
  const int D = cache.shape().kv_dim();
  for (int l = 0; l < cache.shape().n_layer; ++l)
    cache.Write(l, *plan, &rows.k[l][static_cast<size_t>(t0) * D], &rows.v[l][static_cast<size_t>(t0) * D], nullptr);
}

// Prefill batches of 128, 64 and 31, then single-token decode to the end: both controller regimes.
void WriteAll(DynaKvCache& cache, const KvRows& rows) {
  int t = 0;
  for (int b : {128, 64, 31}) {
    WriteBatch(cache, rows, t, b);
    t += b;
  }
  for (; t < rows.n; ++t) WriteBatch(cache, rows, t, 1);
}

// Bytes the layout says the cache holds (docs/kv_layout.md): per layer,
// sum_t (r_K + r_V) * elem + n * 2 * meta_width + ceil(n / B) * 4.
// docs/kv_layout.md's byte count, written out: f16/f32 latents take 2 or 4 bytes a number; int8 /
// int4 latents an fp16 scale per group (one group per latent when group = 0), then one byte (int8)
// or half a byte (int4, rounded up) a number, the whole padded to an even count.
size_t LatentBytes(const LatentFormat& f, int r) {
  if (f.type == LatentFormat::kF16) return 2 * r;
  if (f.type == LatentFormat::kF32) return 4 * r;
  const int groups = f.group > 0 ? (r + f.group - 1) / f.group : 1;
  const size_t b = 2 * groups + (f.type == LatentFormat::kQ8 ? r : (r + 1) / 2);
  return b + (b % 2);
}

// tc: a rank r stands for the ladder's code of at most 2 r bytes, calibrated per layer from the
// profile's eigenvalues (ops/tcode.h); its record size is the ladder's.
size_t LayoutBytes(const DynaKvCache& c) {
  const int B = DynaKvCache::kIndexEvery, D = c.shape().kv_dim();
  const int meta_width = D <= 256 ? 1 : 2;
  size_t bytes = 0;
  for (int l = 0; l < c.shape().n_layer; ++l) {
    const int n = c.Stored(l);
    const bool tc = c.format().tc();
    const TcCodebook ck = tc ? MakeTcCodebook(c.profile().k[l], D) : TcCodebook{};
    const TcCodebook cv = tc ? MakeTcCodebook(c.profile().v[l], D) : TcCodebook{};
    for (int t = 0; t < n; ++t) {
      const TokenRanks r = c.Ranks(l, t);
      if (tc) {
        EXPECT_LE(ck.ladder[r.r_k - 1].bytes, 2 * r.r_k);
        bytes += ck.ladder[r.r_k - 1].bytes + cv.ladder[r.r_v - 1].bytes;
        continue;
      }
      bytes += LatentBytes(c.format(), r.r_k) + LatentBytes(c.format(), r.r_v);
    }
    bytes += static_cast<size_t>(n) * 2 * meta_width + static_cast<size_t>((n + B - 1) / B) * 4;
  }
  return bytes;
}

double Fraction(const DynaKvCache& c) {
  return static_cast<double>(c.BytesUsed()) / (static_cast<double>(c.n_tokens()) * Fp16FullBytesPerToken(c.shape()));
}

// Sum over layers and tokens of |k - k^|^2 + |v - v^|^2, relative to sum |k|^2 + |v|^2.
double ReconstructionError(const DynaKvCache& c, const KvRows& rows) {
  const int D = c.shape().kv_dim();
  std::vector<float> kh(D), vh(D);
  double err = 0.0, norm = 0.0;
  for (int l = 0; l < c.shape().n_layer; ++l)
    for (int t = 0; t < rows.n; ++t) {
      c.ReconstructK(l, t, kh.data());
      c.ReconstructV(l, t, vh.data());
      for (int i = 0; i < D; ++i) {
        const double k = rows.k[l][static_cast<size_t>(t) * D + i], v = rows.v[l][static_cast<size_t>(t) * D + i];
        err += (k - kh[i]) * (k - kh[i]) + (v - vh[i]) * (v - vh[i]);
        norm += k * k + v * v;
      }
    }
  return err / norm;
}

// ---- (1) full rank reproduces the full cache ------------------------------------------------------

TEST(DynaKv, FullRankF32MatchesFullCacheLogits) {
  const Model& m = TheModel();
  const KvShape s = m.config().kv_shape();
  const int n_vocab = m.config().n_vocab;
  const std::vector<int32_t> tokens = Tokens("valid.txt", 300);
  const int n = static_cast<int>(tokens.size());
  auto dyn = MakeCache(Config("uniform", s.kv_dim(), -1, -1, "f32"), RandomProfile(7), n);
  ASSERT_NE(dyn, nullptr);
  FullKvCache full(s, n, KvDtype::kF32);
  ForwardState st_a(m.config(), 128), st_b(m.config(), 128);
  ThreadPool pool(2);
  std::vector<float> la(static_cast<size_t>(128) * n_vocab), lb(la.size());
  // Prefill batches (GEMM path: >= 8), a small batch and single tokens (latent path).
  std::vector<int> batches = {100, 37, 3, 5};
  for (int t = 145; t < n; ++t) batches.push_back(1);
  // Tolerance. Only rounding separates the two: at full rank U U^T = I, so the basis change costs
  // four D-term products per layer (q~, c_K, c_V, the output projection), each a relative error of
  // at most D u (u = 2^-24), i.e. 4 D u ~ 3e-5 per layer. Six layers add up and we allow each
  // block to amplify its input error 10x: tol = n_layer * 4 D u * 10 * max|logit| ~ 1.8e-3 of the
  // largest logit. (Measured: ~1e-6; a wrong basis row or offset gives O(1).)
  const double rel_tol = s.n_layer * 4.0 * s.kv_dim() * kEps * 10.0;
  int t = 0;
  double worst = 0.0;
  for (int b : batches) {
    ASSERT_TRUE(m.Forward(tokens.data() + t, b, full, st_a, la.data(), true, pool).ok());
    ASSERT_TRUE(m.Forward(tokens.data() + t, b, *dyn, st_b, lb.data(), true, pool).ok());
    double scale = 1.0, diff = 0.0;
    for (size_t i = 0; i < static_cast<size_t>(b) * n_vocab; ++i) {
      scale = std::max(scale, static_cast<double>(std::fabs(la[i])));
      diff = std::max(diff, static_cast<double>(std::fabs(la[i] - lb[i])));
    }
    const double tol = rel_tol * scale;
    worst = std::max(worst, diff / scale);
    ASSERT_LE(diff, tol) << "batch at token " << t << " of " << b << " tokens";
    t += b;
  }
  RecordProperty("worst_relative_logit_error", std::to_string(worst));
  EXPECT_EQ(dyn->n_tokens(), n);
}

// ---- (2) latent attention equals explicit reconstruction + dense attention ---------------------------

struct AttnCase {
  const char* dtype;
  int first, n, threads;
  int group = 0;
};

LatentFormat Format(const std::string& dtype, int group = 0) {
  auto f = ParseLatentFormat(dtype, group);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return *f;
}

TEST(DynaKv, LatentAttentionMatchesReconstructReference) {
  const KvShape s = TheModel().config().kv_shape();
  const int D = s.kv_dim(), d = s.head_dim, Hq = s.n_head;
  const DynaKvProfile prof = RandomProfile(11);
  std::vector<AttnCase> cases;
  for (const char* dt : {"f16", "f32", "q8", "q4", "tc"})
    for (int n : {1, 3, 17, 64})
      for (int first : {1, 70, 129}) cases.push_back({dt, first, n, n == 1 ? 3 : 2});
  cases.push_back({"f16", 0, 17, 1});
  cases.push_back({"f16", 200, 1, 1});
  cases.push_back({"q4", 70, 1, 2, 32});   // grouped scales: latents longer than a group
  cases.push_back({"q8", 129, 17, 2, 7});  // and groups that do not divide the rank
  uint32_t seed = 100;
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(std::string(c.dtype) + " group=" + std::to_string(c.group) + " first=" + std::to_string(c.first) +
                 " n=" + std::to_string(c.n) + " threads=" + std::to_string(c.threads));
    DynaKvCache cache(s, c.first + c.n, Format(c.dtype, c.group), std::make_shared<const DynaKvProfile>(prof),
                      std::make_unique<RandomRankPolicy>(D, seed++));
    ThreadPool pool(c.threads);
    std::mt19937 rng(seed++);
    const std::vector<int> layers = {0, 2, 5};
    for (const KvPlan& want : {KvPlan{0, c.first}, KvPlan{c.first, c.n}}) {
      if (want.n == 0) continue;
      auto plan = cache.Plan(want.n);
      ASSERT_TRUE(plan.ok());
      ASSERT_EQ(plan->first, want.first);
      ASSERT_TRUE(cache.Apply(*plan).ok());
      for (int l : layers) {
        const std::vector<float> k = RandomRows(plan->n, D, rng, 1.0), v = RandomRows(plan->n, D, rng, 1.0);
        cache.Write(l, *plan, k.data(), v.data(), nullptr);
      }
    }
    const KvPlan plan{c.first, c.n};
    for (int l : layers) {
      SCOPED_TRACE("layer " + std::to_string(l));
      const std::vector<float> q = RandomRows(c.n, Hq * d, rng, 1.0);
      std::vector<float> got(q.size()), want(q.size());
      cache.Attend(l, plan, q.data(), got.data(), pool);
      cache.AttendReference(l, plan, q.data(), want.data());
      // Tolerance (fp32 path vs double reference on the same stored latents):
      //   scores: q~ (d-term sums) then a D-term dot: |ds| <= (d + D) u |q_h| max|k^ - mu| / sqrt(d)
      //           (|U^T q| <= |q| and |c| <= |k^ - mu| as U is orthonormal), plus the mean term
      //   softmax: |dp|_1 <= 2 |ds|_inf, so the output moves by <= 2 |ds| max|v^|
      //   values: T-term accumulation, then a D-term projection: (T + D + d) u max|v^| sqrt(D)
      double qmax = 0.0, kmax = 0.0, vmax = 0.0;
      for (int i = 0; i < c.n; ++i)
        for (int h = 0; h < Hq; ++h) {
          double n2 = 0.0;
          for (int e = 0; e < d; ++e) n2 += q[(static_cast<size_t>(i) * Hq + h) * d + e] * q[(static_cast<size_t>(i) * Hq + h) * d + e];
          qmax = std::max(qmax, std::sqrt(n2));
        }
      std::vector<float> kh(D), vh(D);
      for (int t = 0; t < c.first + c.n; ++t) {
        cache.ReconstructK(l, t, kh.data());
        cache.ReconstructV(l, t, vh.data());
        double k2 = 0.0;
        for (int i = 0; i < D; ++i) k2 += static_cast<double>(kh[i]) * kh[i];
        kmax = std::max(kmax, std::sqrt(k2));
        vmax = std::max(vmax, MaxAbs(vh));
      }
      const int T = c.first + c.n;
      const double ds = (d + D + 2) * kEps * qmax * kmax / std::sqrt(static_cast<double>(d));
      const double tol = 2 * ds * vmax + (T + D + d) * kEps * vmax * std::sqrt(static_cast<double>(D));
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], want[i], tol) << "output " << i << " (query " << i / (Hq * d) << ", head "
                                          << (i / d) % Hq << ")";
    }
  }
}

// ---- (3) bytes ----------------------------------------------------------------------------------------

TEST(DynaKv, BytesUsedFollowsTheLayout) {
  const KvShape s = TheModel().config().kv_shape();
  for (const LatentFormat& f : {Format("f16"), Format("f32"), Format("q8"), Format("q4"), Format("q4", 32),
                                 Format("q8", 5), Format("tc")}) {
    SCOPED_TRACE(f.Name());
    DynaKvCache cache(s, 300, f, std::make_shared<const DynaKvProfile>(RandomProfile(3)),
                      std::make_unique<RandomRankPolicy>(s.kv_dim(), 5));
    EXPECT_EQ(cache.BytesUsed(), 0u);
    WriteBatch(cache, EvalRows(), 0, 130);
    WriteBatch(cache, EvalRows(), 130, 1);
    WriteBatch(cache, EvalRows(), 131, 69);
    EXPECT_EQ(cache.BytesUsed(), LayoutBytes(cache));
    EXPECT_GE(cache.BytesReserved(), cache.BytesUsed());
    // Records are stored exactly: reconstruction from them equals U[:, :r] c + mu of the input.
    cache.Clear();
    EXPECT_EQ(cache.BytesUsed(), 0u);
  }
  // Uniform rank R: exactly R + R numbers per token per layer.
  auto u = MakeCache(Config("uniform", 24, -1, -1), RandomProfile(3), 256);
  ASSERT_NE(u, nullptr);
  WriteBatch(*u, EvalRows(), 0, 200);
  EXPECT_EQ(u->BytesUsed(), static_cast<size_t>(s.n_layer) * (200 * (48 * 2 + 2) + 4 * 4));
  // Reserved: exactly the capacity's records, metadata and index.
  EXPECT_EQ(u->BytesReserved(), static_cast<size_t>(s.n_layer) * (256 * (48 * 2 + 2) + 4 * 4));
}

TEST(DynaKv, BudgetFractionWithinTwoPercent) {
  const KvRows& rows = EvalRows();
  for (const char* policy : {"uniform", "energy"}) {
    double prev_error = std::numeric_limits<double>::infinity();
    for (double budget : {0.0625, 0.125, 0.25, 0.5}) {
      SCOPED_TRACE(std::string(policy) + " --kv-budget " + std::to_string(budget));
      auto cache = MakeCache(Config(policy, -1, -1, budget), PcaProfile(), rows.n);
      ASSERT_NE(cache, nullptr);
      WriteAll(*cache, rows);
      const double frac = Fraction(*cache);
      EXPECT_NEAR(frac, budget, 0.02 * budget) << "measured fraction " << frac;
      EXPECT_EQ(cache->BytesUsed(), LayoutBytes(*cache));
      // More budget never gives a worse reconstruction.
      const double err = ReconstructionError(*cache, rows);
      EXPECT_LE(err, prev_error) << "relative reconstruction error " << err;
      prev_error = err;
    }
  }
}

TEST(DynaKv, UniformBudgetRanks) {
  RankPolicyContext ctx;
  ctx.kv_dim = 128;
  ctx.cost = DynaKvCache::CostFor(128, KvDtype::kF16);
  // 0.25 * 512 bytes = 128 = 2 bytes metadata + 1/16 index + 2 * (r_K + r_V) -> 63 numbers: 32 + 31.
  const TokenRanks r = UniformRanksForBudget(0.25, ctx);
  EXPECT_EQ(r.r_k, 32);
  EXPECT_EQ(r.r_v, 31);
  const TokenRanks full = UniformRanksForBudget(1.0, ctx);
  EXPECT_EQ(full.r_k, 128);
  EXPECT_EQ(full.r_v, 127);
  // --k-share 0.6: 38 of the 63 numbers' bytes to K.
  const TokenRanks skew = UniformRanksForBudget(0.25, ctx, 0.6);
  EXPECT_EQ(skew.r_k, 38);
  EXPECT_EQ(skew.r_v, 25);
}

// Rank x precision (tc) at a byte budget: the measured fraction stays within the budget (a rank r
// is the best code of at most 2 r bytes), and the reconstruction of real keys and values is better
// than fp16 latents' at the same budget, by a wide margin at a quarter of the cache.
TEST(DynaKv, TcBeatsF16LatentsAtEqualBytes) {
  const KvRows& rows = EvalRows();
  for (double budget : {0.125, 0.25}) {
    SCOPED_TRACE("--kv-budget " + std::to_string(budget));
    auto f16 = MakeCache(Config("uniform", -1, -1, budget, "f16"), PcaProfile(), rows.n);
    auto tc = MakeCache(Config("uniform", -1, -1, budget, "tc"), PcaProfile(), rows.n);
    ASSERT_NE(f16, nullptr);
    ASSERT_NE(tc, nullptr);
    WriteAll(*f16, rows);
    WriteAll(*tc, rows);
    EXPECT_LE(Fraction(*tc), budget * 1.02);
    EXPECT_GE(Fraction(*tc), budget * 0.85);
    EXPECT_EQ(tc->BytesUsed(), LayoutBytes(*tc));
    const double e16 = ReconstructionError(*f16, rows), etc = ReconstructionError(*tc, rows);
    EXPECT_LT(etc, 0.7 * e16) << "tc " << etc << " f16 " << e16;
  }
}

// ---- (4) energy policy -----------------------------------------------------------------------------

TEST(DynaKv, EnergyRankMonotoneInTau) {
  const int D = 128;
  const std::vector<int> levels = DefaultLevels(D);
  std::mt19937 rng(9);
  const KvRows& rows = EvalRows();
  const BasisSet& b = PcaProfile().k[1];
  // Random latents with decaying and flat spectra, and real latents on the PCA basis.
  std::vector<std::vector<float>> latents;
  for (int i = 0; i < 20; ++i) {
    std::vector<float> c = RandomRows(1, D, rng, 1.0);
    if (i % 2 == 0)
      for (int j = 0; j < D; ++j) c[j] *= std::exp(-0.05f * j);
    latents.push_back(c);
  }
  for (int t = 0; t < 20; ++t) {
    std::vector<float> c(D, 0.0f);
    for (int j = 0; j < D; ++j)
      for (int i = 0; i < D; ++i)
        c[j] += (rows.k[1][static_cast<size_t>(t) * D + i] - b.mean[i]) * b.basis[static_cast<size_t>(i) * D + j];
    latents.push_back(c);
  }
  latents.push_back(std::vector<float>(D, 0.0f));  // a token exactly at the mean
  for (size_t i = 0; i < latents.size(); ++i) {
    int prev = 0;
    for (double tau = 0.0; tau <= 1.0; tau += 0.01) {
      const int r = EnergyRank(latents[i].data(), D, levels, tau);
      ASSERT_GE(r, prev) << "latent " << i << " tau " << tau;
      ASSERT_TRUE(std::find(levels.begin(), levels.end(), r) != levels.end()) << r;
      prev = r;
    }
    EXPECT_EQ(EnergyRank(latents[i].data(), D, levels, 1.0), D) << "latent " << i;
    EXPECT_EQ(EnergyRank(latents[i].data(), D, levels, 0.0), levels.front()) << "latent " << i;
  }
  // Through the cache: tau = 1 stores every token at full rank; higher tau, never fewer bytes.
  size_t prev_bytes = 0;
  for (double tau : {0.5, 0.8, 0.9, 0.99, 1.0}) {
    auto cache = MakeCache(Config("energy", -1, tau, -1), PcaProfile(), 64);
    ASSERT_NE(cache, nullptr);
    WriteBatch(*cache, rows, 0, 64);
    EXPECT_GE(cache->BytesUsed(), prev_bytes) << "tau " << tau;
    prev_bytes = cache->BytesUsed();
    if (tau == 1.0) {
      for (int t = 0; t < 64; ++t) EXPECT_EQ(cache->Ranks(3, t).r_k, D);
    }
  }
}

// ---- (5) factory errors and capacity --------------------------------------------------------------

std::string CreateError(const KvConfig& c, const DynaKvProfile& p, Code code = Code::kInvalidArgument) {
  auto cache = CreateDynaKvCacheFromProfile(c, Info(), 64, std::make_shared<const DynaKvProfile>(p), "test-profile");
  EXPECT_FALSE(cache.ok());
  if (cache.ok()) return "";
  EXPECT_EQ(cache.status().code(), code) << cache.status().ToString();
  return cache.status().message();
}

TEST(DynaKv, FactoryErrorsNameTheFlag) {
  KvConfig c = Config("uniform", 8, -1, -1);
  auto missing = CreateKvCache(c, Info(), 64);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("--profile: dynakv needs a calibrated profile (dynakv calibrate)"));
  c.Set("--profile", "/nonexistent/dir/p.dkv");
  auto absent = CreateKvCache(c, Info(), 64);
  ASSERT_FALSE(absent.ok());
  EXPECT_THAT(absent.status().message(), HasSubstr("/nonexistent/dir/p.dkv"));

  const DynaKvProfile p = RandomProfile(1);
  EXPECT_THAT(CreateError(Config("uniform", -1, -1, -1), p), HasSubstr("--rank"));
  EXPECT_THAT(CreateError(Config("uniform", 0, -1, -1), p), HasSubstr("--rank"));
  EXPECT_THAT(CreateError(Config("uniform", 129, -1, -1), p), HasSubstr("--rank"));
  EXPECT_THAT(CreateError(Config("uniform", 8, 0.9, -1), p), HasSubstr("--tau"));
  EXPECT_THAT(CreateError(Config("uniform", -1, 0.9, 0.25), p), HasSubstr("--tau"));
  EXPECT_THAT(CreateError(Config("uniform", 8, -1, 0.25), p), HasSubstr("--rank"));
  EXPECT_THAT(CreateError(Config("energy", 8, -1, -1), p), HasSubstr("--rank"));
  EXPECT_THAT(CreateError(Config("energy", -1, -1, -1), p), HasSubstr("--tau"));
  EXPECT_THAT(CreateError(Config("energy", -1, 1.5, -1), p), HasSubstr("--tau"));
  EXPECT_THAT(CreateError(Config("energy", -1, 0.9, 0.25), p), HasSubstr("--tau"));
  EXPECT_THAT(CreateError(Config("energy", -1, -1, 1e-4), p), HasSubstr("--kv-budget"));
  EXPECT_THAT(CreateError(Config("energy", -1, -1, 1.5), p), HasSubstr("--kv-budget"));
  EXPECT_THAT(CreateError(Config("router", -1, -1, 0.25), p), HasSubstr("--rank-policy"));
  EXPECT_THAT(CreateError(Config("uniform", 8, -1, -1, "q3"), p), HasSubstr("--kv-dtype"));
  EXPECT_THAT(CreateError(Config("energy", -1, -1, 0.25).Set("--k-share", "0.6"), p), HasSubstr("--k-share"));
  EXPECT_THAT(CreateError(Config("uniform", -1, -1, 0.25).Set("--k-share", "1.5"), p), HasSubstr("--k-share"));
  EXPECT_THAT(CreateError(Config("uniform", 8, -1, -1).Set("--k-share", "0.6"), p), HasSubstr("--k-share"));
  EXPECT_THAT(CreateError(Config("uniform", 8, -1, -1).Set("--latent-group", "8"), p), HasSubstr("--latent-group"));
  EXPECT_THAT(CreateKvCache(Config("uniform", 8, -1, -1).Set("--sinks", "4"), Info(), 64).status().message(),
              HasSubstr("--sinks"));
  DynaKvProfile other = p;
  other.model_fingerprint ^= 1;
  // A profile for another model is a file that does not fit (exit 1), not a bad flag (exit 2).
  EXPECT_THAT(CreateError(Config("uniform", 8, -1, -1), other, Code::kFailedPrecondition), HasSubstr("calibrat"));

  // Through the registry with a profile file.
  const std::string path = ::testing::TempDir() + "dk_test_dynakv.dkv";
  ASSERT_TRUE(SaveProfile(p, path).ok());
  c = Config("energy", -1, -1, 0.25);
  c.Set("--profile", path);
  auto ok = CreateKvCache(c, Info(), 64);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_THAT((*ok)->name(), HasSubstr("dynakv"));
  std::remove(path.c_str());
}

TEST(DynaKv, PlanReportsFullCache) {
  auto cache = MakeCache(Config("uniform", 16, -1, -1), RandomProfile(2), 8);
  ASSERT_NE(cache, nullptr);
  WriteBatch(*cache, EvalRows(), 0, 8);
  auto plan = cache->Plan(1);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), Code::kResourceExhausted);
  // The model's forward pass hands that status back unchanged.
  ForwardState st(TheModel().config(), 4);
  ThreadPool pool(1);
  std::vector<float> logits(TheModel().config().n_vocab);
  const int32_t tok = 1;
  EXPECT_EQ(TheModel().Forward(&tok, 1, *cache, st, logits.data(), false, pool).code(), Code::kResourceExhausted);
}

TEST(DynaKv, ClearStartsOver) {
  auto cache = MakeCache(Config("energy", -1, -1, 0.125), PcaProfile(), 200);
  ASSERT_NE(cache, nullptr);
  WriteBatch(*cache, EvalRows(), 0, 100);
  WriteBatch(*cache, EvalRows(), 100, 1);
  const size_t bytes = cache->BytesUsed();
  cache->Clear();
  EXPECT_EQ(cache->BytesUsed(), 0u);
  WriteBatch(*cache, EvalRows(), 0, 100);
  WriteBatch(*cache, EvalRows(), 100, 1);
  EXPECT_EQ(cache->BytesUsed(), bytes);  // the budget controller was reset too
}

}  // namespace
}  // namespace dk
