// libFuzzer target for the GGUF reader: GgufFile::OpenBuffer on arbitrary bytes. A rejected input
// must come back as kCorrupt naming the file; an accepted one is walked the way the engine uses
// it (every metadata key through every typed getter, the tokenizer built from it, every tensor
// looked up, checked against the buffer and, when dequantizable, read as fp32), and the reader's
// promises are checked: tensors inside the buffer, aligned and not overlapping.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_check.h"
#include "model/ggml_types.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace {

using namespace dk;

constexpr char kName[] = "fuzz.gguf";
constexpr int64_t kMaxReadElements = int64_t{1} << 20;

bool NamesFile(const Status& st) { return st.message().find(kName) != std::string::npos; }

// A getter on a present key may fail only as a type or range error that names the file and key.
void CheckGetterError(const Status& st, const std::string& key, const char* getter) {
  if (st.ok()) return;
  FUZZ_CHECK(st.code() == Code::kCorrupt, std::string(getter) + "('" + key + "'): " + st.ToString());
  FUZZ_CHECK(NamesFile(st), std::string(getter) + ": message lacks the file name: " + st.ToString());
}

void CheckGetters(const GgufFile& f, const std::string& key, const GgufValue& v) {
  FUZZ_CHECK(f.Find(key) == &v, "Find('" + key + "') does not return the metadata entry");
  const bool is_number = v.is_integer() || v.is_float();

  auto s = f.GetString(key);
  FUZZ_CHECK(s.ok() == (v.type == GgufType::kString), "GetString('" + key + "') on " + GgufTypeName(v.type));
  CheckGetterError(s.status(), key, "GetString");
  auto u = f.GetUInt(key);
  FUZZ_CHECK(!u.ok() || v.is_integer(), "GetUInt('" + key + "') accepted " + GgufTypeName(v.type));
  CheckGetterError(u.status(), key, "GetUInt");
  auto d = f.GetFloat(key);
  FUZZ_CHECK(d.ok() == is_number, "GetFloat('" + key + "') on " + GgufTypeName(v.type));
  CheckGetterError(d.status(), key, "GetFloat");
  auto b = f.GetBool(key);
  FUZZ_CHECK(b.ok() == (v.type == GgufType::kBool), "GetBool('" + key + "') on " + GgufTypeName(v.type));
  CheckGetterError(b.status(), key, "GetBool");

  auto sa = f.GetStringArray(key);
  FUZZ_CHECK(!sa.ok() || v.type == GgufType::kArray, "GetStringArray('" + key + "') accepted a scalar");
  CheckGetterError(sa.status(), key, "GetStringArray");
  auto fa = f.GetFloatArray(key);
  FUZZ_CHECK(!fa.ok() || v.type == GgufType::kArray, "GetFloatArray('" + key + "') accepted a scalar");
  CheckGetterError(fa.status(), key, "GetFloatArray");
  auto ia = f.GetIntArray(key);
  FUZZ_CHECK(!ia.ok() || v.type == GgufType::kArray, "GetIntArray('" + key + "') accepted a scalar");
  CheckGetterError(ia.status(), key, "GetIntArray");
  if (sa.ok() && fa.ok()) FUZZ_CHECK(false, "'" + key + "' read both as strings and as numbers");

  // The *Or getters on a present key are the plain getters.
  auto uo = f.GetUIntOr(key, 7);
  FUZZ_CHECK(uo.ok() == u.ok() && (!u.ok() || *uo == *u), "GetUIntOr('" + key + "') differs from GetUInt");
  auto fo = f.GetFloatOr(key, 7.0);
  FUZZ_CHECK(fo.ok() == d.ok(), "GetFloatOr('" + key + "') differs from GetFloat");
  auto bo = f.GetBoolOr(key, true);
  FUZZ_CHECK(bo.ok() == b.ok() && (!b.ok() || *bo == *b), "GetBoolOr('" + key + "') differs from GetBool");
}

