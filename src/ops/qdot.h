// Quantized activations and integer dot products, as llama.cpp computes products with quantized
// weights: each row of activations is quantized to 8-bit blocks (q8_0 style, 32 values and one
// scale, for q8_0 / q4_0 weights; q8_K style, 256 values, one scale and sums of 16, for the
// k-quants), then each stored weight block is multiplied with its activation block in integers and
// the block's integer sum scaled once.
//
// Kernels, chosen once at run time from what the CPU has (or forced, DYNAKV_ISA below):
//   avx512vnni  256-bit AVX-512VL VNNI (vpdpbusd: 4 u8 x s8 products summed into int32 in one op);
//   avx2        the same kernels with vpmaddubsw + vpmaddwd;
//   scalar      the reference: plain integer loops per block, in the same blocks and scales.
// Each kernel multiplies one stored weight row with 1 to 4 activation rows at once (the weights are
// unpacked once per block for all of them: the prefill kernel), and is exact in integers within a
// block, so kernels differ from the reference only in the order the block sums are added in float.
//
// Value ranges that keep the u8 x s8 products exact (no int16 saturation in vpmaddubsw, which sums
// two products): activations are within [-127, 127] (both quantizers scale the largest |x| to 127);
// the unsigned operand is a 4-, 5- or 6-bit code, or |q| <= 128 of a q8_0 weight (with the sign moved
// onto the activation), so a pair sums to at most 2 * 128 * 127 < 32767.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ops/qmatmul.h"

namespace dk {

enum class ActFormat : uint8_t {
  kQ8_0,  // blocks of 32: scale d = fp16(amax / 127) (as ggml's block_q8_0 stores it), sums of 32
  kQ8_K,  // blocks of 256: scale d = max / -127 where |max| = amax (ggml's q8_K), sums of 16
};
int64_t ActBlockSize(ActFormat f);  // 32 or 256
int64_t ActSumSize(ActFormat f);    // values per sum: 32 or 16

// Whether products with `type` quantize the activations (q8_0, q4_0, q4_K, q5_K, q6_K), and to what.
bool UsesQuantizedActs(WeightType type);
ActFormat ActFormatFor(WeightType type);

// One row of quantized activations: q[n], d[n / block], sums[n / sum size] (the sums of q).
struct ActRow {
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const int16_t* sums = nullptr;
};

// Quantizes n values (a whole number of blocks) of x; rounding to nearest, ties to even, as
// ggml's x86 quantizers do.
void QuantizeActRow(ActFormat f, const float* x, int64_t n, int8_t* q, float* d, int16_t* sums);

// Several rows, each quantized in place of the last call's (buffers are reused).
class QuantizedActs {
 public:
  // rows x cols values of x, row after row (cols a whole number of ActBlockSize(f)).
  void Quantize(ActFormat f, const float* x, int64_t rows, int64_t cols);
  // The same in two steps, so that rows can be quantized in parallel: Prepare sizes the buffers,
  // then QuantizeRow(i, x_i) for each row i < rows (distinct rows from distinct threads).
  void Prepare(ActFormat f, int64_t rows, int64_t cols);
  void QuantizeRow(int64_t i, const float* x);
  ActRow row(int64_t i) const;
  ActFormat format() const { return format_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  ActFormat format_ = ActFormat::kQ8_0;
  int64_t rows_ = 0, cols_ = 0;
  std::vector<int8_t> q_;
  std::vector<float> d_;
  std::vector<int16_t> sums_;
};

// The instruction sets the kernels come in, best last.
enum class QdotIsa : uint8_t { kScalar, kAvx2, kAvx512Vnni };
const char* QdotIsaName(QdotIsa isa);
// What this CPU runs (checked once); DYNAKV_ISA=scalar|avx2 in the environment caps it, for
// measurements and for comparing kernels on one machine.
QdotIsa BestQdotIsa();
bool CpuHasQdotIsa(QdotIsa isa);
// The kernel DotQ8Rows (and so MatMulWT) runs: BestQdotIsa() unless set (for benchmarks); a set
// value the CPU lacks falls back to the best below it.
QdotIsa ActiveQdotIsa();
void SetQdotIsa(QdotIsa isa);

// out[j] = sum_i w[i] * a[j][i] over n values (a whole number of blocks) of one stored row of
// `type` (UsesQuantizedActs(type); any alignment) and nr (1..4) activation rows quantized in
// ActFormatFor(type), by the kernel for `isa` (CpuHasQdotIsa(isa) must hold).
void DotQ8Rows(QdotIsa isa, WeightType type, const uint8_t* w, const ActRow* a, int nr, int64_t n, float* out);
// The same with ActiveQdotIsa().
void DotQ8Rows(WeightType type, const uint8_t* w, const ActRow* a, int nr, int64_t n, float* out);

}  // namespace dk
