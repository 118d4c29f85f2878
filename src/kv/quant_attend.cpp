#include "kv/quant_attend.h"

#include <cblas.h>

#include "ops/ops.h"

namespace dk {

StatusOr<bool> ParseHadamard(const KvOptions& options, const std::string& method, int head_dim) {
  const std::string value = options.String("--hadamard", "0");
  if (value != "0" && value != "1") return InvalidArgument("--hadamard: a switch (1 or 0), found '" + value + "'");
  if (value == "0") return false;
  if (head_dim <= 0 || (head_dim & (head_dim - 1)) != 0)
    return InvalidArgument("--hadamard: " + method + " rotates each KV head by a Walsh-Hadamard transform, which needs "
                           "a power-of-two head_dim, found " + std::to_string(head_dim));
  return true;
}

KvFlag HadamardKvFlag() {
  return {"--hadamard", "", "q8_0, q4_0, kivi: rotate each KV head by a Walsh-Hadamard transform before quantizing"};
}

void RotateHeads(float* x, int64_t n, int64_t stride, int n_heads, int d) {
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < n_heads; ++g) FwhtInPlace(x + i * stride + static_cast<int64_t>(g) * d, d);
}

void AttendKvHeadGemm(const KvShape& shape, int g, int n, int T, const float* q, bool rotate, float* out,
                      QuantGemmScratch& scratch, ThreadPool& pool) {
  const int d = shape.head_dim, Hq = shape.n_head, group = Hq / shape.n_head_kv, before = T - n;
  const int64_t ld = static_cast<int64_t>(Hq) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  scratch.s.resize(static_cast<size_t>(n) * T);
  if (rotate) scratch.q.resize(static_cast<size_t>(n) * d);
  for (int h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * d;
    int64_t ldq = ld;
    if (rotate) {
      for (int i = 0; i < n; ++i)
        std::copy(qh + i * ld, qh + i * ld + d, scratch.q.data() + static_cast<int64_t>(i) * d);
      RotateHeads(scratch.q.data(), n, d, 1, d);
      qh = scratch.q.data();
      ldq = d;
    }
    float* S = scratch.s.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, T, d, scale, qh, ldq, scratch.k.data(), d, 0.0f, S, T);
    pool.ParallelForChunked(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float* row = S + i * T;
        const int visible = before + static_cast<int>(i) + 1;
        Softmax(row, visible);
        std::fill(row + visible, row + T, 0.0f);
      }
    });
    float* oh = out + static_cast<int64_t>(h) * d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, T, 1.0f, S, T, scratch.v.data(), d, 0.0f, oh, ld);
    if (rotate) RotateHeads(oh, n, ld, 1, d);
  }
}

}  // namespace dk
