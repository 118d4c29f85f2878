// llama.cpp-style quantized KV caches, "q8_0" and "q4_0": every stored token's key row and value
// row (D = H_kv * d numbers each) in ggml's 32-value blocks (ops/quant.h), so each KV head owns
// d / 32 whole blocks of a row and per-head retention moves whole blocks. With --hadamard each
// head's key and value are rotated by the normalized Walsh-Hadamard transform before quantizing
// (as llama.cpp does for quantized caches), which spreads an outlier channel over the head instead
// of letting it set the scale of its whole block. Layout and bytes: docs/kv_layout.md, section 3.
#include <cstring>
#include <memory>

#include "core/threads.h"
#include "kv/quant_attend.h"
#include "kv/registry.h"
#include "ops/quant.h"

namespace dk {
namespace {

// One block format: its name and the kernels of ops/quant.h that read and write it.
struct Q8Format {
  using Block = BlockQ8_0;
  static constexpr const char* kName = "q8_0";
  static void Quantize(const float* x, Block* y, int64_t n) { QuantizeRowQ8_0(x, y, n); }
  static void Dequantize(const Block* x, float* y, int64_t n) { DequantizeRowQ8_0(x, y, n); }
  static float Dot(const float* q, const Block* x, int n) { return DotQ8_0(q, x, n); }
  static void Axpy(float a, const Block* x, float* y, int n) { AxpyQ8_0(a, x, y, n); }
};

struct Q4Format {
  using Block = BlockQ4_0;
  static constexpr const char* kName = "q4_0";
  static void Quantize(const float* x, Block* y, int64_t n) { QuantizeRowQ4_0(x, y, n); }
  static void Dequantize(const Block* x, float* y, int64_t n) { DequantizeRowQ4_0(x, y, n); }
  static float Dot(const float* q, const Block* x, int n) { return DotQ4_0(q, x, n); }
  static void Axpy(float a, const Block* x, float* y, int n) { AxpyQ4_0(a, x, y, n); }
};

// Per layer, K and V as [capacity][nb] blocks, nb = D / 32: row s holds the s-th stored token of
// every KV head, KV head g in blocks [g * bh, g * bh + bh), bh = d / 32. Stored in the rotated
// basis with --hadamard.
template <typename F>
class QBlockKvCache final : public KvCache {
  using Block = typename F::Block;

 public:
  QBlockKvCache(const KvShape& shape, int capacity, bool hadamard)
      : KvCache(shape, capacity),
        hadamard_(hadamard),
        nb_(shape.kv_dim() / kQuantBlock),
        bh_(shape.head_dim / kQuantBlock),
        n_(shape.n_layer, 0) {
    k_.assign(shape.n_layer, std::vector<Block>(static_cast<size_t>(capacity) * nb_));
    v_.assign(shape.n_layer, std::vector<Block>(static_cast<size_t>(capacity) * nb_));
  }

  std::string name() const override { return std::string(F::kName) + (hadamard_ ? "+hadamard" : ""); }
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override;
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override;
  int Stored(int layer) const override { return n_[layer]; }
  void ReadKeys(int layer, int first, int n, float* out) const override { Read(k_[layer], first, n, out); }
  void ReadValues(int layer, int first, int n, float* out) const override { Read(v_[layer], first, n, out); }
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override;
  bool PerHeadRetain() const override { return true; }
  size_t BytesUsed() const override {
    size_t rows = 0;
    for (int n : n_) rows += static_cast<size_t>(n);
    return rows * RowBytes();
  }
  size_t BytesReserved() const override { return static_cast<size_t>(capacity_) * shape_.n_layer * RowBytes(); }

 private:
  size_t RowBytes() const { return 2 * static_cast<size_t>(nb_) * sizeof(Block); }  // one token's K and V
  void OnClear() override { n_.assign(shape_.n_layer, 0); }
  void Store(std::vector<Block>& buf, int first, int n, const float* src);
  void Read(const std::vector<Block>& buf, int first, int n, float* out) const;
  void AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool);

  bool hadamard_;
  int nb_, bh_;  // blocks per row (D / 32) and per KV head (d / 32)
  std::vector<std::vector<Block>> k_, v_;  // [n_layer][capacity * nb_]
  std::vector<int> n_;                     // [n_layer] rows stored
  std::vector<float> rotated_;             // [n][D] a batch rotated per head (--hadamard)
  QuantGemmScratch gemm_;
};

// Head slices of 32-multiples start on block boundaries, so quantizing whole rows of D values
// gives each head exactly the blocks it would get alone.
template <typename F>
void QBlockKvCache<F>::Store(std::vector<Block>& buf, int first, int n, const float* src) {
  const int64_t D = shape_.kv_dim();
  if (hadamard_) {
    rotated_.assign(src, src + n * D);
    RotateHeads(rotated_.data(), n, D, shape_.n_head_kv, shape_.head_dim);
    src = rotated_.data();
  }
  F::Quantize(src, buf.data() + static_cast<int64_t>(first) * nb_, n * D);
}

template <typename F>
void QBlockKvCache<F>::Read(const std::vector<Block>& buf, int first, int n, float* out) const {
  const int64_t D = shape_.kv_dim();
  F::Dequantize(buf.data() + static_cast<int64_t>(first) * nb_, out, n * D);
  if (hadamard_) RotateHeads(out, n, D, shape_.n_head_kv, shape_.head_dim);  // back to the original basis
}

template <typename F>
void QBlockKvCache<F>::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* /*x*/) {
  Store(k_[layer], n_[layer], plan.n, k);
  Store(v_[layer], n_[layer], plan.n, v);
  n_[layer] += plan.n;
}

