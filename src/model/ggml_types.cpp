#include "model/ggml_types.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/fp16.h"
#include "ops/qmatmul.h"
#include "ops/quant.h"

namespace dk {
namespace {

// Block sizes and bytes follow ggml's type_traits table (ggml.c) and block structs (ggml-common.h).
struct TypeEntry {
  uint32_t id;
  GgmlTypeTraits traits;
};

constexpr TypeEntry kTypes[] = {
    {0, {"f32", 1, 4, true}},
    {1, {"f16", 1, 2, true}},
    {2, {"q4_0", 32, 18, true}},    // fp16 d + 16 bytes of nibbles
    {3, {"q4_1", 32, 20, false}},
    {6, {"q5_0", 32, 22, false}},
    {7, {"q5_1", 32, 24, false}},
    {8, {"q8_0", 32, 34, true}},    // fp16 d + 32 int8
    {9, {"q8_1", 32, 36, false}},
    {10, {"q2_K", 256, 84, false}},
    {11, {"q3_K", 256, 110, false}},
    {12, {"q4_K", 256, 144, true}},  // fp16 d, fp16 dmin, 12 bytes scales, 128 bytes qs
    {13, {"q5_K", 256, 176, true}},  // fp16 d, fp16 dmin, 12 bytes scales, qh[32], qs[128]
    {14, {"q6_K", 256, 210, true}},  // ql[128], qh[64], int8 scales[16], fp16 d
    {15, {"q8_K", 256, 292, false}},
    {24, {"i8", 1, 1, false}},
    {25, {"i16", 1, 2, false}},
    {26, {"i32", 1, 4, false}},
    {27, {"i64", 1, 8, false}},
    {28, {"f64", 1, 8, false}},
    {30, {"bf16", 1, 2, true}},
};

// The q8_0 / q4_0 kernels live in ops/quant.h and take typed (2-byte aligned) blocks. A file with
// general.alignment = 1 can put a tensor at an odd address, so such data is copied through an
// aligned buffer a chunk of blocks at a time.
template <typename Block>
void DequantizeBlocks(const uint8_t* src, float* dst, int64_t nblocks,
                      void (*dequantize)(const Block*, float*, int64_t)) {
  if (reinterpret_cast<uintptr_t>(src) % alignof(Block) == 0) {
    dequantize(reinterpret_cast<const Block*>(src), dst, nblocks * kQuantBlock);
    return;
  }
  constexpr int64_t kChunk = 64;
  Block buf[kChunk];
  for (int64_t b = 0; b < nblocks; b += kChunk) {
    const int64_t m = std::min(kChunk, nblocks - b);
    std::memcpy(buf, src + b * static_cast<int64_t>(sizeof(Block)), static_cast<size_t>(m) * sizeof(Block));
    dequantize(buf, dst + b * kQuantBlock, m * kQuantBlock);
  }
}

}  // namespace

const GgmlTypeTraits* GetTypeTraits(uint32_t type_id) {
  for (const TypeEntry& e : kTypes) {
    if (e.id == type_id) return &e.traits;
  }
  return nullptr;
}

std::string TypeName(uint32_t type_id) {
  const GgmlTypeTraits* t = GetTypeTraits(type_id);
  return t != nullptr ? std::string(t->name) : "unknown type " + std::to_string(type_id);
}

bool RowBytes(GgmlType type, int64_t n, size_t* bytes) {
  const GgmlTypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
  if (t == nullptr || n < 0 || n % t->block_size != 0) return false;
  const auto blocks = static_cast<uint64_t>(n / t->block_size);
  uint64_t total = 0;
  if (__builtin_mul_overflow(blocks, static_cast<uint64_t>(t->block_bytes), &total)) return false;
  if (total > SIZE_MAX) return false;
  *bytes = static_cast<size_t>(total);
  return true;
}

Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const GgmlTypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
  const uint32_t id = static_cast<uint32_t>(type);
  if (t == nullptr || !t->dequantizable) {
    return Unimplemented("cannot convert " + TypeName(id) +
                         " to f32 (supported: f32, f16, bf16, q8_0, q4_0, q4_K, q5_K, q6_K)");
  }
  if (n < 0 || n % t->block_size != 0) {
    return InvalidArgument("DequantizeRow: " + std::to_string(n) + " elements is not a whole number of " +
                           t->name + " blocks of " + std::to_string(t->block_size));
  }
  const auto* p = static_cast<const uint8_t*>(src);
  const int64_t nblocks = n / t->block_size;
  switch (type) {
    case GgmlType::kF32:
      if (n > 0) std::memcpy(dst, p, static_cast<size_t>(n) * sizeof(float));
      break;
    case GgmlType::kF16:
      if (reinterpret_cast<uintptr_t>(p) % alignof(uint16_t) == 0) {
        Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(p), dst, n);
      } else {  // a file with general.alignment = 1 can misalign the data
        for (int64_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(LoadU16(p + 2 * i));
      }
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFp32(LoadU16(p + 2 * i));
      break;
    case GgmlType::kQ8_0: DequantizeBlocks<BlockQ8_0>(p, dst, nblocks, DequantizeRowQ8_0); break;
    case GgmlType::kQ4_0: DequantizeBlocks<BlockQ4_0>(p, dst, nblocks, DequantizeRowQ4_0); break;
    case GgmlType::kQ4_K: DequantizeRowQ4_K(p, dst, n); break;
    case GgmlType::kQ5_K: DequantizeRowQ5_K(p, dst, n); break;
    case GgmlType::kQ6_K: DequantizeRowQ6_K(p, dst, n); break;
    default: return Internal("DequantizeRow: no kernel for " + TypeName(id));
  }
  return Status::Ok();
}

