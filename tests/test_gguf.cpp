// GGUF reader tests: round trips through tests/gguf_writer.h, the real model files in tests/data,
// and malformed files (truncated, bit-flipped, huge counts, bad offsets...) that must be rejected
// with one clear message and never crash.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "gguf_writer.h"
#include "model/ggml_types.h"
#include "model/gguf.h"

namespace dk {
namespace {

using test::GgufLayout;
using test::GgufWriter;
using test::PatchPod;
using ::testing::HasSubstr;
using W = GgufWriter;

// Writes `bytes` to a fresh temp file, opens it and unlinks it (the mapping outlives the name).
struct Opened {
  std::string path;
  StatusOr<std::unique_ptr<GgufFile>> file;
};
Opened OpenBytes(const std::vector<uint8_t>& bytes, const std::string& name = "t.gguf",
                 const GgufLimits& limits = {}) {
  const std::string path = W::TempPath(name);
  EXPECT_TRUE(W::WriteBytes(path, bytes)) << path;
  Opened o{path, GgufFile::Open(path, limits)};
  std::remove(path.c_str());
  return o;
}

// Opens `bytes`, expects failure with kCorrupt, and returns the message.
std::string ExpectRejected(const std::vector<uint8_t>& bytes, const std::string& name = "bad.gguf") {
  Opened o = OpenBytes(bytes, name);
  EXPECT_FALSE(o.file.ok()) << name << " was accepted";
  if (o.file.ok()) return "";
  EXPECT_EQ(o.file.status().code(), Code::kCorrupt) << o.file.status().ToString();
  EXPECT_THAT(o.file.status().message(), HasSubstr(o.path));
  return o.file.status().message();
}

std::vector<float> ReadF32(const GgufFile& f, const std::string& name) {
  const GgufTensorInfo* t = f.FindTensor(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  std::vector<float> out(static_cast<size_t>(t->n_elements()));
  Status st = f.ReadAsF32(*t, out.data());
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

// ---- scalar references, written from the IEEE / ggml definitions, independent of the library ----

double HalfRef(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 31) return mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -24);  // subnormal: mant * 2^-14 * 2^-10
  return sign * std::ldexp(1024 + mant, exp - 25);
}

double Bf16Ref(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 7) & 0xFF;
  const int mant = h & 0x7F;
  if (exp == 255) return mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -133);  // subnormal: mant * 2^-126 * 2^-7
  return sign * std::ldexp(128 + mant, exp - 134);
}

void ExpectSameFloat(double want, float got, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what;
  } else {
    EXPECT_EQ(static_cast<float>(want), got) << what;  // every fp16/bf16 value is exact in fp32
  }
}

// A random normal fp16 bit pattern with magnitude in [2^-6, 2^2) (keeps products tame).
uint16_t RandomHalfBits(std::mt19937& rng, bool allow_negative = true) {
  std::uniform_int_distribution<int> exp(15 - 6, 15 + 1), mant(0, 1023), sign(0, 1);
  const int s = allow_negative ? sign(rng) : 0;
  return static_cast<uint16_t>((s << 15) | (exp(rng) << 10) | mant(rng));
}

void PutU16(std::vector<uint8_t>* v, uint16_t x) { test::PutPod<uint16_t>(v, x); }

// ---------------------------------------------------------------------------------------------
// Metadata round trips

class GgufMetadataRoundTrip : public ::testing::TestWithParam<uint32_t> {};

TEST_P(GgufMetadataRoundTrip, EveryScalarTypeKeepsItsValue) {
  GgufWriter w(GetParam());
  w.Add("u8", W::U8(200)).Add("i8", W::I8(-100)).Add("u16", W::U16(60000)).Add("i16", W::I16(-30000));
  w.Add("u32", W::U32(4000000000u)).Add("i32", W::I32(-2000000000)).Add("u64", W::U64(1ull << 63));
  w.Add("i64", W::I64(-(1ll << 62))).Add("f32", W::F32(0.1f)).Add("f64", W::F64(-2.5e300));
  w.Add("bool_t", W::Bool(true)).Add("bool_f", W::Bool(false));
  w.Add("str", W::Str("héllo")).Add("empty_str", W::Str(""));
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  const GgufFile& f = *o.file.value();
  EXPECT_EQ(f.version(), GetParam());
  ASSERT_EQ(f.metadata().size(), 14u);
  EXPECT_EQ(f.metadata()[0].first, "u8");  // file order kept
  EXPECT_EQ(f.Find("u8")->type, GgufType::kU8);
  EXPECT_EQ(f.Find("u8")->u, 200u);
  EXPECT_EQ(f.Find("i8")->i, -100);
  EXPECT_EQ(f.Find("u16")->u, 60000u);
  EXPECT_EQ(f.Find("i16")->i, -30000);
  EXPECT_EQ(f.Find("u32")->u, 4000000000u);
  EXPECT_EQ(f.Find("i32")->i, -2000000000);
  EXPECT_EQ(f.Find("u64")->u, 1ull << 63);
  EXPECT_EQ(f.Find("i64")->i, -(1ll << 62));
  EXPECT_EQ(f.Find("f32")->f, static_cast<double>(0.1f));
  EXPECT_EQ(f.Find("f64")->f, -2.5e300);
  EXPECT_EQ(f.Find("f64")->type, GgufType::kF64);
  EXPECT_EQ(f.Find("str")->s, "héllo");
  EXPECT_EQ(f.Find("empty_str")->s, "");
  EXPECT_EQ(f.GetUInt("u64").value(), 1ull << 63);
  EXPECT_EQ(f.GetUInt("u8").value(), 200u);
  EXPECT_DOUBLE_EQ(f.GetFloat("f64").value(), -2.5e300);
  EXPECT_DOUBLE_EQ(f.GetFloat("i32").value(), -2000000000.0);  // integers accepted as floats
  EXPECT_TRUE(f.GetBool("bool_t").value());
  EXPECT_FALSE(f.GetBool("bool_f").value());
  EXPECT_EQ(f.GetString("str").value(), "héllo");
  EXPECT_EQ(f.Find("missing"), nullptr);
  EXPECT_TRUE(f.tensors().empty());
}

