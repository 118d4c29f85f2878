#include "ops/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/fp16.h"
#include "ops/hsum.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DK_HAVE_AVX2 1
#endif

namespace dk {

namespace {

// Code i of a little-endian packed array of b-bit codes (b in {2, 4, 8}, so no code straddles
// a byte).
inline int AsymCode(const uint8_t* codes, int i, int bits) {
  const int bit = i * bits;
  return (codes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// Signed latent code i: int8 bytes, or int4 nibbles stored offset by 8.
inline int SymCode(const uint8_t* codes, int i, int bits) {
  if (bits == 8) return static_cast<int8_t>(codes[i]);
  return ((codes[i >> 1] >> ((i & 1) * 4)) & 0x0F) - 8;
}

inline int Q4Code(const BlockQ4_0& b, int j) {
  return j < kQuantBlock / 2 ? (b.qs[j] & 0x0F) - 8 : (b.qs[j - kQuantBlock / 2] >> 4) - 8;
}

}  // namespace

// ---- q8_0 / q4_0 quantizers (single implementation: these run once per row written) -----------

void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n) {
  for (int64_t b = 0; b < n / kQuantBlock; ++b, x += kQuantBlock) {
    float amax = 0.0f;
    for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;  // ggml scales by the fp32 inverse, not the fp16 d
    y[b].d = Fp32ToFp16(d);
    for (int j = 0; j < kQuantBlock; ++j) y[b].qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
  }
}

void QuantizeRowQ4_0(const float* x, BlockQ4_0* y, int64_t n) {
  constexpr int kHalf = kQuantBlock / 2;
  for (int64_t b = 0; b < n / kQuantBlock; ++b, x += kQuantBlock) {
    float amax = 0.0f, max = 0.0f;  // the first value of largest magnitude, with its sign
    for (int j = 0; j < kQuantBlock; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = Fp32ToFp16(d);
    for (int j = 0; j < kHalf; ++j) {
      // x * id + 8.5 lies in [0.5, 16.5]: the cast truncates (rounds half up), 16 clamps to 15.
      const auto lo = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x[j] * id + 8.5f)));
      const auto hi = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x[j + kHalf] * id + 8.5f)));
      y[b].qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

void DequantizeRowQ8_0(const BlockQ8_0* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQuantBlock; ++b, y += kQuantBlock) {
    const float d = Fp16ToFp32(x[b].d);
    for (int j = 0; j < kQuantBlock; ++j) y[j] = static_cast<float>(x[b].qs[j]) * d;
  }
}

void DequantizeRowQ4_0(const BlockQ4_0* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQuantBlock; ++b, y += kQuantBlock) {
    const float d = Fp16ToFp32(x[b].d);
    for (int j = 0; j < kQuantBlock; ++j) y[j] = static_cast<float>(Q4Code(x[b], j)) * d;
  }
}

// ---- Asymmetric groups --------------------------------------------------------------------------

size_t AsymCodeBytes(int n, int bits) { return (static_cast<size_t>(n) * bits + 7) / 8; }

void QuantizeAsym(const float* x, int n, int64_t stride, int bits, uint8_t* codes, uint16_t* min_f16,
                  uint16_t* scale_f16) {
  const int levels = (1 << bits) - 1;
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  *min_f16 = Fp32ToFp16(lo);
  *scale_f16 = Fp32ToFp16((hi - lo) / static_cast<float>(levels));
  const float m = Fp16ToFp32(*min_f16), s = Fp16ToFp32(*scale_f16);
  std::memset(codes, 0, AsymCodeBytes(n, bits));
  if (s == 0.0f) return;  // every code 0: the group dequantizes to min16
  for (int i = 0; i < n; ++i) {
    const float t = std::clamp(std::round((x[i * stride] - m) / s), 0.0f, static_cast<float>(levels));
    const int bit = i * bits;
    codes[bit >> 3] = static_cast<uint8_t>(codes[bit >> 3] | (static_cast<int>(t) << (bit & 7)));
  }
}

void DequantizeAsym(const uint8_t* codes, int n, int bits, uint16_t min_f16, uint16_t scale_f16, float* out,
                    int64_t stride) {
  const float m = Fp16ToFp32(min_f16), s = Fp16ToFp32(scale_f16);
  for (int i = 0; i < n; ++i) out[i * stride] = m + s * static_cast<float>(AsymCode(codes, i, bits));
}

// ---- Symmetric latents --------------------------------------------------------------------------

