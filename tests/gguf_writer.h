// Test helper: builds GGUF files in memory and writes them to a temporary path.
//
//   dk::test::GgufWriter w;                       // version 3, alignment 32
//   w.Add("general.architecture", dk::test::GgufWriter::Str("llama"))
//    .Add("llama.block_count", dk::test::GgufWriter::U32(2))
//    .Add("tokenizer.ggml.tokens", dk::test::GgufWriter::StrArray({"a", "b"}));
//   w.AddTensorF32("token_embd.weight", {4, 2}, values);   // dims in ggml order: ne[0] first
//   std::string path = w.WriteTemp("model.gguf");           // unique path under /tmp
//
// Every metadata type is supported (u8..f64, bool, string, arrays of any of them, nested arrays).
// For malformed-file tests: AddRawKv writes any value-type id with raw bytes, AddTensorRaw takes any
// tensor type id, an explicit offset and arbitrary data, SetVersion/SetAlignment(.., false) bypass
// checks, and Build() reports where each section starts (GgufLayout) so a test can patch bytes.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/fp16.h"
#include "model/ggml_types.h"
#include "model/gguf.h"

namespace dk::test {

// Byte offsets of each part of a built file (for tests that patch or truncate it).
struct GgufLayout {
  size_t version = 4;             // u32
  size_t tensor_count = 8;        // u64
  size_t kv_count = 16;           // u64
  std::vector<size_t> kv;         // start of each kv (its key's length field)
  size_t kv_end = 0;              // == start of the first tensor info
  std::vector<size_t> tensor_info;  // start of each tensor info (its name's length field)
  size_t tensor_info_end = 0;     // end of the last tensor info (before padding)
  size_t data_start = 0;          // aligned start of the data section
  std::vector<size_t> tensor_data;  // absolute offset of each tensor's data
  size_t file_size = 0;
};

inline void PutLe(std::vector<uint8_t>* out, const void* p, size_t n) {
  // The tests run on little-endian hosts, like the format. (resize + memcpy rather than insert:
  // GCC 12 reports a bogus stringop-overflow for insert of a few bytes at -O2/-O3.)
  const size_t old = out->size();
  out->resize(old + n);
  if (n != 0) std::memcpy(out->data() + old, p, n);
}
template <typename T>
void PutPod(std::vector<uint8_t>* out, T v) { PutLe(out, &v, sizeof v); }
// Overwrites sizeof(T) bytes at `offset` (for patching counts, types, offsets in built files).
template <typename T>
void PatchPod(std::vector<uint8_t>* bytes, size_t offset, T v) { std::memcpy(bytes->data() + offset, &v, sizeof v); }

class GgufWriter {
 public:
  // One metadata value as it will be encoded. Build with the factories below.
  struct Value {
    uint32_t type = 0;            // GgufType id (any u32 for AddRawKv-style corruption)
    std::vector<uint8_t> raw;     // scalar payload, little-endian
    std::string s;                // kString
    uint32_t elem_type = 0;       // kArray
    std::vector<Value> arr;       // kArray elements (for nested arrays each is itself an array)
    uint64_t packed_count = 0;    // PackedArray: element count, the elements' bytes in `raw`
    bool packed = false;
  };

  static Value Scalar(GgufType t, const void* p, size_t n) {
    Value v;
    v.type = static_cast<uint32_t>(t);
    PutLe(&v.raw, p, n);
    return v;
  }
  static Value U8(uint8_t x) { return Scalar(GgufType::kU8, &x, 1); }
  static Value I8(int8_t x) { return Scalar(GgufType::kI8, &x, 1); }
  static Value U16(uint16_t x) { return Scalar(GgufType::kU16, &x, 2); }
  static Value I16(int16_t x) { return Scalar(GgufType::kI16, &x, 2); }
  static Value U32(uint32_t x) { return Scalar(GgufType::kU32, &x, 4); }
  static Value I32(int32_t x) { return Scalar(GgufType::kI32, &x, 4); }
  static Value U64(uint64_t x) { return Scalar(GgufType::kU64, &x, 8); }
  static Value I64(int64_t x) { return Scalar(GgufType::kI64, &x, 8); }
  static Value F32(float x) { return Scalar(GgufType::kF32, &x, 4); }
  static Value F64(double x) { return Scalar(GgufType::kF64, &x, 8); }
  static Value Bool(bool x) {
    const uint8_t b = x ? 1 : 0;
    return Scalar(GgufType::kBool, &b, 1);
  }
  static Value Str(std::string x) {
    Value v;
    v.type = static_cast<uint32_t>(GgufType::kString);
    v.s = std::move(x);
    return v;
  }
  // An array of `elem` values; every element must have type `elem` (nested: elem = kArray).
  static Value Array(GgufType elem, std::vector<Value> elems) {
    Value v;
    v.type = static_cast<uint32_t>(GgufType::kArray);
    v.elem_type = static_cast<uint32_t>(elem);
    v.arr = std::move(elems);
    return v;
  }
  // An array of `count` elements of a scalar type given as their encoded bytes (large arrays
  // without a Value per element).
  static Value PackedArray(GgufType elem, uint64_t count, std::vector<uint8_t> payload) {
    Value v;
    v.type = static_cast<uint32_t>(GgufType::kArray);
    v.elem_type = static_cast<uint32_t>(elem);
    v.packed = true;
    v.packed_count = count;
    v.raw = std::move(payload);
    return v;
  }
  static Value StrArray(const std::vector<std::string>& xs) {
    std::vector<Value> e;
    for (const auto& x : xs) e.push_back(Str(x));
    return Array(GgufType::kString, std::move(e));
  }
  static Value F32Array(const std::vector<float>& xs) {
    std::vector<Value> e;
    for (float x : xs) e.push_back(F32(x));
    return Array(GgufType::kF32, std::move(e));
  }
  static Value I32Array(const std::vector<int32_t>& xs) {
    std::vector<Value> e;
    for (int32_t x : xs) e.push_back(I32(x));
    return Array(GgufType::kI32, std::move(e));
  }
  static Value U32Array(const std::vector<uint32_t>& xs) {
    std::vector<Value> e;
    for (uint32_t x : xs) e.push_back(U32(x));
    return Array(GgufType::kU32, std::move(e));
  }