TEST_P(GgufMetadataRoundTrip, ArraysOfEveryKindAndNestedArrays) {
  GgufWriter w(GetParam());
  w.Add("strs", W::StrArray({"a", "", "ccc", "<0x0A>"}));
  w.Add("f32s", W::F32Array({1.5f, -2.0f, 3.25f}));
  w.Add("i32s", W::I32Array({-1, 0, 2147483647}));
  w.Add("u8s", W::Array(GgufType::kU8, {W::U8(1), W::U8(255)}));
  w.Add("bools", W::Array(GgufType::kBool, {W::Bool(true), W::Bool(false)}));
  w.Add("f64s", W::Array(GgufType::kF64, {W::F64(1e-300)}));
  w.Add("empty", W::Array(GgufType::kU32, {}));
  w.Add("nested", W::Array(GgufType::kArray, {W::I32Array({1, 2}), W::StrArray({"x"}),
                                              W::Array(GgufType::kArray, {W::U32Array({7})})}));
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  const GgufFile& f = *o.file.value();
  EXPECT_EQ(f.GetStringArray("strs").value(), (std::vector<std::string>{"a", "", "ccc", "<0x0A>"}));
  EXPECT_EQ(f.GetFloatArray("f32s").value(), (std::vector<float>{1.5f, -2.0f, 3.25f}));
  EXPECT_EQ(f.GetIntArray("i32s").value(), (std::vector<int32_t>{-1, 0, 2147483647}));
  EXPECT_EQ(f.GetIntArray("u8s").value(), (std::vector<int32_t>{1, 255}));
  const GgufValue* b = f.Find("bools");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->elem_type, GgufType::kBool);
  ASSERT_EQ(b->size(), 2u);
  EXPECT_EQ(b->At(0).u, 1u);
  EXPECT_EQ(b->At(1).u, 0u);
  EXPECT_EQ(b->At(0).type, GgufType::kBool);
  EXPECT_EQ(f.GetFloatArray("f64s").value()[0], static_cast<float>(1e-300));
  EXPECT_TRUE(f.GetIntArray("empty").value().empty());
  const GgufValue* strs = f.Find("strs");
  ASSERT_NE(strs, nullptr);
  ASSERT_EQ(strs->size(), 4u);
  EXPECT_EQ(strs->StringAt(2), "ccc");
  EXPECT_EQ(strs->At(3).s, "<0x0A>");
  EXPECT_EQ(strs->StringAt(1), "");
  const GgufValue* i32s = f.Find("i32s");
  ASSERT_NE(i32s, nullptr);
  EXPECT_EQ(i32s->At(0).i, -1);
  EXPECT_EQ(i32s->At(2).type, GgufType::kI32);
  const GgufValue* n = f.Find("nested");
  ASSERT_NE(n, nullptr);
  ASSERT_EQ(n->type, GgufType::kArray);
  ASSERT_EQ(n->elem_type, GgufType::kArray);
  ASSERT_EQ(n->size(), 3u);
  ASSERT_EQ(n->arr.size(), 3u);
  EXPECT_EQ(n->arr[0].elem_type, GgufType::kI32);
  ASSERT_EQ(n->arr[0].size(), 2u);
  EXPECT_EQ(n->arr[0].At(1).i, 2);
  EXPECT_EQ(n->arr[1].StringAt(0), "x");
  ASSERT_EQ(n->arr[2].arr.size(), 1u);
  EXPECT_EQ(n->arr[2].arr[0].elem_type, GgufType::kU32);
  EXPECT_EQ(n->arr[2].arr[0].At(0).u, 7u);
}

INSTANTIATE_TEST_SUITE_P(Versions2And3, GgufMetadataRoundTrip, ::testing::Values(2u, 3u),
                         ::testing::PrintToStringParamName());

// Resident memory of this process that is not backed by a file (the heap, not the mapping).
int64_t AnonResidentBytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0, shared = 0;
  in >> size >> resident >> shared;
  return (resident - shared) * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
}

// A large array costs about its bytes in the file, not a GgufValue per element (once 88 bytes each:
// 1.4 GB for this 16 MB array).
TEST(GgufMetadataMemory, LargeArraysCostAboutTheirBytesInTheFile) {
  constexpr uint64_t kN = uint64_t{1} << 24;
  constexpr uint64_t kStrings = uint64_t{1} << 20;
  std::string path;
  {
    std::vector<uint8_t> payload(kN);
    for (uint64_t k = 0; k < kN; ++k) payload[k] = static_cast<uint8_t>(k * 31);
    std::vector<uint8_t> strs;  // 1M strings "a", "bb", "a", ...
    for (uint64_t k = 0; k < kStrings; ++k) {
      test::PutPod<uint64_t>(&strs, 1 + k % 2);
      strs.insert(strs.end(), 1 + k % 2, static_cast<uint8_t>('a' + k % 2));
    }
    GgufWriter w;
    w.Add("general.architecture", W::Str("llama"));
    w.Add("big", W::PackedArray(GgufType::kU8, kN, std::move(payload)));
    w.Add("many_strings", W::PackedArray(GgufType::kString, kStrings, std::move(strs)));
    w.Add("after", W::U32(7));
    path = w.WriteTemp("big-array.gguf");
    ASSERT_FALSE(path.empty());
  }
  const int64_t before = AnonResidentBytes();
  auto f = GgufFile::Open(path);
  const int64_t after = AnonResidentBytes();
  const int64_t file_bytes = static_cast<int64_t>(std::filesystem::file_size(path));
  std::remove(path.c_str());
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const GgufValue* big = f.value()->Find("big");
  ASSERT_NE(big, nullptr);
  ASSERT_EQ(big->size(), kN);
  EXPECT_EQ(big->At(12345).u, static_cast<uint8_t>(12345 * 31));
  EXPECT_EQ(big->At(kN - 1).u, static_cast<uint8_t>((kN - 1) * 31));
  const GgufValue* strings = f.value()->Find("many_strings");
  ASSERT_NE(strings, nullptr);
  ASSERT_EQ(strings->size(), kStrings);
  EXPECT_EQ(strings->StringAt(0), "a");
  EXPECT_EQ(strings->StringAt(kStrings - 1), "bb");
  EXPECT_EQ(f.value()->GetUInt("after").value(), 7u);
  EXPECT_EQ(f.value()->GetIntArray("big").value()[77], static_cast<uint8_t>(77 * 31));
  // What the parsed metadata holds, and what the process grew by: both under twice the file.
  EXPECT_LT(f.value()->MetadataHeapBytes(), static_cast<size_t>(2 * file_bytes));
  EXPECT_LT(after - before, 2 * file_bytes) << "heap grew by " << (after - before) << " bytes for a file of "
                                            << file_bytes;
}