// What the engine does with the metadata after opening a model: build its tokenizer and use it.
void CheckTokenizer(const GgufFile& f) {
  auto tok = Tokenizer::FromGguf(f);
  if (!tok.ok()) {
    FUZZ_CHECK(tok.status().code() != Code::kInternal && !tok.status().message().empty(), tok.status().ToString());
    return;
  }
  const Tokenizer& t = **tok;
  const int32_t n = t.vocab_size();
  FUZZ_CHECK(n > 0, "tokenizer with an empty vocabulary");
  for (const bool special : {false, true}) {
    const std::vector<int32_t> ids = t.Encode("Hello, world! \xc3\xa9\xe2\x96\x81 12 <s>\xff", special);
    for (const int32_t id : ids) FUZZ_CHECK(id >= 0 && id < n, "Encode gave id " + std::to_string(id));
    (void)t.Decode(ids);
  }
  for (int32_t id = -1; id <= std::min(n, 4096); ++id) {
    (void)t.TokenToPiece(id);
    (void)t.IsEog(id);
  }
}

void CheckTensors(const GgufFile& f, const uint8_t* data, size_t size) {
  std::vector<const GgufTensorInfo*> by_start;
  for (const GgufTensorInfo& t : f.tensors()) {
    const std::string ctx = "tensor '" + t.name + "': ";
    FUZZ_CHECK(f.FindTensor(t.name) == &t, ctx + "FindTensor does not return it");
    FUZZ_CHECK(!t.dims.empty() && t.nbytes > 0, ctx + "empty shape or size");
    FUZZ_CHECK(t.data != nullptr && t.data >= data && t.nbytes <= size &&
                   static_cast<size_t>(t.data - data) <= size - t.nbytes,
               ctx + "data outside the buffer");
    FUZZ_CHECK(static_cast<size_t>(t.data - data) % f.alignment() == 0, ctx + "data not aligned");
    size_t expect = 0;
    FUZZ_CHECK(RowBytes(t.type, t.n_elements(), &expect) && expect == t.nbytes,
               ctx + "nbytes " + std::to_string(t.nbytes) + " disagrees with shape " + t.shape_string());
    by_start.push_back(&t);

    // Lookups with the wrong shape are refused; with the right one only an undequantizable type is.
    auto wrong = f.GetTensor(t.name, {});
    FUZZ_CHECK(!wrong.ok() && wrong.status().code() == Code::kCorrupt, ctx + "GetTensor with shape [] accepted");
    auto got = f.GetTensor(t.name, t.dims);
    if (!got.ok()) {
      FUZZ_CHECK(got.status().code() == Code::kUnimplemented, ctx + got.status().ToString());
      continue;
    }
    FUZZ_CHECK(*got == &t, ctx + "GetTensor returned another tensor");
    if (t.n_elements() <= kMaxReadElements) {
      std::vector<float> out(static_cast<size_t>(t.n_elements()));
      const Status st = f.ReadAsF32(t, out.data());
      FUZZ_CHECK(st.ok(), ctx + "ReadAsF32 failed on an accepted tensor: " + st.ToString());
      // A tensor info that does not point into the file is refused, not read.
      GgufTensorInfo forged = t;
      forged.data = nullptr;
      FUZZ_CHECK(f.ReadAsF32(forged, out.data()).code() == Code::kInvalidArgument, ctx + "forged info was read");
    }
  }
  std::sort(by_start.begin(), by_start.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->data < b->data; });
  for (size_t k = 1; k < by_start.size(); ++k) {
    FUZZ_CHECK(by_start[k - 1]->data + by_start[k - 1]->nbytes <= by_start[k]->data,
               "tensors '" + by_start[k - 1]->name + "' and '" + by_start[k]->name + "' overlap");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto opened = GgufFile::OpenBuffer(data, size, kName);
  if (!opened.ok()) {
    FUZZ_CHECK(opened.status().code() == Code::kCorrupt, "rejected with " + opened.status().ToString());
    FUZZ_CHECK(NamesFile(opened.status()), "message lacks the file name: " + opened.status().ToString());
    return 0;
  }
  const GgufFile& f = **opened;
  FUZZ_CHECK(f.version() == 2 || f.version() == 3, "accepted version " + std::to_string(f.version()));
  FUZZ_CHECK(f.alignment() > 0 && (f.alignment() & (f.alignment() - 1)) == 0, "alignment not a power of two");
  FUZZ_CHECK(f.file_size() == size && f.path() == kName, "size or name of the buffer lost");
  for (const auto& [key, value] : f.metadata()) CheckGetters(f, key, value);
  FUZZ_CHECK(f.Find("") == nullptr, "an empty key was accepted");
  CheckTokenizer(f);
  CheckTensors(f, data, size);
  return 0;
}
