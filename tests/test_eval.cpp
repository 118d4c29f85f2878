// dynakv eval: the spec (JSON in and out, errors naming the field), the expansion of methods x
// fractions with their placeholders, and a small real run on the test model: the results layout,
// a finished task skipped when run again, --force rerunning it, and the command line.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/threads.h"
#include "eval/evaluate.h"
#include "eval/perplexity.h"
#include "kv/registry.h"
#include "kv/profile.h"
#include "test_util.h"

namespace dk {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

json MinimalSpec() {
  return json{{"name", "t"}, {"model", "m.gguf"}, {"text", "t.txt"}, {"profile", "p.dkv"},
              {"methods", {"full", "uniform", "snapkv", "router+snapkv"}}, {"fractions", {0.25, 0.0625}}};
}

TEST(EvalSpec, RoundTripsAndRefusesBadFields) {
  auto spec = EvalSpecFromJson(MinimalSpec());
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  auto again = EvalSpecFromJson(EvalSpecToJson(*spec));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(EvalSpecToJson(*again), EvalSpecToJson(*spec));
  struct Case {
    const char* field;
    json value;
    const char* expect;
  } cases[] = {{"name", "../x", "'name'"},
               {"name", "", "'name'"},
               {"tasks", {"perplexity", "dance"}, "unknown task 'dance'"},
               {"methods", {"full", "frobnicate"}, "unknown method 'frobnicate'"},
               {"fractions", {0.25, 1.5}, "--fractions"},
               {"ppl_ctx", 2, "ppl_ctx"},
               {"methods", json::array(), "no methods"}};
  for (const Case& c : cases) {
    json j = MinimalSpec();
    j[c.field] = c.value;
    auto bad = EvalSpecFromJson(j);
    ASSERT_FALSE(bad.ok()) << c.field;
    EXPECT_THAT(bad.status().message(), HasSubstr(c.expect)) << c.field;
  }
}

TEST(EvalSpec, ExpandsMethodsTimesFractionsWithPlaceholders) {
  json j = MinimalSpec();
  j["routers"] = {{"0.25", "r25.dkv"}, {"0.0625", "r06.dkv"}, {"0.5", "r50.dkv"}};
  auto spec = EvalSpecFromJson(j);
  ASSERT_TRUE(spec.ok());
  auto runs = ExpandRuns(*spec);
  ASSERT_TRUE(runs.ok()) << runs.status().ToString();
  // full once (fixed size), the others at each fraction.
  ASSERT_EQ(runs->size(), 1u + 3 * 2);
  EXPECT_EQ((*runs)[0].folder, "full");
  EXPECT_EQ((*runs)[0].fraction, -1.0);
  const EvalRun& u = (*runs)[1];
  EXPECT_EQ(u.folder, "uniform@0.25");
  EXPECT_EQ(u.config.options.String("--kv-budget", ""), "0.25");
  EXPECT_EQ(u.config.options.String("--profile", ""), "p.dkv");
  const EvalRun& s = (*runs)[4];
  EXPECT_EQ(s.folder, "snapkv@0.0625");
  EXPECT_EQ(s.config.evict, "snapkv");
  EXPECT_EQ(s.config.options.String("--evict-keep", ""), "0.0625");
  // router+snapkv splits the fraction: sqrt(0.0625) = 0.25 of the tokens at 0.25 of the bytes each,
  // with the router trained at 0.25.
  const EvalRun& c = (*runs)[6];
  EXPECT_EQ(c.folder, "router+snapkv@0.0625");
  EXPECT_EQ(c.config.options.String("--evict-keep", ""), "0.25");
  EXPECT_EQ(c.config.options.String("--kv-budget", ""), "0.25");
  EXPECT_EQ(c.config.options.String("--profile", ""), "r25.dkv");
  // The router for a rank fraction is the one trained at the largest fraction not above it (offsets
  // move a router up well, down badly), else the smallest: sqrt(0.125) = 0.354 takes the 0.25 one.
  j["fractions"] = {0.125, 0.03};
  j["methods"] = {"router+snapkv"};
  auto spec2 = EvalSpecFromJson(j);
  ASSERT_TRUE(spec2.ok()) << spec2.status().ToString();
  auto runs2 = ExpandRuns(*spec2);
  ASSERT_TRUE(runs2.ok()) << runs2.status().ToString();
  ASSERT_EQ(runs2->size(), 2u);
  EXPECT_EQ((*runs2)[0].config.options.String("--profile", ""), "r25.dkv");
  EXPECT_EQ((*runs2)[1].config.options.String("--profile", ""), "r06.dkv");  // sqrt(0.03) = 0.173: the 0.0625 one
  // A router method without a profile or routers is refused, naming the flag.
  j.erase("profile");
  j.erase("routers");
  auto reparsed = EvalSpecFromJson(j);
  ASSERT_TRUE(reparsed.ok());
  auto no_profile = ExpandRuns(*reparsed);
  ASSERT_FALSE(no_profile.ok());
  EXPECT_THAT(no_profile.status().message(), HasSubstr("--profile"));
}

// A real (small) evaluation on the test model.
class EvalRunTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = Model::Load(test::DataPath("brown-kjv-llama-6M-f32.gguf"));
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value().release();
    root_ = ::testing::TempDir() + "dk_eval_test_" + std::to_string(::getpid());
    // A profile with a random orthonormal basis is enough to run (quality is not the question).
    DynaKvProfile p;
    p.model_fingerprint = model_->fingerprint();
    p.n_layer = model_->config().n_layer;
    p.n_head_kv = model_->config().n_head_kv;
    p.head_dim = model_->config().head_dim;
    const int D = p.kv_dim();
    p.levels = DefaultLevels(D);
    for (auto* sets : {&p.k, &p.v}) {
      sets->resize(p.n_layer);
      for (BasisSet& b : *sets) {
        b.basis.assign(static_cast<size_t>(D) * D, 0.0f);
        for (int i = 0; i < D; ++i) b.basis[static_cast<size_t>(i) * D + i] = 1.0f;  // identity: orthonormal
        b.mean.assign(D, 0.0f);
        for (int i = 0; i < D; ++i) b.eigenvalues.push_back(D - i);
      }
    }
    profile_ = root_ + "-p.dkv";
    ASSERT_TRUE(SaveProfile(p, profile_).ok());
  }
  static void TearDownTestSuite() {
    delete model_;
    std::filesystem::remove_all(root_);
    std::remove(profile_.c_str());
  }

  EvalSpec Spec() {
    json j = {{"name", "small"},
              {"model", "brown-kjv-llama-6M-f32.gguf"},
              {"text", test::DataPath("valid.txt")},
              {"profile", profile_},
              {"methods", {"full", "uniform", "snapkv"}},
              {"fractions", {0.5}},
              {"ppl_ctx", 64},
              {"ppl_chunks", 2},
              {"passkey", {{"lengths", {30}}, {"depths", {0.5}}, {"per_cell", 1}}},
              {"speed_ctx", {64}},
              {"speed_fractions", {0.5}},
              {"speed_decode", 2}};
    auto s = EvalSpecFromJson(j);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return *s;
  }

  static Model* model_;
  static std::string root_, profile_;
};
Model* EvalRunTest::model_ = nullptr;
std::string EvalRunTest::root_, EvalRunTest::profile_;

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in, nullptr, false);
}

