// DynaKV profile file tests: bit-exact round trips, damaged files (every truncation point, every
// flipped byte, a future version, absurd header counts) refused with a message naming the file, the
// model check, and the default rank levels.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>

#include "gguf_writer.h"
#include "kv/profile.h"
#include "kv/registry.h"

namespace dk {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using W = test::GgufWriter;

// A structurally valid profile with random contents (every bit pattern of the floats matters for
// the round trip, not their meaning; eigenvalues are sorted so that validation passes).
DynaKvProfile MakeProfile(int n_layer, int n_head_kv, int head_dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nf(0.0f, 1.0f);
  std::uniform_real_distribution<double> ud(0.0, 10.0);
  DynaKvProfile p;
  p.model_fingerprint = 0x70a94a848df4ab7full ^ seed;
  p.model_name = "test-model-" + std::to_string(seed);
  p.n_layer = n_layer;
  p.n_head_kv = n_head_kv;
  p.head_dim = head_dim;
  const int D = p.kv_dim();
  p.levels = DefaultLevels(D);
  p.n_calib_tokens = 12345 + seed;
  for (std::vector<BasisSet>* sets : {&p.k, &p.v}) {
    sets->resize(n_layer);
    for (BasisSet& b : *sets) {
      b.basis.resize(static_cast<size_t>(D) * D);
      for (float& x : b.basis) x = nf(rng);
      b.mean.resize(D);
      for (float& x : b.mean) x = nf(rng);
      b.eigenvalues.resize(D);
      for (double& x : b.eigenvalues) x = ud(rng);
      std::sort(b.eigenvalues.rbegin(), b.eigenvalues.rend());
      b.eigenvalues.back() = 0.0;
    }
  }
  return p;
}

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Bit comparison: NaN-safe and distinguishes -0 from +0.
template <typename T>
bool SameBits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

void ExpectSameProfile(const DynaKvProfile& a, const DynaKvProfile& b) {
  EXPECT_EQ(a.model_fingerprint, b.model_fingerprint);
  EXPECT_EQ(a.model_name, b.model_name);
  EXPECT_EQ(a.n_layer, b.n_layer);
  EXPECT_EQ(a.n_head_kv, b.n_head_kv);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.levels, b.levels);
  EXPECT_EQ(a.n_calib_tokens, b.n_calib_tokens);
  ASSERT_EQ(a.k.size(), b.k.size());
  ASSERT_EQ(a.v.size(), b.v.size());
  for (size_t l = 0; l < a.k.size(); ++l) {
    for (int which = 0; which < 2; ++which) {
      const BasisSet& x = which == 0 ? a.k[l] : a.v[l];
      const BasisSet& y = which == 0 ? b.k[l] : b.v[l];
      EXPECT_TRUE(SameBits(x.basis, y.basis)) << "layer " << l << (which == 0 ? " K" : " V") << " basis";
      EXPECT_TRUE(SameBits(x.mean, y.mean)) << "layer " << l << (which == 0 ? " K" : " V") << " mean";
      EXPECT_TRUE(SameBits(x.eigenvalues, y.eigenvalues)) << "layer " << l << (which == 0 ? " K" : " V") << " eig";
    }
  }
}

// Loads `bytes` from a fresh file; expects refusal with `code` and the path in the message.
std::string ExpectRefused(const std::vector<uint8_t>& bytes, const std::string& what, Code code = Code::kCorrupt) {
  const std::string path = W::TempPath("bad.dkv");
  EXPECT_TRUE(W::WriteBytes(path, bytes));
  auto r = LoadProfile(path);
  std::remove(path.c_str());
  EXPECT_FALSE(r.ok()) << what << ": accepted";
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), code) << what << ": " << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr(path)) << what;
  return r.status().message();
}

// Offsets of header fields (magic 8, version 4, fingerprint 8, name length 4), the same in versions 1 and 2.
constexpr size_t kVersionOffset = 8;
constexpr size_t kNameLenOffset = 20;
size_t NLayerOffset(const DynaKvProfile& p) { return kNameLenOffset + 4 + p.model_name.size(); }