TEST(GgufMalformed, ArraysOfArraysAreCappedOverTheFile) {
  GgufWriter w;
  w.Add("a", W::Array(GgufType::kArray, {W::I32Array({1}), W::I32Array({2})}));
  w.Add("b", W::Array(GgufType::kArray, {W::I32Array({3})}));
  GgufLimits lim;
  lim.max_nested_arrays = 3;
  EXPECT_TRUE(OpenBytes(w.Build(), "nested.gguf", lim).file.ok());
  lim.max_nested_arrays = 2;
  Opened o = OpenBytes(w.Build(), "nested.gguf", lim);
  ASSERT_FALSE(o.file.ok());
  EXPECT_THAT(o.file.status().message(), HasSubstr("key 'b'"));
  EXPECT_THAT(o.file.status().message(), HasSubstr("cap of 2"));
}

TEST(GgufTypedGetters, WrongTypeMissingKeyAndRangeErrorsNameFileAndKey) {
  GgufWriter w;
  w.Add("name", W::Str("x")).Add("neg", W::I32(-3)).Add("count", W::U32(5)).Add("flag", W::Bool(true));
  w.Add("big", W::U32Array({1, 3000000000u})).Add("strs", W::StrArray({"a"}));
  Opened o = OpenBytes(w.Build(), "getters.gguf");
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  const GgufFile& f = *o.file.value();

  auto s = f.GetUInt("name");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kCorrupt);
  EXPECT_THAT(s.status().message(), HasSubstr(o.path));
  EXPECT_THAT(s.status().message(), HasSubstr("'name'"));
  EXPECT_THAT(s.status().message(), HasSubstr("found string"));

  auto neg = f.GetUInt("neg");
  ASSERT_FALSE(neg.ok());
  EXPECT_THAT(neg.status().message(), HasSubstr("-3"));

  auto missing = f.GetString("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'nope'"));

  EXPECT_EQ(f.GetUIntOr("nope", 42).value(), 42u);
  EXPECT_EQ(f.GetUIntOr("count", 42).value(), 5u);
  EXPECT_DOUBLE_EQ(f.GetFloatOr("nope", 0.5).value(), 0.5);
  EXPECT_TRUE(f.GetBoolOr("nope", true).value());
  EXPECT_FALSE(f.GetBoolOr("name", true).ok());  // present with the wrong type is still an error
  EXPECT_FALSE(f.GetUIntOr("name", 1).ok());
  EXPECT_FALSE(f.GetBool("count").ok());
  EXPECT_FALSE(f.GetString("count").ok());
  EXPECT_FALSE(f.GetFloat("name").ok());

  auto big = f.GetIntArray("big");
  ASSERT_FALSE(big.ok());
  EXPECT_THAT(big.status().message(), HasSubstr("3000000000"));
  auto strs = f.GetFloatArray("strs");
  ASSERT_FALSE(strs.ok());
  EXPECT_THAT(strs.status().message(), HasSubstr("array of string"));
  EXPECT_FALSE(f.GetStringArray("name").ok());
  EXPECT_FALSE(f.GetStringArray("big").ok());
}

// ---------------------------------------------------------------------------------------------
// Tensors

TEST(GgufTensors, CustomAlignmentIsHonouredForDataStartAndOffsets) {
  for (uint32_t align : {1u, 8u, 64u, 4096u}) {
    GgufWriter w;
    w.SetAlignment(align).Add("pad", W::Str("abc"));
    w.AddTensorF32("a", {3}, {1, 2, 3}).AddTensorF32("b", {2, 2}, {4, 5, 6, 7});
    GgufLayout lay;
    Opened o = OpenBytes(w.Build(&lay));
    ASSERT_TRUE(o.file.ok()) << "alignment " << align << ": " << o.file.status().ToString();
    const GgufFile& f = *o.file.value();
    EXPECT_EQ(f.alignment(), align);
    EXPECT_EQ(lay.data_start % align, 0u);
    EXPECT_EQ(f.FindTensor("b")->offset % align, 0u);
    EXPECT_EQ(ReadF32(f, "a"), (std::vector<float>{1, 2, 3}));
    EXPECT_EQ(ReadF32(f, "b"), (std::vector<float>{4, 5, 6, 7}));
  }
}

TEST(GgufTensors, F32RoundTripsExactlyInV2AndV3) {
  for (uint32_t version : {2u, 3u}) {
    std::vector<float> x = {0.0f, -0.0f, 1e-45f, -3.5f, std::numeric_limits<float>::infinity(), 123456.78f};
    GgufWriter w(version);
    w.AddTensorF32("t", {3, 2}, x);
    Opened o = OpenBytes(w.Build());
    ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
    const GgufTensorInfo* t = o.file.value()->FindTensor("t");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dims, (std::vector<int64_t>{3, 2}));
    EXPECT_EQ(t->type, GgmlType::kF32);
    EXPECT_EQ(t->nbytes, 24u);
    EXPECT_EQ(t->shape_string(), "[3, 2]");
    EXPECT_EQ(ReadF32(*o.file.value(), "t"), x);
  }
}

// Every one of the 65536 fp16 and bf16 bit patterns (zeros, subnormals, normals, inf, nan).
TEST(GgufTensors, F16AndBF16ConvertEveryBitPatternExactly) {
  std::vector<uint16_t> bits(65536);
  for (uint32_t i = 0; i < 65536; ++i) bits[i] = static_cast<uint16_t>(i);
  GgufWriter w;
  w.AddTensorBits16("h", {256, 256}, GgmlType::kF16, bits);
  w.AddTensorBits16("b", {65536}, GgmlType::kBF16, bits);
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  const std::vector<float> h = ReadF32(*o.file.value(), "h");
  const std::vector<float> b = ReadF32(*o.file.value(), "b");
  ASSERT_EQ(h.size(), 65536u);
  ASSERT_EQ(b.size(), 65536u);
  for (uint32_t i = 0; i < 65536; ++i) {
    ExpectSameFloat(HalfRef(static_cast<uint16_t>(i)), h[i], "f16 bits " + std::to_string(i));
    ExpectSameFloat(Bf16Ref(static_cast<uint16_t>(i)), b[i], "bf16 bits " + std::to_string(i));
  }
  EXPECT_EQ(h[0x0001], std::ldexp(1.0f, -24));    // smallest subnormal
  EXPECT_EQ(h[0x7C00], std::numeric_limits<float>::infinity());
  EXPECT_EQ(h[0xFC00], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(h[0x8000]));             // -0 keeps its sign
}

