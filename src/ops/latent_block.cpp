// Register-blocked latent attention products (ops/latent_block.h).
#include "ops/latent_block.h"

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#define DK_LATENT_BLOCK_AVX2 1
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

#ifdef DK_LATENT_BLOCK_AVX2
namespace {

// The 4 sums of a0..a3's lanes: [sum a0, sum a1, sum a2, sum a3].
inline __m128 Sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Keeps v in a register: without it the compiler folds the load into every multiply-add that
// uses v, turning one load into four (the tiles exist to load each number once).
inline void Pin(__m256& v) { __asm__("" : "+v"(v)); }

// A tile of 4 heads x T tokens (T <= 4): s[k][t] += q_k . z_t over w coordinates (a multiple of 8).
template <int T>
inline void ScoresTile(const float* q, int64_t ldq, const float* z, int64_t ldz, int w, float* s, int64_t lds) {
  __m256 a[4][T];
  for (int k = 0; k < 4; ++k)
    for (int t = 0; t < T; ++t) a[k][t] = _mm256_setzero_ps();
  for (int j = 0; j < w; j += 8) {
    __m256 zv[T];
    for (int t = 0; t < T; ++t) {
      zv[t] = _mm256_loadu_ps(z + t * ldz + j);
      Pin(zv[t]);
    }
    for (int k = 0; k < 4; ++k) {
      __m256 qv = _mm256_loadu_ps(q + k * ldq + j);
      Pin(qv);
      for (int t = 0; t < T; ++t) a[k][t] = _mm256_fmadd_ps(qv, zv[t], a[k][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float sums[4];
    _mm_storeu_ps(sums, Sum4(a[0][t], a[1][t], a[2][t], a[3][t]));
    for (int k = 0; k < 4; ++k) s[k * lds + t] += sums[k];
  }
}

// One head x one token.
inline float Dot(const float* q, const float* z, int w) {
  __m256 a = _mm256_setzero_ps();
  for (int j = 0; j < w; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(z + j), a);
  const __m128 s = Sum4(a, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
  return _mm_cvtss_f32(s);
}

// A tile of H heads x NV * 8 coordinates from j: acc[k][j..] += sum_t p[k][t] z_t[j..] over the
// tokens in `tokens` (those whose width reaches past j).
template <int H, int NV>
inline void AccumulateTile(const float* p, int64_t lds, const float* z, int64_t ldz, const int* tokens, int n, int j,
                           float* acc, int64_t lda) {
  __m256 a[H][NV];
  for (int k = 0; k < H; ++k)
    for (int v = 0; v < NV; ++v) a[k][v] = _mm256_loadu_ps(acc + k * lda + j + 8 * v);
  for (int i = 0; i < n; ++i) {
    const int t = tokens[i];
    __m256 zv[NV];
    for (int v = 0; v < NV; ++v) {
      zv[v] = _mm256_loadu_ps(z + t * ldz + j + 8 * v);
      Pin(zv[v]);
    }
    for (int k = 0; k < H; ++k) {
      const __m256 pk = _mm256_broadcast_ss(p + k * lds + t);
      for (int v = 0; v < NV; ++v) a[k][v] = _mm256_fmadd_ps(pk, zv[v], a[k][v]);
    }
  }
  for (int k = 0; k < H; ++k)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + k * lda + j + 8 * v, a[k][v]);
}

// Every head over the coordinates [j, j + NV * 8).
template <int NV>
inline void AccumulateStrip(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* tokens, int n,
                            int j, float* acc, int64_t lda) {
  const int h4 = nh / 4 * 4;
  for (int h = 0; h < h4; h += 4) AccumulateTile<4, NV>(p + h * lds, lds, z, ldz, tokens, n, j, acc + h * lda, lda);
  for (int h = h4; h < nh; ++h) AccumulateTile<1, NV>(p + h * lds, lds, z, ldz, tokens, n, j, acc + h * lda, lda);
}

}  // namespace

void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds) {
  const int h4 = nh / 4 * 4, t4 = nt / 4 * 4;
  for (int h = 0; h < h4; h += 4) {
    const float* qh = q + h * ldq;
    float* sh = s + h * lds;
    for (int t = 0; t < t4; t += 4) {
      const int w = std::max(std::max(width[t], width[t + 1]), std::max(width[t + 2], width[t + 3]));
      if (w > 0) ScoresTile<4>(qh, ldq, z + t * ldz, ldz, w, sh + t, lds);
    }
    for (int t = t4; t < nt; ++t)
      if (width[t] > 0) ScoresTile<1>(qh, ldq, z + t * ldz, ldz, width[t], sh + t, lds);
  }
  for (int h = h4; h < nh; ++h)
    for (int t = 0; t < nt; ++t) s[h * lds + t] += Dot(q + h * ldq, z + t * ldz, width[t]);
}

void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda) {
  int wmax = 0;
  for (int t = 0; t < nt; ++t) wmax = std::max(wmax, width[t]);
  // Columns outer, heads inner: a column strip of z (nt x 32 numbers) is reused by every head.
  // Each strip runs over the tokens whose width reaches into it.
  int tokens[256];
  for (int j = 0; j < wmax;) {
    int n = 0;
    for (int t0 = 0; t0 < nt; t0 += 256) {
      const int t1 = std::min(nt, t0 + 256);
      n = 0;
      for (int t = t0; t < t1; ++t)
        if (width[t] > j) tokens[n++] = t;
      if (j + 32 <= wmax)
        AccumulateStrip<4>(p, lds, nh, z, ldz, tokens, n, j, acc, lda);
      else if (j + 16 <= wmax)
        AccumulateStrip<2>(p, lds, nh, z, ldz, tokens, n, j, acc, lda);
      else
        AccumulateStrip<1>(p, lds, nh, z, ldz, tokens, n, j, acc, lda);
    }
    j += j + 32 <= wmax ? 32 : j + 16 <= wmax ? 16 : 8;
  }
}

#else

void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds) {
  scalar::LatentScores(q, ldq, nh, z, ldz, width, nt, s, lds);
}

void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda) {
  scalar::LatentAccumulate(p, lds, nh, z, ldz, width, nt, acc, lda);
}

#endif

}  // namespace dk