template <typename T>
void Patch(std::vector<uint8_t>& bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

TEST(Profile, RoundTripIsBitIdentical) {
  const DynaKvProfile p = MakeProfile(3, 2, 4, 1);
  const std::string path = W::TempPath("round.dkv");
  ASSERT_TRUE(SaveProfile(p, path).ok());
  const std::vector<uint8_t> first = ReadBytes(path);
  EXPECT_EQ(first.size(), ProfileFileBytes(p));
  EXPECT_EQ(first, SerializeProfile(p));
  auto loaded = LoadProfile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ExpectSameProfile(p, *loaded);
  ASSERT_TRUE(SaveProfile(*loaded, path).ok());
  EXPECT_EQ(ReadBytes(path), first) << "saving a loaded profile changed the bytes";
  std::remove(path.c_str());
}

// Bitwise CRC-32 (IEEE, reflected 0xEDB88320), written from the definition: the reference for the
// library's table-driven one.
uint32_t Crc32Reference(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int b = 0; b < 8; ++b) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

TEST(Profile, LayoutAndChecksumAreAsDocumented) {
  const uint8_t check[] = {'1', '2', '3', '4', '5', '6', '7', '8', '9'};
  ASSERT_EQ(Crc32Reference(check, sizeof(check)), 0xCBF43926u);  // the standard check value
  const DynaKvProfile p = MakeProfile(2, 1, 3, 12);
  const std::vector<uint8_t> bytes = SerializeProfile(p);
  // Version 2 without a router: 52 bytes of fixed fields in version 1, plus flags and router width.
  ASSERT_EQ(bytes.size(), 60 + p.model_name.size() + 4 * p.levels.size() + 2 * 2 * (4 * 9 + 4 * 3 + 8 * 3));
  EXPECT_EQ(std::memcmp(bytes.data(), "DKVPROF\0", 8), 0);
  uint32_t u32 = 0;
  uint64_t u64 = 0;
  std::memcpy(&u32, bytes.data() + kVersionOffset, 4);
  EXPECT_EQ(u32, DynaKvProfile::kFormatVersion);
  std::memcpy(&u64, bytes.data() + 12, 8);
  EXPECT_EQ(u64, p.model_fingerprint);
  std::memcpy(&u32, bytes.data() + kNameLenOffset, 4);
  EXPECT_EQ(u32, p.model_name.size());
  std::memcpy(&u32, bytes.data() + NLayerOffset(p), 4);
  EXPECT_EQ(u32, 2u);
  const size_t after_calib = NLayerOffset(p) + 16 + 4 * p.levels.size() + 8;  // flags, then router width
  std::memcpy(&u32, bytes.data() + after_calib, 4);
  EXPECT_EQ(u32, 0u);
  std::memcpy(&u32, bytes.data() + after_calib + 4, 4);
  EXPECT_EQ(u32, 0u);
  float first_basis = 0.0f;  // layer 0 K basis[0] right after the router width (no router)
  std::memcpy(&first_basis, bytes.data() + after_calib + 8, 4);
  EXPECT_EQ(first_basis, p.k[0].basis[0]);
  std::memcpy(&u32, bytes.data() + bytes.size() - 4, 4);
  EXPECT_EQ(u32, Crc32Reference(bytes.data() + 12, bytes.size() - 16));
}

TEST(Profile, RoundTripKeepsSpecialBitPatterns) {
  DynaKvProfile p = MakeProfile(1, 1, 3, 2);
  p.k[0].basis[0] = -0.0f;
  p.k[0].basis[1] = std::numeric_limits<float>::denorm_min();
  p.v[0].mean[2] = -std::numeric_limits<float>::max();
  p.v[0].eigenvalues = {1e300, std::numeric_limits<double>::denorm_min(), 0.0};
  p.model_name = "";
  const std::string path = W::TempPath("special.dkv");
  ASSERT_TRUE(SaveProfile(p, path).ok());
  auto loaded = LoadProfile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ExpectSameProfile(p, *loaded);
  std::remove(path.c_str());
}

TEST(Profile, EveryTruncationIsRefused) {
  const std::vector<uint8_t> bytes = SerializeProfile(MakeProfile(2, 2, 2, 3));
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    const std::vector<uint8_t> head(bytes.begin(), bytes.begin() + cut);
    ExpectRefused(head, "cut at " + std::to_string(cut) + " of " + std::to_string(bytes.size()));
  }
}