// With general.alignment = 1 a tensor's data can sit at an odd address.
TEST(GgufTensors, F16AtOddAddressWithAlignmentOne) {
  auto build = [](uint64_t pad_bytes, GgufLayout* lay) {
    GgufWriter w;
    w.SetAlignment(1);
    w.AddTensorRaw("pad", {pad_bytes}, static_cast<uint32_t>(GgmlType::kI8), std::vector<uint8_t>(pad_bytes));
    w.AddTensorBits16("h", {3}, GgmlType::kF16, {0x3C00, 0x0001, 0xC000});
    return w.Build(lay);
  };
  GgufLayout lay;
  std::vector<uint8_t> bytes = build(1, &lay);
  if (lay.tensor_data[1] % 2 == 0) bytes = build(2, &lay);  // same header size, data shifted by one
  ASSERT_EQ(lay.tensor_data[1] % 2, 1u);
  Opened o = OpenBytes(bytes);
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(o.file.value()->FindTensor("h")->data) % 2, 1u);
  EXPECT_EQ(ReadF32(*o.file.value(), "h"), (std::vector<float>{1.0f, std::ldexp(1.0f, -24), -2.0f}));
}

TEST(GgufTensors, Q8_0MatchesScalarReference) {
  // Block layout (ggml block_q8_0): fp16 d, then 32 int8 quants; value = q * d.
  std::mt19937 rng(1);
  const int kBlocks = 6;
  std::vector<uint8_t> raw;
  std::vector<float> want;
  for (int b = 0; b < kBlocks; ++b) {
    const uint16_t d = b == 0 ? 0 : RandomHalfBits(rng);  // include a zero scale
    PutU16(&raw, d);
    for (int j = 0; j < 32; ++j) {
      const int q = j == 0 ? -128 : (j == 1 ? 127 : static_cast<int>(rng() % 256) - 128);
      raw.push_back(static_cast<uint8_t>(static_cast<int8_t>(q)));
      want.push_back(static_cast<float>(q * HalfRef(d)));  // exact: 8-bit times 11-bit mantissa
    }
  }
  GgufWriter w;
  w.AddTensorRaw("q", {64, 3}, static_cast<uint32_t>(GgmlType::kQ8_0), raw);
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(o.file.value()->FindTensor("q")->nbytes, 6u * 34u);
  EXPECT_EQ(ReadF32(*o.file.value(), "q"), want);
}

TEST(GgufTensors, Q4_0MatchesScalarReference) {
  // Block layout (ggml block_q4_0): fp16 d, 16 bytes; byte j holds element j (low nibble) and
  // element j + 16 (high nibble); value = (q - 8) * d.
  std::mt19937 rng(2);
  const int kBlocks = 4;
  std::vector<uint8_t> raw;
  std::vector<float> want(kBlocks * 32);
  for (int b = 0; b < kBlocks; ++b) {
    const uint16_t d = RandomHalfBits(rng);
    PutU16(&raw, d);
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>(rng() % 16), hi = static_cast<int>(rng() % 16);
      raw.push_back(static_cast<uint8_t>(lo | (hi << 4)));
      want[b * 32 + j] = static_cast<float>((lo - 8) * HalfRef(d));
      want[b * 32 + j + 16] = static_cast<float>((hi - 8) * HalfRef(d));
    }
  }
  GgufWriter w;
  w.AddTensorRaw("q", {128}, static_cast<uint32_t>(GgmlType::kQ4_0), raw);
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(ReadF32(*o.file.value(), "q"), want);
}

// The q8_0 / q4_0 kernels take 2-byte aligned blocks; with general.alignment = 1 the reader copies
// odd-addressed data through an aligned buffer of 64 blocks, so 70 blocks cross a chunk boundary.
TEST(GgufTensors, Q8_0AndQ4_0AtOddAddressWithAlignmentOne) {
  std::mt19937 rng(4);
  const int kBlocks = 70;
  std::vector<uint8_t> q8, q4;
  std::vector<float> want8, want4(kBlocks * 32);
  for (int b = 0; b < kBlocks; ++b) {
    const uint16_t d8 = RandomHalfBits(rng), d4 = RandomHalfBits(rng);
    PutU16(&q8, d8);
    PutU16(&q4, d4);
    for (int j = 0; j < 32; ++j) {
      const int q = static_cast<int>(rng() % 256) - 128;
      q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(q)));
      want8.push_back(static_cast<float>(q * HalfRef(d8)));
    }
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>(rng() % 16), hi = static_cast<int>(rng() % 16);
      q4.push_back(static_cast<uint8_t>(lo | (hi << 4)));
      want4[b * 32 + j] = static_cast<float>((lo - 8) * HalfRef(d4));
      want4[b * 32 + j + 16] = static_cast<float>((hi - 8) * HalfRef(d4));
    }
  }
  auto build = [&](uint64_t pad_bytes, GgufLayout* lay) {
    GgufWriter w;
    w.SetAlignment(1);
    w.AddTensorRaw("pad", {pad_bytes}, static_cast<uint32_t>(GgmlType::kI8), std::vector<uint8_t>(pad_bytes));
    w.AddTensorRaw("q8", {kBlocks * 32}, static_cast<uint32_t>(GgmlType::kQ8_0), q8);  // 70 * 34 bytes: q4 is odd too
    w.AddTensorRaw("q4", {kBlocks * 32}, static_cast<uint32_t>(GgmlType::kQ4_0), q4);
    return w.Build(lay);
  };
  GgufLayout lay;
  std::vector<uint8_t> bytes = build(1, &lay);
  if (lay.tensor_data[1] % 2 == 0) bytes = build(2, &lay);  // same header size, data shifted by one
  ASSERT_EQ(lay.tensor_data[1] % 2, 1u);
  Opened o = OpenBytes(bytes);
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(o.file.value()->FindTensor("q8")->data) % 2, 1u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(o.file.value()->FindTensor("q4")->data) % 2, 1u);
  EXPECT_EQ(ReadF32(*o.file.value(), "q8"), want8);
  EXPECT_EQ(ReadF32(*o.file.value(), "q4"), want4);
}

// Packs 8 six-bit scales and mins into ggml's 12-byte K-quant layout (inverse of get_scale_min_k4):
// bytes 0..3: scale j (low 6) | top 2 bits of scale j+4; bytes 4..7: min j | top 2 bits of min j+4;
// bytes 8..11: low nibble of scale j+4 | low nibble of min j+4 << 4.
std::vector<uint8_t> PackScalesMinsK4(const int sc[8], const int mn[8]) {
  std::vector<uint8_t> q(12);
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
  return q;
}

