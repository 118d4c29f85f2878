#include "kv/full_cache.h"

#include "kv/registry.h"

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

StatusOr<KvDtype> ParseKvDtype(const std::string& text, const std::string& flag) {
  if (text == "f16") return KvDtype::kF16;
  if (text == "f32") return KvDtype::kF32;
  return InvalidArgument(flag + ": expected f16 or f32, found '" + text + "'");
}

FullKvCache::FullKvCache(const KvShape& shape, int capacity, KvDtype dtype)
    : KvCache(shape, capacity), dtype_(dtype), n_(shape.n_layer, 0) {
  const size_t layer_bytes = static_cast<size_t>(capacity) * shape.kv_dim() * elem_bytes();
  for (int l = 0; l < shape.n_layer; ++l) {
    k_.emplace_back(layer_bytes);
    v_.emplace_back(layer_bytes);
  }
}

size_t FullKvCache::BytesUsed() const {
  size_t rows = 0;
  for (int n : n_) rows += static_cast<size_t>(n);
  return rows * 2 * shape_.kv_dim() * elem_bytes();
}

void FullKvCache::StoreRows(LazyBuffer& buf, int first, int n, const float* src) {
  const int64_t D = shape_.kv_dim();
  if (dtype_ == KvDtype::kF16) {
    auto* dst = reinterpret_cast<uint16_t*>(buf.data()) + first * D;
    Fp32ToFp16Row(src, dst, n * D);
  } else {
    std::memcpy(buf.data() + first * D * 4, src, n * D * 4);
  }
}

void FullKvCache::ReadRow(const LazyBuffer& buf, int t, float* dst) const {
  const int64_t D = shape_.kv_dim();
  if (dtype_ == KvDtype::kF16) {
    Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(buf.data()) + t * D, dst, D);
  } else {
    std::memcpy(dst, buf.data() + t * D * 4, D * 4);
  }
}

void FullKvCache::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* /*x*/) {
  StoreRows(k_[layer], n_[layer], plan.n, k);
  StoreRows(v_[layer], n_[layer], plan.n, v);
  n_[layer] += plan.n;
}

void FullKvCache::ReadK(int layer, int t, float* dst) const { ReadRow(k_[layer], t, dst); }
void FullKvCache::ReadV(int layer, int t, float* dst) const { ReadRow(v_[layer], t, dst); }

void FullKvCache::ReadKeys(int layer, int first, int n, float* out) const {
  for (int s = 0; s < n; ++s) ReadRow(k_[layer], first + s, out + static_cast<size_t>(s) * shape_.kv_dim());
}

void FullKvCache::ReadValues(int layer, int first, int n, float* out) const {
  for (int s = 0; s < n; ++s) ReadRow(v_[layer], first + s, out + static_cast<size_t>(s) * shape_.kv_dim());
}

// Rows move toward the front (keep[s] >= s), so compacting in place, in order, never overwrites a
// row still to be read.
Status FullKvCache::Retain(int layer, const std::vector<std::vector<int>>& keep) {
  DK_RETURN_IF_ERROR(CheckRetain(layer, keep));
  const size_t D = shape_.kv_dim(), d = shape_.head_dim, e = elem_bytes();
  const size_t width = keep.size() == 1 ? D : d;  // bytes moved per row: all heads, or one head's columns
  for (size_t g = 0; g < keep.size(); ++g) {
    const size_t col = keep.size() == 1 ? 0 : g * d;
    for (LazyBuffer* buf : {&k_[layer], &v_[layer]})
      for (size_t s = 0; s < keep[g].size(); ++s)
        if (keep[g][s] != static_cast<int>(s))
          std::memmove(buf->data() + (s * D + col) * e, buf->data() + (static_cast<size_t>(keep[g][s]) * D + col) * e,
                       width * e);
  }
  n_[layer] = static_cast<int>(keep[0].size());
  return Status::Ok();
}

