#include "ops/qmatmul.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/env.h"
#include "core/fp16.h"
#include "core/threads.h"
#include "ops/qdot.h"
#include "ops/hsum.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DK_X86 1
#define DK_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

namespace dk {
namespace {

constexpr int64_t kQK = 256;

void DequantizeQ8_0(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
    const float d = LoadF16(src);
    const auto* q = reinterpret_cast<const int8_t*>(src + 2);
    for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(q[j]) * d;
  }
}

void DequantizeQ4_0(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
    const float d = LoadF16(src);
    const uint8_t* q = src + 2;
    for (int j = 0; j < 16; ++j) {
      dst[j] = static_cast<float>((q[j] & 0x0F) - 8) * d;
      dst[j + 16] = static_cast<float>((q[j] >> 4) - 8) * d;
    }
  }
}

}  // namespace

const char* WeightTypeName(WeightType t) {
  switch (t) {
    case WeightType::kF32: return "f32";
    case WeightType::kF16: return "f16";
    case WeightType::kBF16: return "bf16";
    case WeightType::kQ8_0: return "q8_0";
    case WeightType::kQ4_0: return "q4_0";
    case WeightType::kQ4_K: return "q4_K";
    case WeightType::kQ5_K: return "q5_K";
    case WeightType::kQ6_K: return "q6_K";
  }
  return "?";
}

int64_t WeightBlockSize(WeightType t) {
  switch (t) {
    case WeightType::kF32: case WeightType::kF16: case WeightType::kBF16: return 1;
    case WeightType::kQ8_0: case WeightType::kQ4_0: return 32;
    default: return kQK;
  }
}

size_t WeightBlockBytes(WeightType t) {
  switch (t) {
    case WeightType::kF32: return 4;
    case WeightType::kF16: case WeightType::kBF16: return 2;
    case WeightType::kQ8_0: return 34;
    case WeightType::kQ4_0: return 18;
    case WeightType::kQ4_K: return 144;
    case WeightType::kQ5_K: return 176;
    case WeightType::kQ6_K: return 210;
  }
  return 0;
}

WeightMatrix MakeWeightMatrix(WeightType type, const void* data, int64_t rows, int64_t cols) {
  WeightMatrix m;
  m.type = type;
  m.data = static_cast<const uint8_t*>(data);
  m.rows = rows;
  m.cols = cols;
  m.row_bytes = static_cast<size_t>(cols / WeightBlockSize(type)) * WeightBlockBytes(type);
  return m;
}

// Mirrors ggml's dequantize_row_q4_K, including its float evaluation order.
void DequantizeRowQ4_K(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, src += 144) {
    const float d = LoadF16(src);
    const float dmin = LoadF16(src + 2);
    const uint8_t* scales = src + 4;
    const uint8_t* q = src + 16;
    int is = 0;
    for (int j = 0; j < kQK; j += 64, q += 32, is += 2) {
      uint8_t sc, m;
      GetScaleMinK4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      GetScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *dst++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *dst++ = d2 * (q[l] >> 4) - m2;
    }
  }
}

// Mirrors ggml's dequantize_row_q5_K.
void DequantizeRowQ5_K(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, src += 176) {
    const float d = LoadF16(src);
    const float dmin = LoadF16(src + 2);
    const uint8_t* scales = src + 4;
    const uint8_t* qh = src + 16;
    const uint8_t* ql = src + 48;
    int is = 0;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < kQK; j += 64, ql += 32, is += 2) {
      uint8_t sc, m;
      GetScaleMinK4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      GetScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *dst++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *dst++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
}

