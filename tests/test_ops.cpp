// Optimized kernels against their scalar / double references, over odd sizes and misaligned
// pointers. Tolerances are derived from the float rounding of the reductions.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <random>
#include <vector>

#include "core/fp16.h"
#include "ops/ops.h"
#include "ops/simd.h"

namespace dk {
namespace {

struct Data {
  std::vector<float> a, y;
  std::vector<uint16_t> b;
};

Data Make(int n, int offset, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Data d;
  d.a.resize(n + offset);
  d.y.resize(n + offset);
  d.b.resize(n + offset);
  for (int i = 0; i < n + offset; ++i) {
    d.a[i] = nd(rng);
    d.y[i] = nd(rng);
    d.b[i] = Fp32ToFp16(nd(rng));
  }
  return d;
}

const int kSizes[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 129};

TEST(OpsSimd, DotF16MatchesDoubleReference) {
  for (int n : kSizes)
    for (int off : {0, 1, 3}) {
      Data d = Make(n, off, 100 * n + off);
      const float* a = d.a.data() + off;
      const uint16_t* b = d.b.data() + off;
      double ref = 0.0, abs_sum = 0.0;
      for (int i = 0; i < n; ++i) {
        ref += static_cast<double>(a[i]) * Fp16ToFp32(b[i]);
        abs_sum += std::fabs(static_cast<double>(a[i]) * Fp16ToFp32(b[i]));
      }
      // Any summation order of n float products errs by at most ~n * eps * sum|a_i b_i|.
      const double tol = (n + 1) * FLT_EPSILON * abs_sum + 1e-30;
      EXPECT_NEAR(DotF16(a, b, n), ref, tol) << "n=" << n << " offset=" << off;
      EXPECT_NEAR(scalar::DotF16(a, b, n), ref, tol) << "scalar n=" << n;
    }
}

TEST(OpsSimd, AxpyF16MatchesScalar) {
  for (int n : kSizes)
    for (int off : {0, 1, 5}) {
      Data d = Make(n, off, 7 * n + off);
      std::vector<float> y1(d.y), y2(d.y);
      AxpyF16(0.37f, d.b.data() + off, y1.data() + off, n);
      scalar::AxpyF16(0.37f, d.b.data() + off, y2.data() + off, n);
      for (int i = 0; i < n + off; ++i)  // one fused vs two roundings: 1 ulp of the result
        ASSERT_NEAR(y1[i], y2[i], 2 * FLT_EPSILON * (std::fabs(y2[i]) + 1.0f)) << "n=" << n << " i=" << i;
    }
}

TEST(OpsSimd, ExpShiftSumMatchesStdExp) {
  for (int n : kSizes) {
    std::mt19937 rng(n);
    std::uniform_real_distribution<float> u(-90.0f, 0.0f);
    std::vector<float> x(n);
    for (float& v : x) v = u(rng);
    if (n > 2) x[1] = 0.0f, x[2] = -1e-8f;
    std::vector<float> got(x);
    const float sum = ExpShiftSum(got.data(), n, 0.0f);
    double ref_sum = 0.0;
    for (int i = 0; i < n; ++i) {
      const double ref = std::exp(static_cast<double>(x[i]));
      ref_sum += ref;
      // Polynomial exp: a few ulp relative (4 eps), plus the subnormal floor near -87.
      ASSERT_NEAR(got[i], ref, 4 * FLT_EPSILON * ref + 1e-37) << "x=" << x[i];
    }
    EXPECT_NEAR(sum, ref_sum, (n + 4) * FLT_EPSILON * ref_sum + 1e-37) << "n=" << n;
  }
}

TEST(Ops, SoftmaxSumsToOneAndMatchesDouble) {
  std::vector<float> x = {1.0f, -3.0f, 20.0f, 0.5f, 19.0f, -100.0f, 3.0f, 2.0f, 1.5f};
  std::vector<float> p(x);
  Softmax(p.data(), static_cast<int>(p.size()));
  double z = 0.0;
  for (float v : x) z += std::exp(static_cast<double>(v) - 20.0);
  for (size_t i = 0; i < x.size(); ++i)
    EXPECT_NEAR(p[i], std::exp(static_cast<double>(x[i]) - 20.0) / z, 8 * FLT_EPSILON) << i;
}

TEST(Ops, RopeAdjacentAndNeoxRotatePairs) {
  // One head of 4 dims at position 1, base 10000: pair angles 1 and 0.01.
  for (bool neox : {false, true}) {
    std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f};
    const int32_t pos = 1;
    Rope(x.data(), &pos, 1, 1, 4, 4, 10000.0f, neox);
    const int a0 = 0, b0 = neox ? 2 : 1, a1 = neox ? 1 : 2, b1 = 3;
    const float in[4] = {1, 2, 3, 4};
    const double t0 = 1.0, t1 = 0.01;
    EXPECT_NEAR(x[a0], in[a0] * std::cos(t0) - in[b0] * std::sin(t0), 1e-6);
    EXPECT_NEAR(x[b0], in[a0] * std::sin(t0) + in[b0] * std::cos(t0), 1e-6);
    EXPECT_NEAR(x[a1], in[a1] * std::cos(t1) - in[b1] * std::sin(t1), 1e-6);
    EXPECT_NEAR(x[b1], in[a1] * std::sin(t1) + in[b1] * std::cos(t1), 1e-6);
  }
}

TEST(Ops, RmsNormMatchesDouble) {
  std::vector<float> x = {0.5f, -1.5f, 2.0f, 3.25f, -0.75f}, w = {1.0f, 0.5f, 2.0f, -1.0f, 1.5f}, out(5);
  RmsNorm(x.data(), w.data(), out.data(), 1, 5, 1e-5f);
  double ss = 0.0;
  for (float v : x) ss += static_cast<double>(v) * v;
  const double s = 1.0 / std::sqrt(ss / 5 + 1e-5);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(out[i], x[i] * s * w[i], 4 * FLT_EPSILON * std::fabs(x[i] * s * w[i]) + 1e-7);
}

TEST(Fp16, RoundTripAndRounding) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = Fp16ToFp32(bits);
    if (std::isnan(f)) continue;
    ASSERT_EQ(Fp32ToFp16(f), bits) << std::hex << h;
  }
  EXPECT_EQ(Fp32ToFp16(65520.0f), 0x7C00);  // rounds to +inf
  EXPECT_EQ(Fp32ToFp16(1.0f + 1.0f / 2048), 0x3C00);  // tie to even
}

}  // namespace
}  // namespace dk
