// Weight matrices used as stored (F32, F16, BF16 and ggml's q8_0, q4_0, q4_K, q5_K, q6_K blocks):
// the block decoders, dot products of a stored row with an fp32 vector, and the matrix product
// of the forward pass. The data usually lies in the model file's memory mapping; nothing is
// converted at load.
//
// Which kernel runs (MatMulWT below; measurements and reasons in docs/architecture.md, Weights as
// stored):
//   q8_0, q4_0, q4_K, q5_K, q6_K, n <= 8 (ActMode::kQ8, the default): activations quantized to 8
//                             bits and integer dot products on the blocks (ops/qdot.h: AVX-512 VNNI,
//                             AVX2, or the scalar reference, chosen at run time), as llama.cpp does;
//   F32 (n = 1), F16, BF16 (n <= 4), and the quantized types under ActMode::kF32: one fp32 dot
//                             product per (token, row) on the stored values (DotWeights: AVX2+FMA+F16C
//                             when the CPU has them, else the scalar reference);
//   larger n:                 F32: OpenBLAS sgemm on blocks of 64 rows; other types: tiles of rows
//                             dequantized into fp32 scratch, then sgemm per tile.
// Output rows (dot products) and row blocks / tiles (sgemm) are the thread pool's tasks, sized by
// the shape only, so the result has the same bits at any thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/fp16.h"

namespace dk {

class ThreadPool;

enum class WeightType : uint8_t { kF32, kF16, kBF16, kQ8_0, kQ4_0, kQ4_K, kQ5_K, kQ6_K };

const char* WeightTypeName(WeightType t);
int64_t WeightBlockSize(WeightType t);   // values per block: 1 (F32, F16, BF16), 32, or 256
size_t WeightBlockBytes(WeightType t);   // bytes per block: 4, 2, 2, 34, 18, 144, 176, 210

// A [rows][cols] matrix stored row after row in `type` (cols a whole number of blocks). `data`
// needs no alignment (a GGUF file with general.alignment = 1 can misalign it).
struct WeightMatrix {
  WeightType type = WeightType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;

  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
  size_t bytes() const { return static_cast<size_t>(rows) * row_bytes; }
};
WeightMatrix MakeWeightMatrix(WeightType type, const void* data, int64_t rows, int64_t cols);

// Block fields at any alignment: an fp16 scale, and ggml's get_scale_min_k4 (8 six-bit scales and
// 8 six-bit mins of q4_K / q5_K packed into 12 bytes).
inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline float LoadF16(const uint8_t* p) { return Fp16ToFp32(LoadU16(p)); }
inline void GetScaleMinK4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

// ggml's k-quant decoders, with ggml's float evaluation order (dequantize_row_q4_K / _q5_K / _q6_K):
// n values (a multiple of 256) at `src` (any alignment) to fp32.
//   block_q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
//   block_q5_K (176 bytes): fp16 d, fp16 dmin, 12 bytes scales/mins, qh[32] (5th bits), qs[128];
//   block_q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d.
void DequantizeRowQ4_K(const uint8_t* src, float* dst, int64_t n);
void DequantizeRowQ5_K(const uint8_t* src, float* dst, int64_t n);
void DequantizeRowQ6_K(const uint8_t* src, float* dst, int64_t n);

// n values (a whole number of blocks) of a stored row to fp32, exactly as ggml dequantizes them.
void DequantizeWeights(WeightType type, const uint8_t* src, float* dst, int64_t n);

// sum_i x[i] * w[i] over n values (a whole number of blocks) of a stored row: the AVX2 kernel
// when the CPU supports AVX2, FMA and F16C (checked once, at run time), else scalar::DotWeights.
float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n);
// True when DotWeights runs the AVX2 kernels.
bool DotWeightsUsesAvx2();

// How products with q8_0 / q4_0 / q4_K / q5_K / q6_K weights treat the activations:
//   kQ8   quantized to 8-bit blocks, integer dot products (ops/qdot.h), as llama.cpp does (default);
//   kF32  kept in fp32, weights decoded to fp32 on the fly (DotWeights; dequantized tiles + sgemm
//         above DotMaxRows rows): the product with the stored weights up to float rounding.
// The default can be set with DYNAKV_ACTS=f32|q8 in the environment.
enum class ActMode : uint8_t { kQ8, kF32 };
ActMode GetActMode();
void SetActMode(ActMode m);

// y[n][w.rows] = x[n][w.cols] * W^T (accumulate: y +=). pool (may be null) splits the rows of the
// dot-product path; OpenBLAS threads itself.
void MatMulWT(const float* x, const WeightMatrix& w, float* y, int n, bool accumulate, ThreadPool* pool);

// Largest n that MatMulWT runs as dot products (above: sgemm on F32 weights, dequantized tiles +
// sgemm on the others), for a weight type under the current ActMode. The defaults come from
// bench_qmatmul and bench_engine measurements (docs/architecture.md, Weights as stored): 8 for the
// 8-bit integer kernels, 4 for the fp32-activation dot products, 1 for F32 weights (OpenBLAS
// sgemm wins from 2 rows on). SetDotMaxRows(n >= 0) sets one limit for every type (tests and
// benchmarks force a path with it; DYNAKV_DOT_MAX_ROWS=n in the environment does the same); -1
// restores the defaults. DotMaxRows() returns what was set.
int DotMaxRowsFor(WeightType type);
int DotMaxRows();
void SetDotMaxRows(int n);

namespace scalar {
// The reference: each block dequantized (DequantizeWeights), then multiplied and summed in order.
float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n);
}  // namespace scalar

namespace avx2 {
// The AVX2 kernels themselves; callable only when DotWeightsUsesAvx2() (tests compare them with the
// reference).
float DotWeights(WeightType type, const uint8_t* w, const float* x, int64_t n);
}  // namespace avx2

}  // namespace dk