TEST(Profile, TrailingBytesAreRefused) {
  std::vector<uint8_t> bytes = SerializeProfile(MakeProfile(1, 1, 4, 4));
  bytes.push_back(0);
  EXPECT_THAT(ExpectRefused(bytes, "one trailing byte"), HasSubstr("trailing"));
}

TEST(Profile, EveryFlippedByteIsRefused) {
  const DynaKvProfile p = MakeProfile(2, 1, 4, 5);
  const std::vector<uint8_t> bytes = SerializeProfile(p);
  // First byte of the bases: after n_layer .. n_levels, the levels, n_calib_tokens, flags and the
  // router width (0: no router).
  const size_t body = NLayerOffset(p) + 4 * 4 + 4 * p.levels.size() + 8 + 4 + 4;
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      std::vector<uint8_t> bad = bytes;
      bad[i] ^= mask;
      // A flip in the version field that makes a version above the current one is "newer than
      // this build"; one that makes an older (or zero) version is read as such and fails as corrupt.
      const bool in_version = i >= kVersionOffset && i < kVersionOffset + 4;
      uint32_t flipped_version = 0;
      std::memcpy(&flipped_version, bad.data() + kVersionOffset, 4);
      const Code code =
          in_version && flipped_version > DynaKvProfile::kFormatVersion ? Code::kUnimplemented : Code::kCorrupt;
      const std::string what = "byte " + std::to_string(i) + " ^ " + std::to_string(mask);
      const std::string msg = ExpectRefused(bad, what, code);
      // A flip in the bases (or in the stored CRC) can only be caught by the checksum.
      if (i >= body) {
        EXPECT_THAT(msg, HasSubstr("checksum")) << what;
      }
    }
  }
}

TEST(Profile, FutureVersionIsRefusedClearly) {
  std::vector<uint8_t> bytes = SerializeProfile(MakeProfile(1, 1, 4, 6));
  Patch<uint32_t>(bytes, kVersionOffset, DynaKvProfile::kFormatVersion + 1);
  const std::string msg = ExpectRefused(bytes, "version + 1", Code::kUnimplemented);
  EXPECT_THAT(msg, HasSubstr("version " + std::to_string(DynaKvProfile::kFormatVersion + 1)));
  EXPECT_THAT(msg, HasSubstr("newer"));
}

TEST(Profile, BadMagicAndVersionZero) {
  std::vector<uint8_t> bytes = SerializeProfile(MakeProfile(1, 1, 4, 7));
  std::vector<uint8_t> gguf = bytes;
  std::memcpy(gguf.data(), "GGUF\3\0\0\0", 8);
  EXPECT_THAT(ExpectRefused(gguf, "gguf magic"), HasSubstr("found 'GGUF\\x03"));
  Patch<uint32_t>(bytes, kVersionOffset, 0);
  EXPECT_THAT(ExpectRefused(bytes, "version 0"), HasSubstr("version 0"));
}

TEST(Profile, AbsurdHeaderCountsAreRefusedBeforeAllocating) {
  const DynaKvProfile p = MakeProfile(1, 1, 4, 8);
  const std::vector<uint8_t> good = SerializeProfile(p);
  const size_t nl = NLayerOffset(p);
  struct Case {
    const char* what;
    size_t offset;
    uint32_t value;
    const char* expect;
  };
  for (const Case& c : {Case{"name length", kNameLenOffset, 0xFFFFFFF0u, "model name length"},
                        Case{"n_layer 0", nl, 0u, "n_layer"},
                        Case{"n_layer huge", nl, 0x7FFFFFFFu, "n_layer"},
                        Case{"n_layer at cap", nl, 4096u, "truncated"},
                        Case{"n_head_kv huge", nl + 4, 1u << 30, "n_head_kv"},
                        Case{"head_dim huge", nl + 8, 1u << 30, "head_dim"},
                        Case{"levels count", nl + 12, 1000u, "number of levels"}}) {
    std::vector<uint8_t> bad = good;
    Patch<uint32_t>(bad, c.offset, c.value);
    EXPECT_THAT(ExpectRefused(bad, c.what), HasSubstr(c.expect)) << c.what;
  }
  std::vector<uint8_t> wide = good;  // each count within its cap, the product D = 4096 * 4096 is not
  Patch<uint32_t>(wide, nl + 4, 4096u);
  Patch<uint32_t>(wide, nl + 8, 4096u);
  EXPECT_THAT(ExpectRefused(wide, "D over cap"), HasSubstr("KV width"));
}

