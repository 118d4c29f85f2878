// The uncompressed KV cache: every stored token's post-RoPE keys and values, fp16 or fp32.
// Eviction may keep a different subset per KV head (PerHeadRetain): row s of KV head g is then
// the s-th token that head kept.
#pragma once

#include <vector>

#include "core/buffer.h"
#include "kv/kv_cache.h"

namespace dk {

enum class KvDtype { kF16, kF32 };
// "f16" / "f32"; anything else is InvalidArgument naming `flag`.
StatusOr<KvDtype> ParseKvDtype(const std::string& text, const std::string& flag);

class FullKvCache final : public KvCache {
 public:
  FullKvCache(const KvShape& shape, int capacity, KvDtype dtype);
  std::string name() const override { return dtype_ == KvDtype::kF16 ? "full-f16" : "full-f32"; }

  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override;
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override;
  int Stored(int layer) const override { return n_[layer]; }
  void ReadKeys(int layer, int first, int n, float* out) const override;
  void ReadValues(int layer, int first, int n, float* out) const override;
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override;
  bool PerHeadRetain() const override { return true; }
  size_t BytesUsed() const override;
  size_t BytesReserved() const override { return static_cast<size_t>(capacity_) * BytesPerToken(); }
  size_t BytesPerToken() const { return static_cast<size_t>(shape_.n_layer) * 2 * shape_.kv_dim() * elem_bytes(); }

  // Stored row t of layer l, as floats (converted when fp16). dst: [kv_dim]
  void ReadK(int layer, int t, float* dst) const;
  void ReadV(int layer, int t, float* dst) const;

 private:
  size_t elem_bytes() const { return dtype_ == KvDtype::kF16 ? 2 : 4; }
  void OnClear() override { n_.assign(shape_.n_layer, 0); }
  void StoreRows(LazyBuffer& buf, int first, int n, const float* src);
  void ReadRow(const LazyBuffer& buf, int t, float* dst) const;

  void ConvertHead(const LazyBuffer& buf, int64_t g, int T, float* dst) const;  // dst: [T][d]
  void AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool);
  static constexpr int kGemmMinBatch = 8;

  KvDtype dtype_;
  // Per layer: [capacity][kv_dim] elements of dtype_, row s = the s-th stored token (of each head).
  std::vector<LazyBuffer> k_, v_;
  std::vector<int> n_;                         // [n_layer] rows stored
  std::vector<float> scratch_s_;               // [n][T] scores of one head (batched path)
  std::vector<float> scratch_k_, scratch_v_;   // [T][d] one kv head as fp32 (fp16 storage)
};

}  // namespace dk
