// Quantization kernels (ops/quant.h): q8_0 / q4_0 bit-compatibility with ggml worked out by hand,
// every quantizer within the error bound derived in quant.h on varied data and exact on values it
// can represent, the Walsh-Hadamard butterflies against the explicit matrix, and every fast kernel
// against its scalar reference over odd sizes and misaligned pointers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "ops/quant.h"

namespace dk {
namespace {

const double kU16 = std::ldexp(1.0, -11);      // fp16 unit roundoff
const double kHalfSub = std::ldexp(1.0, -25);  // half of fp16's smallest subnormal

// |v - fp16(v)| for |v| below fp16's largest finite value: half an ulp, relative in the normal
// range, absolute (2^-25) among the subnormals.
double Fp16RoundBound(double v) { return std::max(kU16 * std::fabs(v), kHalfSub); }

// ---- Test data ----------------------------------------------------------------------------------

enum class Dist { kNormal, kUniform, kWide, kOffset, kTiny, kAllEqual, kZeros };
const Dist kDists[] = {Dist::kNormal, Dist::kUniform,  Dist::kWide, Dist::kOffset,
                       Dist::kTiny,   Dist::kAllEqual, Dist::kZeros};

const char* Name(Dist d) {
  switch (d) {
    case Dist::kNormal: return "normal";
    case Dist::kUniform: return "uniform[-3,5]";
    case Dist::kWide: return "wide(+-1e-4..1e3)";
    case Dist::kOffset: return "offset(100+U[0,1])";
    case Dist::kTiny: return "tiny(N(0,1e-6))";
    case Dist::kAllEqual: return "all-equal";
    case Dist::kZeros: return "zeros";
  }
  return "?";
}

// kWide spans 7 decades in one group (the small values are lost to the large one's scale: the
// bound must still hold); kOffset has a range small next to its magnitude (the fp16 min's rounding
// dominates); kTiny puts the scales among fp16's subnormals.
std::vector<float> Sample(Dist dist, int n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) {
    switch (dist) {
      case Dist::kNormal: v = normal(rng); break;
      case Dist::kUniform: v = -3.0f + 8.0f * u01(rng); break;
      case Dist::kWide: v = (rng() & 1 ? 1.0f : -1.0f) * std::pow(10.0f, -4.0f + 7.0f * u01(rng)); break;
      case Dist::kOffset: v = 100.0f + u01(rng); break;
      case Dist::kTiny: v = 1e-6f * normal(rng); break;
      case Dist::kAllEqual: v = -2.71828f; break;
      case Dist::kZeros: v = 0.0f; break;
    }
  }
  return x;
}

// A random normal fp16 value with unbiased exponent in [emin, emax].
uint16_t RandomHalf(std::mt19937& rng, int emin, int emax, bool negative_too) {
  const auto e = static_cast<uint32_t>(emin + 15 + static_cast<int>(rng() % (emax - emin + 1)));
  const uint32_t sign = negative_too && (rng() & 1) ? 0x8000u : 0u;
  return static_cast<uint16_t>(sign | (e << 10) | (rng() & 0x3FFu));
}

std::vector<float> Normal(int n, std::mt19937& rng) { return Sample(Dist::kNormal, n, rng); }

// ---- Shared checks for the fast kernels ---------------------------------------------------------

// A float sum of n terms, each rounded at most n + 3 times on its way (the product, a scale
// applied per block or group, the FMA chain, the horizontal sum) errs by at most
// (n + 3) u sum|terms|, u = FLT_EPSILON / 2; FLT_EPSILON is used (2x margin). Checks the scalar
// reference against the exact (double) value and the fast kernel against the reference.
void ExpectDotsClose(float fast, float ref, double exact, double abs_sum, int n, const std::string& what) {
  const double tol = (n + 3) * FLT_EPSILON * abs_sum + 1e-30;
  EXPECT_NEAR(ref, exact, tol) << "scalar reference, " << what;
  EXPECT_NEAR(fast, ref, 2 * tol) << "fast vs scalar, " << what;
}

// y + a * xq: the reference rounds a * xq (xq = scale * code is exact: 8-bit code times 11-bit
// scale) and then the sum; the fast kernel rounds a * scale and then one fused multiply-add.
// The results differ by at most u |a xq| + 2u |y + a xq| <= FLT_EPSILON (|y| + 2 |a xq|).
// Elements outside [off, off + n) must be untouched.
void ExpectAxpysClose(const std::vector<float>& fast, const std::vector<float>& ref, const std::vector<float>& y0,
                      const std::vector<double>& term, int off, const std::string& what) {
  for (size_t i = 0; i < y0.size(); ++i) {
    const bool inside = i >= static_cast<size_t>(off) && i < off + term.size();
    if (!inside) {
      ASSERT_EQ(fast[i], y0[i]) << "wrote outside the row at " << i << ", " << what;
      continue;
    }
    const double t = term[i - off];
    ASSERT_NEAR(ref[i], y0[i] + t, FLT_EPSILON * (std::fabs(y0[i]) + 2 * std::fabs(t)) + 1e-30)
        << "scalar reference at " << i << ", " << what;
    ASSERT_NEAR(fast[i], ref[i], FLT_EPSILON * (std::fabs(y0[i]) + 2 * std::fabs(t)) + 1e-30)
        << "fast vs scalar at " << i << ", " << what;
  }
}

// ==== ggml q8_0 / q4_0 ===========================================================================

TEST(QuantGgml, Q8_0Block0To31MatchesGgmlByHand) {
  // x_j = j. amax = 31, d = 31/127 = 0.24409 = 2^-3 * 1.95276; fp16 mantissa round(0.95276 * 1024)
  // = 976, exponent -3 + 15 = 12: d16 = (12 << 10) | 976 = 0x33D0 = 0.244140625. id = 127/31 and
  // q_j = roundf(127 j / 31); 127 j / 31 is never k + 1/2 (31 does not divide 254 j for j < 31).
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j);
  const int want[32] = {0,  4,  8,  12, 16, 20, 25, 29, 33, 37,  41,  45,  49,  53,  57,  61,
                        66, 70, 74, 78, 82, 86, 90, 94, 98, 102, 107, 111, 115, 119, 123, 127};
  BlockQ8_0 b;
  QuantizeRowQ8_0(x.data(), &b, 32);
  EXPECT_EQ(b.d, 0x33D0);
  std::vector<float> back(32);
  DequantizeRowQ8_0(&b, back.data(), 32);
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(b.qs[j], want[j]) << "j=" << j;
    EXPECT_EQ(back[j], 0.244140625f * static_cast<float>(want[j])) << "j=" << j;
  }
}