TEST(Profile, MissingFileNamesThePath) {
  auto r = LoadProfile("/nonexistent/dir/p.dkv");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("/nonexistent/dir/p.dkv"));
}

TEST(Profile, SaveRefusesInvalidProfiles) {
  DynaKvProfile p = MakeProfile(1, 1, 4, 9);
  const std::string path = W::TempPath("invalid.dkv");
  p.levels = {1, 2};  // does not end with D = 4
  EXPECT_FALSE(SaveProfile(p, path).ok());
  p.levels = {1, 4};
  p.k[0].mean[1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(SaveProfile(p, path).ok());
  p.k[0].mean[1] = 0.0f;
  p.v[0].eigenvalues = {1.0, 2.0, 0.5, 0.0};  // not decreasing
  EXPECT_FALSE(SaveProfile(p, path).ok());
  p.v[0].eigenvalues = {2.0, 1.0, 0.5, -1e-9};  // negative variance
  EXPECT_FALSE(SaveProfile(p, path).ok());
  p.v[0].eigenvalues = {2.0, 1.0, 0.5, 0.0};
  p.v.pop_back();
  EXPECT_FALSE(SaveProfile(p, path).ok());
  EXPECT_FALSE(std::ifstream(path).good()) << "an invalid profile was written";
}

TEST(Profile, ProfileForAnotherModelIsRefused) {
  const DynaKvProfile p = MakeProfile(2, 2, 4, 10);
  KvModelInfo model;
  model.shape = KvShape{2, 4, 2, 4, 32};
  model.fingerprint = p.model_fingerprint;
  model.model_path = "m.gguf";
  EXPECT_TRUE(CheckProfileMatchesModel(p, model, "p.dkv").ok());

  model.fingerprint = 0x1234;
  Status s = CheckProfileMatchesModel(p, model, "p.dkv");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("p.dkv"));
  EXPECT_THAT(s.message(), HasSubstr("'" + p.model_name + "'"));
  EXPECT_THAT(s.message(), HasSubstr("m.gguf"));
  EXPECT_THAT(s.message(), HasSubstr("0000000000001234"));
  char fp[24];
  std::snprintf(fp, sizeof(fp), "%016llx", static_cast<unsigned long long>(p.model_fingerprint));
  EXPECT_THAT(s.message(), HasSubstr(fp));
  EXPECT_THAT(s.message(), HasSubstr("dynakv calibrate"));

  model.fingerprint = p.model_fingerprint;  // same fingerprint, other shape: still refused
  model.shape.head_dim = 8;
  s = CheckProfileMatchesModel(p, model, "p.dkv");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("head_dim=8"));
}

TEST(Profile, DefaultLevels) {
  EXPECT_THAT(DefaultLevels(128), ElementsAre(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128));
  EXPECT_THAT(DefaultLevels(1), ElementsAre(1));
  EXPECT_THAT(DefaultLevels(2), ElementsAre(1, 2));
  EXPECT_THAT(DefaultLevels(3), ElementsAre(1, 2, 3));
  EXPECT_THAT(DefaultLevels(8), ElementsAre(1, 2, 4, 8));
  EXPECT_THAT(DefaultLevels(10), ElementsAre(1, 2, 4, 8, 10));
  EXPECT_THAT(DefaultLevels(13), ElementsAre(1, 2, 4, 8, 12, 13));
  EXPECT_THAT(DefaultLevels(1024), ElementsAre(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
                                               1024));
  EXPECT_TRUE(DefaultLevels(0).empty());
  for (int D = 1; D <= 5000; ++D) {
    const std::vector<int> l = DefaultLevels(D);
    ASSERT_FALSE(l.empty()) << "D=" << D;
    EXPECT_EQ(l.front(), 1) << "D=" << D;
    EXPECT_EQ(l.back(), D) << "D=" << D;
    for (size_t i = 1; i < l.size(); ++i) ASSERT_LT(l[i - 1], l[i]) << "D=" << D << " i=" << i;
  }
}

