// Pieces shared by the quantized caches (qblock_cache.cpp: q8_0 / q4_0; kivi_cache.cpp: KIVI): the
// --hadamard switch, rotating head slices, the decode-path attention skeleton (one work item per
// query and head, the storage's own score and value kernels plugged in) and the batched path on
// one KV head dequantized to fp32.
//
// Rotation. With --hadamard a cache stores H k and H v per KV head (H the normalized d x d
// Walsh-Hadamard matrix: orthogonal and symmetric, so H^-1 = H). Attention never rotates a stored
// row back: it rotates each query head instead, since q . k = (H q) . (H k), and the output
// sum_t p_t H v_t = H (sum_t p_t v_t) is rotated back once with H. ReadKeys / ReadValues apply H to
// what they dequantize, so callers always see the original basis.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/threads.h"
#include "kv/kv_cache.h"
#include "kv/registry.h"
#include "ops/quant.h"
#include "ops/simd.h"

namespace dk {

// Batches of at least this many tokens take the batched (GEMM) path, as in FullKvCache.
constexpr int kQuantGemmMinBatch = 8;

// --hadamard: absent or "0" off, "1" on (the CLI's value for a switch). On needs a power-of-two
// head size (the butterflies of FwhtInPlace); the error names `method` and the head size.
StatusOr<bool> ParseHadamard(const KvOptions& options, const std::string& method, int head_dim);

// The switch's declaration, shared by the methods that read it.
KvFlag HadamardKvFlag();

// FwhtInPlace on each of n_heads consecutive slices of d numbers in each of n rows.
//   x: [n][stride], slices at columns [g*d, g*d + d)
void RotateHeads(float* x, int64_t n, int64_t stride, int n_heads, int d);

// Decode-path attention (batches below kQuantGemmMinBatch), one work item per (query i, head h),
// h's KV head g = h / (H_q / H_kv), over the T = stored - plan.n + i + 1 tokens query i sees:
//   qs = q_h / sqrt(d), then H qs when `rotate`
//   score(g, qs, T, s)          fills s[0, T) with qs . k_t (the storage may write further, up to
//                               s[stored - 1]: the buffer holds `stored` numbers)
//   softmax of s[0, T) in place
//   accumulate(g, p, T, acc)    acc[0, d) += sum_{t < T} p_t v_t (acc starts at zero)
//   out_h = acc, or H acc when `rotate`.
// Two passes over the scores (max, then exp and sum), as FullKvCache's decode path.
template <typename ScoreFn, typename AccumulateFn>
void AttendDecode(const KvShape& shape, int stored, const KvPlan& plan, const float* q, float* out, bool rotate,
                  ThreadPool& pool, ScoreFn score, AccumulateFn accumulate) {
  const int d = shape.head_dim, Hq = shape.n_head, group = Hq / shape.n_head_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int before = stored - plan.n;  // tokens stored before this batch
  pool.ParallelForChunked(static_cast<int64_t>(plan.n) * Hq, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(stored)), qs(d), acc(d);  // [stored], [d], [d]
    for (int64_t item = begin; item < end; ++item) {
      const int i = static_cast<int>(item / Hq), h = static_cast<int>(item % Hq), g = h / group;
      const int T = before + i + 1;
      const float* qi = q + (static_cast<int64_t>(i) * Hq + h) * d;
      for (int e = 0; e < d; ++e) qs[e] = qi[e] * scale;
      if (rotate) FwhtInPlace(qs.data(), d);
      score(g, qs.data(), T, s.data());
      const float mx = *std::max_element(s.begin(), s.begin() + T);
      const float inv = 1.0f / ExpShiftSum(s.data(), T, mx);
      for (int t = 0; t < T; ++t) s[t] *= inv;
      std::fill(acc.begin(), acc.end(), 0.0f);
      accumulate(g, s.data(), T, acc.data());
      if (rotate) FwhtInPlace(acc.data(), d);
      std::copy(acc.begin(), acc.end(), out + (static_cast<int64_t>(i) * Hq + h) * d);
    }
  });
}

// Scratch of the batched path, kept by the cache between calls.
struct QuantGemmScratch {
  std::vector<float> k, v;  // [T][d] one KV head dequantized (storage basis)
  std::vector<float> s;     // [n][T] scores of one query head
  std::vector<float> q;     // [n][d] one query head, rotated
};

// Batched path for the query heads of KV head g: S = Q K^T / sqrt(d) and O = P V as GEMMs on the
// head's dequantized rows scratch.k, scratch.v ([T][d], storage basis), causal softmax between
// (query i sees the first T - n + i + 1 rows). With `rotate` each query head is rotated before
// the first GEMM and each output row rotated back after the second.
//   q: [n][q_dim]   out: [n][q_dim]
void AttendKvHeadGemm(const KvShape& shape, int g, int n, int T, const float* q, bool rotate, float* out,
                      QuantGemmScratch& scratch, ThreadPool& pool);

}  // namespace dk