namespace {

// fp16 and bf16 are NaN or infinite when every exponent bit is set.
bool Fp16NonFinite(uint16_t h) { return (h & 0x7C00u) == 0x7C00u; }
bool Bf16NonFinite(uint16_t h) { return (h & 0x7F80u) == 0x7F80u; }
const char* NanOrInf(bool nan, bool negative) { return nan ? "nan" : (negative ? "-inf" : "inf"); }

Status NonFiniteElement(int64_t i, bool nan, bool negative) {
  return Corrupt(std::string("element ") + std::to_string(i) + " is " + NanOrInf(nan, negative) +
                 " (the weights must be finite)");
}

Status NonFiniteScale(const char* type, int64_t block, int64_t block_size, const char* which, uint16_t h) {
  const bool nan = (h & 0x3FFu) != 0;
  return Corrupt(std::string(type) + " block " + std::to_string(block) + " (elements " +
                 std::to_string(block * block_size) + ".." + std::to_string((block + 1) * block_size - 1) +
                 "): scale " + which + " is " + NanOrInf(nan, (h & 0x8000u) != 0) + " (the weights must be finite)");
}

// Index of the first F32 value whose exponent bits are all set, or -1. Chunks are scanned without
// branches (vectorized), the chunk that holds one is then searched.
int64_t FirstNonFiniteF32(const uint8_t* p, int64_t n) {
  constexpr int64_t kChunk = 1024;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    uint32_t any = 0;
    for (int64_t i = 0; i < m; ++i) {
      uint32_t bits;
      std::memcpy(&bits, p + 4 * (c + i), 4);
      any |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
    }
    if (any == 0) continue;
    for (int64_t i = 0; i < m; ++i) {
      uint32_t bits;
      std::memcpy(&bits, p + 4 * (c + i), 4);
      if ((bits & 0x7F800000u) == 0x7F800000u) return c + i;
    }
  }
  return -1;
}

}  // namespace

Status CheckFinite(GgmlType type, const void* src, int64_t n) {
  const GgmlTypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
  if (t == nullptr || !t->dequantizable) {
    return Unimplemented("cannot check " + TypeName(static_cast<uint32_t>(type)) +
                         " values (supported: f32, f16, bf16, q8_0, q4_0, q4_K, q5_K, q6_K)");
  }
  if (n < 0 || n % t->block_size != 0) {
    return InvalidArgument("CheckFinite: " + std::to_string(n) + " elements is not a whole number of " + t->name +
                           " blocks of " + std::to_string(t->block_size));
  }
  const auto* p = static_cast<const uint8_t*>(src);
  const int64_t nblocks = n / t->block_size;
  switch (type) {
    case GgmlType::kF32: {
      const int64_t i = FirstNonFiniteF32(p, n);
      if (i < 0) return Status::Ok();
      float x;
      std::memcpy(&x, p + 4 * i, 4);
      return NonFiniteElement(i, std::isnan(x), x < 0);
    }
    case GgmlType::kF16:
    case GgmlType::kBF16: {
      const bool f16 = type == GgmlType::kF16;
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = LoadU16(p + 2 * i);
        if (f16 ? Fp16NonFinite(h) : Bf16NonFinite(h))
          return NonFiniteElement(i, (h & (f16 ? 0x3FFu : 0x7Fu)) != 0, (h & 0x8000u) != 0);
      }
      return Status::Ok();
    }
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < nblocks; ++b) {
        const uint16_t d = LoadU16(p + b * static_cast<int64_t>(t->block_bytes));
        if (Fp16NonFinite(d)) return NonFiniteScale(t->name, b, t->block_size, "d", d);
      }
      return Status::Ok();
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
      for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* blk = p + b * static_cast<int64_t>(t->block_bytes);
        const uint16_t d = LoadU16(blk), dmin = LoadU16(blk + 2);
        if (Fp16NonFinite(d)) return NonFiniteScale(t->name, b, t->block_size, "d", d);
        if (Fp16NonFinite(dmin)) return NonFiniteScale(t->name, b, t->block_size, "dmin", dmin);
      }
      return Status::Ok();
    case GgmlType::kQ6_K:
      for (int64_t b = 0; b < nblocks; ++b) {
        const uint16_t d = LoadU16(p + b * static_cast<int64_t>(t->block_bytes) + 208);
        if (Fp16NonFinite(d)) return NonFiniteScale(t->name, b, t->block_size, "d", d);
      }
      return Status::Ok();
    default:
      return Internal(std::string("CheckFinite: no check for ") + t->name);
  }
}

}  // namespace dk
