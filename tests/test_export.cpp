// dynakv export-profile: the safetensors + JSON export, read back by numpy alone
// (tests/read_safetensors.py, no dynakv code), equals the profile number for number.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <algorithm>
#include <cstdio>
#include <random>

#include <nlohmann/json.hpp>

#include "kv/profile.h"
#include "kv/profile_export.h"
#include "test_util.h"

namespace dk {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

DynaKvProfile ProfileWithRouter() {
  std::mt19937 rng(4);
  std::normal_distribution<float> nf(0.0f, 1.0f);
  DynaKvProfile p;
  p.model_fingerprint = 0xABCDEF0123456789ull;
  p.model_name = "export-test";
  p.n_layer = 2;
  p.n_head_kv = 2;
  p.head_dim = 4;
  const int D = p.kv_dim();
  p.levels = {1, 2, 4, 8};
  for (auto* sets : {&p.k, &p.v}) {
    sets->resize(p.n_layer);
    for (BasisSet& b : *sets) {
      for (int i = 0; i < D * D; ++i) b.basis.push_back(nf(rng));
      for (int i = 0; i < D; ++i) b.mean.push_back(nf(rng));
      for (int i = 0; i < D; ++i) b.eigenvalues.push_back(D - i + 0.125 * i);
      std::sort(b.eigenvalues.rbegin(), b.eigenvalues.rend());
    }
  }
  Router r;
  r.n_embd = 6;
  r.hidden = 3;
  r.target = 0.25;
  r.info = R"({"steps": 7})";
  auto rnd = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = nf(rng);
    return v;
  };
  for (int l = 0; l < p.n_layer; ++l) r.layers.push_back({rnd(18), rnd(3), rnd(12), rnd(4), rnd(12), rnd(4)});
  r.budget = {{-1.0, {0.1, 0.2}}, {0.5, {0.3, 0.4}}};
  p.router = r;
  return p;
}

template <typename T>
void ExpectTensor(const json& tensors, const std::string& name, std::vector<int64_t> shape, const std::vector<T>& want) {
  ASSERT_TRUE(tensors.contains(name)) << name;
  EXPECT_EQ(tensors[name]["shape"].get<std::vector<int64_t>>(), shape) << name;
  const auto got = tensors[name]["values"].get<std::vector<double>>();
  ASSERT_EQ(got.size(), want.size()) << name;
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], static_cast<double>(want[i])) << name << "[" << i << "]";
}

TEST(ExportProfile, NumpyReadsBackEveryNumber) {
  const DynaKvProfile p = ProfileWithRouter();
  const std::string dir = ::testing::TempDir() + "dk_export_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(ExportProfile(p, dir).ok());
  const std::string cmd = "/usr/bin/python3 " + std::string(DK_TEST_DATA) + "/../read_safetensors.py " + dir;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  ASSERT_EQ(::pclose(pipe), 0) << "numpy reader failed: " << out;
  const json j = json::parse(out);
  const json& t = j["tensors"];
  const int64_t D = p.kv_dim();
  ExpectTensor(t, "levels", {4}, p.levels);
  for (int l = 0; l < p.n_layer; ++l) {
    const std::string base = "layers." + std::to_string(l);
    ExpectTensor(t, base + ".k.basis", {D, D}, p.k[l].basis);
    ExpectTensor(t, base + ".v.mean", {D}, p.v[l].mean);
    ExpectTensor(t, base + ".k.eigenvalues", {D}, p.k[l].eigenvalues);
    ExpectTensor(t, base + ".router.w1", {3, 6}, p.router->layers[l].w1);
    ExpectTensor(t, base + ".router.b2v", {4}, p.router->layers[l].b2v);
  }
  ExpectTensor(t, "router.budget.beta", {2}, std::vector<double>{-1.0, 0.5});
  ExpectTensor(t, "router.budget.fraction", {2, 2}, std::vector<double>{0.1, 0.2, 0.3, 0.4});
  const json& c = j["config"];
  EXPECT_EQ(c["kv_dim"], D);
  EXPECT_EQ(c["model_fingerprint"], "abcdef0123456789");
  EXPECT_EQ(c["router"]["hidden"], 3);
  EXPECT_EQ(c["router"]["training"]["steps"], 7);
  EXPECT_EQ(j["metadata"]["format"], "dynakv-profile");
  std::filesystem::remove_all(dir);
}

TEST(ExportProfile, CommandLine) {
  const std::string dir = ::testing::TempDir() + "dk_export_cli_" + std::to_string(::getpid());
  auto r = test::RunCli("export-profile " + test::DataPath("stories260K-v1.dkv") + " -o " + dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(dir + "/dynakv.safetensors"));
  auto missing = test::RunCli("export-profile -o " + dir);
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_THAT(missing.err, HasSubstr("PROFILE.dkv"));
  auto bad = test::RunCli("export-profile /nonexistent.dkv -o " + dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("/nonexistent.dkv"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dk
