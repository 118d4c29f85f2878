// GGUF (versions 2 and 3) reader: memory-mapped, validated before anything is allocated.
// Spec: https://github.com/ggerganov/ggml/blob/master/docs/gguf.md
// Every error message names the file, the field or tensor, what was expected and what was found.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/mapped_file.h"
#include "core/status.h"
#include "model/ggml_types.h"

namespace dk {

enum class GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
const char* GgufTypeName(GgufType t);

// One metadata value. Scalars keep their numeric value in the field matching their kind.
// Arrays are stored compactly (a file of N bytes never costs much more than N bytes of memory):
// scalar elements as their little-endian bytes, strings concatenated with their end offsets,
// nested arrays (allowed by the spec, rare) as one GgufValue each. Read elements with At(k) /
// StringAt(k), or through GgufFile's typed array getters.
struct GgufValue {
  GgufType type = GgufType::kU8;
  GgufType elem_type = GgufType::kU8;  // arrays only
  uint64_t u = 0;   // kU8..kU64, kBool (0/1)
  int64_t i = 0;    // kI8..kI64
  double f = 0.0;   // kF32, kF64
  std::string s;    // kString
  // kArray:
  uint64_t count = 0;               // number of elements
  std::vector<uint8_t> bytes;       // scalar elements: count x ElementBytes(elem_type); strings: all
                                    // characters, element k ending at str_ends[k]
  std::vector<uint64_t> str_ends;   // arrays of strings
  std::vector<GgufValue> arr;       // arrays of arrays

  bool is_integer() const;
  bool is_float() const { return type == GgufType::kF32 || type == GgufType::kF64; }
  size_t size() const { return static_cast<size_t>(count); }  // elements of an array
  // Element k (< size()) of an array of scalars or strings, as a scalar value of elem_type.
  // For an array of arrays, use arr[k].
  GgufValue At(size_t k) const;
  // Element k (< size()) of an array of strings.
  std::string_view StringAt(size_t k) const;
  // Heap bytes this value holds (its arrays' storage and strings, nested values included).
  size_t HeapBytes() const;
};

// Bytes one scalar element of type t takes in the file (0 for kString and kArray).
size_t GgufScalarBytes(GgufType t);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne[0] is the fastest-varying (row length), as in ggml
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;        // relative to the start of the data section
  size_t nbytes = 0;
  const uint8_t* data = nullptr;  // points into the mapped file

  int64_t n_elements() const;
  std::string shape_string() const;  // "[256, 4096]"
};

// Caps applied before allocating: a file claiming more is rejected as corrupt.
struct GgufLimits {
  uint64_t max_tensors = 1u << 20;
  uint64_t max_kv = 1u << 20;
  uint64_t max_string_bytes = 1u << 26;   // 64 MiB
  uint64_t max_array_elems = 1u << 26;
  uint64_t max_nested_arrays = 1u << 16;  // arrays inside arrays, over the whole file
  uint32_t max_dims = 4;
  int max_array_depth = 4;
};

class GgufFile {
 public:
  static StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path, const GgufLimits& limits = {});
  // The same parser over `size` bytes in memory (fuzzers, files built in memory): `name` stands for
  // the path in messages and path(). The caller keeps the bytes alive and unchanged while the
  // GgufFile lives (tensor data points into them).
  static StatusOr<std::unique_ptr<GgufFile>> OpenBuffer(const uint8_t* data, size_t size, const std::string& name,
                                                        const GgufLimits& limits = {});

  const std::string& path() const { return file_->path(); }
  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  size_t file_size() const { return file_->size(); }

  // Metadata, in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* Find(const std::string& key) const;
  // Heap bytes held by the metadata (keys and values): proportional to the file's metadata bytes.
  size_t MetadataHeapBytes() const;

  // Typed getters. Missing key -> kNotFound; wrong type or value out of range -> kCorrupt
  // (message names file, key, expected and found type).
  StatusOr<std::string> GetString(const std::string& key) const;
  StatusOr<uint64_t> GetUInt(const std::string& key) const;   // any non-negative integer type
  StatusOr<double> GetFloat(const std::string& key) const;    // f32/f64 (integers accepted)
  StatusOr<bool> GetBool(const std::string& key) const;
  StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;
  StatusOr<std::vector<float>> GetFloatArray(const std::string& key) const;
  StatusOr<std::vector<int32_t>> GetIntArray(const std::string& key) const;
  // Defaults for optional keys (a present key of the wrong type is still an error).
  StatusOr<uint64_t> GetUIntOr(const std::string& key, uint64_t def) const;
  StatusOr<double> GetFloatOr(const std::string& key, double def) const;
  StatusOr<bool> GetBoolOr(const std::string& key, bool def) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(const std::string& name) const;

  // Looks up a tensor and checks its shape (ne order) and that its type is dequantizable.
  // Error example: "m.gguf: tensor 'blk.0.attn_q.weight': expected shape [256, 256], found [256, 128]".
  StatusOr<const GgufTensorInfo*> GetTensor(const std::string& name, const std::vector<int64_t>& dims) const;

  // Converts a tensor to fp32 (any supported type).
  Status ReadAsF32(const GgufTensorInfo& t, float* dst) const;

 private:
  GgufFile() = default;
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;

  friend class GgufParser;
};

}  // namespace dk