TEST(Profile, NormalizeLevels) {
  EXPECT_EQ(NormalizeLevels({}, 16).value(), DefaultLevels(16));
  EXPECT_THAT(NormalizeLevels({4, 8}, 16).value(), ElementsAre(4, 8, 16));
  EXPECT_THAT(NormalizeLevels({4, 16}, 16).value(), ElementsAre(4, 16));
  EXPECT_FALSE(NormalizeLevels({0, 4}, 16).ok());
  EXPECT_FALSE(NormalizeLevels({4, 32}, 16).ok());
  EXPECT_FALSE(NormalizeLevels({8, 4}, 16).ok());
  EXPECT_FALSE(NormalizeLevels({4, 4}, 16).ok());
}

TEST(Profile, ExplainedVariance) {
  DynaKvProfile p = MakeProfile(1, 1, 4, 11);
  p.k[0].eigenvalues = {4.0, 3.0, 2.0, 1.0};
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 0), 0.0);
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 1), 0.4);
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 3), 0.9);
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 4), 1.0);
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 99), 1.0);
  EXPECT_THAT(ExplainedVarianceTable(p), HasSubstr("0.4000"));
  p.k[0].eigenvalues = {0.0, 0.0, 0.0, 0.0};
  EXPECT_DOUBLE_EQ(p.ExplainedVariance(p.k[0], 1), 1.0);
}

// A router with random weights and a valid budget table for profile p.
Router MakeRouter(const DynaKvProfile& p, int n_embd, int hidden, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nf(0.0f, 1.0f);
  Router r;
  r.n_embd = n_embd;
  r.hidden = hidden;
  r.target = 0.25;
  r.info = "{\"steps\": 3}";
  const size_t L = p.levels.size(), H = hidden, E = n_embd;
  auto rnd = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = nf(rng);
    return v;
  };
  for (int l = 0; l < p.n_layer; ++l) r.layers.push_back({rnd(H * E), rnd(H), rnd(L * H), rnd(L), rnd(L * H), rnd(L)});
  for (int i = 0; i < 5; ++i) r.budget.push_back({-1.0 + i, std::vector<double>(p.n_layer, 0.1 + 0.2 * i)});
  return r;
}

TEST(Profile, RouterRoundTripIsBitIdentical) {
  DynaKvProfile p = MakeProfile(3, 2, 4, 31);
  p.router = MakeRouter(p, 16, 5, 32);
  p.flags = DynaKvProfile::kFlagTrainedBases;
  const std::string path = W::TempPath("router.dkv");
  ASSERT_TRUE(SaveProfile(p, path).ok());
  const std::vector<uint8_t> first = ReadBytes(path);
  EXPECT_EQ(first.size(), ProfileFileBytes(p));
  auto loaded = LoadProfile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ExpectSameProfile(p, *loaded);
  EXPECT_EQ(loaded->flags, p.flags);
  ASSERT_TRUE(loaded->router.has_value());
  const Router& a = *p.router;
  const Router& b = *loaded->router;
  EXPECT_EQ(a.n_embd, b.n_embd);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.target, b.target);
  EXPECT_EQ(a.info, b.info);
  for (size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_TRUE(SameBits(a.layers[l].w1, b.layers[l].w1)) << l;
    EXPECT_TRUE(SameBits(a.layers[l].b2v, b.layers[l].b2v)) << l;
  }
  ASSERT_EQ(a.budget.size(), b.budget.size());
  for (size_t i = 0; i < a.budget.size(); ++i) {
    EXPECT_EQ(a.budget[i].beta, b.budget[i].beta);
    EXPECT_EQ(a.budget[i].fraction, b.budget[i].fraction);
  }
  ASSERT_TRUE(SaveProfile(*loaded, path).ok());
  EXPECT_EQ(ReadBytes(path), first);
  // Every truncation of a file with a router is refused too.
  for (size_t cut = 0; cut < first.size(); cut += 7) {
    ExpectRefused(std::vector<uint8_t>(first.begin(), first.begin() + cut), "router file cut at " + std::to_string(cut));
  }
  std::remove(path.c_str());
}

