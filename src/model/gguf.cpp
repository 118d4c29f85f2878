#include "model/gguf.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <numeric>

namespace dk {

const char* GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kU8: return "u8";
    case GgufType::kI8: return "i8";
    case GgufType::kU16: return "u16";
    case GgufType::kI16: return "i16";
    case GgufType::kU32: return "u32";
    case GgufType::kI32: return "i32";
    case GgufType::kF32: return "f32";
    case GgufType::kBool: return "bool";
    case GgufType::kString: return "string";
    case GgufType::kArray: return "array";
    case GgufType::kU64: return "u64";
    case GgufType::kI64: return "i64";
    case GgufType::kF64: return "f64";
  }
  return "unknown";
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kU16: case GgufType::kI16:
    case GgufType::kU32: case GgufType::kI32: case GgufType::kU64: case GgufType::kI64:
      return true;
    default:
      return false;
  }
}

size_t GgufScalarBytes(GgufType t) {
  switch (t) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kBool: return 1;
    case GgufType::kU16: case GgufType::kI16: return 2;
    case GgufType::kU32: case GgufType::kI32: case GgufType::kF32: return 4;
    case GgufType::kU64: case GgufType::kI64: case GgufType::kF64: return 8;
    case GgufType::kString: case GgufType::kArray: return 0;
  }
  return 0;
}

namespace {

// Decodes one little-endian scalar of type t at p into v (v->type = t).
void DecodeScalar(GgufType t, const uint8_t* p, GgufValue* v) {
  v->type = t;
  auto get = [p](auto x) {
    std::memcpy(&x, p, sizeof x);
    return x;
  };
  switch (t) {
    case GgufType::kU8: case GgufType::kBool: v->u = get(uint8_t{}); break;
    case GgufType::kI8: v->i = get(int8_t{}); break;
    case GgufType::kU16: v->u = get(uint16_t{}); break;
    case GgufType::kI16: v->i = get(int16_t{}); break;
    case GgufType::kU32: v->u = get(uint32_t{}); break;
    case GgufType::kI32: v->i = get(int32_t{}); break;
    case GgufType::kU64: v->u = get(uint64_t{}); break;
    case GgufType::kI64: v->i = get(int64_t{}); break;
    case GgufType::kF32: v->f = get(float{}); break;
    case GgufType::kF64: v->f = get(double{}); break;
    case GgufType::kString: case GgufType::kArray: break;
  }
}

}  // namespace

GgufValue GgufValue::At(size_t k) const {
  GgufValue e;
  e.type = elem_type;
  if (type != GgufType::kArray || k >= size()) return e;
  if (elem_type == GgufType::kString) {
    e.s = std::string(StringAt(k));
  } else if (elem_type != GgufType::kArray) {
    DecodeScalar(elem_type, bytes.data() + k * GgufScalarBytes(elem_type), &e);
  }
  return e;
}

std::string_view GgufValue::StringAt(size_t k) const {
  if (type != GgufType::kArray || elem_type != GgufType::kString || k >= str_ends.size()) return {};
  const uint64_t begin = k == 0 ? 0 : str_ends[k - 1];
  return std::string_view(reinterpret_cast<const char*>(bytes.data()) + begin,
                          static_cast<size_t>(str_ends[k] - begin));
}

size_t GgufValue::HeapBytes() const {
  size_t n = (s.capacity() > 15 ? s.capacity() + 1 : 0) + bytes.capacity() + str_ends.capacity() * sizeof(uint64_t) +
             arr.capacity() * sizeof(GgufValue);
  for (const GgufValue& e : arr) n += e.HeapBytes();
  return n;
}

int64_t GgufTensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // the parser rejected products that overflow
  return n;
}

std::string GgufTensorInfo::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

