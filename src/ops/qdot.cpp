#include "ops/qdot.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define DK_QDOT_X86 1
#endif

#include "core/env.h"
#include "ops/hsum.h"

namespace dk {

int64_t ActBlockSize(ActFormat f) { return f == ActFormat::kQ8_0 ? 32 : 256; }
int64_t ActSumSize(ActFormat f) { return f == ActFormat::kQ8_0 ? 32 : 16; }

bool UsesQuantizedActs(WeightType type) {
  switch (type) {
    case WeightType::kQ8_0: case WeightType::kQ4_0: case WeightType::kQ4_K: case WeightType::kQ5_K:
    case WeightType::kQ6_K:
      return true;
    default:
      return false;
  }
}

ActFormat ActFormatFor(WeightType type) {
  return type == WeightType::kQ8_0 || type == WeightType::kQ4_0 ? ActFormat::kQ8_0 : ActFormat::kQ8_K;
}

namespace {
// Round to nearest, ties to even (the default rounding mode; ggml's nearest_int and its AVX
// quantizers' _MM_ROUND_NEAREST), kept within [-127, 127]; NaN (a non-finite activation, which the
// forward pass reports per layer) becomes 0 instead of an undefined conversion.
inline int RoundEven(float v) {
  const float r = std::nearbyint(v);
  if (r >= 127.0f) return 127;
  if (r <= -127.0f) return -127;
  return r == r ? static_cast<int>(r) : 0;
}
}  // namespace

void QuantizeActRow(ActFormat f, const float* x, int64_t n, int8_t* q, float* d, int16_t* sums) {
  if (f == ActFormat::kQ8_0) {
    // ggml's quantize_row_q8_0 (x86): d = amax / 127 stored as fp16; q = round(x * 127 / amax).
    for (int64_t b = 0; b < n / 32; ++b, x += 32, q += 32) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
      d[b] = Fp16ToFp32(Fp32ToFp16(amax / 127.0f));
      const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      for (int j = 0; j < 32; ++j) {
        q[j] = static_cast<int8_t>(RoundEven(x[j] * id));
        sum += q[j];
      }
      sums[b] = static_cast<int16_t>(sum);
    }
    return;
  }
  // ggml's quantize_row_q8_K_ref: the value of largest magnitude (sign kept) maps to -127.
  for (int64_t b = 0; b < n / 256; ++b, x += 256, q += 256, sums += 16) {
    float max = 0.0f, amax = 0.0f;
    for (int j = 0; j < 256; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) amax = ax, max = x[j];
    }
    if (amax == 0.0f) {
      d[b] = 0.0f;
      std::memset(q, 0, 256);
      std::memset(sums, 0, 16 * sizeof(int16_t));
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < 256; ++j) q[j] = static_cast<int8_t>(RoundEven(iscale * x[j]));
    for (int g = 0; g < 16; ++g) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += q[16 * g + j];
      sums[g] = static_cast<int16_t>(sum);
    }
    d[b] = 1.0f / iscale;
  }
}

void QuantizedActs::Quantize(ActFormat f, const float* x, int64_t rows, int64_t cols) {
  Prepare(f, rows, cols);
  for (int64_t i = 0; i < rows; ++i) QuantizeRow(i, x + i * cols);
}

void QuantizedActs::QuantizeRow(int64_t i, const float* x) {
  const int64_t nd = cols_ / ActBlockSize(format_), ns = cols_ / ActSumSize(format_);
  QuantizeActRow(format_, x, cols_, q_.data() + i * cols_, d_.data() + i * nd, sums_.data() + i * ns);
}

void QuantizedActs::Prepare(ActFormat f, int64_t rows, int64_t cols) {
  format_ = f;
  rows_ = rows;
  cols_ = cols;
  const size_t n = static_cast<size_t>(rows * cols);
  if (q_.size() < n) q_.resize(n);
  const size_t nd = n / static_cast<size_t>(ActBlockSize(f)), ns = n / static_cast<size_t>(ActSumSize(f));
  if (d_.size() < nd) d_.resize(nd);
  if (sums_.size() < ns) sums_.resize(ns);
}