int SymLatentGroups(int r, int group) { return (r + group - 1) / group; }
size_t SymLatentCodeBytes(int r, int bits) {
  return bits == 8 ? static_cast<size_t>(r) : (static_cast<size_t>(r) + 1) / 2;
}
size_t SymLatentBytes(int r, int bits, int group) {
  return SymLatentCodeBytes(r, bits) + sizeof(uint16_t) * static_cast<size_t>(SymLatentGroups(r, group));
}

void QuantizeSymLatent(const float* x, int r, int bits, int group, uint8_t* codes, uint16_t* scales) {
  const int qmax = (1 << (bits - 1)) - 1;
  std::memset(codes, 0, SymLatentCodeBytes(r, bits));
  for (int g = 0, start = 0; start < r; ++g, start += group) {
    const int end = std::min(r, start + group);
    float amax = 0.0f;
    for (int i = start; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    scales[g] = Fp32ToFp16(amax / static_cast<float>(qmax));
    const float s = Fp16ToFp32(scales[g]);
    for (int i = start; i < end; ++i) {
      // s = 0 (a zero group, or one below qmax * 2^-25): code 0, the nearest representable value.
      const float lim = static_cast<float>(qmax);
      const int c = s == 0.0f ? 0 : static_cast<int>(std::clamp(std::round(x[i] / s), -lim, lim));
      if (bits == 8) {
        codes[i] = static_cast<uint8_t>(static_cast<int8_t>(c));
      } else {
        codes[i >> 1] = static_cast<uint8_t>(codes[i >> 1] | ((c + 8) << ((i & 1) * 4)));
      }
    }
  }
}

// ---- Scalar references: the definitions, one element at a time ----------------------------------

namespace scalar {

float DotQ8_0(const float* q, const BlockQ8_0* x, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) {
    const BlockQ8_0& b = x[i / kQuantBlock];
    s += q[i] * (Fp16ToFp32(b.d) * static_cast<float>(b.qs[i % kQuantBlock]));
  }
  return s;
}

float DotQ4_0(const float* q, const BlockQ4_0* x, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) {
    const BlockQ4_0& b = x[i / kQuantBlock];
    s += q[i] * (Fp16ToFp32(b.d) * static_cast<float>(Q4Code(b, i % kQuantBlock)));
  }
  return s;
}

void AxpyQ8_0(float a, const BlockQ8_0* x, float* y, int n) {
  for (int i = 0; i < n; ++i) {
    const BlockQ8_0& b = x[i / kQuantBlock];
    y[i] += a * (Fp16ToFp32(b.d) * static_cast<float>(b.qs[i % kQuantBlock]));
  }
}

void AxpyQ4_0(float a, const BlockQ4_0* x, float* y, int n) {
  for (int i = 0; i < n; ++i) {
    const BlockQ4_0& b = x[i / kQuantBlock];
    y[i] += a * (Fp16ToFp32(b.d) * static_cast<float>(Q4Code(b, i % kQuantBlock)));
  }
}

float DotAsymCodes(const float* w, const uint8_t* codes, int n, int bits) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += w[i] * static_cast<float>(AsymCode(codes, i, bits));
  return s;
}

void AxpyAsymCodes(float a, const uint8_t* codes, int n, int bits, float* y) {
  for (int i = 0; i < n; ++i) y[i] += a * static_cast<float>(AsymCode(codes, i, bits));
}

void FwhtInPlace(float* x, int n) {
  // H_n[i][j] = (-1)^popcount(i & j) is the Sylvester matrix (bit k of i and j picks the sign of
  // the k-th Kronecker factor [[1, 1], [1, -1]]).
  std::vector<double> y(static_cast<size_t>(n), 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      y[i] += (std::popcount(static_cast<unsigned>(i & j)) & 1 ? -1.0 : 1.0) * static_cast<double>(x[j]);
  const double norm = 1.0 / std::sqrt(static_cast<double>(n));
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(y[i] * norm);
}

void DequantizeSymLatent(const uint8_t* codes, const uint16_t* scales, int r, int bits, int group, float* out) {
  for (int i = 0; i < r; ++i) out[i] = Fp16ToFp32(scales[i / group]) * static_cast<float>(SymCode(codes, i, bits));
}

}  // namespace scalar

