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
#include "ops/attention.h"
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

// Decode-path attention (batches below kQuantGemmMinBatch). Work items as SplitDecode cuts them
// (ops/attention.h): a query i, a KV head g and a run of the query heads h that share it, over the
// T = stored - plan.n + i + 1 tokens query i sees, in tiles of `tile` tokens (each tile's blocks
// read once for all the run's heads):
//   qs_h = q_h / sqrt(d), then H qs_h when `rotate`
//   score(g, qs, t0, t1, s)          fills s[t0, t1) with qs . k_t (t0 a multiple of `tile`; the
//                                    storage may write further, up to s[stored - 1]: the buffer
//                                    holds `stored` numbers)
//   softmax of s[0, T) in place
//   accumulate(g, p, t0, t1, acc)    acc[0, d) += sum_{t0 <= t < t1} p_t v_t (acc starts at zero)
//   out_h = acc, or H acc when `rotate`.
// Two passes over the scores (max, then exp and sum), as FullKvCache's decode path.
template <typename ScoreFn, typename AccumulateFn>
void AttendDecode(const KvShape& shape, int stored, const KvPlan& plan, const float* q, float* out, bool rotate,
                  ThreadPool& pool, int tile, ScoreFn score, AccumulateFn accumulate) {
  const int d = shape.head_dim, Hq = shape.n_head, group = Hq / shape.n_head_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int before = stored - plan.n;  // tokens stored before this batch
  const DecodeSplit split = SplitDecode(plan.n, shape.n_head_kv, group, pool.size());
  pool.ParallelForChunked(split.items, [&](int64_t begin, int64_t end) {
    const size_t heads = static_cast<size_t>(split.heads);
    std::vector<float> s(heads * stored), qs(heads * d), acc(heads * d);  // [heads][stored], [heads][d] x 2
    for (int64_t item = begin; item < end; ++item) {
      const DecodeItem it = split.At(item);
      const int T = before + it.query + 1;
      for (int h = 0; h < it.heads; ++h) {
        const float* qi = q + (static_cast<int64_t>(it.query) * Hq + it.head0 + h) * d;
        float* qh = qs.data() + static_cast<size_t>(h) * d;
        for (int e = 0; e < d; ++e) qh[e] = qi[e] * scale;
        if (rotate) FwhtInPlace(qh, d);
      }
      for (int t0 = 0; t0 < T; t0 += tile)
        for (int h = 0; h < it.heads; ++h)
          score(it.kv_head, qs.data() + static_cast<size_t>(h) * d, t0, std::min(T, t0 + tile),
                s.data() + static_cast<size_t>(h) * stored);
      for (int h = 0; h < it.heads; ++h) {
        float* sh = s.data() + static_cast<size_t>(h) * stored;
        const float mx = *std::max_element(sh, sh + T);
        const float inv = 1.0f / ExpShiftSum(sh, T, mx);
        for (int t = 0; t < T; ++t) sh[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int t0 = 0; t0 < T; t0 += tile)
        for (int h = 0; h < it.heads; ++h)
          accumulate(it.kv_head, s.data() + static_cast<size_t>(h) * stored, t0, std::min(T, t0 + tile),
                     acc.data() + static_cast<size_t>(h) * d);
      for (int h = 0; h < it.heads; ++h) {
        float* ah = acc.data() + static_cast<size_t>(h) * d;
        if (rotate) FwhtInPlace(ah, d);
        std::copy(ah, ah + d, out + (static_cast<int64_t>(it.query) * Hq + it.head0 + h) * d);
      }
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
