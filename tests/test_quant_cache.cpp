// The quantized KV caches (q8_0, q4_0, kivi; the conformance suite covers their protocol): what they
// store is exactly what ops/quant.h's quantizers make of the rows (rotated per head with
// --hadamard), KIVI stays within the derived bound of its groups and keeps its residual in fp16,
// bytes follow the layout's formulas, the rotation lowers attention error on keys and values with
// outlier channels, and per-head retention keeps the right rows.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "core/threads.h"
#include "kv/registry.h"
#include "ops/quant.h"

namespace dk {
namespace {

using ::testing::HasSubstr;

const KvShape kShape{2, 4, 2, 64, 16};  // 2 layers, GQA 4/2, head size 64: D = 128
constexpr int kD = 128, kd = 64, kCap = 96;
const double kU16 = std::ldexp(1.0, -11);  // fp16 unit roundoff

StatusOr<std::unique_ptr<KvCache>> Make(const std::string& method, const std::map<std::string, std::string>& flags,
                                        const KvShape& shape = kShape, int capacity = kCap) {
  KvConfig config;
  config.method = method;
  for (const auto& [f, v] : flags) config.Set(f, v);
  return CreateKvCache(config, KvModelInfo{shape, 0, "test"}, capacity);
}

std::vector<float> Normal(size_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> x(n);
  for (float& e : x) e = nd(rng);
  return x;
}

// Writes n tokens (k, v: [n][D]) to every layer as one batch.
void WriteAll(KvCache& cache, const std::vector<float>& k, const std::vector<float>& v, int n) {
  auto plan = cache.Plan(n);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_TRUE(cache.Apply(*plan).ok());
  std::vector<float> x(static_cast<size_t>(n) * cache.shape().n_embd, 0.0f);
  for (int l = 0; l < cache.shape().n_layer; ++l) cache.Write(l, *plan, k.data(), v.data(), x.data());
}

std::vector<float> Read(const KvCache& cache, int layer, bool keys) {
  const int T = cache.Stored(layer), D = cache.shape().kv_dim();
  std::vector<float> out(static_cast<size_t>(T) * D);
  if (keys) {
    cache.ReadKeys(layer, 0, T, out.data());
  } else {
    cache.ReadValues(layer, 0, T, out.data());
  }
  return out;
}

// ==== q8_0 / q4_0 ================================================================================

// What the block cache must hold for rows x [n][D]: each head rotated (when asked), the row
// quantized and dequantized by ops/quant.h, rotated back. The cache runs the same kernels on the
// same numbers in the same order, so the two agree bit for bit.
std::vector<float> ExpectedBlocks(const std::string& method, bool hadamard, std::vector<float> x, int n) {
  if (hadamard)
    for (int t = 0; t < n; ++t)
      for (int g = 0; g < kD / kd; ++g) FwhtInPlace(x.data() + t * kD + g * kd, kd);
  std::vector<float> back(x.size());
  if (method == "q8_0") {
    std::vector<BlockQ8_0> b(x.size() / kQuantBlock);
    QuantizeRowQ8_0(x.data(), b.data(), static_cast<int64_t>(x.size()));
    DequantizeRowQ8_0(b.data(), back.data(), static_cast<int64_t>(x.size()));
  } else {
    std::vector<BlockQ4_0> b(x.size() / kQuantBlock);
    QuantizeRowQ4_0(x.data(), b.data(), static_cast<int64_t>(x.size()));
    DequantizeRowQ4_0(b.data(), back.data(), static_cast<int64_t>(x.size()));
  }
  if (hadamard)
    for (int t = 0; t < n; ++t)
      for (int g = 0; g < kD / kd; ++g) FwhtInPlace(back.data() + t * kD + g * kd, kd);
  return back;
}

TEST(QuantCache, BlockCachesHoldExactlyTheDequantizedBlocks) {
  std::mt19937_64 rng(1);
  const int n = 11;
  const std::vector<float> k = Normal(static_cast<size_t>(n) * kD, rng), v = Normal(k.size(), rng, 3.0f);
  for (const std::string method : {"q8_0", "q4_0"})
    for (const bool hadamard : {false, true}) {
      const std::string what = method + (hadamard ? " --hadamard" : "");
      auto cache = Make(method, hadamard ? std::map<std::string, std::string>{{"--hadamard", "1"}}
                                         : std::map<std::string, std::string>{});
      ASSERT_TRUE(cache.ok()) << cache.status().ToString();
      WriteAll(**cache, k, v, n);
      for (int l = 0; l < kShape.n_layer; ++l) {
        EXPECT_EQ(Read(**cache, l, true), ExpectedBlocks(method, hadamard, k, n)) << what << " keys, layer " << l;
        EXPECT_EQ(Read(**cache, l, false), ExpectedBlocks(method, hadamard, v, n)) << what << " values, layer " << l;
      }
      // 34 or 18 bytes per 32 numbers, against 64 in fp16.
      const double fraction = static_cast<double>((*cache)->BytesUsed()) / (n * Fp16FullBytesPerToken(kShape));
      EXPECT_EQ(fraction, method == "q8_0" ? 34.0 / 64 : 18.0 / 64) << what;
      EXPECT_EQ((*cache)->BytesReserved(), kCap * Fp16FullBytesPerToken(kShape) * (method == "q8_0" ? 34 : 18) / 64);
    }
}

TEST(QuantCache, BlockCachesRefuseShapesTheyCannotStore) {
  KvShape odd = kShape;
  odd.head_dim = 48;  // not whole blocks
  auto c = Make("q4_0", {}, odd);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("q4_0"));
  EXPECT_THAT(c.status().message(), HasSubstr("head_dim 48"));
  odd.head_dim = 96;  // whole blocks, but no Walsh-Hadamard transform of that size
  EXPECT_TRUE(Make("q8_0", {}, odd).ok());
  c = Make("q8_0", {{"--hadamard", "1"}}, odd);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("power-of-two head_dim, found 96"));
  EXPECT_FALSE(Make("q8_0", {{"--hadamard", "yes"}}).ok());
}