TEST(QuantGgml, Q4_0Block0To31MatchesGgmlByHand) {
  // x_j = j. The largest magnitude is +31, so d = 31 / -8 = -3.875 (exact): fp16 sign 1, exponent
  // 1 + 15 = 16, mantissa 0.9375 * 1024 = 960: 0x8000 | (16 << 10) | 960 = 0xC3C0. id = -8/31 and
  // q_j = min(15, trunc(8.5 - 8 j / 31)): 8, 8, then four each of 7, 6, 5, 4, 3, 2, 1, and 0, 0;
  // x_31 = 31 gives 8.5 - 8 = 0.5 -> 0 and dequantizes to (0 - 8) * -3.875 = 31 exactly.
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j);
  const int q[32] = {8, 8, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0};
  BlockQ4_0 b;
  QuantizeRowQ4_0(x.data(), &b, 32);
  EXPECT_EQ(b.d, 0xC3C0);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b.qs[j], q[j] | (q[j + 16] << 4)) << "byte " << j;
  std::vector<float> back(32);
  DequantizeRowQ4_0(&b, back.data(), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], static_cast<float>(q[j] - 8) * -3.875f) << "j=" << j;
  EXPECT_EQ(back[31], 31.0f);
}

TEST(QuantGgml, CodesComeFromTheFp32ScaleAndGgmlRounding) {
  // q8_0 scales by the fp32 1/d, not by the stored fp16 d: in the block 0..31 with x_20 = 20.627,
  // 20.627 * 127/31 = 84.504 rounds to 85, where 20.627 / 0.244140625 (fp16 d) = 84.488 would give 84.
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j);
  x[20] = 20.627f;
  BlockQ8_0 b8;
  QuantizeRowQ8_0(x.data(), &b8, 32);
  EXPECT_EQ(b8.d, 0x33D0);
  EXPECT_EQ(b8.qs[20], 85);
  // q4_0 rounds half up (trunc of x/d + 8.5), not half away from zero. Extreme -4: d = 0.5, id = 2
  // (both exact). x = -1.25: -2.5 + 8.5 = 6 -> q 6 (roundf(-2.5) = -3 would give 5); x = 1.25:
  // 11; x = 3.75: 16 -> clamped to 15; x = 0: 8.
  std::vector<float> y(32, 0.0f);
  y[0] = -4.0f, y[1] = -1.25f, y[2] = 1.25f, y[3] = 3.75f;
  BlockQ4_0 b4;
  QuantizeRowQ4_0(y.data(), &b4, 32);
  EXPECT_EQ(b4.d, 0x3800);    // 0.5: exponent -1 + 15 = 14, 14 << 10
  EXPECT_EQ(b4.qs[0], 0x80);  // element 0: q 0, element 16: q 8
  EXPECT_EQ(b4.qs[1], 0x86);
  EXPECT_EQ(b4.qs[2], 0x8B);
  EXPECT_EQ(b4.qs[3], 0x8F);
  EXPECT_EQ(b4.qs[4], 0x88);
}

TEST(QuantGgml, Q4_0NegativeExtremeAndZeroBlocksMatchGgml) {
  // x_j = (j - 24) / 2: the largest magnitude is x_0 = -12, so d = -12 / -8 = 1.5 (fp16 0x3E00)
  // and q_j = trunc((j - 24) / 3 + 8.5): never within 1/6 of an integer, so float rounding of
  // x * id cannot move it.
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 24) * 0.5f;
  BlockQ4_0 b[2];
  std::vector<float> zeros(32, 0.0f);
  x.insert(x.end(), zeros.begin(), zeros.end());
  QuantizeRowQ4_0(x.data(), b, 64);
  EXPECT_EQ(b[0].d, 0x3E00);
  for (int j = 0; j < 32; ++j) {
    const int want = static_cast<int>(std::floor((j - 24) / 3.0 + 8.5));
    const int got = j < 16 ? (b[0].qs[j] & 0x0F) : (b[0].qs[j - 16] >> 4);
    EXPECT_EQ(got, want) << "j=" << j;
  }
  // All zeros: max = 0, d = 0 / -8 = -0.0, which ggml stores as fp16 -0 (0x8000); id = 0 and every
  // code is trunc(8.5) = 8.
  EXPECT_EQ(b[1].d, 0x8000);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b[1].qs[j], 0x88) << "byte " << j;
  BlockQ8_0 z;
  QuantizeRowQ8_0(zeros.data(), &z, 32);  // amax = 0: d = +0, id = 0, codes 0
  EXPECT_EQ(z.d, 0x0000);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(z.qs[j], 0) << "j=" << j;
}