// Mirrors ggml's dequantize_row_q6_K.
void DequantizeRowQ6_K(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, src += 210) {
    const float d = LoadF16(src + 208);
    const uint8_t* ql = src;
    const uint8_t* qh = src + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(src + 192);
    for (int half = 0; half < 2; ++half, dst += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        dst[l + 0] = d * sc[is + 0] * q1;
        dst[l + 32] = d * sc[is + 2] * q2;
        dst[l + 64] = d * sc[is + 4] * q3;
        dst[l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

void DequantizeWeights(WeightType type, const uint8_t* src, float* dst, int64_t n) {
  switch (type) {
    case WeightType::kF32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case WeightType::kF16:
      if (reinterpret_cast<uintptr_t>(src) % alignof(uint16_t) == 0) {
        Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(src), dst, n);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = LoadF16(src + 2 * i);
      }
      return;
    case WeightType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFp32(LoadU16(src + 2 * i));
      return;
    case WeightType::kQ8_0: DequantizeQ8_0(src, dst, n); return;
    case WeightType::kQ4_0: DequantizeQ4_0(src, dst, n); return;
    case WeightType::kQ4_K: DequantizeRowQ4_K(src, dst, n); return;
    case WeightType::kQ5_K: DequantizeRowQ5_K(src, dst, n); return;
    case WeightType::kQ6_K: DequantizeRowQ6_K(src, dst, n); return;
  }
}

namespace scalar {

float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n) {
  const int64_t bs = std::max<int64_t>(WeightBlockSize(type), 64);  // plain types: 64 values at a time
  const size_t step = static_cast<size_t>(bs / WeightBlockSize(type)) * WeightBlockBytes(type);
  float buf[kQK];
  float s = 0.0f;
  for (int64_t i = 0; i < n; i += bs, w += step) {
    const int64_t m = std::min(bs, n - i);
    DequantizeWeights(type, w, buf, m);
    for (int64_t j = 0; j < m; ++j) s += buf[j] * x[i + j];
  }
  return s;
}

}  // namespace scalar

#if DK_X86
namespace avx2 {
namespace {

// 8 bytes at p, zero-extended to 8 int32 lanes.
DK_AVX2_FN inline __m256i Bytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

DK_AVX2_FN float DotF32(const uint8_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(w) + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(w) + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  float s = HorizontalSum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) {
    float v;
    std::memcpy(&v, w + 4 * i, 4);
    s += v * x[i];
  }
  return s;
}

DK_AVX2_FN float DotF16(const uint8_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i + 16)));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
  }
  float s = HorizontalSum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += LoadF16(w + 2 * i) * x[i];
  return s;
}

DK_AVX2_FN float DotBF16(const uint8_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), _mm256_loadu_ps(x + i), a0);
  }
  float s = HorizontalSum(a0);
  for (; i < n; ++i) s += Bf16ToFp32(LoadU16(w + 2 * i)) * x[i];
  return s;
}

DK_AVX2_FN float DotQ8_0(const uint8_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / 32; ++b, w += 34, x += 32) {
    const uint8_t* q = w + 2;
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < 32; k += 8) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)));
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + k), s);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(LoadF16(w)), s, acc);
  }
  return HorizontalSum(acc);
}

DK_AVX2_FN float DotQ4_0(const uint8_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  for (int64_t b = 0; b < n / 32; ++b, w += 18, x += 32) {
    const uint8_t* q = w + 2;
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < 16; k += 8) {
      const __m256i v = Bytes8(q + k);
      const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(v, mask), eight);
      const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_loadu_ps(x + k), s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_loadu_ps(x + 16 + k), s);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(LoadF16(w)), s, acc);
  }
  return HorizontalSum(acc);
}

// q4_K and q5_K: value = d_j * q - m_j per sub-block of 32, so sum x w = d_j sum(q x) - m_j sum(x).
DK_AVX2_FN float DotQ4_K(const uint8_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t b = 0; b < n / kQK; ++b, w += 144) {
    const float d = LoadF16(w), dmin = LoadF16(w + 2);
    const uint8_t* scales = w + 4;
    const uint8_t* q = w + 16;
    for (int j = 0; j < 4; ++j, q += 32, x += 64) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * j, scales, &sc1, &m1);
      GetScaleMinK4(2 * j + 1, scales, &sc2, &m2);
      __m256 qx1 = _mm256_setzero_ps(), qx2 = _mm256_setzero_ps(), sx1 = _mm256_setzero_ps(),
             sx2 = _mm256_setzero_ps();
      for (int l = 0; l < 32; l += 8) {
        const __m256i v = Bytes8(q + l);
        const __m256 x1 = _mm256_loadu_ps(x + l), x2 = _mm256_loadu_ps(x + 32 + l);
        qx1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), x1, qx1);
        qx2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x2, qx2);
        sx1 = _mm256_add_ps(sx1, x1);
        sx2 = _mm256_add_ps(sx2, x2);
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1), qx1, acc);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc2), qx2, acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m1), sx1, acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m2), sx2, acc);
    }
  }
  return HorizontalSum(acc);
}