// ==== KIVI =======================================================================================

// The bound of ops/quant.h for one asymmetric group, given the numbers it quantized (x16):
//   |x - x^| <= max(scale16 / 2, |min - min16| + L |s - scale16|),  s = (max - min) / L,
// with |min - min16| <= max(u16 |min|, 2^-25) and |s - scale16| <= max(u16 s, 2^-25) + 2^-22 s
// (fp32 subtraction and division, then fp16), scale16 <= s + that.
double AsymBound(const std::vector<double>& x16, int bits) {
  const int L = (1 << bits) - 1;
  double lo = x16[0], hi = x16[0];
  for (double x : x16) lo = std::min(lo, x), hi = std::max(hi, x);
  const double s = (hi - lo) / L, ds = std::max(kU16 * s, std::ldexp(1.0, -25)) + std::ldexp(s, -22);
  const double dm = std::max(kU16 * std::fabs(lo), std::ldexp(1.0, -25));
  return std::max((s + ds) / 2, dm + L * ds);
}

// Checks what a KIVI cache (no rotation) returns for its T stored tokens against the rows x it was
// given (keys or values, [T][D]): tokens in whole groups of G within the group's bound, the rest
// (the residual) exactly fp16(x). Groups are quantized from the fp16 residual, so the bound is that
// of the fp16-rounded group plus the input's own rounding |x - fp16(x)|; FLT_EPSILON (|x| + |x^|
// + |min|) covers fp32 arithmetic in quantizing and dequantizing (as tests/test_quant.cpp).
void CheckKivi(const std::vector<float>& got, const std::vector<float>& x, int T, int G, int bits, bool keys,
               const std::string& what) {
  const int quantized = T / G * G;
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < kD; ++c) {
      const double xi = x[t * kD + c], gi = got[t * kD + c], x16 = Fp16ToFp32(Fp32ToFp16(x[t * kD + c]));
      if (t >= quantized) {
        ASSERT_EQ(gi, x16) << what << ": residual token " << t << " channel " << c;
        continue;
      }
      // The group of (t, c): channel c over the G tokens of t's group (keys), or t's G channels (values).
      std::vector<double> group;
      for (int i = 0; i < G; ++i) {
        const int tt = keys ? t / G * G + i : t, cc = keys ? c : c / G * G + i;
        group.push_back(Fp16ToFp32(Fp32ToFp16(x[tt * kD + cc])));
      }
      const double lo = *std::min_element(group.begin(), group.end());
      const double tol = AsymBound(group, bits) + std::fabs(xi - x16) +
                         FLT_EPSILON * (std::fabs(xi) + std::fabs(gi) + std::fabs(lo));
      ASSERT_LE(std::fabs(gi - xi), tol) << what << ": token " << t << " channel " << c;
    }
}

// Bytes of one layer: per group of G tokens, K and V each D channels x (codes + fp16 min + scale);
// per residual token, K and V in fp16.
size_t KiviLayerBytes(int groups, int residual, int G, int bits) {
  return groups * 2 * kD * (AsymCodeBytes(G, bits) + 4) + static_cast<size_t>(residual) * 2 * kD * 2;
}

