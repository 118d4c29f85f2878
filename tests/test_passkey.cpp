// Passkey retrieval: case generation (determinism, depth, question, counts, refused options), the
// scoring rule, the summary, a real run of the retrieval-trained v2 model with the full cache, and
// the 'dynakv passkey' CLI.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <random>
#include <nlohmann/json.hpp>

#include "core/threads.h"
#include "eval/passkey.h"
#include "kv/full_cache.h"
#include "model/llama.h"
#include "test_util.h"

namespace dk {
namespace {

using test::DataPath;
using test::RunCli;
using ::testing::HasSubstr;

// The retrieval-trained evaluation model (v2), f16: the v1 files do not read from their context.
const std::string kModel = DataPath("brown-kjv-llama-6M-v2-f16.gguf");
const std::string kValid = DataPath("valid.txt");

// 1000 distinct words w0 .. w999 with mixed whitespace, so word indices are easy to check.
std::string NumberedText(int n) {
  std::string s;
  const char* gaps[] = {" ", "\n", "\n\n", "\t ", "  "};
  for (int i = 0; i < n; ++i) s += "w" + std::to_string(i) + gaps[i % 5];
  return s;
}

PasskeyOptions SmallOptions() {
  PasskeyOptions o;
  o.lengths = {50, 120};
  o.depths = {0.0, 0.25, 0.5, 1.0};
  o.per_cell = 3;
  return o;
}

TEST(Passkey, SplitWordsNormalisesNewlinesAndBlankLines) {
  EXPECT_THAT(SplitWords("  a b\n\nc\r\n\td  \n"), ::testing::ElementsAre("a", "b", "c", "d"));
  EXPECT_TRUE(SplitWords(" \n\n ").empty());
  EXPECT_EQ(PasskeySentence("pass key", "48213"), "The pass key is 48213. Remember it. 48213 is the pass key.");
}

TEST(Passkey, CasesAreDeterministicForASeedAndDifferAcrossSeeds) {
  const std::string text = NumberedText(1000);
  PasskeyOptions o = SmallOptions();
  auto a = MakePasskeyCases(text, o), b = MakePasskeyCases(text, o);
  o.seed = 2;
  auto c = MakePasskeyCases(text, o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status().ToString();
  ASSERT_EQ(a->size(), b->size());
  ASSERT_EQ(a->size(), c->size());
  int same_key = 0, same_offset = 0;
  for (size_t i = 0; i < a->size(); ++i) {
    EXPECT_EQ((*a)[i].prompt, (*b)[i].prompt);
    EXPECT_EQ((*a)[i].key, (*b)[i].key);
    same_key += (*a)[i].key == (*c)[i].key;
    same_offset += (*a)[i].offset == (*c)[i].offset;
  }
  EXPECT_EQ(same_key, 0);
  EXPECT_LE(same_offset, 1);
  // Pinned: std::mt19937_64's output is fixed by the standard and the draws are plain modulo, so
  // these hold with any standard library.
  std::mt19937_64 seeds(1), rng(seeds());
  const uint64_t key = 10000 + rng() % 90000, offset = rng() % (1000 - 50 + 1);
  EXPECT_EQ((*a)[0].offset, static_cast<int64_t>(offset));
  EXPECT_EQ((*a)[0].key, std::to_string(key));
}

TEST(Passkey, KeySentenceSitsAtTheRequestedDepth) {
  const std::string text = NumberedText(1000);
  const std::vector<std::string> source = SplitWords(text);
  PasskeyOptions o = SmallOptions();
  o.depths = {0.0, 0.1, 0.33, 0.5, 0.9, 1.0};
  auto cases = MakePasskeyCases(text, o);
  ASSERT_TRUE(cases.ok()) << cases.status().ToString();
  for (const PasskeyCase& c : *cases) {
    SCOPED_TRACE(c.prompt);
    const int expect = static_cast<int>(std::lround(c.depth * c.length));
    EXPECT_EQ(c.key_word, expect);
    const std::string sentence = PasskeySentence(c.phrase, c.key);
    const size_t at = c.prompt.find(sentence);
    ASSERT_NE(at, std::string::npos);
    EXPECT_EQ(static_cast<int>(SplitWords(c.prompt.substr(0, at)).size()), expect);
    // The haystack is `length` consecutive source words from `offset`, the sentence spliced in.
    std::vector<std::string> hay = SplitWords(c.prompt.substr(0, at));
    const std::string question = " What is the " + c.phrase + "?";
    const std::string after = c.prompt.substr(at + sentence.size(), c.prompt.rfind(question) - at - sentence.size());
    for (const std::string& w : SplitWords(after)) hay.push_back(w);
    ASSERT_EQ(static_cast<int>(hay.size()), c.length);
    for (int i = 0; i < c.length; ++i) ASSERT_EQ(hay[i], source[c.offset + i]) << i;
    // Single spaces only: no newline or doubled space survives from the source.
    EXPECT_EQ(c.prompt.find('\n'), std::string::npos);
    EXPECT_EQ(c.prompt.find("  "), std::string::npos);
  }
}

TEST(Passkey, PromptEndsWithTheQuestion) {
  auto cases = MakePasskeyCases(NumberedText(1000), SmallOptions());
  ASSERT_TRUE(cases.ok());
  for (const PasskeyCase& c : *cases) {
    const std::string q = " What is the " + c.phrase + "? The " + c.phrase + " is";
    ASSERT_GE(c.prompt.size(), q.size());
    EXPECT_EQ(c.prompt.substr(c.prompt.size() - q.size()), q);
    EXPECT_EQ(c.key.size(), 5u);
    EXPECT_GE(std::stoi(c.key), 10000);
    EXPECT_LE(std::stoi(c.key), 99999);
  }
}

TEST(Passkey, CountIsLengthsTimesDepthsTimesPerCell) {
  PasskeyOptions o = SmallOptions();
  auto cases = MakePasskeyCases(NumberedText(1000), o);
  ASSERT_TRUE(cases.ok());
  ASSERT_EQ(cases->size(), 2u * 4u * 3u);
  // Length-major, then depth, then repetition; phrases take turns.
  EXPECT_EQ((*cases)[0].length, 50);
  EXPECT_EQ((*cases)[0].depth, 0.0);
  EXPECT_EQ((*cases)[3].depth, 0.25);
  EXPECT_EQ((*cases)[12].length, 120);
  for (size_t i = 0; i < cases->size(); ++i) EXPECT_EQ((*cases)[i].phrase, o.phrases[i % o.phrases.size()]);
  o = PasskeyOptions{};
  cases = MakePasskeyCases(NumberedText(1000), o);
  ASSERT_TRUE(cases.ok());
  EXPECT_EQ(cases->size(), 30u);
}

TEST(Passkey, BadOptionsAreRefusedNamingTheOption) {
  struct Case {
    const char* needle;
    std::function<void(PasskeyOptions&)> edit;
  } cases[] = {
      {"--lengths", [](PasskeyOptions& o) { o.lengths.clear(); }},
      {"--lengths", [](PasskeyOptions& o) { o.lengths = {100, 0}; }},
      {"--depths", [](PasskeyOptions& o) { o.depths.clear(); }},
      {"--depths", [](PasskeyOptions& o) { o.depths = {0.5, 1.5}; }},
      {"--depths", [](PasskeyOptions& o) { o.depths = {-0.1}; }},
      {"--depths", [](PasskeyOptions& o) { o.depths = {std::nan("")}; }},
      {"--per-cell", [](PasskeyOptions& o) { o.per_cell = 0; }},
      {"-n", [](PasskeyOptions& o) { o.n_predict = 0; }},
      {"phrases", [](PasskeyOptions& o) { o.phrases.clear(); }},
      {"phrases", [](PasskeyOptions& o) { o.phrases = {"pass key", ""}; }},
  };
  const std::string text = NumberedText(1000);
  for (const Case& c : cases) {
    PasskeyOptions o;
    c.edit(o);
    auto r = MakePasskeyCases(text, o);
    ASSERT_FALSE(r.ok()) << c.needle;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(c.needle));
    EXPECT_EQ(ValidatePasskeyOptions(o).code(), Code::kInvalidArgument);
  }
  // A text shorter than the longest haystack.
  auto r = MakePasskeyCases(NumberedText(499), PasskeyOptions{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("499 words"));
  EXPECT_THAT(r.status().message(), HasSubstr("--lengths (500)"));
  EXPECT_TRUE(MakePasskeyCases(NumberedText(500), PasskeyOptions{}).ok());
}

TEST(Passkey, ScoringIsAnExactDigitMatch) {
  EXPECT_TRUE(PasskeyCorrect(" 48213.", "48213"));
  EXPECT_TRUE(PasskeyCorrect("48213", "48213"));
  EXPECT_TRUE(PasskeyCorrect(" 48213 is the pass key", "48213"));
  EXPECT_FALSE(PasskeyCorrect(" 4821.", "48213"));     // shorter run
  EXPECT_FALSE(PasskeyCorrect(" 482130.", "48213"));   // longer run
  EXPECT_FALSE(PasskeyCorrect(" 148213.", "48213"));   // key inside a longer run
  EXPECT_FALSE(PasskeyCorrect(" 4821 3.", "48213"));   // split
  EXPECT_FALSE(PasskeyCorrect(" 30595. 48213", "48213"));  // only the first run counts
  EXPECT_FALSE(PasskeyCorrect(" the", "48213"));
  EXPECT_FALSE(PasskeyCorrect("", "48213"));
  EXPECT_FALSE(PasskeyCorrect("", ""));
  EXPECT_EQ(FirstDigitRun("ab 12x34"), "12");
  EXPECT_EQ(FirstDigitRun("none"), "");
}

TEST(Passkey, SummaryGroupsByLengthAndDepth) {
  std::vector<PasskeyResult> rs;
  auto add = [&](int length, double depth, bool ok, double frac) {
    PasskeyResult r;
    r.length = length;
    r.depth = depth;
    r.correct = ok;
    r.kv_fraction = frac;
    r.n_prompt = 10;
    rs.push_back(r);
  };
  add(300, 0.5, true, 0.5);
  add(150, 0.5, false, 0.25);
  add(150, 0.1, true, 0.25);
  add(300, 0.1, true, 0.0);
  const PasskeySummary s = SummarizePasskey(rs);
  EXPECT_EQ(s.n, 4);
  EXPECT_EQ(s.correct, 3);
  EXPECT_DOUBLE_EQ(s.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(s.mean_kv_fraction, 0.25);
  EXPECT_EQ(s.n_prompt_tokens, 40);
  ASSERT_EQ(s.by_length.size(), 2u);
  EXPECT_EQ(s.by_length[0].value, 150);
  EXPECT_EQ(s.by_length[0].correct, 1);
  EXPECT_EQ(s.by_length[0].n, 2);
  EXPECT_EQ(s.by_length[1].value, 300);
  EXPECT_DOUBLE_EQ(s.by_length[1].accuracy(), 1.0);
  ASSERT_EQ(s.by_depth.size(), 2u);
  EXPECT_EQ(s.by_depth[0].value, 0.1);
  EXPECT_DOUBLE_EQ(s.by_depth[1].accuracy(), 0.5);
  EXPECT_EQ(SummarizePasskey({}).n, 0);
}

std::unique_ptr<Model> LoadModel() {
  auto m = Model::Load(kModel);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

TEST(PasskeyRetrieval, WindowsTooLongForTheContextAreRedrawn) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  const std::string text = test::ReadText(kValid);
  PasskeyOptions o;
  o.lengths = {300};
  o.per_cell = 4;
  auto plain = MakePasskeyCases(text, o);
  ASSERT_TRUE(plain.ok());
  // 300 words of valid.txt: about 540 tokens, some over 600.
  constexpr int kLimit = 560;
  auto fitted = MakePasskeyCases(text, o, &model->tokenizer(), kLimit);
  ASSERT_TRUE(fitted.ok()) << fitted.status().ToString();
  ASSERT_EQ(fitted->size(), plain->size());
  int redrawn = 0;
  for (size_t i = 0; i < fitted->size(); ++i) {
    const PasskeyCase &f = (*fitted)[i], &p = (*plain)[i];
    const int n = static_cast<int>(model->tokenizer().Encode(f.prompt, true).size());
    EXPECT_LE(n, kLimit);
    EXPECT_EQ(f.key, p.key);
    EXPECT_EQ(f.phrase, p.phrase);
    if (f.redraws == 0) {
      EXPECT_EQ(f.prompt, p.prompt) << "a case that fits is the same case";
    } else {
      ++redrawn;
      EXPECT_NE(f.offset, p.offset);
      EXPECT_GT(static_cast<int>(model->tokenizer().Encode(p.prompt, true).size()), kLimit);
    }
  }
  EXPECT_GT(redrawn, 0);
  EXPECT_LT(redrawn, static_cast<int>(fitted->size()));
  // A limit no window meets.
  auto none = MakePasskeyCases(text, o, &model->tokenizer(), 100);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(none.status().message(), HasSubstr("case 0 (length 300, depth 0.1, pass key)"));
  EXPECT_THAT(none.status().message(), HasSubstr("at most 100 tokens"));
}

// The v2 model retrieves 150 of 150 with llama.cpp on such haystacks; allow one miss for the f16
// weights and our float summation order.
TEST(PasskeyRetrieval, V2ModelRetrievesWithTheFullCache) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  PasskeyOptions o;
  o.lengths = {150, 300};
  o.per_cell = 1;
  auto cases = MakePasskeyCases(test::ReadText(kValid), o);
  ASSERT_TRUE(cases.ok()) << cases.status().ToString();
  ASSERT_EQ(cases->size(), 10u);
  FullKvCache cache(model->config().kv_shape(), model->config().n_ctx_train, KvDtype::kF16);
  ThreadPool pool(2);
  int calls = 0;
  auto results = RunPasskey(*model, *cases, o.n_predict, cache, pool, [&](int i, const PasskeyResult& r) {
    EXPECT_EQ(i, calls++);
    EXPECT_EQ(r.key, (*cases)[i].key);
  });
  ASSERT_TRUE(results.ok()) << results.status().ToString();
  ASSERT_EQ(results->size(), 10u);
  EXPECT_EQ(calls, 10);
  int correct = 0;
  for (const PasskeyResult& r : *results) {
    SCOPED_TRACE("key " + r.key + ", continuation '" + r.continuation + "'");
    correct += r.correct;
    EXPECT_EQ(r.correct, PasskeyCorrect(r.continuation, r.key));
    EXPECT_GT(r.n_prompt, r.length);
    EXPECT_LE(r.n_generated, o.n_predict);
    // The fp16 full cache is its own denominator.
    EXPECT_DOUBLE_EQ(r.kv_fraction, 1.0);
    EXPECT_EQ(r.kv_bytes, static_cast<size_t>(r.n_prompt) * Fp16FullBytesPerToken(cache.shape()));
    // Decoding stops once the number has ended (" 48213." needs about 7 tokens, not n_predict).
    if (r.correct) {
      EXPECT_EQ(r.continuation.substr(0, 6), " " + r.key);
      EXPECT_LT(r.n_generated, o.n_predict);
    }
  }
  EXPECT_GE(correct, 9);
  const PasskeySummary s = SummarizePasskey(*results);
  EXPECT_EQ(s.correct, correct);
  EXPECT_EQ(s.by_length.size(), 2u);
  EXPECT_EQ(s.by_depth.size(), 5u);
}

// Plain text with lower-case words (the keys task's word keys and the records' names come from it).
std::string WordyText(int n) {
  const char* words[] = {"harbor", "candle", "meadow", "silver", "lantern", "orchard", "pebble", "willow",
                         "granite", "thistle", "the", "and", "of", "Stone", "x1"};
  std::string s;
  for (int i = 0; i < n; ++i) {
    // Every third word a made-up one ("kab", "kac", ...): enough distinct names for 60 records.
    std::string w = words[i % 15];
    if (i % 3 == 2) w = std::string("k") + static_cast<char>('a' + i / 26 % 26) + static_cast<char>('a' + i % 26);
    s += w + (i % 7 == 0 ? "\n" : " ");
  }
  return s;
}

int Count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = 0; (p = s.find(what, p)) != std::string::npos; p += what.size()) ++n;
  return n;
}

TEST(Retrieval, KeysCasesHoldTheKeyAndTheirDistractorsUnderOtherPhrases) {
  PasskeyOptions o = DefaultRetrievalOptions("keys");
  o.lengths = {60, 200};
  o.per_cell = 4;
  auto cases = MakePasskeyCases(WordyText(3000), o);
  ASSERT_TRUE(cases.ok()) << cases.status().ToString();
  ASSERT_EQ(cases->size(), 2u * 5u * 4u);
  int words = 0, seen[3] = {0, 0, 0};
  for (const PasskeyCase& c : *cases) {
    SCOPED_TRACE(c.prompt);
    ASSERT_GE(c.distractors, 0);
    ASSERT_LE(c.distractors, 2);
    ++seen[c.distractors];
    // The key sentence once, the question at the end, one more key sentence per distractor, each
    // under a number phrase other than the asked one.
    EXPECT_EQ(Count(c.prompt, PasskeySentence(c.phrase, c.key)), 1);
    EXPECT_TRUE(c.prompt.ends_with(" What is the " + c.phrase + "? The " + c.phrase + " is"));
    EXPECT_EQ(Count(c.prompt, ". Remember it."), 1 + c.distractors);
    EXPECT_EQ(Count(c.prompt, "The " + c.phrase + " is"), 2);  // its sentence and the question
    if (c.phrase == "secret word") {
      ++words;
      EXPECT_FALSE(c.key.empty());
      for (char ch : c.key) EXPECT_TRUE(ch >= 'a' && ch <= 'z');
      EXPECT_TRUE(PasskeyCorrect(" " + c.key + ".", c.key));
      EXPECT_FALSE(PasskeyCorrect(" " + c.key + "s.", c.key));
    } else {
      EXPECT_EQ(c.key.size(), 5u);
    }
  }
  EXPECT_EQ(words, 8);  // five phrases in turn: every fifth case
  for (int d : seen) EXPECT_GT(d, 0) << "0, 1 and 2 distractors all drawn";
  o.max_distractors = 0;
  auto none = MakePasskeyCases(WordyText(3000), o);
  ASSERT_TRUE(none.ok());
  for (const PasskeyCase& c : *none) EXPECT_EQ(Count(c.prompt, ". Remember it."), 1);
}

TEST(Retrieval, RecordsCasesAskTheRecordAtTheDepth) {
  PasskeyOptions o = DefaultRetrievalOptions("records");
  o.lengths = {40, 100};
  o.depths = {0.0, 0.5, 1.0};
  o.per_cell = 3;
  auto cases = MakePasskeyCases(WordyText(3000), o);
  ASSERT_TRUE(cases.ok()) << cases.status().ToString();
  ASSERT_EQ(cases->size(), 18u);
  for (const PasskeyCase& c : *cases) {
    SCOPED_TRACE(c.prompt);
    const size_t at = c.prompt.find("Records: ");
    ASSERT_NE(at, std::string::npos);
    const size_t end = c.prompt.find(". The number for ", at);
    ASSERT_NE(end, std::string::npos);
    // The haystack's words come first, then the block, then the question.
    EXPECT_EQ(static_cast<int>(SplitWords(c.prompt.substr(0, at)).size()), c.length);
    std::vector<std::pair<std::string, std::string>> records;
    std::string block = c.prompt.substr(at + 9, end - at - 9);
    for (size_t p = 0; p <= block.size();) {
      size_t q = block.find("; ", p);
      if (q == std::string::npos) q = block.size();
      const std::vector<std::string> kv = SplitWords(block.substr(p, q - p));
      ASSERT_EQ(kv.size(), 2u);
      records.emplace_back(kv[0], kv[1]);
      p = q + 2;
    }
    EXPECT_EQ(static_cast<int>(records.size()), c.distractors);
    EXPECT_GE(c.distractors, 20);
    EXPECT_LE(c.distractors, 60);
    const size_t asked = static_cast<size_t>(std::lround(c.depth * (records.size() - 1)));
    EXPECT_EQ(records[asked].second, c.key);
    EXPECT_TRUE(c.prompt.ends_with(" The number for " + records[asked].first + " is"));
    for (size_t k = 0; k < records.size(); ++k)
      for (size_t j = k + 1; j < records.size(); ++j) EXPECT_NE(records[k].first, records[j].first);
  }
}

TEST(Retrieval, BadRetrievalOptionsAreRefused) {
  PasskeyOptions o = DefaultRetrievalOptions("keys");
  o.task = "needles";
  EXPECT_THAT(ValidatePasskeyOptions(o).ToString(), HasSubstr("--task"));
  o = DefaultRetrievalOptions("keys");
  o.max_distractors = 17;
  EXPECT_THAT(ValidatePasskeyOptions(o).ToString(), HasSubstr("--distractors"));
  o = DefaultRetrievalOptions("records");
  o.records_min = 30;
  o.records_max = 20;
  EXPECT_THAT(ValidatePasskeyOptions(o).ToString(), HasSubstr("records"));
  // Too few distinct words for the records' names.
  o = DefaultRetrievalOptions("records");
  o.lengths = {10};
  EXPECT_THAT(MakePasskeyCases(NumberedText(100), o).status().ToString(), HasSubstr("too few"));
}

TEST(PasskeyRetrieval, CaseLongerThanTheCacheIsAnErrorNamingIt) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  PasskeyOptions o;
  o.lengths = {20, 150};
  o.depths = {0.5};
  o.per_cell = 1;
  auto cases = MakePasskeyCases(test::ReadText(kValid), o);
  ASSERT_TRUE(cases.ok());
  FullKvCache cache(model->config().kv_shape(), 100, KvDtype::kF16);
  ThreadPool pool(1);
  int calls = 0;
  auto r = RunPasskey(*model, *cases, o.n_predict, cache, pool, [&](int, const PasskeyResult&) { ++calls; });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("case 1 (length 150, depth 0.5, secret code)"));
  EXPECT_THAT(r.status().message(), HasSubstr("100"));
  EXPECT_EQ(calls, 0) << "checked before any case runs";
  EXPECT_EQ(RunPasskey(*model, *cases, 0, cache, pool).status().code(), Code::kInvalidArgument);
}