namespace {

bool IsSignedType(GgufType t) {
  return t == GgufType::kI8 || t == GgufType::kI16 || t == GgufType::kI32 || t == GgufType::kI64;
}

// Fewest bytes one element of type `t` can occupy in the file (used to bound counts).
uint64_t MinEncodedBytes(GgufType t) {
  switch (t) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kBool: return 1;
    case GgufType::kU16: case GgufType::kI16: return 2;
    case GgufType::kU32: case GgufType::kI32: case GgufType::kF32: return 4;
    case GgufType::kString: return 8;        // u64 length
    case GgufType::kArray: return 4 + 8;     // element type + length
    default: return 8;
  }
}

std::string DescribeType(const GgufValue& v) {
  if (v.type != GgufType::kArray) return GgufTypeName(v.type);
  return std::string("array of ") + GgufTypeName(v.elem_type);
}

// Keys and tensor names come from the file: escaped for messages (a newline or an escape sequence
// in a name must not reach the terminal raw).
std::string Quote(const std::string& s) { return "'" + Printable(s) + "'"; }

}  // namespace

// Reads a GGUF file through a bounded cursor. Each Read* checks the bytes left before reading,
// so no count or length from the file is trusted before it is compared with the file size.
// Low-level messages carry no file name; Parse() prefixes it once.
class GgufParser {
 public:
  GgufParser(GgufFile* out, const GgufLimits& limits)
      : out_(out), lim_(limits), base_(out->file_->data()), size_(out->file_->size()) {}

  // Both entry points (a mapped file, a view of caller memory) run this.
  static StatusOr<std::unique_ptr<GgufFile>> Run(std::unique_ptr<MappedFile> file, const GgufLimits& limits) {
    std::unique_ptr<GgufFile> f(new GgufFile());
    f->file_ = std::move(file);
    GgufParser parser(f.get(), limits);
    DK_RETURN_IF_ERROR(parser.Parse());
    return f;
  }

  Status Parse() {
    Status st = ParseAll();
    return st.WithContext(out_->path());
  }