ActRow QuantizedActs::row(int64_t i) const {
  ActRow r;
  r.q = q_.data() + i * cols_;
  r.d = d_.data() + i * (cols_ / ActBlockSize(format_));
  r.sums = sums_.data() + i * (cols_ / ActSumSize(format_));
  return r;
}

// ---- the scalar reference: integer sums per block, written from the block layouts directly ----
namespace {

float RefQ8_0(const uint8_t* w, const ActRow& a, int64_t n) {
  float s = 0.0f;
  for (int64_t b = 0; b < n / 32; ++b, w += 34) {
    const auto* q = reinterpret_cast<const int8_t*>(w + 2);
    int sumi = 0;
    for (int j = 0; j < 32; ++j) sumi += q[j] * a.q[32 * b + j];
    s += static_cast<float>(sumi) * (LoadF16(w) * a.d[b]);
  }
  return s;
}

float RefQ4_0(const uint8_t* w, const ActRow& a, int64_t n) {
  float s = 0.0f;
  for (int64_t b = 0; b < n / 32; ++b, w += 18) {
    const uint8_t* q = w + 2;
    const int8_t* y = a.q + 32 * b;
    int sumi = 0;
    for (int j = 0; j < 16; ++j) sumi += ((q[j] & 0xF) - 8) * y[j] + ((q[j] >> 4) - 8) * y[j + 16];
    s += static_cast<float>(sumi) * (LoadF16(w) * a.d[b]);
  }
  return s;
}

// q4_K / q5_K: value i of a block (sub-block j = i / 32, chunk c = i / 64, l = i % 32) has code
// nibble (low for even j) of qs[32 c + l], plus 16 * bit j of qh[l] for q5_K.
float RefQ45_K(const uint8_t* w, const ActRow& a, int64_t n, bool five) {
  float s = 0.0f;
  for (int64_t b = 0; b < n / 256; ++b, w += five ? 176 : 144) {
    const uint8_t* qs = w + (five ? 48 : 16);
    const uint8_t* qh = w + 16;
    const int8_t* y = a.q + 256 * b;
    int sumi = 0, summs = 0;
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      GetScaleMinK4(j, w + 4, &sc, &m);
      int dot = 0, ysum = 0;
      for (int l = 0; l < 32; ++l) {
        const uint8_t byte = qs[32 * (j / 2) + l];
        int code = j % 2 == 0 ? byte & 0xF : byte >> 4;
        if (five) code += ((qh[l] >> j) & 1) << 4;
        dot += code * y[32 * j + l];
        ysum += y[32 * j + l];
      }
      sumi += sc * dot;
      summs += m * ysum;
    }
    s += LoadF16(w) * a.d[b] * static_cast<float>(sumi) - LoadF16(w + 2) * a.d[b] * static_cast<float>(summs);
  }
  return s;
}

// q6_K: value i (half h = i / 128, quarter t = (i % 128) / 32, l = i % 32) has code
// nibble (low for t < 2) of ql[64 h + l + 32 (t % 2)] | bits 2t..2t+1 of qh[32 h + l] << 4, minus 32,
// and scale sc[8 h + l / 16 + 2 t].
float RefQ6_K(const uint8_t* w, const ActRow& a, int64_t n) {
  float s = 0.0f;
  for (int64_t b = 0; b < n / 256; ++b, w += 210) {
    const auto* sc = reinterpret_cast<const int8_t*>(w + 192);
    const int8_t* y = a.q + 256 * b;
    int sumi = 0;
    for (int i = 0; i < 256; ++i) {
      const int h = i / 128, t = (i % 128) / 32, l = i % 32;
      const uint8_t lo = w[64 * h + l + 32 * (t % 2)];
      const int code = ((t < 2 ? lo & 0xF : lo >> 4) | (((w[128 + 32 * h + l] >> (2 * t)) & 3) << 4)) - 32;
      sumi += sc[8 * h + l / 16 + 2 * t] * code * y[i];
    }
    s += LoadF16(w + 208) * a.d[b] * static_cast<float>(sumi);
  }
  return s;
}