TEST_F(EvalRunTest, LayoutSkipIfDoneAndForce) {
  ThreadPool pool(2);
  const EvalSpec spec = Spec();
  auto first = RunEvaluation(*model_, spec, root_, false, pool);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  const std::string dir = root_ + "/small";
  // The spec beside the results, paths as given (a relative one stays relative).
  EXPECT_EQ(ReadJson(dir + "/config.json")["model"], "brown-kjv-llama-6M-f32.gguf");
  for (const char* run : {"full", "uniform@0.5", "snapkv@0.5"})
    for (const char* task : {"perplexity", "passkey", "speed"}) {
      const json r = ReadJson(dir + "/runs/" + run + "/" + task + ".json");
      ASSERT_FALSE(r.is_discarded()) << run << " " << task;
      EXPECT_EQ(r["config"]["task"], task);
      EXPECT_TRUE(r.contains("result") && r.contains("seconds")) << run << " " << task;
    }
  const json rows = ReadJson(dir + "/summary.json")["rows"];
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_NEAR(rows[0]["perplexity"]["kl"].get<double>(), 0.0, 1e-6) << "the full cache against itself";
  EXPECT_NEAR(rows[1]["perplexity"]["kv_fraction_prompt"].get<double>(), 0.5, 0.01);
  EXPECT_NEAR(rows[2]["perplexity"]["kv_fraction_prompt"].get<double>(), 0.5, 0.01);
  EXPECT_GT(rows[2]["perplexity"]["kl"].get<double>(), 0.0) << "snapkv dropped half the context";

  // Run again: every task is reused (same file, same recorded time); --force recomputes.
  const json before = ReadJson(dir + "/runs/uniform@0.5/perplexity.json");
  auto second = RunEvaluation(*model_, spec, root_, false, pool);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(ReadJson(dir + "/runs/uniform@0.5/perplexity.json"), before);
  EXPECT_EQ(*second, *first);
  // A changed setting reruns the tasks it touches (and only those).
  EvalSpec more = spec;
  more.ppl_chunks = 3;
  const json passkey_before = ReadJson(dir + "/runs/uniform@0.5/passkey.json");
  ASSERT_TRUE(RunEvaluation(*model_, more, root_, false, pool).ok());
  EXPECT_EQ(ReadJson(dir + "/runs/uniform@0.5/perplexity.json")["result"]["chunks"], 3);
  EXPECT_EQ(ReadJson(dir + "/runs/uniform@0.5/passkey.json"), passkey_before);
  ASSERT_TRUE(RunEvaluation(*model_, spec, root_, true, pool).ok());
  EXPECT_NE(ReadJson(dir + "/runs/uniform@0.5/perplexity.json")["seconds"], before["seconds"]);
}