DK_AVX2_FN float DotQ5_K(const uint8_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF), one = _mm256_set1_epi32(1);
  for (int64_t b = 0; b < n / kQK; ++b, w += 176) {
    const float d = LoadF16(w), dmin = LoadF16(w + 2);
    const uint8_t* scales = w + 4;
    const uint8_t* qh = w + 16;
    const uint8_t* ql = w + 48;
    for (int j = 0; j < 4; ++j, ql += 32, x += 64) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * j, scales, &sc1, &m1);
      GetScaleMinK4(2 * j + 1, scales, &sc2, &m2);
      const __m128i sh1 = _mm_cvtsi32_si128(2 * j), sh2 = _mm_cvtsi32_si128(2 * j + 1);
      __m256 qx1 = _mm256_setzero_ps(), qx2 = _mm256_setzero_ps(), sx1 = _mm256_setzero_ps(),
             sx2 = _mm256_setzero_ps();
      for (int l = 0; l < 32; l += 8) {
        const __m256i v = Bytes8(ql + l), h = Bytes8(qh + l);
        const __m256i h1 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(h, sh1), one), 4);
        const __m256i h2 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(h, sh2), one), 4);
        const __m256i q1 = _mm256_or_si256(_mm256_and_si256(v, mask), h1);
        const __m256i q2 = _mm256_or_si256(_mm256_srli_epi32(v, 4), h2);
        const __m256 x1 = _mm256_loadu_ps(x + l), x2 = _mm256_loadu_ps(x + 32 + l);
        qx1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), x1, qx1);
        qx2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q2), x2, qx2);
        sx1 = _mm256_add_ps(sx1, x1);
        sx2 = _mm256_add_ps(sx2, x2);
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1), qx1, acc);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc2), qx2, acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m1), sx1, acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m2), sx2, acc);
    }
  }
  return HorizontalSum(acc);
}

DK_AVX2_FN float DotQ6_K(const uint8_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF), three = _mm256_set1_epi32(3), k32 = _mm256_set1_epi32(32);
  for (int64_t b = 0; b < n / kQK; ++b, w += 210) {
    const float d = LoadF16(w + 208);
    const uint8_t* ql = w;
    const uint8_t* qh = w + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(w + 192);
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, x += 128) {
      for (int is = 0; is < 2; ++is) {  // l in [16 is, 16 is + 16): scales sc[is + 0, 2, 4, 6]
        __m256 s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps(),
               s4 = _mm256_setzero_ps();
        for (int l = 16 * is; l < 16 * is + 16; l += 8) {
          const __m256i a = Bytes8(ql + l), c = Bytes8(ql + l + 32), h = Bytes8(qh + l);
          const __m256i q1 = _mm256_sub_epi32(
              _mm256_or_si256(_mm256_and_si256(a, mask), _mm256_slli_epi32(_mm256_and_si256(h, three), 4)), k32);
          const __m256i q2 = _mm256_sub_epi32(
              _mm256_or_si256(_mm256_and_si256(c, mask),
                              _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2), three), 4)),
              k32);
          const __m256i q3 = _mm256_sub_epi32(
              _mm256_or_si256(_mm256_srli_epi32(a, 4),
                              _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 4), three), 4)),
              k32);
          const __m256i q4 = _mm256_sub_epi32(
              _mm256_or_si256(_mm256_srli_epi32(c, 4),
                              _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 6), three), 4)),
              k32);
          s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(x + l), s1);
          s2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q2), _mm256_loadu_ps(x + l + 32), s2);
          s3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q3), _mm256_loadu_ps(x + l + 64), s3);
          s4 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4), _mm256_loadu_ps(x + l + 96), s4);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[is + 0]), s1, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[is + 2]), s2, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[is + 4]), s3, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[is + 6]), s4, acc);
      }
    }
  }
  return HorizontalSum(acc);
}

}  // namespace

float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n) {
  switch (type) {
    case WeightType::kF32: return DotF32(w, x, n);
    case WeightType::kF16: return DotF16(w, x, n);
    case WeightType::kBF16: return DotBF16(w, x, n);
    case WeightType::kQ8_0: return DotQ8_0(w, x, n);
    case WeightType::kQ4_0: return DotQ4_0(w, x, n);
    case WeightType::kQ4_K: return DotQ4_K(w, x, n);
    case WeightType::kQ5_K: return DotQ5_K(w, x, n);
    case WeightType::kQ6_K: return DotQ6_K(w, x, n);
  }
  return 0.0f;
}

}  // namespace avx2

