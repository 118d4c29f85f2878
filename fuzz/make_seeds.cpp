// Writes the seed corpora of the fuzz targets (run by scripts/fuzz.sh; nothing here is committed):
//   fuzz_make_seeds <tests/data> <corpus root>
// <root>/gguf:      of each tests/data/*.gguf its first 64 KiB, its metadata alone (a complete
//                   file without tensors) and its metadata with up to 8 tensor infos shrunk to one
//                   block each; small complete files from tests/gguf_writer.h (every metadata
//                   type, nested arrays, one tensor of every known ggml type, llama and gpt2
//                   vocabularies, version 2, other alignments).
// <root>/tokenizer: lines of valid.txt, the reference tokenizer strings, byte-level oddities.
// <root>/profile:   stories260K-v1.dkv, a tiny version-1 profile, version-2 profiles with and
//                   without a router.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "gguf_writer.h"
#include "kv/profile.h"
#include "model/ggml_types.h"
#include "profile_v1.h"

namespace fs = std::filesystem;
using dk::GgufType;
using W = dk::test::GgufWriter;

namespace {

std::vector<uint8_t> ReadBytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int g_written = 0;
void Write(const fs::path& dir, const std::string& name, const void* data, size_t size) {
  std::ofstream out(dir / ("seed-" + name), std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out.flush()) {
    std::fprintf(stderr, "cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
  ++g_written;
}
void Write(const fs::path& dir, const std::string& name, const std::vector<uint8_t>& b) {
  Write(dir, name, b.data(), b.size());
}
void Write(const fs::path& dir, const std::string& name, const std::string& s) { Write(dir, name, s.data(), s.size()); }

// ---- GGUF seeds from the test models (trusted files: a minimal walk, no checks) ----

struct Walk {
  const std::vector<uint8_t>& b;
  size_t pos = 0;
  template <typename T>
  T Get() {
    T v{};
    std::memcpy(&v, b.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string Str() {
    const auto n = Get<uint64_t>();
    std::string s(reinterpret_cast<const char*>(b.data() + pos), n);
    pos += n;
    return s;
  }
  void SkipValue(uint32_t type) {
    static constexpr size_t kSize[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == static_cast<uint32_t>(GgufType::kString)) {
      Str();
    } else if (type == static_cast<uint32_t>(GgufType::kArray)) {
      const auto elem = Get<uint32_t>();
      const auto n = Get<uint64_t>();
      for (uint64_t i = 0; i < n; ++i) SkipValue(elem);
    } else {
      pos += kSize[type];
    }
  }
};

void ModelSeeds(const fs::path& model, const fs::path& out) {
  const std::vector<uint8_t> b = ReadBytes(model);
  const std::string stem = model.stem().string();
  Write(out, "head-" + stem, b.data(), std::min<size_t>(b.size(), 64 * 1024));

  Walk w{b};
  w.pos = 8;
  const auto n_tensors = w.Get<uint64_t>();
  const auto n_kv = w.Get<uint64_t>();
  for (uint64_t i = 0; i < n_kv; ++i) {
    w.Str();
    w.SkipValue(w.Get<uint32_t>());
  }
  const size_t kv_end = w.pos;
  std::vector<uint8_t> meta(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(kv_end));
  dk::test::PatchPod<uint64_t>(&meta, 8, 0);
  Write(out, "meta-" + stem, meta);

  // Up to 8 tensor infos, each shrunk to one block (32 elements of a plain type), packed.
  constexpr size_t kAlign = 32;  // none of the test models sets general.alignment
  std::vector<uint8_t> tiny = meta;
  std::vector<uint8_t> data;
  std::mt19937 rng(1);
  uint64_t kept = 0;
  for (uint64_t i = 0; i < n_tensors && kept < 8; ++i, ++kept) {
    const std::string name = w.Str();
    const auto n_dims = w.Get<uint32_t>();
    for (uint32_t d = 0; d < n_dims; ++d) w.Get<uint64_t>();
    const auto type = w.Get<uint32_t>();
    w.Get<uint64_t>();
    const dk::GgmlTypeTraits* tr = dk::GetTypeTraits(type);
    const uint64_t elems = tr->block_size == 1 ? 32 : static_cast<uint64_t>(tr->block_size);
    const size_t bytes = tr->block_size == 1 ? 32 * tr->block_bytes : tr->block_bytes;
    dk::test::PutPod<uint64_t>(&tiny, name.size());
    dk::test::PutLe(&tiny, name.data(), name.size());
    dk::test::PutPod<uint32_t>(&tiny, 1);
    dk::test::PutPod<uint64_t>(&tiny, elems);
    dk::test::PutPod<uint32_t>(&tiny, type);
    dk::test::PutPod<uint64_t>(&tiny, data.size());
    for (size_t k = 0; k < bytes; ++k) data.push_back(static_cast<uint8_t>(rng() & 0x3F));  // small, finite
    data.resize((data.size() + kAlign - 1) / kAlign * kAlign, 0);
  }
  dk::test::PatchPod<uint64_t>(&tiny, 8, kept);
  tiny.resize((tiny.size() + kAlign - 1) / kAlign * kAlign, 0);
  tiny.insert(tiny.end(), data.begin(), data.end());
  Write(out, "tiny-" + stem, tiny);
}

// ---- synthetic GGUF seeds ----

W::Value NumArray(GgufType t, int n) {
  std::vector<W::Value> e;
  for (int i = 0; i < n; ++i) {
    const uint64_t x = static_cast<uint64_t>(i * 37 + 1);
    e.push_back(W::Scalar(t, &x, t == GgufType::kU8 || t == GgufType::kI8 || t == GgufType::kBool ? 1
                                 : t == GgufType::kU16 || t == GgufType::kI16                      ? 2
                                 : t == GgufType::kU32 || t == GgufType::kI32                      ? 4
                                                                                                   : 8));
  }
  return W::Array(t, std::move(e));
}

void AllTypes(W& w) {
  w.Add("general.architecture", W::Str("llama"))
      .Add("t.u8", W::U8(200)).Add("t.i8", W::I8(-100)).Add("t.u16", W::U16(60000)).Add("t.i16", W::I16(-30000))
      .Add("t.u32", W::U32(4000000000u)).Add("t.i32", W::I32(-2000000000)).Add("t.u64", W::U64(~0ull))
      .Add("t.i64", W::I64(-1)).Add("t.f32", W::F32(1.5f)).Add("t.f64", W::F64(-2.25)).Add("t.bool", W::Bool(true))
      .Add("t.str", W::Str("h\xc3\xa9llo")).Add("t.empty_str", W::Str(""))
      .Add("t.arr_u8", NumArray(GgufType::kU8, 3)).Add("t.arr_i16", NumArray(GgufType::kI16, 3))
      .Add("t.arr_u32", W::U32Array({1, 2, 3})).Add("t.arr_i32", W::I32Array({-1, 0, 1 << 30}))
      .Add("t.arr_i64", NumArray(GgufType::kI64, 2)).Add("t.arr_u64", NumArray(GgufType::kU64, 2))
      .Add("t.arr_f32", W::F32Array({0.5f, -1.0f})).Add("t.arr_bool", W::Array(GgufType::kBool, {W::Bool(false)}))
      .Add("t.arr_str", W::StrArray({"a", "", "ccc"})).Add("t.arr_empty", W::Array(GgufType::kF64, {}))
      .Add("t.nested", W::Array(GgufType::kArray, {W::StrArray({"x"}), W::U32Array({7, 8})}))
      .Add("t.nested3", W::Array(GgufType::kArray, {W::Array(GgufType::kArray, {W::F32Array({1.0f})})}))
      .Add("llama.block_count", W::U32(2)).Add("llama.context_length", W::U32(128))
      .Add("llama.rope.freq_base", W::F32(10000.0f));
}

void TensorsOfEveryType(W& w) {
  std::mt19937 rng(7);
  for (uint32_t id = 0; id < 64; ++id) {
    const dk::GgmlTypeTraits* tr = dk::GetTypeTraits(id);
    if (tr == nullptr) continue;
    const uint64_t rows = id % 3 == 0 ? 2 : 1;
    std::vector<uint8_t> bytes(tr->block_bytes * rows);
    for (uint8_t& x : bytes) x = static_cast<uint8_t>(rng() & 0x3F);
    w.AddTensorRaw(std::string("t.") + tr->name, {static_cast<uint64_t>(tr->block_size), rows}, id, bytes);
  }
}

void SyntheticSeeds(const fs::path& out) {
  {
    W w;
    AllTypes(w);
    TensorsOfEveryType(w);
    Write(out, "all-types", w.Build());
  }
  {
    W w(2);
    w.Add("general.name", W::Str("v2"));
    w.AddTensorF32("a", {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
    Write(out, "version2", w.Build());
  }
  Write(out, "empty", W().Build());
  for (const uint32_t a : {1u, 64u}) {
    W w;
    w.SetAlignment(a);
    w.AddTensorF32("x", {3}, {1, 2, 3}).AddTensorF16("y", {5}, {1, 2, 3, 4, 5});
    w.AddTensorQ8_0("z", {32}, std::vector<float>(32, 0.25f));
    Write(out, "align-" + std::to_string(a), w.Build());
  }
  {  // a llama (SentencePiece) vocabulary: specials, byte tokens, merges, a user-defined token
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<int32_t> types = {2, 3, 3};
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      tokens.push_back(name);
      types.push_back(6);
    }
    for (const char* t : {"\xe2\x96\x81", "a", "b", "ab", "\xe2\x96\x81" "ab", "c", "\xc3\xa9"}) {
      tokens.push_back(t);
      types.push_back(1);
    }
    tokens.push_back("<user>");
    types.push_back(4);
    std::vector<float> scores;
    for (size_t i = 0; i < tokens.size(); ++i) scores.push_back(-static_cast<float>(i));
    W w;
    w.Add("tokenizer.ggml.model", W::Str("llama")).Add("tokenizer.ggml.tokens", W::StrArray(tokens))
        .Add("tokenizer.ggml.scores", W::F32Array(scores)).Add("tokenizer.ggml.token_type", W::I32Array(types))
        .Add("tokenizer.ggml.bos_token_id", W::U32(1)).Add("tokenizer.ggml.eos_token_id", W::U32(2))
        .Add("tokenizer.ggml.unknown_token_id", W::U32(0)).Add("tokenizer.ggml.add_bos_token", W::Bool(true))
        .Add("tokenizer.ggml.add_eos_token", W::Bool(true)).Add("tokenizer.ggml.add_space_prefix", W::Bool(false));
    Write(out, "tok-llama", w.Build());
  }
  {  // a gpt2 (byte-level BPE) vocabulary with merges
    std::vector<std::string> tokens;
    for (int b = 33; b < 127; ++b) tokens.push_back(std::string(1, static_cast<char>(b)));
    tokens.push_back("\xc4\xa0");  // the space's byte character
    tokens.push_back("\xc4\xa0t");
    tokens.push_back("he");
    tokens.push_back("\xc4\xa0the");
    tokens.push_back("<|endoftext|>");
    std::vector<int32_t> types(tokens.size(), 1);
    types.back() = 3;
    W w;
    w.Add("tokenizer.ggml.model", W::Str("gpt2")).Add("tokenizer.ggml.pre", W::Str("gpt-2"))
        .Add("tokenizer.ggml.tokens", W::StrArray(tokens)).Add("tokenizer.ggml.token_type", W::I32Array(types))
        .Add("tokenizer.ggml.merges", W::StrArray({"\xc4\xa0 t", "h e", "\xc4\xa0t he"}))
        .Add("tokenizer.ggml.eos_token_id", W::U32(static_cast<uint32_t>(tokens.size() - 1)))
        .Add("tokenizer.ggml.eot_token_id", W::U32(static_cast<uint32_t>(tokens.size() - 1)));
    Write(out, "tok-gpt2", w.Build());
  }
}

// ---- tokenizer seeds ----

void TokenizerSeeds(const fs::path& data, const fs::path& out) {
  int n = 0;
  {
    std::ifstream in(data / "valid.txt", std::ios::binary);
    int line_no = 0;
    for (std::string line; std::getline(in, line); ++line_no) {
      if (line_no % 12 == 0 && !line.empty()) Write(out, "valid-" + std::to_string(n++), line.substr(0, 512));
    }
  }
  for (const fs::path& ref : {data / "reference" / "strings.txt"}) {
    std::ifstream in(ref, std::ios::binary);
    for (std::string line; std::getline(in, line);) Write(out, "ref-" + std::to_string(n++), line);
  }
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes += static_cast<char>(b);
  const std::vector<std::string> odd = {
      "", " ", "  a  b   c ", "\t\n\r\x0b\x0c", "\xe2\x96\x81", "\xe2\x96\x81\xe2\x96\x81x \xe2\x96\x81",
      "<s>", "</s>", "<unk>", "<0x41>", "<0xZZ>", "<|endoftext|>", "<|user|>", "a<|user|>b<|user|>",
      std::string("nul\0byte", 8), "\xff\xfe", "\xc3", "\x80\x80", "\xe2\x96", "\xe2\x96 ", "\xe0\xe2\x96\x81",
      "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80", "\xf0\x9f\x99\x82\xf0\x9f\x99",
      "e\xcc\x81 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xd9\xa3\xd9\xa4 \xef\xbc\x91", "\xc2\xa0\xe2\x80\x83\xe3\x80\x80",
      "it's we're I'll they'd you've 'S", "3.14159 1,000,000 007 \xc2\xb2", std::string(300, ' '),
      std::string(500, 'a'), "hi!? (x) [y] {z} \"q\" \\n", all_bytes};
  for (size_t i = 0; i < odd.size(); ++i) Write(out, "odd-" + std::to_string(i), odd[i]);
}

// ---- profile seeds ----

dk::DynaKvProfile TinyProfile(int n_layer, int n_head_kv, int head_dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nf(0.0f, 1.0f);
  dk::DynaKvProfile p;
  p.model_fingerprint = 0x1234abcd5678ef00ull ^ seed;
  p.model_name = "seed-model";
  p.n_layer = n_layer;
  p.n_head_kv = n_head_kv;
  p.head_dim = head_dim;
  const int D = p.kv_dim();
  p.levels = dk::DefaultLevels(D);
  p.n_calib_tokens = 1000;
  for (std::vector<dk::BasisSet>* sets : {&p.k, &p.v}) {
    sets->resize(static_cast<size_t>(n_layer));
    for (dk::BasisSet& b : *sets) {
      b.basis.resize(static_cast<size_t>(D) * D);
      for (float& x : b.basis) x = nf(rng);
      b.mean.resize(static_cast<size_t>(D));
      for (float& x : b.mean) x = nf(rng);
      for (int i = 0; i < D; ++i) b.eigenvalues.push_back(static_cast<double>(D - i));
    }
  }
  return p;
}

void AddRouter(dk::DynaKvProfile& p, int E, int H, int rows) {
  dk::Router r;
  r.n_embd = E;
  r.hidden = H;
  r.target = 0.25;
  r.info = "{\"steps\": 10}";
  const size_t L = p.levels.size();
  for (int l = 0; l < p.n_layer; ++l) {
    dk::RouterLayer w;
    w.w1.assign(static_cast<size_t>(H * E), 0.125f);
    w.b1.assign(static_cast<size_t>(H), -0.5f);
    w.w2k.assign(L * static_cast<size_t>(H), 0.25f);
    w.b2k.assign(L, 1.0f);
    w.w2v.assign(L * static_cast<size_t>(H), -0.25f);
    w.b2v.assign(L, 2.0f);
    r.layers.push_back(std::move(w));
  }
  for (int i = 0; i < rows; ++i) {
    dk::RouterBudgetRow row;
    row.beta = i - 1.0;
    row.fraction.assign(static_cast<size_t>(p.n_layer), 0.2 + 0.3 * i);
    r.budget.push_back(std::move(row));
  }
  p.router = std::move(r);
}

void ProfileSeeds(const fs::path& data, const fs::path& out) {
  Write(out, "stories260K-v1", ReadBytes(data / "stories260K-v1.dkv"));
  Write(out, "tiny-v1", dk::fuzz::ProfileAsVersion1(TinyProfile(1, 1, 2, 1)));
  dk::DynaKvProfile plain = TinyProfile(2, 1, 4, 2);
  Write(out, "tiny-v2", dk::SerializeProfile(plain));
  dk::DynaKvProfile routed = TinyProfile(2, 2, 2, 3);
  routed.flags = dk::DynaKvProfile::kFlagTrainedBases;
  AddRouter(routed, 6, 3, 2);
  Write(out, "router-v2", dk::SerializeProfile(routed));
  dk::DynaKvProfile no_budget = TinyProfile(1, 1, 3, 4);
  AddRouter(no_budget, 2, 1, 0);
  Write(out, "router-v2-nobudget", dk::SerializeProfile(no_budget));
  for (const auto* p : {&plain, &routed, &no_budget}) {
    const dk::Status st = dk::ValidateProfile(*p, "seed");
    if (!st.ok()) {
      std::fprintf(stderr, "seed profile invalid: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <tests/data> <corpus root>\n", argv[0]);
    return 2;
  }
  const fs::path data = argv[1], root = argv[2];
  for (const char* t : {"gguf", "tokenizer", "profile"}) fs::create_directories(root / t);
  std::vector<fs::path> models;
  for (const auto& e : fs::directory_iterator(data))
    if (e.path().extension() == ".gguf") models.push_back(e.path());
  std::sort(models.begin(), models.end());
  for (const fs::path& m : models) ModelSeeds(m, root / "gguf");
  SyntheticSeeds(root / "gguf");
  TokenizerSeeds(data, root / "tokenizer");
  ProfileSeeds(data, root / "profile");
  std::printf("seeds: %d files under %s\n", g_written, root.c_str());
  return 0;
}
