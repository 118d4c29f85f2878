// Latent attention on a block of decoded latents: the two products of one block of B tokens with
// all query heads, register-blocked (issue 16's decode speed).
//
// DynaKV's latents are shared by every head of a layer, so a block's two products are small
// matrix products: scores S[h][t] = q_h . z_t (heads x tokens, over the latent's coordinates) and
// values A[h][:] += sum_t P[h][t] z_t. Computed one token at a time they are load-bound (each
// multiply-add reloads a query or an accumulator); here a tile of 4 heads x 4 tokens of scores and
// one of 4 heads x 4 vectors of accumulator columns stay in registers over the whole inner loop, so
// each loaded number feeds four multiply-adds. Vectors are 8 floats with AVX2 and 16 with AVX-512.
// The scalar:: versions are the reference, tested against every kernel the CPU runs
// (tests/test_latent_block.cpp); they add in a different order, so results agree to rounding.
//
// Layouts: q [nh][ldq], z [nt][ldz], s / p [nh][lds], acc [nh][lda], all row-major floats.
// width[t] is token t's number of coordinates (a multiple of 8). Row t of z holds its numbers in
// [0, width[t]) and zeros from there to RoundUp16(max width): the fast paths may multiply those
// zeros. q rows hold at least that many finite numbers too; acc rows at least RoundUp8(max width).
#pragma once

#include <cstdint>

#include "ops/qdot.h"

namespace dk {

// s[h * lds + t] += sum_{j < width[t]} q[h * ldq + j] z[t * ldz + j]
void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds);
// acc[h * lda + j] += sum_t p[h * lds + t] z[t * ldz + j], j < width[t]
void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda);

// The same by the kernels of one instruction set (AVX-512: 16-float vectors; AVX2: 8; scalar: the
// reference); CpuHasQdotIsa(isa) must hold. The two above use ActiveQdotIsa().
void LatentScores(QdotIsa isa, const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width,
                  int nt, float* s, int64_t lds);
void LatentAccumulate(QdotIsa isa, const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width,
                      int nt, float* acc, int64_t lda);

namespace scalar {
void LatentScores(const float* q, int64_t ldq, int nh, const float* z, int64_t ldz, const int* width, int nt,
                  float* s, int64_t lds);
void LatentAccumulate(const float* p, int64_t lds, int nh, const float* z, int64_t ldz, const int* width, int nt,
                      float* acc, int64_t lda);
}  // namespace scalar

}  // namespace dk
