// ggml tensor element types as stored in GGUF files, their block layout, and dequantization.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"

namespace dk {

// Values are ggml's on-disk type ids.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
};

struct GgmlTypeTraits {
  const char* name;      // "f32", "q8_0", ...
  int64_t block_size;    // elements per block (1 for plain types)
  size_t block_bytes;    // bytes per block
  bool dequantizable;    // DequantizeRow supports it
};

// Traits of a known type id; nullptr for an id ggml does not define (or we do not know).
const GgmlTypeTraits* GetTypeTraits(uint32_t type_id);
std::string TypeName(uint32_t type_id);

// Bytes taken by `n` elements of `type` (n must be a multiple of the block size).
// Returns false on overflow or when n is not a whole number of blocks.
bool RowBytes(GgmlType type, int64_t n, size_t* bytes);

// Converts `n` elements (a whole number of blocks) at `src` to fp32.
// Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (the k-quants as ggml's dequantize_row_*).
Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

// Looks for NaN or infinity in `n` elements (a whole number of blocks) of `type` at `src`, without
// converting them: every value of F32, F16 and BF16; the fp16 scales of quantized blocks (q8_0 and
// q4_0: d; q4_K and q5_K: d and dmin; q6_K: d), since finite scales give finite values. kCorrupt naming the first
// element or block found and what it holds; Unimplemented for the types DequantizeRow refuses.
Status CheckFinite(GgmlType type, const void* src, int64_t n);

}  // namespace dk