// The same CPU features as the 8-bit kernels' AVX2 version (ops/qdot.cpp checks them once).
bool DotWeightsUsesAvx2() { return CpuHasQdotIsa(QdotIsa::kAvx2); }

float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n) {
  return DotWeightsUsesAvx2() ? avx2::DotWeights(type, w, x, n) : scalar::DotWeights(type, w, x, n);
}

#else  // not x86: the scalar reference only

namespace avx2 {
float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n) {
  return scalar::DotWeights(type, w, x, n);
}
}  // namespace avx2
bool DotWeightsUsesAvx2() { return false; }
float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n) {
  return scalar::DotWeights(type, w, x, n);
}

#endif

namespace {

std::atomic<int> g_dot_max_rows{static_cast<int>(EnvInt("DYNAKV_DOT_MAX_ROWS").value_or(-1))};
std::atomic<ActMode> g_act_mode{EnvChoice("DYNAKV_ACTS").value_or("q8") == "f32" ? ActMode::kF32 : ActMode::kQ8};

// Below this many stored values a matrix-vector product is not worth waking the pool for.
constexpr int64_t kParallelMinValues = 1 << 16;

void MatMulDot(const float* x, const WeightMatrix& w, float* y, int n, bool accumulate, ThreadPool* pool) {
  const WeightType type = w.type;
  const bool simd = DotWeightsUsesAvx2();
  auto body = [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w.row(r);
      for (int i = 0; i < n; ++i) {
        const float* xi = x + static_cast<int64_t>(i) * w.cols;
        const float v = simd ? avx2::DotWeights(type, row, xi, w.cols) : scalar::DotWeights(type, row, xi, w.cols);
        float& out = y[static_cast<int64_t>(i) * w.rows + r];
        out = accumulate ? out + v : v;
      }
    }
  };
  if (pool != nullptr && pool->size() > 1 && w.rows * w.cols * n >= kParallelMinValues) {
    // Rows are independent: chunks claimed from the pool's counter, so a descheduled worker holds
    // back one small chunk, not half the rows.
    pool->ParallelForChunked(w.rows, [&](int64_t r0, int64_t r1) { body(r0, r1, 0); }, 16);
  } else {
    body(0, w.rows, 0);
  }
}

// Quantized weights times 8-bit quantized activations (ops/qdot.h). The activations are quantized
// once per call; each weight row is then multiplied with up to 4 activation rows at a time (its
// blocks unpacked once for all of them), rows split over the pool in chunks of 16.
void MatMulQ8(const float* x, const WeightMatrix& w, float* y, int n, bool accumulate, ThreadPool* pool) {
  // The calling thread's buffers, named by reference: a lambda run by a pool worker that named the
  // thread_local itself would get the worker's own (empty) one.
  thread_local QuantizedActs tl_acts;
  QuantizedActs& qa = tl_acts;
  qa.Prepare(ActFormatFor(w.type), n, w.cols);
  const bool parallel = pool != nullptr && pool->size() > 1 && w.rows * w.cols * n >= kParallelMinValues;
  if (parallel && n >= 8) {
    pool->ParallelForChunked(n, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) qa.QuantizeRow(i, x + i * w.cols);
    }, 4);
  } else {
    for (int i = 0; i < n; ++i) qa.QuantizeRow(i, x + static_cast<int64_t>(i) * w.cols);
  }
  const QdotIsa isa = ActiveQdotIsa();
  auto body = [&](int64_t r0, int64_t r1) {
    for (int i0 = 0; i0 < n; i0 += 4) {
      const int nr = std::min(4, n - i0);
      ActRow a[4];
      for (int j = 0; j < nr; ++j) a[j] = qa.row(i0 + j);
      for (int64_t r = r0; r < r1; ++r) {
        float o[4];
        DotQ8Rows(isa, w.type, w.row(r), a, nr, w.cols, o);
        for (int j = 0; j < nr; ++j) {
          float& out = y[static_cast<int64_t>(i0 + j) * w.rows + r];
          out = accumulate ? out + o[j] : o[j];
        }
      }
    }
  };
  if (parallel) {
    pool->ParallelForChunked(w.rows, body, 16);
  } else {
    body(0, w.rows);
  }
}