  explicit GgufWriter(uint32_t version = 3) : version_(version) {}

  GgufWriter& SetVersion(uint32_t v) { version_ = v; return *this; }
  // Sets the data alignment. add_key: also write general.alignment (u32) so readers honour it;
  // pass false to lay the file out with `a` but leave the key out (a corrupt-file test).
  GgufWriter& SetAlignment(uint32_t a, bool add_key = true) {
    alignment_ = a;
    if (add_key) Add("general.alignment", U32(a));
    return *this;
  }

  // Adds a metadata kv (no duplicate check: tests may want duplicates).
  GgufWriter& Add(const std::string& key, Value v) {
    kvs_.emplace_back(key, std::move(v));
    return *this;
  }
  // A kv with any value-type id and raw payload bytes (for unknown-type tests).
  GgufWriter& AddRawKv(const std::string& key, uint32_t type_id, std::vector<uint8_t> payload) {
    Value v;
    v.type = type_id;
    v.raw = std::move(payload);
    return Add(key, std::move(v));
  }

  // A tensor with raw data. dims in ggml order (ne[0] first). offset: relative to the data section;
  // nullopt = next free aligned position. type_id need not be a known ggml type.
  GgufWriter& AddTensorRaw(const std::string& name, std::vector<uint64_t> dims, uint32_t type_id,
                           std::vector<uint8_t> data, std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({name, std::move(dims), type_id, std::move(data), offset});
    return *this;
  }
  GgufWriter& AddTensorF32(const std::string& name, const std::vector<uint64_t>& dims, const std::vector<float>& x) {
    std::vector<uint8_t> d;
    PutLe(&d, x.data(), x.size() * sizeof(float));
    return AddTensorRaw(name, dims, static_cast<uint32_t>(GgmlType::kF32), std::move(d));
  }
  // Stores `x` as fp16 (round to nearest even).
  GgufWriter& AddTensorF16(const std::string& name, const std::vector<uint64_t>& dims, const std::vector<float>& x) {
    std::vector<uint8_t> d;
    for (float f : x) PutPod<uint16_t>(&d, Fp32ToFp16(f));
    return AddTensorRaw(name, dims, static_cast<uint32_t>(GgmlType::kF16), std::move(d));
  }
  // Stores raw 16-bit patterns as F16 or BF16 (exact-bit tests).
  GgufWriter& AddTensorBits16(const std::string& name, const std::vector<uint64_t>& dims, GgmlType type,
                              const std::vector<uint16_t>& bits) {
    std::vector<uint8_t> d;
    PutLe(&d, bits.data(), bits.size() * 2);
    return AddTensorRaw(name, dims, static_cast<uint32_t>(type), std::move(d));
  }
  // Stores `x` as Q8_0 with ggml's reference quantizer (d = amax / 127, q = round(x / d)).
  GgufWriter& AddTensorQ8_0(const std::string& name, const std::vector<uint64_t>& dims, const std::vector<float>& x) {
    return AddTensorRaw(name, dims, static_cast<uint32_t>(GgmlType::kQ8_0), QuantizeQ8_0(x));
  }