float RefDot(WeightType type, const uint8_t* w, const ActRow& a, int64_t n) {
  switch (type) {
    case WeightType::kQ8_0: return RefQ8_0(w, a, n);
    case WeightType::kQ4_0: return RefQ4_0(w, a, n);
    case WeightType::kQ4_K: return RefQ45_K(w, a, n, false);
    case WeightType::kQ5_K: return RefQ45_K(w, a, n, true);
    case WeightType::kQ6_K: return RefQ6_K(w, a, n);
    default: return 0.0f;
  }
}

}  // namespace

// ---- the SIMD kernels, one copy per instruction set (ops/qdot_simd.inc) ----
#if DK_QDOT_X86
namespace avx2 {
#define DK_QFN __attribute__((target("avx2,fma,f16c")))
DK_QFN inline __m256i DotU8S8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#include "ops/qdot_simd.inc"
#undef DK_QFN
}  // namespace avx2

namespace avx512vnni {
#define DK_QFN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
DK_QFN inline __m256i DotU8S8(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
#include "ops/qdot_simd.inc"
#undef DK_QFN
}  // namespace avx512vnni
#endif

const char* QdotIsaName(QdotIsa isa) {
  switch (isa) {
    case QdotIsa::kScalar: return "scalar";
    case QdotIsa::kAvx2: return "avx2";
    case QdotIsa::kAvx512Vnni: return "avx512vnni";
  }
  return "?";
}

bool CpuHasQdotIsa(QdotIsa isa) {
#if DK_QDOT_X86
  static const bool avx2 = [] {
    // F16C through CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c".
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  static const bool vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  switch (isa) {
    case QdotIsa::kScalar: return true;
    case QdotIsa::kAvx2: return avx2;
    case QdotIsa::kAvx512Vnni: return vnni;
  }
  return false;
#else
  return isa == QdotIsa::kScalar;
#endif
}

QdotIsa BestQdotIsa() {
  static const QdotIsa best = [] {
    QdotIsa cap = QdotIsa::kAvx512Vnni;
    if (const std::optional<std::string> v = EnvChoice("DYNAKV_ISA")) {
      if (*v == "scalar") cap = QdotIsa::kScalar;
      if (*v == "avx2") cap = QdotIsa::kAvx2;
    }
    for (QdotIsa isa : {QdotIsa::kAvx512Vnni, QdotIsa::kAvx2})
      if (isa <= cap && CpuHasQdotIsa(isa)) return isa;
    return QdotIsa::kScalar;
  }();
  return best;
}

namespace {
std::atomic<QdotIsa> g_isa{BestQdotIsa()};
}  // namespace

QdotIsa ActiveQdotIsa() { return g_isa.load(std::memory_order_relaxed); }
void SetQdotIsa(QdotIsa isa) {
  while (isa != QdotIsa::kScalar && !CpuHasQdotIsa(isa)) isa = static_cast<QdotIsa>(static_cast<int>(isa) - 1);
  g_isa.store(isa, std::memory_order_relaxed);
}

void DotQ8Rows(QdotIsa isa, WeightType type, const uint8_t* w, const ActRow* a, int nr, int64_t n, float* out) {
  nr = std::clamp(nr, 1, 4);
  switch (isa) {
#if DK_QDOT_X86
    case QdotIsa::kAvx512Vnni: avx512vnni::DotRows(type, w, a, nr, n, out); return;
    case QdotIsa::kAvx2: avx2::DotRows(type, w, a, nr, n, out); return;
#endif
    default:
      for (int r = 0; r < nr; ++r) out[r] = RefDot(type, w, a[r], n);
      return;
  }
}

void DotQ8Rows(WeightType type, const uint8_t* w, const ActRow* a, int nr, int64_t n, float* out) {
  DotQ8Rows(ActiveQdotIsa(), type, w, a, nr, n, out);
}

}  // namespace dk