TEST(GgufTensors, Q4_KMatchesScalarReference) {
  // Super-block (ggml block_q4_K, 144 bytes): fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes qs.
  // Sub-block s (32 elements) has scale sc[s], min m[s]; for group g = 0..3, byte qs[32g + l] holds
  // element 64g + l (low nibble, sub-block 2g) and 64g + 32 + l (high nibble, sub-block 2g+1);
  // value = d * sc * q - dmin * m.
  std::mt19937 rng(3);
  const int kBlocks = 3;
  std::vector<uint8_t> raw;
  std::vector<double> want;
  std::vector<double> tol;
  for (int b = 0; b < kBlocks; ++b) {
    const uint16_t d = RandomHalfBits(rng, false), dmin = RandomHalfBits(rng, false);
    int sc[8], mn[8];
    for (int s = 0; s < 8; ++s) {
      sc[s] = static_cast<int>(rng() % 64);
      mn[s] = static_cast<int>(rng() % 64);
    }
    sc[7] = 63;  // exercise the two high bits of the packed fields
    mn[6] = 48;
    PutU16(&raw, d);
    PutU16(&raw, dmin);
    for (uint8_t x : PackScalesMinsK4(sc, mn)) raw.push_back(x);
    std::vector<int> q(256);
    for (int g = 0; g < 4; ++g) {
      for (int l = 0; l < 32; ++l) {
        const int lo = static_cast<int>(rng() % 16), hi = static_cast<int>(rng() % 16);
        raw.push_back(static_cast<uint8_t>(lo | (hi << 4)));
        q[64 * g + l] = lo;
        q[64 * g + 32 + l] = hi;
      }
    }
    for (int e = 0; e < 256; ++e) {
      const int s = e / 32;
      const double a = HalfRef(d) * sc[s] * q[e], m = HalfRef(dmin) * mn[s];
      want.push_back(a - m);
      // ggml rounds d*sc, dmin*m, the product and the difference to fp32: <= 4 half-ulps of the terms.
      tol.push_back(4 * std::ldexp(std::fabs(a) + std::fabs(m), -24));
    }
  }
  GgufWriter w;
  w.AddTensorRaw("q", {256, 3}, static_cast<uint32_t>(GgmlType::kQ4_K), raw);
  Opened o = OpenBytes(w.Build());
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(o.file.value()->FindTensor("q")->nbytes, 3u * 144u);
  const std::vector<float> got = ReadF32(*o.file.value(), "q");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol[i]) << "element " << i;
}

TEST(GgufTensors, GetTensorChecksShapeAndSupportedType) {
  GgufWriter w;
  w.AddTensorF32("w", {4, 2}, std::vector<float>(8, 1.0f));
  w.AddTensorRaw("q41", {32}, static_cast<uint32_t>(GgmlType::kQ4_1), std::vector<uint8_t>(20));
  Opened o = OpenBytes(w.Build(), "shape.gguf");
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  const GgufFile& f = *o.file.value();
  EXPECT_TRUE(f.GetTensor("w", {4, 2}).ok());
  auto bad = f.GetTensor("w", {2, 4});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr(o.path));
  EXPECT_THAT(bad.status().message(), HasSubstr("tensor 'w': expected shape [2, 4], found [4, 2]"));
  auto rank = f.GetTensor("w", {8});
  ASSERT_FALSE(rank.ok());
  EXPECT_THAT(rank.status().message(), HasSubstr("expected shape [8], found [4, 2]"));
  auto missing = f.GetTensor("nope", {1});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'nope'"));
  auto q41 = f.GetTensor("q41", {32});
  ASSERT_FALSE(q41.ok());
  EXPECT_EQ(q41.status().code(), Code::kUnimplemented);
  EXPECT_THAT(q41.status().message(), HasSubstr("q4_1"));
  std::vector<float> dst(32);
  EXPECT_FALSE(f.ReadAsF32(*f.FindTensor("q41"), dst.data()).ok());
}

// ---------------------------------------------------------------------------------------------
// Real files

const std::string kData = DK_TEST_DATA;

TEST(GgufRealFiles, Stories260KHasExpectedMetadataAndTensors) {
  auto f = GgufFile::Open(kData + "/stories260K.gguf");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const GgufFile& g = *f.value();
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(g.GetString("general.architecture").value(), "llama");
  EXPECT_EQ(g.GetUInt("llama.embedding_length").value(), 64u);
  EXPECT_EQ(g.GetUInt("llama.block_count").value(), 5u);
  EXPECT_EQ(g.GetUInt("llama.attention.head_count").value(), 8u);
  EXPECT_EQ(g.GetUInt("llama.attention.head_count_kv").value(), 4u);
  EXPECT_NEAR(g.GetFloat("llama.attention.layer_norm_rms_epsilon").value(), 1e-5, 1e-12);
  EXPECT_EQ(g.GetStringArray("tokenizer.ggml.tokens").value().size(), 512u);
  EXPECT_EQ(g.GetFloatArray("tokenizer.ggml.scores").value().size(), 512u);
  EXPECT_EQ(g.GetIntArray("tokenizer.ggml.token_type").value().size(), 512u);
  EXPECT_EQ(g.tensors().size(), 48u);
  auto emb = g.GetTensor("token_embd.weight", {64, 512});
  ASSERT_TRUE(emb.ok()) << emb.status().ToString();
  std::vector<float> x(64 * 512);
  ASSERT_TRUE(g.ReadAsF32(*emb.value(), x.data()).ok());
  double sum_sq = 0;
  for (float v : x) sum_sq += static_cast<double>(v) * v;
  EXPECT_TRUE(std::isfinite(sum_sq));
  EXPECT_GT(sum_sq, 0.0);
}