// |d - d16| for d = amax / 127 or max / -8: the fp32 division (2^-24 d), then the fp16 rounding.
double ScaleError(double d) { return Fp16RoundBound(d) + std::ldexp(std::fabs(d), -23); }

TEST(QuantGgml, Q8_0WithinBoundOnVariedData) {
  // q = round(x / d) with |x / d| <= 127, so |x - d q| <= d/2 and |x - d16 q| <= d/2 + 127 |d - d16|.
  // Slack: x * fl(1/d) is rounded twice (FLT_EPSILON |x| in x units); d16 * q is exact in fp32.
  std::mt19937 rng(11);
  for (Dist dist : kDists) {
    const int kBlocks = 4;
    const std::vector<float> x = Sample(dist, 32 * kBlocks, rng);
    std::vector<BlockQ8_0> b(kBlocks);
    std::vector<float> back(x.size());
    QuantizeRowQ8_0(x.data(), b.data(), static_cast<int64_t>(x.size()));
    DequantizeRowQ8_0(b.data(), back.data(), static_cast<int64_t>(x.size()));
    for (int k = 0; k < kBlocks; ++k) {
      double amax = 0.0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(static_cast<double>(x[32 * k + j])));
      const double d = amax / 127;
      ASSERT_LE(std::fabs(Fp16ToFp32(b[k].d) - d), ScaleError(d)) << Name(dist) << " block " << k;
      for (int j = 0; j < 32; ++j) {
        const size_t i = 32 * k + j;
        const double bound = d / 2 + 127 * ScaleError(d) + FLT_EPSILON * (std::fabs(x[i]) + d);
        ASSERT_LE(std::fabs(back[i] - static_cast<double>(x[i])), bound) << Name(dist) << " element " << i;
      }
    }
  }
}

TEST(QuantGgml, Q4_0WithinBoundOnVariedData) {
  // q - 8 = round-half-up(x / d) in [-8, 8], 8 clamped to 7: |x - d (q - 8)| <= |d|/2 where
  // x / d <= 7.5, and <= |d| beyond (the end opposite the extreme); plus 8 |d - d16|.
  std::mt19937 rng(12);
  for (Dist dist : kDists) {
    const int kBlocks = 4;
    const std::vector<float> x = Sample(dist, 32 * kBlocks, rng);
    std::vector<BlockQ4_0> b(kBlocks);
    std::vector<float> back(x.size());
    QuantizeRowQ4_0(x.data(), b.data(), static_cast<int64_t>(x.size()));
    DequantizeRowQ4_0(b.data(), back.data(), static_cast<int64_t>(x.size()));
    for (int k = 0; k < kBlocks; ++k) {
      double max = 0.0;
      for (int j = 0; j < 32; ++j)
        if (std::fabs(x[32 * k + j]) > std::fabs(max)) max = x[32 * k + j];
      const double d = max / -8, ad = std::fabs(d);
      ASSERT_LE(std::fabs(Fp16ToFp32(b[k].d) - d), ScaleError(d)) << Name(dist) << " block " << k;
      for (int j = 0; j < 32; ++j) {
        const size_t i = 32 * k + j;
        const bool clamped = d != 0.0 && x[i] / d > 7.5 - 1e-4;
        const double bound = (clamped ? ad : ad / 2) + 8 * ScaleError(d) + FLT_EPSILON * (std::fabs(x[i]) + ad);
        ASSERT_LE(std::fabs(back[i] - static_cast<double>(x[i])), bound) << Name(dist) << " element " << i;
      }
    }
  }
}

TEST(QuantGgml, RepresentableBlocksAreExact) {
  // x_j = k_j d16 with the largest magnitude 127 d16 (q8_0) or -8 d16 (q4_0) present: the fp32 d
  // equals d16 exactly, x * fl(1/d) is within 2 ulps of the integer k (so it rounds back to k), and
  // d16 * k is exact in fp32.
  std::mt19937 rng(13);
  for (int trial = 0; trial < 20; ++trial) {
    // q8_0's d is amax / 127 >= 0; q4_0's d carries the sign of its extreme, so it may be negative.
    const uint16_t d16 = RandomHalf(rng, -10, 6, true), d16_pos = static_cast<uint16_t>(d16 & 0x7FFF);
    const float d = Fp16ToFp32(d16);
    std::vector<float> x8(32), x4(32);
    for (int j = 0; j < 32; ++j) {
      const int k8 = j == 0 ? 127 : static_cast<int>(rng() % 255) - 127;
      const int k4 = j == 0 ? 0 : static_cast<int>(rng() % 16);
      x8[j] = static_cast<float>(k8) * Fp16ToFp32(d16_pos);
      x4[j] = static_cast<float>(k4 - 8) * d;
    }
    BlockQ8_0 b8;
    BlockQ4_0 b4;
    QuantizeRowQ8_0(x8.data(), &b8, 32);
    QuantizeRowQ4_0(x4.data(), &b4, 32);
    std::vector<float> back8(32), back4(32);
    DequantizeRowQ8_0(&b8, back8.data(), 32);
    DequantizeRowQ4_0(&b4, back4.data(), 32);
    EXPECT_EQ(b8.d, d16_pos) << "q8_0 trial " << trial;
    EXPECT_EQ(b4.d, d16) << "q4_0 trial " << trial;
    EXPECT_EQ(back8, x8) << "q8_0 trial " << trial << " d=" << d;
    EXPECT_EQ(back4, x4) << "q4_0 trial " << trial << " d=" << d;
  }
}