namespace {

// One butterfly pass over the stages h_begin, 2 h_begin, ... < n (unnormalized).
void FwhtStagesScalar(float* x, int n, int h_begin) {
  for (int h = h_begin; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

void ScaleInPlace(float* x, int n, float s) {
  for (int i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace

#if DK_HAVE_AVX2

namespace {

// The low 8 bytes of v as signed int8 -> 8 floats.
inline __m256 I8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline __m256 LoadI8x8(const void* p) { return I8x8(_mm_loadl_epi64(static_cast<const __m128i*>(p))); }

// Eight consecutive b-bit codes starting on a byte boundary (8 codes fill exactly b bytes).
// 2 and 4 bits: broadcast the b bytes to every lane and shift lane k right by k*b.
template <int kBits>
inline __m256 AsymCodes8(const uint8_t* p) {
  if constexpr (kBits == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    uint32_t word = 0;
    std::memcpy(&word, p, kBits);  // reads exactly the b bytes of these codes
    const __m256i shifts =
        _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits, 7 * kBits);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << kBits) - 1)));
  }
}

// q4_0 block: the 32 codes minus 8 as four int8 vectors of 8 (elements 0-7, 8-15, 16-23, 24-31).
inline void Q4Codes(const BlockQ4_0& b, __m256 c[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
  const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
  c[0] = I8x8(lo);
  c[1] = I8x8(_mm_unpackhi_epi64(lo, lo));
  c[2] = I8x8(hi);
  c[3] = I8x8(_mm_unpackhi_epi64(hi, hi));
}

inline void Q8Codes(const BlockQ8_0& b, __m256 c[4]) {
  for (int k = 0; k < 4; ++k) c[k] = LoadI8x8(b.qs + 8 * k);
}

// sum over blocks of d * (q . codes): one fp32 FMA chain per block, scaled once by d.
template <typename Block, void (*kCodes)(const Block&, __m256*)>
float DotBlocks(const float* q, const Block* x, int n) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < n / kQuantBlock; ++b, q += kQuantBlock) {
    __m256 c[4];
    kCodes(x[b], c);
    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(q), c[0]);
    for (int k = 1; k < 4; ++k) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * k), c[k], s);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(Fp16ToFp32(x[b].d)), s, acc);
  }
  return HorizontalSum(acc);
}

template <typename Block, void (*kCodes)(const Block&, __m256*)>
void AxpyBlocks(float a, const Block* x, float* y, int n) {
  for (int b = 0; b < n / kQuantBlock; ++b, y += kQuantBlock) {
    __m256 c[4];
    kCodes(x[b], c);
    const __m256 ad = _mm256_set1_ps(a * Fp16ToFp32(x[b].d));
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(ad, c[k], _mm256_loadu_ps(y + 8 * k)));
  }
}

template <int kBits>
float DotAsymCodesT(const float* w, const uint8_t* codes, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), AsymCodes8<kBits>(codes + i * kBits / 8), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), AsymCodes8<kBits>(codes + (i + 8) * kBits / 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), AsymCodes8<kBits>(codes + i * kBits / 8), acc0);
  float s = HorizontalSum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += w[i] * static_cast<float>(AsymCode(codes, i, kBits));
  return s;
}

template <int kBits>
void AxpyAsymCodesT(float a, const uint8_t* codes, int n, float* y) {
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, AsymCodes8<kBits>(codes + i * kBits / 8), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * static_cast<float>(AsymCode(codes, i, kBits));
}

// Eight signed latent codes from element i (even for int4, so they start on a byte).
template <int kBits>
inline __m256 SymCodes8(const uint8_t* codes, int i) {
  if constexpr (kBits == 8) {
    return LoadI8x8(codes + i);
  } else {
    return _mm256_sub_ps(AsymCodes8<4>(codes + i / 2), _mm256_set1_ps(8.0f));
  }
}

// Walks the groups of a latent with their fp32 scales: vec(i, end, scale) takes whole runs of 8
// from element i and returns where it stopped, one(i, scale) takes single elements (short groups
// and tails). An int4 group starting at an odd element hands that element to one() first, so the
// vector loop always starts on a byte.
template <int kBits, typename Vec, typename One>
inline void ForEachSymChunk(int r, int group, const uint16_t* scales, Vec vec, One one) {
  for (int g = 0, start = 0; start < r; ++g, start += group) {
    const int end = std::min(r, start + group);
    const float s = Fp16ToFp32(scales[g]);
    int i = start;
    if (kBits == 4 && (i & 1) && end - i > 8) one(i++, s);
    if (end - i >= 8) i = vec(i, end, s);
    for (; i < end; ++i) one(i, s);
  }
}