TEST(GgufRealFiles, BrownKjvF16AndF32AgreeWithinFp16Rounding) {
  auto f32 = GgufFile::Open(kData + "/brown-kjv-llama-6M-f32.gguf");
  auto f16 = GgufFile::Open(kData + "/brown-kjv-llama-6M-f16.gguf");
  ASSERT_TRUE(f32.ok()) << f32.status().ToString();
  ASSERT_TRUE(f16.ok()) << f16.status().ToString();
  for (const GgufFile* g : {f32.value().get(), f16.value().get()}) {
    EXPECT_EQ(g->GetUInt("llama.embedding_length").value(), 256u);
    EXPECT_EQ(g->GetUInt("llama.block_count").value(), 6u);
    EXPECT_EQ(g->GetUInt("llama.attention.head_count").value(), 4u);
    EXPECT_EQ(g->GetUInt("llama.attention.head_count_kv").value(), 2u);
    EXPECT_EQ(g->GetUInt("llama.feed_forward_length").value(), 768u);
    EXPECT_TRUE(g->GetBool("tokenizer.ggml.add_bos_token").value());
    EXPECT_EQ(g->tensors().size(), 57u);
  }
  EXPECT_EQ(f16.value()->FindTensor("token_embd.weight")->type, GgmlType::kF16);
  EXPECT_EQ(f32.value()->FindTensor("token_embd.weight")->type, GgmlType::kF32);
  auto k = f16.value()->GetTensor("blk.0.attn_k.weight", {256, 256});
  ASSERT_FALSE(k.ok());
  EXPECT_THAT(k.status().message(),
              HasSubstr("tensor 'blk.0.attn_k.weight': expected shape [256, 256], found [256, 128]"));

  auto a = f32.value()->GetTensor("token_embd.weight", {256, 4096});
  auto b = f16.value()->GetTensor("token_embd.weight", {256, 4096});
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<float> x(256 * 4096), y(256 * 4096);
  ASSERT_TRUE(f32.value()->ReadAsF32(*a.value(), x.data()).ok());
  ASSERT_TRUE(f16.value()->ReadAsF32(*b.value(), y.data()).ok());
  for (size_t i = 0; i < x.size(); ++i) {
    // Round-to-nearest fp16: relative error <= 2^-11 for normals, absolute <= 2^-25 for subnormals.
    const double tol = std::max(std::ldexp(std::fabs(static_cast<double>(x[i])), -11), std::ldexp(1.0, -25));
    ASSERT_NEAR(x[i], y[i], tol) << "element " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed files

// A small valid file whose last tensor ends exactly at the end of the file, so any truncation
// removes something the reader needs.
std::vector<uint8_t> SmallValidFile(GgufLayout* lay = nullptr) {
  GgufWriter w;
  w.Add("general.architecture", W::Str("llama")).Add("llama.block_count", W::U32(1));
  w.Add("tokenizer.ggml.tokens", W::StrArray({"<unk>", "a", "bc"}));
  w.Add("nested", W::Array(GgufType::kArray, {W::F32Array({1.0f}), W::Array(GgufType::kBool, {W::Bool(true)})}));
  w.Add("flag", W::Bool(false)).Add("eps", W::F64(1e-6));
  w.AddTensorQ8_0("q", {32}, std::vector<float>(32, 127.0f / 256));  // d = 2^-8, exact in fp16
  w.AddTensorF32("w", {8, 2}, std::vector<float>(16, 2.0f));  // 64 bytes: ends on the alignment
  return w.Build(lay);
}

TEST(GgufMalformed, SmallValidFileOpensAndEndsAtLastTensor) {
  GgufLayout lay;
  std::vector<uint8_t> bytes = SmallValidFile(&lay);
  EXPECT_EQ(lay.tensor_data.back() + 64, bytes.size());
  Opened o = OpenBytes(bytes);
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  EXPECT_EQ(ReadF32(*o.file.value(), "w"), std::vector<float>(16, 2.0f));
  EXPECT_EQ(ReadF32(*o.file.value(), "q"), std::vector<float>(32, 127.0f / 256));
}

TEST(GgufMalformed, EveryTruncationOfSmallFileIsRejected) {
  const std::vector<uint8_t> bytes = SmallValidFile();
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    std::vector<uint8_t> head(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(cut));
    Opened o = OpenBytes(head, "cut.gguf");
    ASSERT_FALSE(o.file.ok()) << "truncated at " << cut << " of " << bytes.size() << " was accepted";
    EXPECT_THAT(o.file.status().message(), HasSubstr(o.path)) << "cut " << cut;
  }
}

TEST(GgufMalformed, TruncationsOfStories260KAreRejected) {
  auto src = ReadWholeFile(kData + "/stories260K.gguf");
  ASSERT_TRUE(src.ok());
  const std::string& full = src.value();
  const std::string path = W::TempPath("stories_cut.gguf");
  ASSERT_TRUE(W::WriteBytes(path, std::vector<uint8_t>(full.begin(), full.end())));
  // Shrink the same file step by step (truncate is cheap): every 7th byte through the metadata
  // and tensor infos, then a stride through the data section.
  std::vector<size_t> cuts;
  for (size_t c = 0; c < 12000; c += 7) cuts.push_back(c);
  for (size_t c = 12000; c < full.size(); c += 4093) cuts.push_back(c);
  cuts.push_back(full.size() - 1);
  int rejected = 0;
  for (auto it = cuts.rbegin(); it != cuts.rend(); ++it) {
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(*it)), 0);
    auto f = GgufFile::Open(path);
    EXPECT_FALSE(f.ok()) << "truncated at " << *it << " was accepted";
    rejected += f.ok() ? 0 : 1;
  }
  std::remove(path.c_str());
  EXPECT_EQ(rejected, static_cast<int>(cuts.size()));
}

TEST(GgufMalformed, FlippedBytesNeverCrashAndAcceptedFilesStayInBounds) {
  GgufLayout lay;
  const std::vector<uint8_t> bytes = SmallValidFile(&lay);
  const std::string path = W::TempPath("flip.gguf");
  int accepted = 0, rejected = 0;
  for (size_t pos = 0; pos < lay.data_start; ++pos) {
    for (uint8_t mask : {0x01, 0x10, 0x80, 0xFF}) {
      std::vector<uint8_t> b = bytes;
      b[pos] ^= mask;
      ASSERT_TRUE(W::WriteBytes(path, b));
      auto f = GgufFile::Open(path);
      if (!f.ok()) {
        ++rejected;
        EXPECT_THAT(f.status().message(), HasSubstr(path));
        continue;
      }
      ++accepted;
      for (const GgufTensorInfo& t : f.value()->tensors()) {
        EXPECT_LE(t.offset + t.nbytes, f.value()->file_size()) << "flip at " << pos;
        std::vector<float> out(static_cast<size_t>(t.n_elements()));
        (void)f.value()->ReadAsF32(t, out.data());  // ASan checks the reads stay in the mapping
      }
    }
  }
  std::remove(path.c_str());
  // Flips inside key/tensor-name characters or value payloads legitimately still parse.
  EXPECT_GT(rejected, accepted / 2) << "accepted " << accepted << ", rejected " << rejected;
}

TEST(GgufMalformed, HugeTensorAndKvCountsAreRejectedBeforeAllocating) {
  GgufLayout lay;
  std::vector<uint8_t> b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.tensor_count, 1ull << 60);
  EXPECT_THAT(ExpectRejected(b), HasSubstr("tensor count: 1152921504606846976 exceeds the cap"));
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv_count, 1ull << 60);
  EXPECT_THAT(ExpectRejected(b), HasSubstr("metadata kv count"));
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv_count, 100000);  // under the cap but more than the file can hold
  EXPECT_THAT(ExpectRejected(b), HasSubstr("bytes remain"));
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.tensor_count, 3);  // one more tensor info than present
  EXPECT_FALSE(OpenBytes(b).file.ok());
}