void MatMulTiles(const float* x, const WeightMatrix& w, float* y, int n, bool accumulate, ThreadPool* pool) {
  // Tiles of up to 64 rows (fewer for very wide rows: at most 256K values, 1 MiB of fp32), at least
  // 16. Each tile is one task: its rows dequantized into the running thread's scratch, then one
  // sgemm (OpenBLAS at one thread) on them, so a prefill's products use every thread of the pool
  // and no more. The tile size depends on the shape only: the same bits at any thread count.
  const int64_t tile = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(1, w.cols), 16, 64);
  const int64_t tiles = (w.rows + tile - 1) / tile;
  auto run = [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scratch;  // this thread's own
    const size_t need = static_cast<size_t>(std::min(tile, w.rows) * w.cols);
    if (scratch.size() < need) scratch.resize(need);
    float* buf = scratch.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, rows = std::min(tile, w.rows - r0);
      for (int64_t r = 0; r < rows; ++r) DequantizeWeights(w.type, w.row(r0 + r), buf + r * w.cols, w.cols);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, static_cast<int>(rows), static_cast<int>(w.cols), 1.0f,
                  x, static_cast<int>(w.cols), buf, static_cast<int>(w.cols), accumulate ? 1.0f : 0.0f, y + r0,
                  static_cast<int>(w.rows));
    }
  };
  if (pool != nullptr && pool->size() > 1 && tiles > 1) {
    pool->ParallelForChunked(tiles, run, 1);
  } else {
    run(0, tiles);
  }
}

}  // namespace

// Rows per block of the F32 products split over the pool (see MatMulWT).
constexpr int kF32GemvRows = 64;
constexpr int kF32GemmRows = 64;

ActMode GetActMode() { return g_act_mode.load(std::memory_order_relaxed); }
void SetActMode(ActMode m) { g_act_mode.store(m, std::memory_order_relaxed); }

int DotMaxRows() { return g_dot_max_rows.load(std::memory_order_relaxed); }
int DotMaxRowsFor(WeightType type) {
  const int set = DotMaxRows();
  if (set >= 0) return set;
  if (type == WeightType::kF32) return 1;
  return UsesQuantizedActs(type) && GetActMode() == ActMode::kQ8 ? 8 : 4;
}
void SetDotMaxRows(int n) { g_dot_max_rows.store(n, std::memory_order_relaxed); }

void MatMulWT(const float* x, const WeightMatrix& w, float* y, int n, bool accumulate, ThreadPool* pool) {
  if (n <= 0 || w.rows <= 0) return;
  const int in = static_cast<int>(w.cols), out = static_cast<int>(w.rows);
  const int dot_max = DotMaxRowsFor(w.type);
  if (UsesQuantizedActs(w.type) && GetActMode() == ActMode::kQ8 && n <= dot_max) {
    MatMulQ8(x, w, y, n, accumulate, pool);
    return;
  }
  if (w.type == WeightType::kF32 && n > dot_max && reinterpret_cast<uintptr_t>(w.data) % alignof(float) == 0) {
    const auto* f = reinterpret_cast<const float*>(w.data);
    const float beta = accumulate ? 1.0f : 0.0f;
    // OpenBLAS runs at one thread beside the pool (core/threads.h), so the pool splits the output
    // rows: blocks of a fixed size whatever the thread count, each one sgemv/sgemm call on its
    // rows, so every output is computed by the same call shape at -t 1 and -t N (same bits).
    const int block = n == 1 ? kF32GemvRows : kF32GemmRows;
    const int64_t blocks = (out + block - 1) / block;
    auto run = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int r0 = static_cast<int>(b * block), rows = std::min(block, out - r0);
        if (n == 1) {
          cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, in, 1.0f, f + static_cast<int64_t>(r0) * in, in, x, 1, beta,
                      y + r0, 1);
        } else {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, in, 1.0f, x, in,
                      f + static_cast<int64_t>(r0) * in, in, beta, y + r0, out);
        }
      }
    };
    if (pool != nullptr && pool->size() > 1 && blocks > 1 && static_cast<int64_t>(out) * in * n >= kParallelMinValues) {
      pool->ParallelForChunked(blocks, run, 1);
    } else {
      run(0, blocks);
    }
    return;
  }
  if (n <= dot_max) {
    MatMulDot(x, w, y, n, accumulate, pool);
  } else {
    MatMulTiles(x, w, y, n, accumulate, pool);
  }
}

}  // namespace dk