template <int kBits>
void DequantizeSymLatentT(const uint8_t* codes, const uint16_t* scales, int r, int group, float* out) {
  auto vec = [&](int i, int end, float s) {
    const __m256 vs = _mm256_set1_ps(s);
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(vs, SymCodes8<kBits>(codes, i)));
    return i;
  };
  auto one = [&](int i, float s) { out[i] = s * static_cast<float>(SymCode(codes, i, kBits)); };
  ForEachSymChunk<kBits>(r, group, scales, vec, one);
}

// The first three butterfly stages (h = 1, 2, 4) inside one vector of 8: each stage is
// v * (+1 | -1) + partner, with the partner brought in by a permute; one rounding per stage,
// as a + b and a - b round in the scalar butterfly, so the results are bit-identical to it.
inline __m256 Fwht8(__m256 v) {
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1), _mm256_permute_ps(v, 0x4E));
  return _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1), _mm256_permute2f128_ps(v, v, 0x01));
}

}  // namespace

float DotQ8_0(const float* q, const BlockQ8_0* x, int n) { return DotBlocks<BlockQ8_0, Q8Codes>(q, x, n); }
float DotQ4_0(const float* q, const BlockQ4_0* x, int n) { return DotBlocks<BlockQ4_0, Q4Codes>(q, x, n); }
void AxpyQ8_0(float a, const BlockQ8_0* x, float* y, int n) { AxpyBlocks<BlockQ8_0, Q8Codes>(a, x, y, n); }
void AxpyQ4_0(float a, const BlockQ4_0* x, float* y, int n) { AxpyBlocks<BlockQ4_0, Q4Codes>(a, x, y, n); }

float DotAsymCodes(const float* w, const uint8_t* codes, int n, int bits) {
  if (bits == 2) return DotAsymCodesT<2>(w, codes, n);
  if (bits == 4) return DotAsymCodesT<4>(w, codes, n);
  return DotAsymCodesT<8>(w, codes, n);
}

void AxpyAsymCodes(float a, const uint8_t* codes, int n, int bits, float* y) {
  if (bits == 2) return AxpyAsymCodesT<2>(a, codes, n, y);
  if (bits == 4) return AxpyAsymCodesT<4>(a, codes, n, y);
  AxpyAsymCodesT<8>(a, codes, n, y);
}

void FwhtInPlace(float* x, int n) {
  if (n < 8) {
    FwhtStagesScalar(x, n, 1);
  } else {
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, Fwht8(_mm256_loadu_ps(x + i)));
    for (int h = 8; h < n; h *= 2)
      for (int i = 0; i < n; i += 2 * h)
        for (int j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
          _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
          _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
        }
  }
  ScaleInPlace(x, n, 1.0f / std::sqrt(static_cast<float>(n)));
}

void DequantizeSymLatent(const uint8_t* codes, const uint16_t* scales, int r, int bits, int group, float* out) {
  if (bits == 8) return DequantizeSymLatentT<8>(codes, scales, r, group, out);
  DequantizeSymLatentT<4>(codes, scales, r, group, out);
}

#else

float DotQ8_0(const float* q, const BlockQ8_0* x, int n) { return scalar::DotQ8_0(q, x, n); }
float DotQ4_0(const float* q, const BlockQ4_0* x, int n) { return scalar::DotQ4_0(q, x, n); }
void AxpyQ8_0(float a, const BlockQ8_0* x, float* y, int n) { scalar::AxpyQ8_0(a, x, y, n); }
void AxpyQ4_0(float a, const BlockQ4_0* x, float* y, int n) { scalar::AxpyQ4_0(a, x, y, n); }
float DotAsymCodes(const float* w, const uint8_t* codes, int n, int bits) {
  return scalar::DotAsymCodes(w, codes, n, bits);
}
void AxpyAsymCodes(float a, const uint8_t* codes, int n, int bits, float* y) {
  scalar::AxpyAsymCodes(a, codes, n, bits, y);
}
void FwhtInPlace(float* x, int n) {
  FwhtStagesScalar(x, n, 1);
  ScaleInPlace(x, n, 1.0f / std::sqrt(static_cast<float>(n)));
}
void DequantizeSymLatent(const uint8_t* codes, const uint16_t* scales, int r, int bits, int group, float* out) {
  scalar::DequantizeSymLatent(codes, scales, r, bits, group, out);
}

#endif

}  // namespace dk