 private:
  Status ParseAll() {
    uint64_t n_tensors = 0, n_kv = 0;
    DK_RETURN_IF_ERROR(ReadHeader(&n_tensors, &n_kv));
    out_->kv_.reserve(n_kv);
    for (uint64_t i = 0; i < n_kv; ++i) DK_RETURN_IF_ERROR(ReadKv(i));
    DK_RETURN_IF_ERROR(ReadAlignment());
    out_->tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) DK_RETURN_IF_ERROR(ReadTensorInfo(i));
    return PlaceTensors();
  }

  uint64_t Left() const { return size_ - pos_; }

  Status Need(uint64_t n, const char* field) const {
    if (n <= Left()) return Status::Ok();
    return Corrupt(std::string(field) + ": needs " + std::to_string(n) + " bytes at offset " +
                   std::to_string(pos_) + " but the file ends at " + std::to_string(size_) +
                   " (truncated?)");
  }

  template <typename T>
  Status ReadPod(const char* field, T* v) {
    DK_RETURN_IF_ERROR(Need(sizeof(T), field));
    std::memcpy(v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::Ok();
  }

  Status ReadString(const char* field, std::string* s) {
    uint64_t len = 0;
    DK_RETURN_IF_ERROR(ReadPod(field, &len));
    if (len > lim_.max_string_bytes) {
      return Corrupt(std::string(field) + ": string length " + std::to_string(len) + " exceeds the cap of " +
                     std::to_string(lim_.max_string_bytes) + " bytes");
    }
    DK_RETURN_IF_ERROR(Need(len, field));
    s->assign(reinterpret_cast<const char*>(base_ + pos_), static_cast<size_t>(len));
    pos_ += len;
    return Status::Ok();
  }

  Status ReadValueType(const char* field, GgufType* t) {
    uint32_t raw = 0;
    DK_RETURN_IF_ERROR(ReadPod(field, &raw));
    if (raw > static_cast<uint32_t>(GgufType::kF64)) {
      return Corrupt(std::string(field) + ": unknown value type " + std::to_string(raw) + " (expected 0..12)");
    }
    *t = static_cast<GgufType>(raw);
    return Status::Ok();
  }

  Status ReadHeader(uint64_t* n_tensors, uint64_t* n_kv) {
    if (size_ < 4) return Corrupt("file is " + std::to_string(size_) + " bytes, too small for a GGUF header");
    if (std::memcmp(base_, "GGUF", 4) != 0) {
      char found[64];
      std::snprintf(found, sizeof found, "%02x %02x %02x %02x", base_[0], base_[1], base_[2], base_[3]);
      return Corrupt(std::string("magic: expected 'GGUF' (47 47 55 46), found ") + found + " (not a GGUF file)");
    }
    pos_ = 4;
    DK_RETURN_IF_ERROR(ReadPod("version", &out_->version_));
    DK_RETURN_IF_ERROR(CheckVersion(out_->version_));
    DK_RETURN_IF_ERROR(ReadPod("tensor count", n_tensors));
    DK_RETURN_IF_ERROR(ReadPod("metadata kv count", n_kv));
    // A tensor info takes at least 8 (name length) + 4 + 8 + 4 + 8 = 32 bytes; a kv at least 8 + 1 + 4 + 1.
    DK_RETURN_IF_ERROR(CheckCount("tensor count", *n_tensors, lim_.max_tensors, 32));
    return CheckCount("metadata kv count", *n_kv, lim_.max_kv, 14);
  }

  Status CheckVersion(uint32_t v) const {
    if (v == 2 || v == 3) return Status::Ok();
    if (v == 1) {
      return Corrupt("version: GGUF version 1 is not supported (expected 2 or 3); re-convert the model "
                     "with a current llama.cpp");
    }
    std::string msg = "version: expected 2 or 3, found " + std::to_string(v);
    if (__builtin_bswap32(v) == 2 || __builtin_bswap32(v) == 3) msg += " (a big-endian file? only little-endian is supported)";
    return Corrupt(msg);
  }

  Status CheckCount(const char* field, uint64_t n, uint64_t cap, uint64_t min_bytes_each) const {
    if (n > cap) {
      return Corrupt(std::string(field) + ": " + std::to_string(n) + " exceeds the cap of " + std::to_string(cap));
    }
    if (n > Left() / min_bytes_each) {
      return Corrupt(std::string(field) + ": " + std::to_string(n) + " entries need at least " +
                     std::to_string(min_bytes_each) + " bytes each, but only " + std::to_string(Left()) +
                     " bytes remain in the file (" + std::to_string(size_) + " bytes)");
    }
    return Status::Ok();
  }

  Status ReadKv(uint64_t index) {
    std::string key;
    const std::string where = "metadata kv #" + std::to_string(index);
    DK_RETURN_IF_ERROR(ReadString("key", &key).WithContext(where));
    if (key.empty()) return Corrupt(where + ": empty key");
    const std::string ctx = "key " + Quote(key);
    if (out_->kv_index_.count(key) != 0) {
      return Corrupt(ctx + ": duplicate key (first defined as metadata kv #" +
                     std::to_string(out_->kv_index_.at(key)) + ", again as #" + std::to_string(index) + ")");
    }
    GgufValue value;
    DK_RETURN_IF_ERROR(ReadValueType("value type", &value.type).WithContext(ctx));
    DK_RETURN_IF_ERROR(ReadValue(value.type, 0, &value).WithContext(ctx));
    out_->kv_index_.emplace(key, out_->kv_.size());
    out_->kv_.emplace_back(std::move(key), std::move(value));
    return Status::Ok();
  }

  template <typename Raw, typename Dst>
  Status ReadScalar(Dst* dst) {
    Raw raw{};
    DK_RETURN_IF_ERROR(ReadPod("value", &raw));
    *dst = static_cast<Dst>(raw);
    return Status::Ok();
  }

  Status ReadValue(GgufType type, int depth, GgufValue* v) {
    v->type = type;
    switch (type) {
      case GgufType::kU8: return ReadScalar<uint8_t>(&v->u);
      case GgufType::kI8: return ReadScalar<int8_t>(&v->i);
      case GgufType::kU16: return ReadScalar<uint16_t>(&v->u);
      case GgufType::kI16: return ReadScalar<int16_t>(&v->i);
      case GgufType::kU32: return ReadScalar<uint32_t>(&v->u);
      case GgufType::kI32: return ReadScalar<int32_t>(&v->i);
      case GgufType::kU64: return ReadScalar<uint64_t>(&v->u);
      case GgufType::kI64: return ReadScalar<int64_t>(&v->i);
      case GgufType::kF32: return ReadScalar<float>(&v->f);
      case GgufType::kF64: return ReadScalar<double>(&v->f);
      case GgufType::kBool: return ReadBool(v);
      case GgufType::kString: return ReadString("string value", &v->s);
      case GgufType::kArray: return ReadArray(depth + 1, v);
    }
    return Internal("unhandled value type");
  }

  Status ReadBool(GgufValue* v) {
    uint8_t b = 0;
    DK_RETURN_IF_ERROR(ReadPod("bool value", &b));
    if (b > 1) return Corrupt("bool value: expected 0 or 1, found " + std::to_string(b));
    v->u = b;
    return Status::Ok();
  }

  Status ReadArray(int depth, GgufValue* v) {
    if (depth > lim_.max_array_depth) {
      return Corrupt("arrays nested " + std::to_string(depth) + " deep, more than the cap of " +
                     std::to_string(lim_.max_array_depth));
    }
    uint64_t n = 0;
    DK_RETURN_IF_ERROR(ReadValueType("array element type", &v->elem_type));
    DK_RETURN_IF_ERROR(ReadPod("array length", &n));
    if (n > lim_.max_array_elems) {
      return Corrupt("array length " + std::to_string(n) + " exceeds the cap of " +
                     std::to_string(lim_.max_array_elems));
    }
    const uint64_t min_each = MinEncodedBytes(v->elem_type);
    if (n > Left() / min_each) {
      return Corrupt("array of " + std::to_string(n) + " " + GgufTypeName(v->elem_type) + " needs at least " +
                     std::to_string(n) + " x " + std::to_string(min_each) + " bytes at offset " +
                     std::to_string(pos_) + " but the file ends at " + std::to_string(size_));
    }
    v->count = n;
    if (v->elem_type == GgufType::kString) return ReadStringElements(n, v);
    if (v->elem_type == GgufType::kArray) return ReadNestedArrays(depth, n, v);
    return ReadScalarElements(n, v);
  }

  // Scalars: their bytes as they are in the file (n x size, checked against the file above).
  Status ReadScalarElements(uint64_t n, GgufValue* v) {
    const size_t nbytes = static_cast<size_t>(n) * GgufScalarBytes(v->elem_type);
    v->bytes.assign(base_ + pos_, base_ + pos_ + nbytes);
    if (v->elem_type == GgufType::kBool) {
      for (size_t k = 0; k < nbytes; ++k) {
        if (v->bytes[k] > 1) {
          return Corrupt("element " + std::to_string(k) + ": bool value: expected 0 or 1, found " +
                         std::to_string(v->bytes[k]));
        }
      }
    }
    pos_ += nbytes;
    return Status::Ok();
  }

  // Strings: characters concatenated, one end offset each (at most the file's bytes in all). A
  // first pass checks every length and sums them, so the characters are allocated once, exactly.
  Status ReadStringElements(uint64_t n, GgufValue* v) {
    const uint64_t start = pos_;
    uint64_t total = 0;
    for (uint64_t k = 0; k < n; ++k) {
      uint64_t len = 0;
      Status st = ReadPod("string value", &len);
      if (st.ok() && len > lim_.max_string_bytes) {
        st = Corrupt("string value: string length " + std::to_string(len) + " exceeds the cap of " +
                     std::to_string(lim_.max_string_bytes) + " bytes");
      }
      if (st.ok()) st = Need(len, "string value");
      if (!st.ok()) return st.WithContext("element " + std::to_string(k));
      pos_ += len;
      total += len;  // at most the file size
    }
    pos_ = start;
    v->bytes.resize(static_cast<size_t>(total));
    v->str_ends.resize(static_cast<size_t>(n));
    uint64_t at = 0;
    for (uint64_t k = 0; k < n; ++k) {
      uint64_t len = 0;
      std::memcpy(&len, base_ + pos_, sizeof len);
      pos_ += sizeof len;
      if (len > 0) std::memcpy(v->bytes.data() + at, base_ + pos_, static_cast<size_t>(len));
      pos_ += len;
      at += len;
      v->str_ends[static_cast<size_t>(k)] = at;
    }
    return Status::Ok();
  }

  // An element of an array of arrays is itself {element type, length, elements}. Each costs a
  // GgufValue, so their number over the file is capped.
  Status ReadNestedArrays(int depth, uint64_t n, GgufValue* v) {
    if (n > lim_.max_nested_arrays - nested_arrays_) {
      return Corrupt("array of " + std::to_string(n) + " arrays: more arrays inside arrays than the cap of " +
                     std::to_string(lim_.max_nested_arrays) + " in a file");
    }
    nested_arrays_ += n;
    v->arr.resize(static_cast<size_t>(n));
    for (uint64_t k = 0; k < n; ++k) {
      GgufValue& e = v->arr[static_cast<size_t>(k)];
      e.type = GgufType::kArray;
      Status st = ReadArray(depth + 1, &e);
      if (!st.ok()) return st.WithContext("element " + std::to_string(k));
    }
    return Status::Ok();
  }

  Status ReadAlignment() {
    auto it = out_->kv_index_.find("general.alignment");
    if (it == out_->kv_index_.end()) return Status::Ok();  // default 32
    const GgufValue& v = out_->kv_[it->second].second;
    const bool unsigned_int = v.is_integer() && !IsSignedType(v.type);
    const uint64_t a = unsigned_int ? v.u : (v.is_integer() && v.i > 0 ? static_cast<uint64_t>(v.i) : 0);
    if (!v.is_integer() || a == 0 || (a & (a - 1)) != 0 || a > (1u << 30)) {
      const std::string found = v.is_integer() ? (unsigned_int ? std::to_string(v.u) : std::to_string(v.i))
                                               : DescribeType(v);
      return Corrupt("key 'general.alignment': expected a non-zero power of two (at most 2^30), found " + found);
    }
    out_->alignment_ = static_cast<size_t>(a);
    return Status::Ok();
  }

  Status ReadTensorInfo(uint64_t index) {
    GgufTensorInfo t;
    const std::string where = "tensor #" + std::to_string(index);
    DK_RETURN_IF_ERROR(ReadString("name", &t.name).WithContext(where));
    if (t.name.empty()) return Corrupt(where + ": empty tensor name");
    const std::string ctx = "tensor " + Quote(t.name);
    if (out_->tensor_index_.count(t.name) != 0) {
      return Corrupt(ctx + ": duplicate tensor name (first defined as tensor #" +
                     std::to_string(out_->tensor_index_.at(t.name)) + ", again as #" + std::to_string(index) + ")");
    }
    DK_RETURN_IF_ERROR(ReadShape(&t).WithContext(ctx));
    DK_RETURN_IF_ERROR(ReadTensorType(&t).WithContext(ctx));
    DK_RETURN_IF_ERROR(ReadPod("offset", &t.offset).WithContext(ctx));
    out_->tensor_index_.emplace(t.name, out_->tensors_.size());
    out_->tensors_.push_back(std::move(t));
    return Status::Ok();
  }

  Status ReadShape(GgufTensorInfo* t) {
    uint32_t n_dims = 0;
    DK_RETURN_IF_ERROR(ReadPod("n_dims", &n_dims));
    if (n_dims < 1 || n_dims > lim_.max_dims) {
      return Corrupt("n_dims: expected 1.." + std::to_string(lim_.max_dims) + ", found " + std::to_string(n_dims));
    }
    int64_t product = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = 0;
      DK_RETURN_IF_ERROR(ReadPod("dimension", &dim));
      const std::string which = "dimension " + std::to_string(d);
      if (dim < 1 || dim > static_cast<uint64_t>(INT64_MAX)) {
        return Corrupt(which + ": expected >= 1 (and < 2^63), found " + std::to_string(dim));
      }
      t->dims.push_back(static_cast<int64_t>(dim));
      if (__builtin_mul_overflow(product, static_cast<int64_t>(dim), &product)) {
        return Corrupt("shape " + t->shape_string() + "...: element count overflows 64 bits");
      }
    }
    return Status::Ok();
  }

  Status ReadTensorType(GgufTensorInfo* t) {
    uint32_t id = 0;
    DK_RETURN_IF_ERROR(ReadPod("type", &id));
    const GgmlTypeTraits* tr = GetTypeTraits(id);
    if (tr == nullptr) return Corrupt("type: unknown or unsupported ggml type id " + std::to_string(id));
    t->type = static_cast<GgmlType>(id);
    if (t->dims[0] % tr->block_size != 0) {
      return Corrupt("shape " + t->shape_string() + ": row length " + std::to_string(t->dims[0]) +
                     " is not a multiple of the " + tr->name + " block size " + std::to_string(tr->block_size));
    }
    size_t row_bytes = 0;
    const uint64_t rows = static_cast<uint64_t>(t->n_elements() / t->dims[0]);
    uint64_t total = 0;
    if (!RowBytes(t->type, t->dims[0], &row_bytes) || __builtin_mul_overflow(row_bytes, rows, &total) ||
        total > SIZE_MAX) {
      return Corrupt("shape " + t->shape_string() + " of " + tr->name + ": byte size overflows");
    }
    t->nbytes = static_cast<size_t>(total);
    return Status::Ok();
  }

  std::string Extent(uint64_t start, uint64_t nbytes) const {
    return "data [offset " + std::to_string(start) + ", " + std::to_string(nbytes) + " bytes]";
  }

  Status PlaceTensors() {
    const uint64_t a = out_->alignment_;
    const uint64_t data_start = (pos_ + a - 1) / a * a;  // pos_ <= size_ and a <= 2^30: no overflow
    auto& ts = out_->tensors_;
    if (!ts.empty() && data_start > size_) {
      return Corrupt("data section: starts at aligned offset " + std::to_string(data_start) +
                     ", past the end of the file (" + std::to_string(size_) + " bytes)");
    }
    for (GgufTensorInfo& t : ts) {
      const std::string ctx = "tensor " + Quote(t.name);
      if (t.offset % a != 0) {
        return Corrupt(ctx + ": offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                       std::to_string(a));
      }
      const uint64_t room = size_ - data_start;
      if (t.offset > room || t.nbytes > room - t.offset) {
        const uint64_t start = t.offset > UINT64_MAX - data_start ? t.offset : data_start + t.offset;
        return Corrupt(ctx + ": " + Extent(start, t.nbytes) + " extends past end of file (" +
                       std::to_string(size_) + " bytes)");
      }
      t.data = base_ + data_start + t.offset;
    }
    return CheckNoOverlap();
  }

  Status CheckNoOverlap() const {
    const auto& ts = out_->tensors_;
    std::vector<size_t> order(ts.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return ts[x].offset < ts[y].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
      const GgufTensorInfo& prev = ts[order[k - 1]];
      const GgufTensorInfo& cur = ts[order[k]];
      if (prev.offset + prev.nbytes > cur.offset) {  // both bounded by the file size
        const uint64_t base = static_cast<uint64_t>(prev.data - base_) - prev.offset;
        return Corrupt("tensor " + Quote(cur.name) + ": " + Extent(base + cur.offset, cur.nbytes) +
                       " overlaps tensor " + Quote(prev.name) + " " + Extent(base + prev.offset, prev.nbytes));
      }
    }
    return Status::Ok();
  }

  GgufFile* out_;
  const GgufLimits& lim_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t nested_arrays_ = 0;  // arrays read as elements of arrays so far
};

StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path, const GgufLimits& limits) {
  DK_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  return GgufParser::Run(std::move(file), limits);
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::OpenBuffer(const uint8_t* data, size_t size, const std::string& name,
                                                        const GgufLimits& limits) {
  return GgufParser::Run(MappedFile::View(data, size, name), limits);
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

size_t GgufFile::MetadataHeapBytes() const {
  size_t n = kv_.capacity() * sizeof(kv_[0]);
  for (const auto& [key, value] : kv_) {
    n += (key.capacity() > 15 ? key.capacity() + 1 : 0) + value.HeapBytes();
    n += 64 + (key.capacity() > 15 ? key.capacity() + 1 : 0);  // kv_index_: a tree node and its key
  }
  return n;
}

const GgufTensorInfo* GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

// ---- typed getters ----

namespace {

Status WrongType(const std::string& path, const std::string& key, const char* expected, const GgufValue& v) {
  return Corrupt(path + ": key " + Quote(key) + ": expected " + expected + ", found " + DescribeType(v));
}

// Converts an integer value to uint64 if it is non-negative.
bool AsUInt(const GgufValue& v, uint64_t* out) {
  if (!v.is_integer()) return false;
  if (IsSignedType(v.type)) {
    if (v.i < 0) return false;
    *out = static_cast<uint64_t>(v.i);
  } else {
    *out = v.u;
  }
  return true;
}

bool AsDouble(const GgufValue& v, double* out) {
  if (v.is_float()) *out = v.f;
  else if (v.is_integer()) *out = IsSignedType(v.type) ? static_cast<double>(v.i) : static_cast<double>(v.u);
  else return false;
  return true;
}

std::string IntText(const GgufValue& v) { return IsSignedType(v.type) ? std::to_string(v.i) : std::to_string(v.u); }

StatusOr<const GgufValue*> FindOrNotFound(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return NotFound(f.path() + ": key " + Quote(key) + " not found");
  return v;
}

}  // namespace

StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  if (v->type != GgufType::kString) return WrongType(path(), key, "string", *v);
  return v->s;
}

StatusOr<uint64_t> GgufFile::GetUInt(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  if (!v->is_integer()) return WrongType(path(), key, "an unsigned integer", *v);
  uint64_t u = 0;
  if (!AsUInt(*v, &u)) {
    return Corrupt(path() + ": key " + Quote(key) + ": expected a non-negative integer, found " + IntText(*v));
  }
  return u;
}

StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  double d = 0;
  if (!AsDouble(*v, &d)) return WrongType(path(), key, "a number (f32/f64)", *v);
  return d;
}

StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  if (v->type != GgufType::kBool) return WrongType(path(), key, "bool", *v);
  return v->u != 0;
}

StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString) {
    return WrongType(path(), key, "array of string", *v);
  }
  std::vector<std::string> out;
  out.reserve(v->size());
  for (size_t k = 0; k < v->size(); ++k) out.emplace_back(v->StringAt(k));
  return out;
}

StatusOr<std::vector<float>> GgufFile::GetFloatArray(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  const bool numeric = v->type == GgufType::kArray && v->elem_type != GgufType::kString &&
                       v->elem_type != GgufType::kArray && v->elem_type != GgufType::kBool;
  if (!numeric) return WrongType(path(), key, "array of f32", *v);
  std::vector<float> out;
  out.reserve(v->size());
  for (size_t k = 0; k < v->size(); ++k) {
    double d = 0;
    AsDouble(v->At(k), &d);
    out.push_back(static_cast<float>(d));
  }
  return out;
}

StatusOr<std::vector<int32_t>> GgufFile::GetIntArray(const std::string& key) const {
  DK_ASSIGN_OR_RETURN(const GgufValue* v, FindOrNotFound(*this, key));
  GgufValue probe;
  probe.type = v->elem_type;
  if (v->type != GgufType::kArray || !probe.is_integer()) return WrongType(path(), key, "array of i32", *v);
  std::vector<int32_t> out;
  out.reserve(v->size());
  for (size_t k = 0; k < v->size(); ++k) {
    const GgufValue e = v->At(k);
    const bool fits = IsSignedType(e.type) ? (e.i >= INT32_MIN && e.i <= INT32_MAX) : e.u <= INT32_MAX;
    if (!fits) {
      return Corrupt(path() + ": key " + Quote(key) + ": element " + std::to_string(k) + " = " + IntText(e) +
                     " does not fit in i32");
    }
    out.push_back(IsSignedType(e.type) ? static_cast<int32_t>(e.i) : static_cast<int32_t>(e.u));
  }
  return out;
}