template <typename Block>
void CheckBlockKernels(void (*quantize)(const float*, Block*, int64_t),
                       void (*dequantize)(const Block*, float*, int64_t), float (*dot)(const float*, const Block*, int),
                       float (*dot_ref)(const float*, const Block*, int),
                       void (*axpy)(float, const Block*, float*, int),
                       void (*axpy_ref)(float, const Block*, float*, int), const char* type) {
  for (int nblocks : {1, 2, 3, 7})
    for (int off : {0, 1, 3}) {
      std::mt19937 rng(100 * nblocks + off);
      const int n = 32 * nblocks;
      std::vector<float> x = Normal(n, rng), q = Normal(n + off, rng), y0 = Normal(n + off + 2, rng), xq(n);
      std::vector<Block> b(nblocks);
      quantize(x.data(), b.data(), n);
      dequantize(b.data(), xq.data(), n);
      const std::string what =
          std::string(type) + " blocks=" + std::to_string(nblocks) + " offset=" + std::to_string(off);
      double exact = 0.0, abs_sum = 0.0;
      for (int i = 0; i < n; ++i) {
        exact += static_cast<double>(q[off + i]) * xq[i];
        abs_sum += std::fabs(static_cast<double>(q[off + i]) * xq[i]);
      }
      ExpectDotsClose(dot(q.data() + off, b.data(), n), dot_ref(q.data() + off, b.data(), n), exact, abs_sum, n, what);
      const float a = -0.73f;
      std::vector<float> yf(y0), yr(y0);
      std::vector<double> term(n);
      for (int i = 0; i < n; ++i) term[i] = static_cast<double>(a) * xq[i];
      axpy(a, b.data(), yf.data() + off, n);
      axpy_ref(a, b.data(), yr.data() + off, n);
      ExpectAxpysClose(yf, yr, y0, term, off, what);
    }
}

TEST(QuantGgml, DotAndAxpyMatchScalarReference) {
  CheckBlockKernels<BlockQ8_0>(QuantizeRowQ8_0, DequantizeRowQ8_0, DotQ8_0, scalar::DotQ8_0, AxpyQ8_0, scalar::AxpyQ8_0,
                               "q8_0");
  CheckBlockKernels<BlockQ4_0>(QuantizeRowQ4_0, DequantizeRowQ4_0, DotQ4_0, scalar::DotQ4_0, AxpyQ4_0, scalar::AxpyQ4_0,
                               "q4_0");
}

// ==== Asymmetric b-bit groups ====================================================================

const int kBits[] = {2, 4, 8};
const int kGroupSizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 128};

int Code(const std::vector<uint8_t>& codes, int i, int bits) {
  return (codes[i * bits / 8] >> (i * bits % 8)) & ((1 << bits) - 1);
}

// Checks one quantized group against the bound derived in quant.h:
//   |x - x^| <= max(scale16 / 2, |min - min16| + L |s - scale16|),
// with the stored values themselves checked against their a-priori rounding bounds
//   |min - min16| <= max(u16 |min|, 2^-25),  |s - scale16| <= max(u16 s, 2^-25) + 2^-22 s
// (fp32 max - min and division, 2 roundings of 2^-24 each, then fp16). Slack for fp32 arithmetic:
// (x - min16) / scale16 rounds twice (2u |x - min16| in x units), min16 + scale16 * code rounds once
// (u |x^|; the product is exact): FLT_EPSILON (|x| + |min16| + |x^|) covers both.
void CheckAsymGroup(const std::vector<float>& x, int stride, int bits, uint16_t min16, uint16_t scale16,
                    const std::vector<float>& back, const std::string& what) {
  const int n = static_cast<int>(x.size() / stride), levels = (1 << bits) - 1;
  double lo = x[0], hi = x[0];
  for (int i = 0; i < n; ++i) lo = std::min<double>(lo, x[i * stride]), hi = std::max<double>(hi, x[i * stride]);
  const double s = (hi - lo) / levels, m16 = Fp16ToFp32(min16), s16 = Fp16ToFp32(scale16);
  const double dm = Fp16RoundBound(lo), ds = Fp16RoundBound(s) + std::ldexp(s, -22);
  ASSERT_LE(std::fabs(m16 - lo), dm) << "stored min, " << what;
  ASSERT_LE(std::fabs(s16 - s), ds) << "stored scale, " << what;
  for (int i = 0; i < n; ++i) {
    const double xi = x[i * stride], got = back[i * stride];
    const double slack = FLT_EPSILON * (std::fabs(xi) + std::fabs(m16) + std::fabs(got));
    ASSERT_LE(std::fabs(got - xi), std::max(s16 / 2, dm + levels * ds) + slack) << "element " << i << ", " << what;
  }
}