TEST(Profile, BadRoutersAreRefused) {
  DynaKvProfile p = MakeProfile(2, 1, 4, 33);
  const std::string path = W::TempPath("badrouter.dkv");
  p.router = MakeRouter(p, 8, 3, 34);
  p.router->layers[1].w2k.pop_back();
  EXPECT_FALSE(SaveProfile(p, path).ok());
  p.router = MakeRouter(p, 8, 3, 34);
  p.router->layers[0].b1[2] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(ValidateProfile(p, "x").message(), HasSubstr("router layer 0 b1"));
  p.router = MakeRouter(p, 8, 3, 34);
  p.router->budget[2].beta = p.router->budget[1].beta;
  EXPECT_THAT(ValidateProfile(p, "x").message(), HasSubstr("increasing"));
  p.router = MakeRouter(p, 8, 3, 34);
  p.router->target = 0.0;
  EXPECT_THAT(ValidateProfile(p, "x").message(), HasSubstr("target"));
  p.router = MakeRouter(p, 8, 3, 34);
  p.flags = 0x80;
  EXPECT_THAT(ValidateProfile(p, "x").message(), HasSubstr("flags"));
  EXPECT_FALSE(std::ifstream(path).good()) << "an invalid profile was written";
}

TEST(Profile, RouterForAnotherWidthIsRefused) {
  DynaKvProfile p = MakeProfile(2, 2, 4, 35);
  p.router = MakeRouter(p, 16, 3, 36);
  KvModelInfo model;
  model.shape = KvShape{2, 4, 2, 4, 32};
  model.fingerprint = p.model_fingerprint;
  model.model_path = "m.gguf";
  const Status s = CheckProfileMatchesModel(p, model, "p.dkv");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("width 16"));
  EXPECT_THAT(s.message(), HasSubstr("n_embd=32"));
}

// A version-1 file written by the previous release (tests/data/stories260K-v1.dkv, calibrated on
// stories260K) still loads, and re-saving it as version 2 keeps every number.
TEST(Profile, VersionOneFilesStillLoad) {
  const std::string v1 = std::string(DK_TEST_DATA) + "/stories260K-v1.dkv";
  const std::vector<uint8_t> bytes = ReadBytes(v1);
  ASSERT_GT(bytes.size(), 12u);
  uint32_t version;
  std::memcpy(&version, bytes.data() + kVersionOffset, 4);
  ASSERT_EQ(version, 1u);
  auto p = LoadProfile(v1);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_FALSE(p->router.has_value());
  EXPECT_EQ(p->flags, 0u);
  EXPECT_EQ(p->n_layer, 5);
  EXPECT_EQ(p->kv_dim(), 32);
  const std::string path = W::TempPath("v2.dkv");
  ASSERT_TRUE(SaveProfile(*p, path).ok());
  EXPECT_EQ(ReadBytes(path).size(), bytes.size() + 8) << "version 2 adds the flags and the router width";
  auto again = LoadProfile(path);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ExpectSameProfile(*p, *again);
  std::remove(path.c_str());
}

// The in-memory entry point (LoadProfile runs it on the mapped file; fuzz/fuzz_profile.cpp calls it).
TEST(Profile, ParseProfileReadsWhatLoadProfileReads) {
  DynaKvProfile p = MakeProfile(2, 2, 4, 41);
  p.router = MakeRouter(p, 8, 3, 42);
  const std::vector<uint8_t> bytes = SerializeProfile(p);
  auto parsed = ParseProfile(bytes.data(), bytes.size(), "mem.dkv");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  ExpectSameProfile(p, *parsed);
  ASSERT_TRUE(parsed->router.has_value());
  EXPECT_EQ(SerializeProfile(*parsed), bytes);

  std::vector<uint8_t> damaged = bytes;
  damaged[bytes.size() / 2] ^= 0x10;
  const std::string from_file = ExpectRefused(damaged, "a flipped bit");
  auto from_memory = ParseProfile(damaged.data(), damaged.size(), "mem.dkv");
  ASSERT_FALSE(from_memory.ok());
  EXPECT_EQ(from_memory.status().code(), Code::kCorrupt);
  EXPECT_THAT(from_memory.status().message(), HasSubstr("mem.dkv: checksum mismatch"));
  EXPECT_EQ(from_memory.status().message().substr(from_memory.status().message().find(':')),
            from_file.substr(from_file.find(": checksum")));

  auto empty = ParseProfile(nullptr, 0, "empty.dkv");
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(empty.status().message(), HasSubstr("empty.dkv: not a DynaKV profile"));
}

}  // namespace
}  // namespace dk