void FullKvCache::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  if (plan.n >= kGemmMinBatch) {
    AttendGemm(layer, plan, q, out, pool);
    return;
  }
  // Decode path: one work item per (query, KV head, run of its query heads), reading the stored
  // rows directly. The query heads that share a KV head (GQA) go through its rows together, a tile
  // of kDecodeTile tokens at a time, so each row comes from memory once per work item, not once per
  // query head (the per-head loop read a 32k-token cache group times over and ran at a quarter of
  // the memory's speed). Per head the arithmetic and its order are those of AttendOne.
  const int d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv;
  const int64_t D = shape_.kv_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int stored = n_[layer], before = stored - plan.n;  // rows stored before this batch
  const DecodeSplit split = SplitDecode(plan.n, shape_.n_head_kv, group, pool.size());
  pool.ParallelForChunked(split.items, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(split.heads) * stored);  // [heads][stored]
    for (int64_t item = begin; item < end; ++item) {
      const DecodeItem it = split.At(item);
      const int T = before + it.query + 1;
      const float* qi = q + (static_cast<int64_t>(it.query) * Hq + it.head0) * d;
      float* oi = out + (static_cast<int64_t>(it.query) * Hq + it.head0) * d;
      if (dtype_ == KvDtype::kF32) {
        const float* kr = reinterpret_cast<const float*>(k_[layer].data()) + it.kv_head * d;
        const float* vr = reinterpret_cast<const float*>(v_[layer].data()) + it.kv_head * d;
        for (int h = 0; h < it.heads; ++h) AttendOne(qi + h * d, kr, vr, D, T, d, scale, oi + h * d, scores.data());
        continue;
      }
      const auto* k16 = reinterpret_cast<const uint16_t*>(k_[layer].data()) + it.kv_head * d;
      const auto* v16 = reinterpret_cast<const uint16_t*>(v_[layer].data()) + it.kv_head * d;
      for (int t0 = 0; t0 < T; t0 += kDecodeTile) {
        const int t1 = std::min(T, t0 + kDecodeTile);
        for (int h = 0; h < it.heads; ++h) {
          float* s = scores.data() + static_cast<size_t>(h) * stored;
          for (int t = t0; t < t1; ++t) s[t] = DotF16(qi + h * d, k16 + t * D, d) * scale;
        }
      }
      for (int h = 0; h < it.heads; ++h) {
        float* s = scores.data() + static_cast<size_t>(h) * stored;
        const float mx = *std::max_element(s, s + T);
        const float inv = 1.0f / ExpShiftSum(s, T, mx);
        for (int t = 0; t < T; ++t) s[t] *= inv;
        std::fill(oi + h * d, oi + (h + 1) * d, 0.0f);
      }
      for (int t0 = 0; t0 < T; t0 += kDecodeTile) {
        const int t1 = std::min(T, t0 + kDecodeTile);
        for (int h = 0; h < it.heads; ++h) {
          const float* p = scores.data() + static_cast<size_t>(h) * stored;
          for (int t = t0; t < t1; ++t) AxpyF16(p[t], v16 + t * D, oi + h * d, d);
        }
      }
    }
  });
}

void FullKvCache::ConvertHead(const LazyBuffer& buf, int64_t g, int T, float* dst) const {
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
  const int n = plan.n, T = n_[layer], before = T - n;
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
      pool.ParallelForChunked(n, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          float* row = S + i * T;
          const int visible = before + static_cast<int>(i) + 1;
          Softmax(row, visible);
          for (int t = visible; t < T; ++t) row[t] = 0.0f;
        }
      });
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, T, 1.0f, S, T, vr, ld, 0.0f, out + h * d, Hq * d);
    }
  }
}

namespace {

StatusOr<std::unique_ptr<KvCache>> CreateFull(const KvConfig& config, const KvModelInfo& model, int capacity) {
  KvDtype dtype;
  DK_ASSIGN_OR_RETURN(dtype, ParseKvDtype(config.options.String("--kv-dtype", "f16"), "--kv-dtype"));
  return std::unique_ptr<KvCache>(new FullKvCache(model.shape, capacity, dtype));
}

}  // namespace

const KvMethod& FullKvMethod() {
  static const KvMethod m{"full",
                          "uncompressed keys and values (fp16 or fp32)",
                          {{"--kv-dtype", "TYPE", "storage of cached rows or latents: f16 (default) or f32"}},
                          &CreateFull};
  return m;
}

}  // namespace dk