TEST(QuantAsym, WithinDerivedBoundOnVariedData) {
  // Strided groups read x[i * stride]; the other positions hold a huge sentinel that would wreck
  // the scale if read, and the dequantizer must leave them alone. A guard byte after the codes
  // must survive, and padding bits in the last byte must be zero.
  std::mt19937 rng(21);
  const float kSentinel = 1e30f;
  for (int bits : kBits)
    for (Dist dist : kDists)
      for (int n : {1, 7, 32, 33, 128})
        for (int stride : {1, 3}) {
          const std::string what = std::string(Name(dist)) + " bits=" + std::to_string(bits) +
                                   " n=" + std::to_string(n) + " stride=" + std::to_string(stride);
          const std::vector<float> v = Sample(dist, n, rng);
          std::vector<float> x(static_cast<size_t>(n) * stride, kSentinel), back(x.size(), kSentinel);
          for (int i = 0; i < n; ++i) x[i * stride] = v[i];
          const size_t nbytes = AsymCodeBytes(n, bits);
          std::vector<uint8_t> codes(nbytes + 1, 0xA5);
          uint16_t min16 = 0, scale16 = 0;
          QuantizeAsym(x.data(), n, stride, bits, codes.data(), &min16, &scale16);
          DequantizeAsym(codes.data(), n, bits, min16, scale16, back.data(), stride);
          ASSERT_EQ(codes[nbytes], 0xA5) << "guard byte, " << what;
          const int used = (n * bits) % 8;
          if (used != 0) {
            ASSERT_EQ(codes[nbytes - 1] >> used, 0) << "padding bits, " << what;
          }
          for (size_t i = 0; i < x.size(); ++i) {
            if (i % stride != 0) {
              ASSERT_EQ(back[i], kSentinel) << "dequantize wrote off-stride " << i << ", " << what;
            }
          }
          CheckAsymGroup(x, stride, bits, min16, scale16, back, what);
        }
}

TEST(QuantAsym, GridValuesReproduceExactly) {
  // min16 = i_m 2^e and scale16 = j_s 2^e (|i_m|, j_s < 2^11: both fp16), values min16 + k scale16
  // with k = 0 and k = L present: every x = (i_m + k j_s) 2^e has under 20 significant bits, so
  // max - min = L scale16 and its division by L are exact, min16 and scale16 are stored as is,
  // (x - min16) / scale16 = k exactly, and dequantization returns x bit for bit.
  std::mt19937 rng(22);
  for (int bits : kBits)
    for (int n : kGroupSizes)
      for (int e : {-12, -4, 0, 3}) {
        const int levels = (1 << bits) - 1;
        const double m = std::ldexp(static_cast<int>(rng() % 4095) - 2047, e);
        const double s = std::ldexp(1 + static_cast<int>(rng() % 2047), e);
        std::vector<float> x(n), back(n);
        std::vector<int> k(n);
        for (int i = 0; i < n; ++i) {
          k[i] = i == 0 ? 0 : (i == 1 ? levels : static_cast<int>(rng() % (levels + 1)));
          x[i] = static_cast<float>(m + k[i] * s);
        }
        std::vector<uint8_t> codes(AsymCodeBytes(n, bits));
        uint16_t min16 = 0, scale16 = 0;
        QuantizeAsym(x.data(), n, 1, bits, codes.data(), &min16, &scale16);
        DequantizeAsym(codes.data(), n, bits, min16, scale16, back.data(), 1);
        const std::string what = "bits=" + std::to_string(bits) + " n=" + std::to_string(n) + " e=" + std::to_string(e);
        EXPECT_EQ(Fp16ToFp32(min16), m) << what;
        EXPECT_EQ(Fp16ToFp32(scale16), n == 1 ? 0.0 : s) << what;  // one value: a constant group
        for (int i = 0; i < n; ++i) ASSERT_EQ(Code(codes, i, bits), k[i]) << "code " << i << ", " << what;
        EXPECT_EQ(back, x) << what;
      }
}

TEST(QuantAsym, ConstantGroupReproducesFp16Min) {
  // max == min: scale 0, every code 0, and each value comes back as fp16(min), within half an fp16
  // ulp (or 2^-25 for 1e-9, which underflows to 0).
  for (float v : {3.14159f, -1e-3f, 1e-9f, 60000.0f, 0.0f})
    for (int bits : kBits) {
      const int n = 5, stride = 2;
      std::vector<float> x(n * stride, v), back(n * stride, 0.0f);
      std::vector<uint8_t> codes(AsymCodeBytes(n, bits), 0xFF);
      uint16_t min16 = 1, scale16 = 1;
      QuantizeAsym(x.data(), n, stride, bits, codes.data(), &min16, &scale16);
      DequantizeAsym(codes.data(), n, bits, min16, scale16, back.data(), stride);
      EXPECT_EQ(scale16, 0) << "v=" << v << " bits=" << bits;
      for (uint8_t c : codes) EXPECT_EQ(c, 0) << "v=" << v << " bits=" << bits;
      for (int i = 0; i < n; ++i) {
        EXPECT_EQ(back[i * stride], Fp16ToFp32(Fp32ToFp16(v))) << "v=" << v << " bits=" << bits;
        EXPECT_LE(std::fabs(back[i * stride] - static_cast<double>(v)), Fp16RoundBound(v)) << "v=" << v;
      }
    }
}