// Rows move toward the front (keep[s] >= s), so compacting in place, in order, never overwrites a
// row still to be read. One list: whole rows move; one per head: head g's bh blocks of each row.
template <typename F>
Status QBlockKvCache<F>::Retain(int layer, const std::vector<std::vector<int>>& keep) {
  DK_RETURN_IF_ERROR(CheckRetain(layer, keep));
  const size_t width = keep.size() == 1 ? nb_ : bh_;  // blocks moved per row
  for (size_t g = 0; g < keep.size(); ++g) {
    const size_t col = keep.size() == 1 ? 0 : g * bh_;
    for (std::vector<Block>* buf : {&k_[layer], &v_[layer]})
      for (size_t s = 0; s < keep[g].size(); ++s)
        if (keep[g][s] != static_cast<int>(s))
          std::memmove(buf->data() + s * nb_ + col, buf->data() + static_cast<size_t>(keep[g][s]) * nb_ + col,
                       width * sizeof(Block));
  }
  n_[layer] = static_cast<int>(keep[0].size());
  return Status::Ok();
}

// Decode path: scores and value sums straight from the blocks (ggml's dot and axpy kernels).
template <typename F>
void QBlockKvCache<F>::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  if (plan.n >= kQuantGemmMinBatch) {
    AttendGemm(layer, plan, q, out, pool);
    return;
  }
  const int d = shape_.head_dim;
  const Block* kb = k_[layer].data();
  const Block* vb = v_[layer].data();
  auto score = [&](int g, const float* qs, int t0, int t1, float* s) {
    for (int t = t0; t < t1; ++t) s[t] = F::Dot(qs, kb + static_cast<int64_t>(t) * nb_ + g * bh_, d);
  };
  auto accumulate = [&](int g, const float* p, int t0, int t1, float* acc) {
    for (int t = t0; t < t1; ++t) F::Axpy(p[t], vb + static_cast<int64_t>(t) * nb_ + g * bh_, acc, d);
  };
  AttendDecode(shape_, n_[layer], plan, q, out, hadamard_, pool, kDecodeTile, score, accumulate);
}

// Batched path: each KV head dequantized once to fp32 [T][d] (still rotated), then GEMMs.
template <typename F>
void QBlockKvCache<F>::AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  const int d = shape_.head_dim, T = n_[layer];
  gemm_.k.resize(static_cast<size_t>(T) * d);
  gemm_.v.resize(static_cast<size_t>(T) * d);
  for (int g = 0; g < shape_.n_head_kv; ++g) {
    for (int t = 0; t < T; ++t) {
      const int64_t at = static_cast<int64_t>(t) * nb_ + g * bh_;
      F::Dequantize(k_[layer].data() + at, gemm_.k.data() + static_cast<int64_t>(t) * d, d);
      F::Dequantize(v_[layer].data() + at, gemm_.v.data() + static_cast<int64_t>(t) * d, d);
    }
    AttendKvHeadGemm(shape_, g, plan.n, T, q, hadamard_, out, gemm_, pool);
  }
}

template <typename F>
StatusOr<std::unique_ptr<KvCache>> CreateQBlock(const KvConfig& config, const KvModelInfo& model, int capacity) {
  const int d = model.shape.head_dim;
  if (d <= 0 || d % kQuantBlock != 0)
    return InvalidArgument(std::string(F::kName) + ": head_dim " + std::to_string(d) +
                           " is not a multiple of 32 (each KV head is stored in whole 32-value blocks)");
  bool hadamard = false;
  DK_ASSIGN_OR_RETURN(hadamard, ParseHadamard(config.options, F::kName, d));
  return std::unique_ptr<KvCache>(new QBlockKvCache<F>(model.shape, capacity, hadamard));
}

}  // namespace

const KvMethod& Q8_0KvMethod() {
  static const KvMethod m{"q8_0", "keys and values in ggml q8_0 blocks (8-bit, 34 bytes per 32 values)",
                          {HadamardKvFlag()}, &CreateQBlock<Q8Format>};
  return m;
}

const KvMethod& Q4_0KvMethod() {
  static const KvMethod m{"q4_0", "keys and values in ggml q4_0 blocks (4-bit, 18 bytes per 32 values)",
                          {HadamardKvFlag()}, &CreateQBlock<Q4Format>};
  return m;
}

}  // namespace dk
