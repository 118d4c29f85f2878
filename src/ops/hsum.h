// The sum of the 8 float lanes of a 256-bit register, for every AVX kernel (ops/simd.cpp,
// ops/quant.cpp, ops/qmatmul.cpp, ops/qdot_simd.inc): one definition. Marked target("avx") so it
// inlines into kernels compiled for AVX2 or AVX-512 by attribute as well as by -march.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace dk {

__attribute__((target("avx"))) inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace dk
#endif