TEST(QuantAsym, CodesPackLittleEndianWithinBytes) {
  // min 0, scale 1 (the values are their own codes). 2-bit codes 0,1,2,3 | 3,0,1: byte 0 =
  // 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4, byte 1 = 3 | 0<<2 | 1<<4 = 0x13. 4-bit 0,15 | 1,14 | 7: low
  // nibble first: 0xF0, 0xE1, 0x07. 8-bit: one byte each.
  struct Case {
    int bits;
    std::vector<float> x;
    std::vector<uint8_t> bytes;
  };
  const Case cases[] = {{2, {0, 1, 2, 3, 3, 0, 1}, {0xE4, 0x13}},
                        {4, {0, 15, 1, 14, 7}, {0xF0, 0xE1, 0x07}},
                        {8, {0, 255, 17}, {0x00, 0xFF, 0x11}}};
  for (const Case& c : cases) {
    const int n = static_cast<int>(c.x.size());
    std::vector<uint8_t> codes(AsymCodeBytes(n, c.bits));
    uint16_t min16 = 0, scale16 = 0;
    QuantizeAsym(c.x.data(), n, 1, c.bits, codes.data(), &min16, &scale16);
    EXPECT_EQ(Fp16ToFp32(min16), 0.0f) << "bits=" << c.bits;
    EXPECT_EQ(Fp16ToFp32(scale16), 1.0f) << "bits=" << c.bits;
    EXPECT_EQ(codes, c.bytes) << "bits=" << c.bits;
  }
}

TEST(QuantAsym, DotAndAxpyCodesMatchScalarReference) {
  // Any bytes are valid codes. The codes start at byte offsets 0 and 1, the floats at 0, 1, 3.
  for (int bits : kBits)
    for (int n : kGroupSizes)
      for (int off : {0, 1, 3}) {
        std::mt19937 rng(1000 * bits + 10 * n + off);
        const int coff = off % 2;
        std::vector<uint8_t> codes(AsymCodeBytes(n, bits) + coff);
        for (uint8_t& c : codes) c = static_cast<uint8_t>(rng());
        const std::vector<uint8_t> packed(codes.begin() + coff, codes.end());
        const std::vector<float> w = Normal(n + off, rng), y0 = Normal(n + off + 2, rng);
        const std::string what =
            "bits=" + std::to_string(bits) + " n=" + std::to_string(n) + " offset=" + std::to_string(off);
        double exact = 0.0, abs_sum = 0.0;
        for (int i = 0; i < n; ++i) {
          exact += static_cast<double>(w[off + i]) * Code(packed, i, bits);
          abs_sum += std::fabs(static_cast<double>(w[off + i]) * Code(packed, i, bits));
        }
        const uint8_t* p = codes.data() + coff;
        ExpectDotsClose(DotAsymCodes(w.data() + off, p, n, bits), scalar::DotAsymCodes(w.data() + off, p, n, bits),
                        exact, abs_sum, n, what);
        const float a = 0.61f;
        std::vector<float> yf(y0), yr(y0);
        std::vector<double> term(n);
        for (int i = 0; i < n; ++i) term[i] = static_cast<double>(a) * Code(packed, i, bits);
        AxpyAsymCodes(a, p, n, bits, yf.data() + off);
        scalar::AxpyAsymCodes(a, p, n, bits, yr.data() + off);
        ExpectAxpysClose(yf, yr, y0, term, off, what);
      }
}

// ==== Walsh-Hadamard =============================================================================

// Norm-wise error of the butterflies: each of the L = log2 n unnormalized stages scales the 2-norm
// by sqrt(2) exactly and rounds every entry once (u relative), so stage k adds at most
// u 2^(k/2) |x|, amplified by 2^((L-k)/2) in the stages after it: L u 2^(L/2) |x| in all, L u |x|
// after the 1/sqrt(n) scaling, which itself (and its rounded constant) adds 2u |x|. The double
// reference rounded to float adds u |x|. With FLT_EPSILON = 2u, (L + 2) FLT_EPSILON |x|_2 covers it.
double FwhtTol(int n, const std::vector<float>& x) {
  double norm = 0.0;
  for (float v : x) norm += static_cast<double>(v) * v;
  return (std::log2(n) + 2) * FLT_EPSILON * std::sqrt(norm);
}

TEST(QuantFwht, ReferenceIsTheSylvesterMatrix) {
  // H_2 / sqrt(2) on (a, b) is ((a + b), (a - b)) / sqrt(2); H_4 e_1 / 2 is column 1 of
  // [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]] / 2 = (1, -1, 1, -1) / 2.
  std::vector<float> two = {3.0f, 1.0f};
  scalar::FwhtInPlace(two.data(), 2);
  EXPECT_FLOAT_EQ(two[0], 4.0f / std::sqrt(2.0f));
  EXPECT_FLOAT_EQ(two[1], 2.0f / std::sqrt(2.0f));
  std::vector<float> e1 = {0.0f, 1.0f, 0.0f, 0.0f};
  scalar::FwhtInPlace(e1.data(), 4);
  EXPECT_EQ(e1, (std::vector<float>{0.5f, -0.5f, 0.5f, -0.5f}));
  std::vector<float> one = {-7.5f};
  FwhtInPlace(one.data(), 1);
  EXPECT_EQ(one[0], -7.5f);  // H_1 = [1]
}

