// Quantized activations and integer dot products (ops/qdot.h): the two activation quantizers
// against their definitions, the scalar reference against a double-precision product of the
// decoded weights and activations, every SIMD kernel this CPU has against the reference (1 to 4
// activation rows, 1 to 5 blocks, misaligned rows, extreme codes), and MatMulWT's 8-bit path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/fp16.h"
#include "core/threads.h"
#include "ops/qdot.h"
#include "ops/qmatmul.h"
#include "test_util.h"

namespace dk {
namespace {

constexpr WeightType kQTypes[] = {WeightType::kQ8_0, WeightType::kQ4_0, WeightType::kQ4_K, WeightType::kQ5_K,
                                  WeightType::kQ6_K};

void PutF16(uint8_t* p, float v) {
  const uint16_t h = Fp32ToFp16(v);
  std::memcpy(p, &h, 2);
}

// Random stored rows: random code bytes (every code value occurs), finite scales of realistic size.
// With `extreme`, every code byte is 0x80 or 0xFF/0x7F-like extremes instead (q8_0: -128 and 127;
// the nibble types: all bits set), the largest products the kernels can meet.
std::vector<uint8_t> RandomQRows(WeightType type, int64_t rows, int64_t cols, std::mt19937& rng, bool extreme) {
  const size_t bb = WeightBlockBytes(type);
  const size_t nblocks = static_cast<size_t>(rows * cols / WeightBlockSize(type));
  std::vector<uint8_t> b(nblocks * bb);
  std::uniform_int_distribution<int> byte(0, 255), coin(0, 1);
  std::uniform_real_distribution<float> ud(0.001f, 0.05f);
  for (auto& v : b) v = static_cast<uint8_t>(extreme ? (coin(rng) != 0 ? 0x80 : 0xFF) : byte(rng));
  if (extreme && type == WeightType::kQ8_0) {
    for (auto& v : b) v = coin(rng) != 0 ? 0x80 : 0x7F;
  }
  for (size_t k = 0; k < nblocks; ++k) {
    uint8_t* p = b.data() + k * bb;
    switch (type) {
      case WeightType::kQ8_0: case WeightType::kQ4_0: PutF16(p, ud(rng)); break;
      case WeightType::kQ4_K: case WeightType::kQ5_K: PutF16(p, ud(rng)); PutF16(p + 2, ud(rng)); break;
      case WeightType::kQ6_K:
        PutF16(p + 208, ud(rng) / 8);
        if (extreme) std::memset(p + 192, 0x80, 16);  // scales -128
        break;
      default: break;
    }
  }
  return b;
}

std::vector<float> RandomActs(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = nd(rng);
  if (n > 3) x[3] = 0.0f;
  return x;
}

TEST(ActQuant, Q8_0IsGgmlsBlockQ8_0) {
  std::mt19937 rng(1);
  std::vector<float> x = RandomActs(96, rng);
  std::fill(x.begin() + 64, x.end(), 0.0f);  // an all-zero block
  x[5] = -7.5f;                               // the first block's largest magnitude
  std::vector<int8_t> q(96);
  std::vector<float> d(3);
  std::vector<int16_t> sums(3);
  QuantizeActRow(ActFormat::kQ8_0, x.data(), 96, q.data(), d.data(), sums.data());
  EXPECT_EQ(d[0], Fp16ToFp32(Fp32ToFp16(7.5f / 127.0f)));
  EXPECT_EQ(q[5], -127);
  EXPECT_EQ(d[2], 0.0f);
  for (int b = 0; b < 3; ++b) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int i = 32 * b + j;
      sum += q[i];
      ASSERT_LE(std::abs(q[i]), 127);
      // q = round(x * 127 / amax), so x - q * amax / 127 is at most half a step; d is amax / 127
      // rounded to fp16 (relative 2^-11), which the step bound allows for.
      if (d[b] != 0.0f) {
        EXPECT_LE(std::fabs(x[i] - q[i] * d[b]), 0.5f * d[b] * 1.01f + 127 * d[b] * 1e-3f) << i;
      }
    }
    EXPECT_EQ(sums[b], sum);
  }
  for (int j = 64; j < 96; ++j) EXPECT_EQ(q[j], 0);
}