TEST(QuantCache, KiviGroupsWithinBoundResidualExactBytesByFormula) {
  std::mt19937_64 rng(2);
  const int G = 32, T = 40;  // one group and 8 residual tokens
  std::vector<float> k = Normal(static_cast<size_t>(T) * kD, rng), v = Normal(k.size(), rng, 2.0f);
  for (int t = 0; t < T; ++t) k[t * kD + 5] += 7.0f;  // a channel offset: per-channel keys absorb it
  for (const int bits : {2, 4}) {
    const std::string what = "kivi " + std::to_string(bits) + "-bit";
    auto cache = Make("kivi", {{"--kivi-bits", std::to_string(bits)}});
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    WriteAll(**cache, k, v, T);
    for (int l = 0; l < kShape.n_layer; ++l) {
      ASSERT_EQ((*cache)->Stored(l), T);
      CheckKivi(Read(**cache, l, true), k, T, G, bits, true, what + " keys");
      CheckKivi(Read(**cache, l, false), v, T, G, bits, false, what + " values");
    }
    EXPECT_EQ((*cache)->BytesUsed(), kShape.n_layer * KiviLayerBytes(1, 8, G, bits)) << what;
    // Reserved: floor(96 / 32) groups and a residual of 32 per layer.
    EXPECT_EQ((*cache)->BytesReserved(), kShape.n_layer * KiviLayerBytes(3, 32, G, bits)) << what;
  }
}

TEST(QuantCache, KiviRefusesBadFlags) {
  const std::vector<std::pair<std::map<std::string, std::string>, std::string>> bad = {
      {{{"--kivi-bits", "3"}}, "--kivi-bits"},
      {{{"--kivi-bits", "8"}}, "--kivi-bits"},
      {{{"--kivi-group", "24"}}, "must divide head_dim 64"},
      {{{"--kivi-group", "16"}, {"--kivi-residual", "24"}}, "--kivi-residual: 24 is not a multiple"},
  };
  for (const auto& [flags, msg] : bad) {
    auto c = Make("kivi", flags);
    ASSERT_FALSE(c.ok()) << msg;
    EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(c.status().message(), HasSubstr(msg));
  }
  KvShape odd = kShape;
  odd.head_dim = 96;
  EXPECT_THAT(Make("kivi", {{"--hadamard", "1"}}, odd).status().message(), HasSubstr("found 96"));
}

// ==== Hadamard on outlier channels ===============================================================

// Keys and values with 3 channels per head 20x larger than the rest, as real caches have them: a
// key outlier channel is large with a fixed sign (N(0, 1) + 20), a value outlier varies (20 N(0, 1)).
// Queries N(0, 0.25). Exact attention in double on the unquantized rows, against the cache's
// attention for a prefill batch of 63 (GEMM path) and one decode step: RMS error over the outputs.
double AttentionError(const std::string& method, std::map<std::string, std::string> flags, bool hadamard) {
  if (hadamard) flags["--hadamard"] = "1";
  KvShape shape = kShape;
  shape.n_layer = 1;
  auto made = Make(method, flags, shape);
  if (!made.ok()) return -1;
  KvCache& cache = **made;
  std::mt19937_64 rng(3);
  const int n = 64, Hq = shape.n_head;
  std::vector<float> k = Normal(static_cast<size_t>(n) * kD, rng), v = Normal(k.size(), rng);
  std::vector<float> q = Normal(static_cast<size_t>(n) * Hq * kd, rng, 0.25f);
  for (int t = 0; t < n; ++t)
    for (int c : {3, 17, 40})
      for (int g = 0; g < 2; ++g) k[t * kD + g * kd + c] += 20.0f, v[t * kD + g * kd + c] *= 20.0f;
  ThreadPool pool(1);
  std::vector<float> out(static_cast<size_t>(n) * Hq * kd), x(static_cast<size_t>(n) * shape.n_embd);
  double err = 0;
  for (auto [first, count] : {std::pair{0, n - 1}, std::pair{n - 1, 1}}) {
    auto plan = cache.Plan(count);
    EXPECT_TRUE(plan.ok() && cache.Apply(*plan).ok());
    cache.Write(0, *plan, k.data() + first * kD, v.data() + first * kD, x.data());
    cache.Attend(0, *plan, q.data() + first * Hq * kd, out.data(), pool);
    for (int i = 0; i < count; ++i)
      for (int h = 0; h < Hq; ++h) {
        const int g = h / 2, T = first + i + 1;
        const float* qh = q.data() + ((first + i) * Hq + h) * kd;
        std::vector<double> p(T);
        double mx = -1e300, sum = 0;
        for (int t = 0; t < T; ++t) {
          double dot = 0;
          for (int e = 0; e < kd; ++e) dot += static_cast<double>(qh[e]) * k[t * kD + g * kd + e];
          mx = std::max(mx, p[t] = dot / std::sqrt(static_cast<double>(kd)));
        }
        for (double& e : p) sum += (e = std::exp(e - mx));
        for (int e = 0; e < kd; ++e) {
          double want = 0;
          for (int t = 0; t < T; ++t) want += p[t] / sum * v[t * kD + g * kd + e];
          err += std::pow(out[(i * Hq + h) * kd + e] - want, 2);
        }
      }
  }
  return std::sqrt(err / (static_cast<double>(n) * Hq * kd));
}