TEST(PasskeyCli, PrintsCasesAndEndsWithTheAccuracyLine) {
  const std::string json = ::testing::TempDir() + "passkey.json";
  std::remove(json.c_str());
  auto r = RunCli("passkey -m " + kModel + " -f " + kValid +
                  " --lengths 150 --depths 0.2,0.8 --per-cell 2 --seed 7 -t 2 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("length   150  depth 0.2"));
  EXPECT_THAT(r.out, HasSubstr("accuracy by length:"));
  EXPECT_THAT(r.out, HasSubstr("accuracy by depth:"));
  EXPECT_THAT(r.out, HasSubstr("KV fraction = 1.0000"));
  EXPECT_THAT(r.out, ::testing::ContainsRegex("accuracy = [01]\\.[0-9]{4} \\([0-4] of 4\\)\n$"));
  EXPECT_THAT(r.err, HasSubstr("passkey: 4 cases, context 1024, kv cache"));
  EXPECT_THAT(r.err, HasSubstr("passkey ["));  // progress bar
  const auto j = nlohmann::json::parse(test::ReadText(json), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  ASSERT_EQ(j["cases"].size(), 4u);
  EXPECT_EQ(j["cases"][0]["length"], 150);
  EXPECT_EQ(j["cases"][0]["key"].get<std::string>().size(), 5u);
  EXPECT_EQ(j["summary"]["n"], 4);
  EXPECT_EQ(j["summary"]["by_depth"].size(), 2u);
  EXPECT_EQ(j["options"]["seed"], 7);
  // -q: only the summary.
  auto q = RunCli("passkey -m " + kModel + " -f " + kValid + " --lengths 150 --depths 0.5 --per-cell 1 -t 2 -q");
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_THAT(q.out, ::testing::StartsWith("accuracy by length:"));
  EXPECT_THAT(q.out, HasSubstr("of 1)\n"));
}

TEST(PasskeyCli, BadFlagValuesExit2NamingTheFlag) {
  struct Case {
    std::string args, needle;
  } cases[] = {
      {"--depths 1.5", "--depths: depth 1.5 is outside [0, 1]"},
      {"--depths 0.1,,0.5", "--depths: expected comma-separated numbers"},
      {"--depths abc", "--depths: expected comma-separated numbers"},
      {"--lengths 150,0", "--lengths: expected comma-separated integers"},
      {"--lengths 1e3", "--lengths: expected comma-separated integers"},
      {"--per-cell 0", "--per-cell: expected an integer"},
      {"-n 0", "-n: expected an integer"},
      {"--rank 8", "--rank: only meaningful with --kv dynakv"},
      {"--kv dynakv --rank 8", "--profile: dynakv needs a calibrated profile"},
  };
  for (const Case& c : cases) {
    auto r = RunCli("passkey -m " + kModel + " -f " + kValid + " " + c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.needle)) << c.args;
    EXPECT_THAT(r.err, HasSubstr("usage: dynakv passkey")) << c.args;
  }
  auto r = RunCli("passkey -f " + kValid);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("-m: a model file is required"));
}

TEST(PasskeyCli, BadTextFileExit1NamingIt) {
  auto r = RunCli("passkey -m " + kModel + " -f /nonexistent/haystack.txt");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/haystack.txt"));
  const std::string path = ::testing::TempDir() + "passkey_short.txt";
  std::ofstream(path) << "In the beginning God created the heaven and the earth.\n";
  r = RunCli("passkey -m " + kModel + " -f " + path);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr(path + ": the text has 10 words"));
  r = RunCli("passkey -m " + kModel + " -f " + kValid + " --lengths 500 -c 200 -q");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("case 0 (length 500"));
}

}  // namespace
}  // namespace dk