// A long-context protocol: n_prompt tokens of each chunk compressed, the rest scored; and the
// reference's logits kept once and reused give the very same KL as computing them again.
TEST_F(EvalRunTest, PerplexityPromptSplitAndStoredReferenceLogits) {
  ThreadPool pool(2);
  const auto tokens = model_->tokenizer().Encode(test::ReadText(test::DataPath("valid.txt")).substr(0, 20000), true);
  KvConfig snap;
  snap.method = "full";
  snap.evict = "snapkv";
  snap.Set("--evict-keep", "0.5");
  const KvModelInfo info{model_->config().kv_shape(), 0, ""};
  auto run = [&](int n_prompt, ReferenceLogits* stored) {
    auto cache = CreateKvCache(snap, info, 128);
    auto reference = CreateKvCache(KvConfig{}, info, 128);
    EXPECT_TRUE(cache.ok() && reference.ok());
    PerplexityOptions o{128, 128, 3, true, 8, n_prompt};
    auto r = ComputePerplexity(*model_, tokens, **cache, reference->get(), o, pool, nullptr, stored);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return *r;
  };
  const PerplexityResult half = run(0, nullptr), long_prompt = run(96, nullptr);
  EXPECT_EQ(half.n_scored, 3 * (128 - 64 - 1));
  EXPECT_EQ(long_prompt.n_scored, 3 * (128 - 96 - 1));
  EXPECT_NE(half.kl_mean, long_prompt.kl_mean);
  ReferenceLogits stored;
  const PerplexityResult first = run(96, &stored);
  ASSERT_EQ(stored.chunks.size(), 3u);
  EXPECT_EQ(stored.chunks[0].size(), static_cast<size_t>(31) * model_->config().n_vocab);
  // The second run takes every reference row from the store.
  const PerplexityResult second = run(96, &stored);
  EXPECT_EQ(first.kl_mean, long_prompt.kl_mean);
  EXPECT_EQ(second.kl_mean, long_prompt.kl_mean);
  EXPECT_EQ(second.same_top1, long_prompt.same_top1);
  // Another split starts the store anew.
  const PerplexityResult again_half = run(0, &stored);
  EXPECT_EQ(stored.n_prompt, 64);
  EXPECT_EQ(again_half.kl_mean, half.kl_mean);
  PerplexityOptions bad{128, 128, 3, true, 8, 127};
  auto cache = CreateKvCache(KvConfig{}, info, 128);
  EXPECT_THAT(ComputePerplexity(*model_, tokens, **cache, nullptr, bad, pool).status().ToString(),
              HasSubstr("prompt part"));
}

// Speed with a short real prefill replayed to the context: the cache holds the same number of
// tokens at the same bytes as after a whole prefill, and the prefill rate is that of the real part.
TEST_F(EvalRunTest, SpeedFillReplaysTheRealPrefill) {
  ThreadPool pool(2);
  EvalSpec spec = Spec();
  spec.tasks = {"speed"};
  spec.speed_ctx = {40, 200};
  auto whole = RunEvaluation(*model_, spec, root_ + "-whole", false, pool);
  spec.speed_fill = 48;
  auto filled = RunEvaluation(*model_, spec, root_ + "-fill", false, pool);
  ASSERT_TRUE(whole.ok() && filled.ok()) << filled.status().ToString();
  for (size_t r = 0; r < 3; ++r) {
    const json& a = (*whole)["rows"][r]["speed"]["contexts"];
    const json& b = (*filled)["rows"][r]["speed"]["contexts"];
    ASSERT_EQ(b.size(), 2u);
    EXPECT_EQ(b[0]["prefill_tokens"], 40) << "a context below the fill is prefilled whole";
    EXPECT_EQ(b[1]["prefill_tokens"], 48);
    EXPECT_EQ(a[1]["prefill_tokens"], 200);
    EXPECT_EQ(a[1]["kv_bytes"], b[1]["kv_bytes"]) << (*whole)["rows"][r]["method"];
    EXPECT_GT(b[1]["resident_bytes"].get<double>(), 0.0);
    EXPECT_GT(b[1]["decode_tokens_per_s"].get<double>(), 0.0);
  }
  std::filesystem::remove_all(root_ + "-whole");
  std::filesystem::remove_all(root_ + "-fill");
  spec.speed_fill = -1;
  EXPECT_FALSE(EvalSpecFromJson(EvalSpecToJson(spec)).ok());
}

TEST_F(EvalRunTest, CommandLine) {
  const std::string dir = root_ + "-cli";
  auto r = test::RunCli("eval -m " + test::DataPath("brown-kjv-llama-6M-f32.gguf") + " -f " +
                        test::DataPath("valid.txt") + " --profile " + profile_ +
                        " --methods full,energy --fractions 0.5 --tasks perplexity -c 64 --chunks 2 --name cli"
                        " --results " + dir + " -t 2");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("energy"));
  EXPECT_THAT(r.err, HasSubstr("eval [1/2] full perplexity"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/cli/summary.json"));
  auto bad = test::RunCli("eval -m x.gguf -f t.txt --methods full,nope");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("unknown method 'nope'"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dk