TEST(GgufMalformed, HugeStringAndArrayLengthsAreRejected) {
  GgufLayout lay;
  std::vector<uint8_t> b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv[0], 1ull << 63);  // length of the first key
  std::string m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("metadata kv #0"));
  EXPECT_THAT(m, HasSubstr("9223372036854775808"));

  // Value of general.architecture: key length (8) + key (20) + type (4), then the string length.
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv[0] + 8 + 20 + 4, 1ull << 63);
  EXPECT_THAT(ExpectRejected(b), HasSubstr("key 'general.architecture'"));
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv[0] + 8 + 20 + 4, 1000);  // under the cap, past the end of the file
  EXPECT_THAT(ExpectRejected(b), HasSubstr("truncated"));

  // tokenizer.ggml.tokens: key length + 21 bytes + type + element type, then the array length.
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv[2] + 8 + 21 + 4 + 4, 1ull << 62);
  m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("key 'tokenizer.ggml.tokens'"));
  EXPECT_THAT(m, HasSubstr("exceeds the cap"));
  b = SmallValidFile(&lay);
  PatchPod<uint64_t>(&b, lay.kv[2] + 8 + 21 + 4 + 4, 1000000);  // under the cap: the file size bounds it
  m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("key 'tokenizer.ggml.tokens'"));
  EXPECT_THAT(m, HasSubstr("needs at least 1000000 x 8 bytes"));
}

TEST(GgufMalformed, LimitsAreConfigurable) {
  GgufLimits lim;
  lim.max_tensors = 1;
  Opened o = OpenBytes(SmallValidFile(), "lim.gguf", lim);
  ASSERT_FALSE(o.file.ok());
  EXPECT_THAT(o.file.status().message(), HasSubstr("exceeds the cap of 1"));
  lim = GgufLimits();
  lim.max_string_bytes = 4;
  o = OpenBytes(SmallValidFile(), "lim.gguf", lim);
  ASSERT_FALSE(o.file.ok());
  EXPECT_THAT(o.file.status().message(), HasSubstr("cap of 4 bytes"));
}

TEST(GgufMalformed, BadShapesAreRejectedWithTensorName) {
  GgufLayout lay;
  std::vector<uint8_t> b = SmallValidFile(&lay);
  PatchPod<uint32_t>(&b, lay.tensor_info[1] + 8 + 1, 1000);  // n_dims of tensor 'w'
  std::string m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("tensor 'w'"));
  EXPECT_THAT(m, HasSubstr("n_dims: expected 1..4, found 1000"));

  b = SmallValidFile(&lay);
  PatchPod<uint32_t>(&b, lay.tensor_info[1] + 8 + 1, 0);
  EXPECT_THAT(ExpectRejected(b), HasSubstr("found 0"));

  GgufWriter w;
  w.AddTensorRaw("huge", {1ull << 32, 1ull << 32, 2}, 0, std::vector<uint8_t>(32));
  m = ExpectRejected(w.Build());
  EXPECT_THAT(m, HasSubstr("tensor 'huge'"));
  EXPECT_THAT(m, HasSubstr("overflows"));

  GgufWriter w_bytes;  // element count fits in int64, byte count does not
  w_bytes.AddTensorRaw("wide", {1ull << 61, 2}, 0, std::vector<uint8_t>(32));
  EXPECT_THAT(ExpectRejected(w_bytes.Build()), HasSubstr("tensor 'wide'"));

  GgufWriter w_zero;
  w_zero.AddTensorRaw("zero", {4, 0}, 0, {});
  EXPECT_THAT(ExpectRejected(w_zero.Build()), HasSubstr("dimension 1: expected >= 1"));

  GgufWriter w_block;
  w_block.AddTensorRaw("q", {16}, static_cast<uint32_t>(GgmlType::kQ8_0), std::vector<uint8_t>(34));
  EXPECT_THAT(ExpectRejected(w_block.Build()), HasSubstr("row length 16 is not a multiple of the q8_0 block size 32"));
}

TEST(GgufMalformed, BadMagicAndVersionsAreRejected) {
  GgufLayout lay;
  std::vector<uint8_t> b = SmallValidFile(&lay);
  b[0] = 'X';
  EXPECT_THAT(ExpectRejected(b), HasSubstr("magic: expected 'GGUF'"));
  for (uint32_t v : {1u, 99u, 0x03000000u}) {
    b = SmallValidFile(&lay);
    PatchPod<uint32_t>(&b, lay.version, v);
    std::string m = ExpectRejected(b);
    EXPECT_THAT(m, HasSubstr("version"));
    EXPECT_THAT(m, HasSubstr(v == 1 ? "version 1 is not supported" : "expected 2 or 3, found"));
  }
  EXPECT_THAT(ExpectRejected({}), HasSubstr("too small"));
  EXPECT_THAT(ExpectRejected({'G', 'G', 'U', 'F', 3, 0}), HasSubstr("version: needs 4 bytes"));
  auto missing = GgufFile::Open("/nonexistent/dir/m.gguf");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("/nonexistent/dir/m.gguf"));
}

TEST(GgufMalformed, UnknownValueAndTensorTypesAreRejected) {
  GgufWriter w;
  w.Add("ok", W::U8(1)).AddRawKv("x.bad", 13, {0, 0, 0, 0});
  std::string m = ExpectRejected(w.Build());
  EXPECT_THAT(m, HasSubstr("key 'x.bad'"));
  EXPECT_THAT(m, HasSubstr("unknown value type 13"));

  GgufWriter w_elem;
  GgufWriter::Value arr = W::Array(GgufType::kU8, {});
  arr.elem_type = 77;
  w_elem.Add("arr", arr);
  EXPECT_THAT(ExpectRejected(w_elem.Build()), HasSubstr("unknown value type 77"));

  GgufWriter w_bool;
  w_bool.AddRawKv("b", static_cast<uint32_t>(GgufType::kBool), {2});
  EXPECT_THAT(ExpectRejected(w_bool.Build()), HasSubstr("expected 0 or 1, found 2"));

  GgufWriter wt;
  wt.AddTensorRaw("t", {4}, 99, std::vector<uint8_t>(16));
  m = ExpectRejected(wt.Build());
  EXPECT_THAT(m, HasSubstr("tensor 't'"));
  EXPECT_THAT(m, HasSubstr("ggml type id 99"));
}

TEST(GgufMalformed, ArraysNestedTooDeepAreRejected) {
  // Depth 4 (the default cap) parses; depth 5 is rejected.
  GgufWriter::Value v = W::Array(GgufType::kU8, {W::U8(1)});
  for (int depth = 2; depth <= 4; ++depth) v = W::Array(GgufType::kArray, {v});
  GgufWriter ok;
  ok.Add("deep", v);
  EXPECT_TRUE(OpenBytes(ok.Build()).file.ok());
  GgufWriter bad;
  bad.Add("deeper", W::Array(GgufType::kArray, {v}));
  std::string m = ExpectRejected(bad.Build());
  EXPECT_THAT(m, HasSubstr("key 'deeper'"));
  EXPECT_THAT(m, HasSubstr("nested 5 deep"));
}