TEST(ActQuant, Q8_KIsGgmlsBlockQ8_K) {
  std::mt19937 rng(2);
  std::vector<float> x = RandomActs(512, rng);
  std::fill(x.begin() + 256, x.end(), 0.0f);
  x[10] = 9.0f;  // largest magnitude, positive: maps to -127 with a negative scale
  std::vector<int8_t> q(512);
  std::vector<float> d(2);
  std::vector<int16_t> sums(32);
  QuantizeActRow(ActFormat::kQ8_K, x.data(), 512, q.data(), d.data(), sums.data());
  EXPECT_EQ(q[10], -127);
  EXPECT_FLOAT_EQ(d[0], 1.0f / (-127.0f / 9.0f));
  EXPECT_EQ(d[1], 0.0f);
  for (int g = 0; g < 32; ++g) {
    int sum = 0;
    for (int j = 0; j < 16; ++j) sum += q[16 * g + j];
    EXPECT_EQ(sums[g], sum) << "group " << g;
  }
  for (int i = 0; i < 256; ++i) {
    ASSERT_LE(std::abs(q[i]), 127);
    EXPECT_LE(std::fabs(x[i] - q[i] * d[0]), 0.5f * std::fabs(d[0]) * 1.0001f) << i;
  }
  // Ties round to even, as ggml's nearest_int: 1.5 and 2.5 steps become 2.
  std::vector<float> t(256, 0.0f);
  t[0] = -127.0f;  // scale 1: q = x
  t[1] = 1.5f;
  t[2] = 2.5f;
  QuantizeActRow(ActFormat::kQ8_K, t.data(), 256, q.data(), d.data(), sums.data());
  EXPECT_EQ(d[0], 1.0f);
  EXPECT_EQ(q[1], 2);
  EXPECT_EQ(q[2], 2);
}

// A non-finite activation (the forward pass reports it per layer) must not reach an undefined
// float-to-int conversion: the codes stay within [-127, 127] (UBSan runs this in the ASan build).
TEST(ActQuant, NonFiniteValuesStayInRange) {
  for (ActFormat f : {ActFormat::kQ8_0, ActFormat::kQ8_K}) {
    std::vector<float> x(256, 0.5f);
    x[1] = std::numeric_limits<float>::infinity();
    x[2] = std::numeric_limits<float>::quiet_NaN();
    x[40] = -std::numeric_limits<float>::infinity();
    std::vector<int8_t> q(256);
    std::vector<float> d(8);
    std::vector<int16_t> sums(16);
    QuantizeActRow(f, x.data(), 256, q.data(), d.data(), sums.data());
    for (int8_t v : q) EXPECT_LE(std::abs(static_cast<int>(v)), 127);
  }
}

// The reference against sum_i w_i * (d_a q_a,i) in double, w_i the decoded weights (DequantizeWeights,
// checked against hand-packed blocks in test_qweights.cpp).
TEST(QDot, ReferenceIsTheProductOfTheDecodedValues) {
  std::mt19937 rng(3);
  for (WeightType type : kQTypes) {
    const int64_t n = 3 * WeightBlockSize(type) * (WeightBlockSize(type) == 32 ? 3 : 1);
    SCOPED_TRACE(WeightTypeName(type));
    const auto w = RandomQRows(type, 1, n, rng, false);
    const auto x = RandomActs(n, rng);
    QuantizedActs qa;
    qa.Quantize(ActFormatFor(type), x.data(), 1, n);
    const ActRow a = qa.row(0);
    std::vector<float> wf(static_cast<size_t>(n));
    DequantizeWeights(type, w.data(), wf.data(), n);
    const int64_t ab = ActBlockSize(ActFormatFor(type));
    double exact = 0, mag = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double p = static_cast<double>(wf[i]) * (static_cast<double>(a.d[i / ab]) * a.q[i]);
      exact += p;
      mag += std::fabs(p);
    }
    float ref = 0;
    DotQ8Rows(QdotIsa::kScalar, type, w.data(), &a, 1, n, &ref);
    // The reference rounds each block's scale product and adds block sums in float: a few ulp of
    // sum |terms| per block. (ggml's decoded weight d*sc*q - dmin*m rounds differently again.)
    EXPECT_NEAR(ref, exact, 1e-5 * mag);
    // And the quantized product is close to the fp32 one: activations within half a step each.
    double f32 = 0;
    for (int64_t i = 0; i < n; ++i) f32 += static_cast<double>(wf[i]) * x[i];
    double bound = 0;
    for (int64_t i = 0; i < n; ++i) bound += std::fabs(wf[i]) * 0.5 * std::fabs(a.d[i / ab]) * 1.01;
    EXPECT_NEAR(ref, f32, bound + 1e-5 * mag);
  }
}

