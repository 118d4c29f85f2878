// Register-blocked latent attention products (ops/latent_block.h): the scalar references, then the
// kernels (ops/latent_block_simd.inc) once for AVX2 (8-float vectors) and once for AVX-512
// (16-float vectors), chosen at run time as the integer dot products are (ops/qdot.h:
// ActiveQdotIsa, DYNAKV_ISA).
#include "ops/latent_block.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#define DK_LATENT_X86 1
#include <immintrin.h>
#endif

namespace dk {

namespace scalar {

void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds) {
  for (int h = 0; h < nh; ++h)
    for (int t = 0; t < nt; ++t) {
      float sum = 0.0f;
      for (int j = 0; j < width[t]; ++j) sum += q[h * ldq + j] * z[t * ldz + j];
      s[h * lds + t] += sum;
    }
}

void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda) {
  for (int h = 0; h < nh; ++h)
    for (int t = 0; t < nt; ++t) {
      const float w = p[h * lds + t];
      for (int j = 0; j < width[t]; ++j) acc[h * lda + j] += w * z[t * ldz + j];
    }
}

}  // namespace scalar

#if DK_LATENT_X86
namespace {

// The 4 sums of a0..a3's lanes: [sum a0, sum a1, sum a2, sum a3].
__attribute__((target("avx"))) inline __m128 Sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

}  // namespace

// DK_PIN keeps a loaded vector in a register: without it the compiler folds the load into every
// multiply-add that uses it, turning one load into four (the tiles exist to load each number once).
#define DK_PIN(v) __asm__("" : "+v"(v))
namespace avx2 {
#define DK_LFN __attribute__((target("avx2,fma")))
struct V {
  using T = __m256;
  static constexpr int kN = 8;
  static constexpr int kStrip = 2;  // vectors per accumulator tile row: 8 + 2 + 1 of 16 registers
  DK_LFN static T Zero() { return _mm256_setzero_ps(); }
  DK_LFN static T Load(const float* p) { return _mm256_loadu_ps(p); }
  DK_LFN static T Load8(const float* p) { return _mm256_loadu_ps(p); }
  DK_LFN static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  DK_LFN static void Store8(float* p, T v) { _mm256_storeu_ps(p, v); }
  DK_LFN static T Set1(float x) { return _mm256_set1_ps(x); }
  DK_LFN static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  DK_LFN static __m256 Half(T v) { return v; }
};
#include "ops/latent_block_simd.inc"
#undef DK_LFN
}  // namespace avx2

namespace avx512 {
#define DK_LFN __attribute__((target("avx2,fma,avx512f,avx512vl")))
struct V {
  using T = __m512;
  static constexpr int kN = 16;
  static constexpr int kStrip = 2;  // 4 measured slower (bench_latent)
  DK_LFN static T Zero() { return _mm512_setzero_ps(); }
  DK_LFN static T Load(const float* p) { return _mm512_loadu_ps(p); }
  DK_LFN static T Load8(const float* p) { return _mm512_maskz_loadu_ps(0x00FF, p); }  // lanes 8..15 zero
  DK_LFN static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  DK_LFN static void Store8(float* p, T v) { _mm512_mask_storeu_ps(p, 0x00FF, v); }
  DK_LFN static T Set1(float x) { return _mm512_set1_ps(x); }
  DK_LFN static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  DK_LFN static __m256 Half(T v) {  // the sum of the two 8-lane halves (through memory: GCC 12's
    alignas(64) float x[16];         // _mm512_extract* warn of an uninitialised operand)
    _mm512_store_ps(x, v);
    return _mm256_add_ps(_mm256_load_ps(x), _mm256_load_ps(x + 8));
  }
};
#include "ops/latent_block_simd.inc"
#undef DK_LFN
}  // namespace avx512
#endif

namespace {

// Runs the kernel of `isa` (on x86; elsewhere the reference).
template <typename... A>
void ByIsa(QdotIsa isa, [[maybe_unused]] void (*on_avx512)(A...), [[maybe_unused]] void (*on_avx2)(A...),
           void (*on_scalar)(A...), A... args) {
#if DK_LATENT_X86
  if (isa == QdotIsa::kAvx512Vnni) return on_avx512(args...);
  if (isa == QdotIsa::kAvx2) return on_avx2(args...);
#endif
  on_scalar(args...);
}

#if DK_LATENT_X86
constexpr auto kScores512 = &avx512::LatentScores, kScores2 = &avx2::LatentScores;
constexpr auto kAccumulate512 = &avx512::LatentAccumulate, kAccumulate2 = &avx2::LatentAccumulate;
#else
constexpr auto kScores512 = &scalar::LatentScores, kScores2 = &scalar::LatentScores;
constexpr auto kAccumulate512 = &scalar::LatentAccumulate, kAccumulate2 = &scalar::LatentAccumulate;
#endif

}  // namespace

void LatentScores(QdotIsa isa, const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width,
                  int nt, float* s, int64_t lds) {
  ByIsa(isa, kScores512, kScores2, &scalar::LatentScores, q, ldq, nh, z, ldz, width, nt, s, lds);
}

void LatentAccumulate(QdotIsa isa, const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width,
                      int nt, float* acc, int64_t lda) {
  ByIsa(isa, kAccumulate512, kAccumulate2, &scalar::LatentAccumulate, p, lds, nh, z, ldz, width, nt, acc, lda);
}

void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds) {
  LatentScores(ActiveQdotIsa(), q, ldq, nh, z, ldz, width, nt, s, lds);
}

void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda) {
  LatentAccumulate(ActiveQdotIsa(), p, lds, nh, z, ldz, width, nt, acc, lda);
}

}  // namespace dk