TEST(QuantFwht, ButterfliesMatchExplicitMatrix) {
  for (int n = 1; n <= 256; n *= 2)
    for (int off : {0, 1}) {
      std::mt19937 rng(n + off);
      const std::vector<float> x = Normal(n, rng);
      std::vector<float> fast(n + off, 0.0f), ref(x);
      std::copy(x.begin(), x.end(), fast.begin() + off);
      FwhtInPlace(fast.data() + off, n);
      scalar::FwhtInPlace(ref.data(), n);
      const double tol = FwhtTol(n, x);
      for (int i = 0; i < n; ++i)
        ASSERT_NEAR(fast[off + i], ref[i], tol) << "n=" << n << " offset=" << off << " i=" << i;
    }
}

TEST(QuantFwht, PreservesNormAndIsItsOwnInverse) {
  for (int n = 1; n <= 4096; n *= 2)
    for (Dist dist : {Dist::kNormal, Dist::kWide}) {
      std::mt19937 rng(7 * n);
      const std::vector<float> x = Sample(dist, n, rng);
      const std::string what = std::string(Name(dist)) + " n=" + std::to_string(n);
      std::vector<float> y(x);
      FwhtInPlace(y.data(), n);
      double nx = 0.0, ny = 0.0;
      for (int i = 0; i < n; ++i) nx += static_cast<double>(x[i]) * x[i], ny += static_cast<double>(y[i]) * y[i];
      const double tol = FwhtTol(n, x);
      EXPECT_NEAR(std::sqrt(ny), std::sqrt(nx), tol) << "norm, " << what;
      FwhtInPlace(y.data(), n);
      for (int i = 0; i < n; ++i) ASSERT_NEAR(y[i], x[i], 2 * tol) << "H H x, " << what << " i=" << i;
    }
}

// ==== Symmetric latents ==========================================================================

const int kRanks[] = {1, 3, 7, 8, 9, 31, 32, 33, 64, 100, 128};

// 5 and 13: int4 groups starting mid-byte (13 long enough for the vector loop after the odd start).
std::vector<int> GroupsFor(int r) { return {1, 5, 8, 13, 32, r}; }

struct Latent {
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales;
};

Latent QuantizeLatent(const std::vector<float>& x, int bits, int group) {
  const int r = static_cast<int>(x.size());
  Latent l{std::vector<uint8_t>(SymLatentCodeBytes(r, bits)), std::vector<uint16_t>(SymLatentGroups(r, group))};
  QuantizeSymLatent(x.data(), r, bits, group, l.codes.data(), l.scales.data());
  return l;
}

std::vector<float> DequantizeLatent(const Latent& l, int r, int bits, int group) {
  std::vector<float> out(r);
  DequantizeSymLatent(l.codes.data(), l.scales.data(), r, bits, group, out.data());
  return out;
}

TEST(QuantSymLatent, LayoutAndByteAccounting) {
  EXPECT_EQ(SymLatentBytes(100, 4, 32), 50u + 2 * 4);  // 4 groups: 32, 32, 32, 4
  EXPECT_EQ(SymLatentBytes(100, 8, 32), 100u + 2 * 4);
  EXPECT_EQ(SymLatentBytes(7, 4, 8), 4u + 2);  // odd r: the last byte is half padding
  EXPECT_EQ(SymLatentBytes(33, 8, 33), 33u + 2);
  EXPECT_EQ(SymLatentBytes(1, 4, 1), 1u + 2);
  EXPECT_EQ(SymLatentBytes(9, 4, 2), 5u + 2 * 5);
  // amax 7 -> scale 1 for int4: codes -7, 7, 0 stored +8 as 1 | 15 << 4 = 0xF1, then 8 and a zero
  // padding nibble. amax 127 -> scale 1 for int8: two's complement bytes.
  const Latent l4 = QuantizeLatent({-7, 7, 0}, 4, 3);
  EXPECT_EQ(l4.codes, (std::vector<uint8_t>{0xF1, 0x08}));
  EXPECT_EQ(l4.scales, (std::vector<uint16_t>{0x3C00}));
  const Latent l8 = QuantizeLatent({-127, 127, 0, -1}, 8, 4);
  EXPECT_EQ(l8.codes, (std::vector<uint8_t>{0x81, 0x7F, 0x00, 0xFF}));
  EXPECT_EQ(l8.scales, (std::vector<uint16_t>{0x3C00}));
}