  static std::vector<uint8_t> QuantizeQ8_0(const std::vector<float>& x) {
    std::vector<uint8_t> out;
    for (size_t b = 0; b + 32 <= x.size(); b += 32) {
      float amax = 0.0f;
      for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b + j]));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      PutPod<uint16_t>(&out, Fp32ToFp16(d));
      for (size_t j = 0; j < 32; ++j) out.push_back(static_cast<uint8_t>(static_cast<int8_t>(std::roundf(x[b + j] * id))));
    }
    return out;
  }

  // Encodes the whole file. `layout` (optional) receives the offsets of each section.
  std::vector<uint8_t> Build(GgufLayout* layout = nullptr) const {
    GgufLayout lay;
    std::vector<uint8_t> out;
    PutLe(&out, "GGUF", 4);
    PutPod<uint32_t>(&out, version_);
    PutPod<uint64_t>(&out, tensors_.size());
    PutPod<uint64_t>(&out, kvs_.size());
    for (const auto& [key, v] : kvs_) {
      lay.kv.push_back(out.size());
      PutString(&out, key);
      PutPod<uint32_t>(&out, v.type);
      EncodeValue(&out, v);
    }
    lay.kv_end = out.size();
    const std::vector<uint64_t> offsets = TensorOffsets();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      lay.tensor_info.push_back(out.size());
      PutString(&out, t.name);
      PutPod<uint32_t>(&out, static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) PutPod<uint64_t>(&out, d);
      PutPod<uint32_t>(&out, t.type_id);
      PutPod<uint64_t>(&out, offsets[i]);
    }
    lay.tensor_info_end = out.size();
    out.resize(AlignUp(out.size()), 0);
    lay.data_start = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const size_t at = lay.data_start + static_cast<size_t>(offsets[i]);
      if (out.size() < at + tensors_[i].data.size()) out.resize(at + tensors_[i].data.size(), 0);
      if (!tensors_[i].data.empty()) std::memcpy(out.data() + at, tensors_[i].data.data(), tensors_[i].data.size());
      lay.tensor_data.push_back(at);
    }
    if (!tensors_.empty()) out.resize(AlignUp(out.size()), 0);  // trailing padding, as ggml writes
    lay.file_size = out.size();
    if (layout != nullptr) *layout = lay;
    return out;
  }

  // Writes `bytes` to `path` (plain write: tests rewrite files thousands of times); false on failure.
  static bool WriteBytes(const std::string& path, const std::vector<uint8_t>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return static_cast<bool>(out.flush());
  }
  // A unique path under the system temp folder ending in `name`.
  static std::string TempPath(const std::string& name) {
    static std::atomic<int> counter{0};
    const auto dir = std::filesystem::temp_directory_path();
    return (dir / ("dk_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" + name)).string();
  }
  // Builds, writes to TempPath(name) and returns the path ("" on failure).
  std::string WriteTemp(const std::string& name, GgufLayout* layout = nullptr) const {
    const std::string path = TempPath(name);
    return WriteBytes(path, Build(layout)) ? path : "";
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type_id;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;
  };

  size_t AlignUp(size_t n) const { return alignment_ == 0 ? n : (n + alignment_ - 1) / alignment_ * alignment_; }

  std::vector<uint64_t> TensorOffsets() const {
    std::vector<uint64_t> offs;
    uint64_t next = 0;
    for (const Tensor& t : tensors_) {
      offs.push_back(t.offset.value_or(next));
      next = std::max<uint64_t>(next, AlignUp(static_cast<size_t>(offs.back() + t.data.size())));
    }
    return offs;
  }

  static void PutString(std::vector<uint8_t>* out, const std::string& s) {
    PutPod<uint64_t>(out, s.size());
    PutLe(out, s.data(), s.size());
  }

  // Payload only (the type id is written by the caller: kv or array header).
  static void EncodeValue(std::vector<uint8_t>* out, const Value& v) {
    if (v.type == static_cast<uint32_t>(GgufType::kString)) {
      PutString(out, v.s);
    } else if (v.type == static_cast<uint32_t>(GgufType::kArray) && v.packed) {
      PutPod<uint32_t>(out, v.elem_type);
      PutPod<uint64_t>(out, v.packed_count);
      PutLe(out, v.raw.data(), v.raw.size());
    } else if (v.type == static_cast<uint32_t>(GgufType::kArray)) {
      PutPod<uint32_t>(out, v.elem_type);
      PutPod<uint64_t>(out, v.arr.size());
      for (const Value& e : v.arr) {
        EncodeValue(out, e);  // nested arrays: each element writes its own {type, length, elems}
      }
    } else {
      out->insert(out->end(), v.raw.begin(), v.raw.end());
    }
  }

  uint32_t version_;
  size_t alignment_ = 32;
  std::vector<std::pair<std::string, Value>> kvs_;
  std::vector<Tensor> tensors_;
};

}  // namespace dk::test
