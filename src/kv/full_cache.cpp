#include "kv/full_cache.h"

#include <cmath>
#include <algorithm>
#include <cstring>

#include <cblas.h>

#include "core/fp16.h"
#include "core/threads.h"
#include "ops/attention.h"
#include "ops/ops.h"
#include "ops/simd.h"

namespace dk {

FullKvCache::FullKvCache(const KvShape& shape, int capacity, KvDtype dtype) : KvCache(shape, capacity), dtype_(dtype) {
  const size_t layer_bytes = static_cast<size_t>(capacity) * shape.kv_dim() * elem_bytes();
  k_.assign(shape.n_layer, std::vector<uint8_t>(layer_bytes));
  v_.assign(shape.n_layer, std::vector<uint8_t>(layer_bytes));
}

void FullKvCache::StoreRows(std::vector<uint8_t>& buf, const KvPlan& plan, const float* src) {
  const int64_t D = shape_.kv_dim();
  if (dtype_ == KvDtype::kF16) {
    auto* dst = reinterpret_cast<uint16_t*>(buf.data()) + plan.first * D;
    Fp32ToFp16Row(src, dst, plan.n * D);
  } else {
    std::memcpy(buf.data() + plan.first * D * 4, src, plan.n * D * 4);
  }
}

void FullKvCache::ReadRow(const std::vector<uint8_t>& buf, int t, float* dst) const {
  const int64_t D = shape_.kv_dim();
  if (dtype_ == KvDtype::kF16) {
    Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(buf.data()) + t * D, dst, D);
  } else {
    std::memcpy(dst, buf.data() + t * D * 4, D * 4);
  }
}

void FullKvCache::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* /*x*/) {
  StoreRows(k_[layer], plan, k);
  StoreRows(v_[layer], plan, v);
}

void FullKvCache::ReadK(int layer, int t, float* dst) const { ReadRow(k_[layer], t, dst); }
void FullKvCache::ReadV(int layer, int t, float* dst) const { ReadRow(v_[layer], t, dst); }

void FullKvCache::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  if (plan.n >= kGemmMinBatch) {
    AttendGemm(layer, plan, q, out, pool);
    return;
  }
  // Decode path: one work item per (query, head), reading the stored rows directly.
  const int d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv;
  const int64_t D = shape_.kv_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  pool.ParallelFor(static_cast<int64_t>(plan.n) * Hq, [&](int64_t begin, int64_t end, int) {
    std::vector<float> scores(plan.first + plan.n);
    for (int64_t item = begin; item < end; ++item) {
      const int i = static_cast<int>(item / Hq), h = static_cast<int>(item % Hq), g = h / group;
      const int T = plan.first + i + 1;
      const float* qi = q + static_cast<int64_t>(i) * Hq * d + h * d;
      float* oi = out + static_cast<int64_t>(i) * Hq * d + h * d;
      if (dtype_ == KvDtype::kF32) {
        const float* kr = reinterpret_cast<const float*>(k_[layer].data()) + g * d;
        const float* vr = reinterpret_cast<const float*>(v_[layer].data()) + g * d;
        AttendOne(qi, kr, vr, D, T, d, scale, oi, scores.data());
        continue;
      }
      const auto* k16 = reinterpret_cast<const uint16_t*>(k_[layer].data()) + g * d;
      const auto* v16 = reinterpret_cast<const uint16_t*>(v_[layer].data()) + g * d;
      float mx = -INFINITY;
      for (int t = 0; t < T; ++t) {
        scores[t] = DotF16(qi, k16 + t * D, d) * scale;
        mx = std::max(mx, scores[t]);
      }
      const float inv = 1.0f / ExpShiftSum(scores.data(), T, mx);
      std::fill(oi, oi + d, 0.0f);
      for (int t = 0; t < T; ++t) AxpyF16(scores[t] * inv, v16 + t * D, oi, d);
    }
  });
}

void FullKvCache::ConvertHead(const std::vector<uint8_t>& buf, int64_t g, int T, float* dst) const {
  const int d = shape_.head_dim;
  const int64_t D = shape_.kv_dim();
  const auto* src = reinterpret_cast<const uint16_t*>(buf.data());
  for (int t = 0; t < T; ++t) Fp16ToFp32Row(src + t * D + g * d, dst + static_cast<int64_t>(t) * d, d);
}

// Batched path: per query head, S = Q K^T and O = P V as GEMMs (OpenBLAS threads them); the
// causal mask and softmax run row-parallel on the pool. Computing the masked upper triangle
// costs at most 2x the useful work, far less than scalar dot products lose.
void FullKvCache::AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  const int d = shape_.head_dim, Hq = shape_.n_head, Hkv = shape_.n_head_kv, group = Hq / Hkv;
  const int64_t D = shape_.kv_dim();
  const int n = plan.n, T = plan.first + plan.n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  scratch_s_.resize(static_cast<size_t>(n) * T);
  for (int g = 0; g < Hkv; ++g) {
    const float* kr;
    const float* vr;
    int64_t ld = D;
    if (dtype_ == KvDtype::kF32) {
      kr = reinterpret_cast<const float*>(k_[layer].data()) + g * d;
      vr = reinterpret_cast<const float*>(v_[layer].data()) + g * d;
    } else {
      scratch_k_.resize(static_cast<size_t>(T) * d);
      scratch_v_.resize(static_cast<size_t>(T) * d);
      ConvertHead(k_[layer], g, T, scratch_k_.data());
      ConvertHead(v_[layer], g, T, scratch_v_.data());
      kr = scratch_k_.data();
      vr = scratch_v_.data();
      ld = d;
    }
    for (int h = g * group; h < (g + 1) * group; ++h) {
      float* S = scratch_s_.data();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, T, d, scale, q + h * d, Hq * d, kr, ld, 0.0f, S, T);
      pool.ParallelFor(n, [&](int64_t b, int64_t e, int) {
        for (int64_t i = b; i < e; ++i) {
          float* row = S + i * T;
          const int visible = plan.first + static_cast<int>(i) + 1;
          Softmax(row, visible);
          for (int t = visible; t < T; ++t) row[t] = 0.0f;
        }
      });
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, T, 1.0f, S, T, vr, ld, 0.0f, out + h * d, Hq * d);
    }
  }
}

}  // namespace dk