TEST(QDot, EveryKernelMatchesTheReference) {
  std::mt19937 rng(4);
  int kernels = 0;
  for (QdotIsa isa : {QdotIsa::kAvx2, QdotIsa::kAvx512Vnni}) {
    if (!CpuHasQdotIsa(isa)) continue;
    ++kernels;
    for (WeightType type : kQTypes) {
      const int64_t bs = WeightBlockSize(type);
      for (int64_t blocks : {1, 2, 3, 5}) {
        const int64_t n = blocks * bs;
        for (bool extreme : {false, true}) {
          for (int offset : {0, 1}) {
            SCOPED_TRACE(std::string(QdotIsaName(isa)) + " " + WeightTypeName(type) + " n=" + std::to_string(n) +
                         (extreme ? " extreme codes" : "") + (offset != 0 ? " at an odd address" : ""));
            const auto row = RandomQRows(type, 1, n, rng, extreme);
            std::vector<uint8_t> buf(row.size() + 1);
            std::memcpy(buf.data() + offset, row.data(), row.size());
            std::vector<float> x(static_cast<size_t>(4 * n));
            for (int r = 0; r < 4; ++r) {
              auto xr = RandomActs(n, rng);
              if (extreme) {  // activations at +-127 steps too
                for (auto& v : xr) v = v < 0 ? -1.0f : 1.0f;
              }
              std::copy(xr.begin(), xr.end(), x.begin() + r * n);
            }
            QuantizedActs qa;
            qa.Quantize(ActFormatFor(type), x.data(), 4, n);
            ActRow a[4];
            for (int r = 0; r < 4; ++r) a[r] = qa.row(r);
            float ref[4];
            DotQ8Rows(QdotIsa::kScalar, type, buf.data() + offset, a, 4, n, ref);
            for (int nr = 1; nr <= 4; ++nr) {
              float got[4] = {0, 0, 0, 0};
              DotQ8Rows(isa, type, buf.data() + offset, a, nr, n, got);
              for (int r = 0; r < nr; ++r) {
                // Integer sums are exact in both; only the float adds of block results differ.
                EXPECT_NEAR(got[r], ref[r], 2e-6 * std::fabs(ref[r]) + 1e-4 * std::sqrt(static_cast<double>(n)))
                    << nr << " rows, row " << r;
              }
            }
          }
        }
      }
    }
  }
  if (kernels == 0) GTEST_SKIP() << "this CPU has no AVX2: only the scalar reference runs";
}

TEST(QDot, MatMulQ8MatchesTheReferenceAcrossThreadsAndBatches) {
  std::mt19937 rng(5);
  const test::KernelModeGuard modes;
  SetActMode(ActMode::kQ8);
  SetDotMaxRows(100);  // the 8-bit dot products at every batch size here
  for (WeightType type : kQTypes) {
    const int64_t rows = 37, cols = 2 * WeightBlockSize(type) * (WeightBlockSize(type) == 32 ? 3 : 1);
    const auto data = RandomQRows(type, rows, cols, rng, false);
    const WeightMatrix m = MakeWeightMatrix(type, data.data(), rows, cols);
    for (int n : {1, 3, 4, 9}) {
      std::vector<float> x(static_cast<size_t>(n * cols));
      for (float& v : x) v = std::normal_distribution<float>(0, 1)(rng);
      QuantizedActs qa;
      qa.Quantize(ActFormatFor(type), x.data(), n, cols);
      std::vector<float> ref(static_cast<size_t>(n * rows));
      for (int i = 0; i < n; ++i) {
        const ActRow a = qa.row(i);
        for (int64_t r = 0; r < rows; ++r) DotQ8Rows(QdotIsa::kScalar, type, m.row(r), &a, 1, cols, &ref[i * rows + r]);
      }
      std::vector<float> first;
      for (int threads : {1, 2, 3}) {
        ThreadPool pool(threads);
        for (bool acc : {false, true}) {
          SCOPED_TRACE(std::string(WeightTypeName(type)) + " n=" + std::to_string(n) + " threads " +
                       std::to_string(threads) + (acc ? " +=" : ""));
          std::vector<float> y(static_cast<size_t>(n * rows), acc ? 1.5f : -99.0f);
          MatMulWT(x.data(), m, y.data(), n, acc, &pool);
          for (size_t k = 0; k < y.size(); ++k)
            ASSERT_NEAR(y[k], ref[k] + (acc ? 1.5f : 0.0f), 2e-6 * std::fabs(ref[k]) + 1e-4) << "output " << k;
          if (!acc) {
            // The same bits whatever the thread count: each output is one kernel call.
            if (first.empty()) first = y;
            EXPECT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(float)));
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace dk