TEST(GgufMalformed, BadAlignmentValuesAreRejected) {
  for (uint32_t a : {0u, 48u}) {
    GgufWriter w;
    w.Add("general.alignment", W::U32(a));
    std::string m = ExpectRejected(w.Build());
    EXPECT_THAT(m, HasSubstr("general.alignment"));
    EXPECT_THAT(m, HasSubstr("found " + std::to_string(a)));
  }
  GgufWriter w;
  w.Add("general.alignment", W::Str("32"));
  EXPECT_THAT(ExpectRejected(w.Build()), HasSubstr("found string"));
}

TEST(GgufMalformed, BadTensorOffsetsAreRejected) {
  GgufWriter w_mis;
  w_mis.AddTensorF32("a", {4}, {1, 2, 3, 4}).AddTensorF32("b", {4}, {1, 2, 3, 4});
  GgufLayout lay;
  std::vector<uint8_t> b = w_mis.Build(&lay);
  // The offset field is the last 8 bytes of the tensor info: name len + name + n_dims + dims + type.
  const size_t b_offset_field = lay.tensor_info[1] + 8 + 1 + 4 + 8 + 4;
  PatchPod<uint64_t>(&b, b_offset_field, 36);
  std::string m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("tensor 'b': offset 36 is not a multiple of the alignment 32"));

  PatchPod<uint64_t>(&b, b_offset_field, 1024);
  m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("tensor 'b': data [offset " + std::to_string(lay.data_start + 1024) + ", 16 bytes]"));
  EXPECT_THAT(m, HasSubstr("extends past end of file (" + std::to_string(b.size()) + " bytes)"));

  PatchPod<uint64_t>(&b, b_offset_field, ~uint64_t{31});  // offset + size would wrap around
  EXPECT_THAT(ExpectRejected(b), HasSubstr("extends past end of file"));

  PatchPod<uint64_t>(&b, b_offset_field, 0);  // same data as 'a'
  m = ExpectRejected(b);
  EXPECT_THAT(m, HasSubstr("overlaps tensor"));
  EXPECT_THAT(m, HasSubstr("'a'"));
}

TEST(GgufMalformed, DuplicateKeysAndTensorNamesAreRejected) {
  GgufWriter w;
  w.Add("k", W::U8(1)).Add("other", W::U8(2)).Add("k", W::U8(3));
  std::string m = ExpectRejected(w.Build());
  EXPECT_THAT(m, HasSubstr("key 'k': duplicate key"));

  GgufWriter wt;
  wt.AddTensorF32("t", {1}, {1}).AddTensorF32("t", {1}, {2});
  EXPECT_THAT(ExpectRejected(wt.Build()), HasSubstr("tensor 't': duplicate tensor name"));
}

TEST(GgufMalformed, DataSectionPastEndOfFileIsRejected) {
  GgufWriter w;
  w.AddTensorF32("t", {1}, {1});
  GgufLayout lay;
  std::vector<uint8_t> b = w.Build(&lay);
  b.resize(lay.tensor_info_end);  // tensor infos intact, data section gone
  EXPECT_THAT(ExpectRejected(b), HasSubstr("data section"));
}

// ---- the in-memory entry point (the fuzz target fuzz/fuzz_gguf.cpp reads through it) ----

std::string Replaced(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = 0; (at = s.find(from, at)) != std::string::npos; at += to.size()) s.replace(at, from.size(), to);
  return s;
}

TEST(GgufBuffer, OpenBufferReadsWhatOpenReads) {
  GgufLayout lay;
  const std::vector<uint8_t> bytes = SmallValidFile(&lay);
  Opened o = OpenBytes(bytes);
  ASSERT_TRUE(o.file.ok()) << o.file.status().ToString();
  auto m = GgufFile::OpenBuffer(bytes.data(), bytes.size(), "mem.gguf");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const GgufFile& a = *o.file.value();
  const GgufFile& b = *m.value();
  EXPECT_EQ(b.path(), "mem.gguf");
  EXPECT_EQ(b.file_size(), bytes.size());
  EXPECT_EQ(b.version(), a.version());
  EXPECT_EQ(b.alignment(), a.alignment());
  ASSERT_EQ(b.metadata().size(), a.metadata().size());
  for (size_t i = 0; i < a.metadata().size(); ++i) {
    EXPECT_EQ(b.metadata()[i].first, a.metadata()[i].first);
    EXPECT_EQ(b.metadata()[i].second.type, a.metadata()[i].second.type);
  }
  EXPECT_EQ(b.GetString("general.architecture").value(), a.GetString("general.architecture").value());
  ASSERT_EQ(b.tensors().size(), a.tensors().size());
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    const GgufTensorInfo& ta = a.tensors()[i];
    const GgufTensorInfo& tb = b.tensors()[i];
    EXPECT_EQ(tb.name, ta.name);
    EXPECT_EQ(tb.dims, ta.dims);
    EXPECT_EQ(tb.type, ta.type);
    EXPECT_EQ(tb.nbytes, ta.nbytes);
    EXPECT_EQ(tb.data, bytes.data() + lay.tensor_data[i]) << "tensor data points into the caller's buffer";
    EXPECT_EQ(ReadF32(b, tb.name), ReadF32(a, ta.name));
  }
}

TEST(GgufBuffer, OpenBufferRejectsWhatOpenRejectsWithTheSameMessage) {
  const std::vector<uint8_t> bytes = SmallValidFile();
  for (size_t cut = 0; cut < bytes.size(); cut += 3) {
    const std::vector<uint8_t> head(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(cut));
    Opened o = OpenBytes(head, "cut.gguf");
    auto m = GgufFile::OpenBuffer(head.data(), head.size(), "mem.gguf");
    ASSERT_FALSE(o.file.ok()) << cut;
    ASSERT_FALSE(m.ok()) << "cut at " << cut << " accepted";
    EXPECT_EQ(m.status().code(), o.file.status().code()) << cut;
    EXPECT_EQ(m.status().message(), Replaced(o.file.status().message(), o.path, "mem.gguf")) << cut;
  }
  auto empty = GgufFile::OpenBuffer(nullptr, 0, "empty.gguf");
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().code(), Code::kCorrupt);
  EXPECT_THAT(empty.status().message(), HasSubstr("empty.gguf: file is 0 bytes"));
}

}  // namespace
}  // namespace dk