// |x - x^| <= max(scale16 / 2, Q |s - scale16|) (quant.h), s = amax / Q, with the stored scale
// checked against |s - scale16| <= max(u16 s, 2^-25) + 2^-23 s (the fp32 division, then fp16).
// Slack: x / scale16 rounds once (u |x| in x units); scale16 * code is exact.
void CheckSymLatent(const std::vector<float>& x, int bits, int group, const Latent& l, const std::string& what) {
  const int r = static_cast<int>(x.size()), qmax = (1 << (bits - 1)) - 1;
  const std::vector<float> back = DequantizeLatent(l, r, bits, group);
  for (int g = 0; g * group < r; ++g) {
    const int start = g * group, end = std::min(r, start + group);
    double amax = 0.0;
    for (int i = start; i < end; ++i) amax = std::max(amax, std::fabs(static_cast<double>(x[i])));
    const double s = amax / qmax, s16 = Fp16ToFp32(l.scales[g]), ds = Fp16RoundBound(s) + std::ldexp(s, -23);
    ASSERT_LE(std::fabs(s16 - s), ds) << "scale of group " << g << ", " << what;
    for (int i = start; i < end; ++i)
      ASSERT_LE(std::fabs(back[i] - static_cast<double>(x[i])),
                std::max(s16 / 2, qmax * ds) + FLT_EPSILON * std::fabs(x[i]))
          << "element " << i << ", " << what;
  }
  if (bits == 4 && r % 2 == 1) {
    ASSERT_EQ(l.codes.back() >> 4, 0) << "padding nibble, " << what;
  }
}

TEST(QuantSymLatent, WithinBoundOnVariedData) {
  std::mt19937 rng(31);
  for (int bits : {4, 8})
    for (int r : kRanks)
      for (int group : GroupsFor(r))
        for (Dist dist : kDists) {
          const std::vector<float> x = Sample(dist, r, rng);
          CheckSymLatent(x, bits, group, QuantizeLatent(x, bits, group),
                         std::string(Name(dist)) + " bits=" + std::to_string(bits) + " r=" + std::to_string(r) +
                             " group=" + std::to_string(group));
        }
}

TEST(QuantSymLatent, RepresentableValuesAreExact) {
  // x = k scale16 with k = +-Q present in each group: Q scale16 is exact in fp32 (7 bits times 11),
  // so amax / Q = scale16 exactly, it is stored as is, x / scale16 = k, and scale16 * k = x.
  std::mt19937 rng(32);
  for (int bits : {4, 8})
    for (int r : kRanks)
      for (int group : GroupsFor(r)) {
        const int qmax = (1 << (bits - 1)) - 1;
        std::vector<float> x(r);
        std::vector<uint16_t> want_scales;
        for (int start = 0; start < r; start += group) {
          const uint16_t s16 = RandomHalf(rng, -12, 8, false);
          want_scales.push_back(s16);
          for (int i = start; i < std::min(r, start + group); ++i) {
            const int k = i == start ? (rng() & 1 ? qmax : -qmax) : static_cast<int>(rng() % (2 * qmax + 1)) - qmax;
            x[i] = static_cast<float>(k) * Fp16ToFp32(s16);
          }
        }
        const Latent l = QuantizeLatent(x, bits, group);
        const std::string what =
            "bits=" + std::to_string(bits) + " r=" + std::to_string(r) + " group=" + std::to_string(group);
        EXPECT_EQ(l.scales, want_scales) << what;
        EXPECT_EQ(DequantizeLatent(l, r, bits, group), x) << what;
      }
}

TEST(QuantSymLatent, ZeroGroupsHaveZeroScaleAndCodes) {
  // r = 33, group 8: groups 0..4, the last of one element. Groups 1 and 4 are zero, group 2 is so
  // small (1e-9) that amax / Q underflows fp16 to 0: all three store scale 0 and codes 0.
  for (int bits : {4, 8}) {
    std::mt19937 rng(33);
    std::vector<float> x = Normal(33, rng);
    for (int i = 8; i < 16; ++i) x[i] = 0.0f;
    for (int i = 16; i < 24; ++i) x[i] = (i % 2 ? 1e-9f : -1e-9f);
    x[32] = 0.0f;
    const Latent l = QuantizeLatent(x, bits, 8);
    const std::vector<float> back = DequantizeLatent(l, 33, bits, 8);
    for (int g : {1, 2, 4}) EXPECT_EQ(l.scales[g], 0) << "group " << g << " bits=" << bits;
    for (int i : {8, 15, 16, 23, 32}) EXPECT_EQ(back[i], 0.0f) << "element " << i << " bits=" << bits;
    CheckSymLatent(x, bits, 8, l, "zero groups bits=" + std::to_string(bits));
  }
}

TEST(QuantSymLatent, FastDequantizeMatchesScalarReference) {
  // Codes at byte offsets 0 and 1 (int4 groups then start mid-byte); bit-identical (one product each).
  for (int bits : {4, 8})
    for (int r : kRanks)
      for (int group : GroupsFor(r))
        for (int off : {0, 1}) {
          std::mt19937 rng(10000 * bits + 100 * r + 10 * group + off);
          const Latent l = QuantizeLatent(Normal(r, rng), bits, group);
          std::vector<uint8_t> codes(off, 0x5A);
          codes.insert(codes.end(), l.codes.begin(), l.codes.end());
          const uint8_t* c = codes.data() + off;
          std::vector<float> fast(r + 1, -3.0f), ref(r + 1, -3.0f);
          DequantizeSymLatent(c, l.scales.data(), r, bits, group, fast.data());
          scalar::DequantizeSymLatent(c, l.scales.data(), r, bits, group, ref.data());
          EXPECT_EQ(fast, ref) << "bits=" << bits << " r=" << r << " group=" << group << " offset=" << off;
          EXPECT_EQ(fast[r], -3.0f) << "wrote past the latent";
        }
}

}  // namespace
}  // namespace dk