StatusOr<uint64_t> GgufFile::GetUIntOr(const std::string& key, uint64_t def) const {
  return Find(key) == nullptr ? StatusOr<uint64_t>(def) : GetUInt(key);
}

StatusOr<double> GgufFile::GetFloatOr(const std::string& key, double def) const {
  return Find(key) == nullptr ? StatusOr<double>(def) : GetFloat(key);
}

StatusOr<bool> GgufFile::GetBoolOr(const std::string& key, bool def) const {
  return Find(key) == nullptr ? StatusOr<bool>(def) : GetBool(key);
}

// ---- tensors ----

StatusOr<const GgufTensorInfo*> GgufFile::GetTensor(const std::string& name, const std::vector<int64_t>& dims) const {
  const GgufTensorInfo* t = FindTensor(name);
  if (t == nullptr) return NotFound(path() + ": tensor " + Quote(name) + " not found");
  if (t->dims != dims) {
    GgufTensorInfo want;
    want.dims = dims;
    return Corrupt(path() + ": tensor " + Quote(name) + ": expected shape " + want.shape_string() + ", found " +
                   t->shape_string());
  }
  const GgmlTypeTraits* tr = GetTypeTraits(static_cast<uint32_t>(t->type));
  if (tr == nullptr || !tr->dequantizable) {
    return Unimplemented(path() + ": tensor " + Quote(name) + ": type " + TypeName(static_cast<uint32_t>(t->type)) +
                         " is not supported (supported: f32, f16, bf16, q8_0, q4_0, q4_K, q5_K, q6_K)");
  }
  return t;
}

Status GgufFile::ReadAsF32(const GgufTensorInfo& t, float* dst) const {
  const std::string ctx = path() + ": tensor " + Quote(t.name);
  const uint8_t* begin = file_->data();
  size_t expect = 0;
  const int64_t n = t.n_elements();
  if (t.data == nullptr || t.data < begin || t.nbytes > file_->size() ||
      static_cast<size_t>(t.data - begin) > file_->size() - t.nbytes) {
    return InvalidArgument(ctx + ": tensor info does not point into this file");
  }
  if (t.dims.empty() || !RowBytes(t.type, n, &expect) || expect != t.nbytes) {
    return InvalidArgument(ctx + ": tensor info is inconsistent (shape " + t.shape_string() + ", " +
                           std::to_string(t.nbytes) + " bytes)");
  }
  return DequantizeRow(t.type, t.data, dst, n).WithContext(ctx);
}

}  // namespace dk