TEST(QuantCache, HadamardLowersAttentionErrorOnOutlierChannels) {
  // q4_0: an outlier sets the scale of its whole 32-value block, so the block's other 31 numbers
  // are coded with steps 20x too coarse; rotated, every number of the head has the same spread.
  // KIVI's per-channel keys already give an outlier channel its own scale and min, so the rotation
  // gains nothing on keys (a fixed-sign outlier becomes a per-channel offset, which the min
  // absorbs; a zero-mean one would spread its variance over every channel: no gain either); its
  // per-token values share one scale per 32 channels, as q4_0 blocks do, and gain. Over seeds
  // 1-8 the rotated error is 0.43-0.49x the plain one for q4_0, 0.54-0.81x for 2-bit KIVI.
  for (const auto& [method, flags] : std::vector<std::pair<std::string, std::map<std::string, std::string>>>{
           {"q4_0", {}}, {"kivi", {{"--kivi-bits", "2"}}}}) {
    const double plain = AttentionError(method, flags, false), rotated = AttentionError(method, flags, true);
    ASSERT_GT(plain, 0) << method;
    ASSERT_GT(rotated, 0) << method;
    EXPECT_LT(rotated, plain) << method << ": the rotation did not help";
    std::printf("[          ] %s: attention RMS error %.4f plain, %.4f with --hadamard\n", method.c_str(), plain,
                rotated);
  }
}

// ==== Retention ==================================================================================

// Per-head lists: head 0 keeps the even tokens, head 1 the first half.
std::vector<std::vector<int>> PerHeadKeep(int T) {
  std::vector<std::vector<int>> keep(2);
  for (int t = 0; t < T / 2; ++t) keep[0].push_back(2 * t), keep[1].push_back(t);
  return keep;
}

// Rows [kept][D] as a per-head retention should leave them: head g's columns from its own rows.
std::vector<float> Gather(const std::vector<float>& rows, const std::vector<std::vector<int>>& keep) {
  std::vector<float> out(keep[0].size() * kD);
  for (int g = 0; g < 2; ++g)
    for (size_t s = 0; s < keep[g].size(); ++s)
      for (int e = 0; e < kd; ++e) out[s * kD + g * kd + e] = rows[keep[g][s] * kD + g * kd + e];
  return out;
}

TEST(QuantCache, PerHeadRetainKeepsEachHeadsRowsAndFreesBytes) {
  std::mt19937_64 rng(4);
  const int T = 40, kept = 20;
  const std::vector<float> k = Normal(static_cast<size_t>(T) * kD, rng), v = Normal(k.size(), rng);
  const auto keep = PerHeadKeep(T);
  // Block caches move whole blocks: the kept rows are the rows read before, bit for bit.
  for (const std::string method : {"q8_0", "q4_0"}) {
    auto cache = Make(method, {{"--hadamard", "1"}});
    ASSERT_TRUE(cache.ok());
    WriteAll(**cache, k, v, T);
    const std::vector<float> keys = Read(**cache, 1, true), values = Read(**cache, 1, false);
    const size_t bytes = (*cache)->BytesUsed();
    ASSERT_TRUE((*cache)->Retain(1, keep).ok()) << method;
    EXPECT_EQ((*cache)->Stored(1), kept);
    EXPECT_EQ(Read(**cache, 1, true), Gather(keys, keep)) << method;
    EXPECT_EQ(Read(**cache, 1, false), Gather(values, keep)) << method;
    EXPECT_EQ((*cache)->BytesUsed(), bytes / 2 + bytes / 4) << method << ": layer 1 holds half its rows";
  }
  // KIVI re-appends the kept rows as read: 2 groups of 8 re-quantized (within the bound of the read
  // rows) and 4 in the residual (exactly fp16 of the read rows).
  const int G = 8, bits = 2;
  auto cache = Make("kivi", {{"--kivi-bits", "2"}, {"--kivi-group", "8"}});
  ASSERT_TRUE(cache.ok());
  WriteAll(**cache, k, v, T);
  const std::vector<float> keys = Read(**cache, 1, true), values = Read(**cache, 1, false);
  ASSERT_TRUE((*cache)->Retain(1, keep).ok());
  EXPECT_EQ((*cache)->Stored(1), kept);
  CheckKivi(Read(**cache, 1, true), Gather(keys, keep), kept, G, bits, true, "kivi retained keys");
  CheckKivi(Read(**cache, 1, false), Gather(values, keep), kept, G, bits, false, "kivi retained values");
  EXPECT_EQ((*cache)->BytesUsed(), KiviLayerBytes(5, 0, G, bits) + KiviLayerBytes(2, 4, G, bits));
}

}  // namespace
}  // namespace dk
