// Tokenizer tests: exact ids against llama.cpp (c392e509) for the two llama-vocabulary models,
// decode round trips, a hand-made GPT-2 byte-level BPE, and bad-data errors.
#include "model/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "gguf_writer.h"
#include "model/gguf.h"
#include "test_util.h"

namespace dk {
namespace {

using test::GgufWriter;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::unique_ptr<Tokenizer> LoadTokenizer(const std::string& model) {
  auto gguf = GgufFile::Open(std::string(DK_TEST_DATA) + "/" + model + ".gguf");
  EXPECT_TRUE(gguf.ok()) << gguf.status().ToString();
  if (!gguf.ok()) return nullptr;
  auto tok = Tokenizer::FromGguf(**gguf);
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  if (!tok.ok()) return nullptr;
  return std::move(tok).value();
}

struct RefLine {
  std::string text;
  std::vector<int32_t> ids;
};

// tokenize.txt: "<text>\t[1, 2, 3]"; the text may itself hold a tab, so split on the last one.
std::vector<RefLine> ReadReference(const std::string& model) {
  std::ifstream in(std::string(DK_TEST_DATA) + "/reference/" + model + "/tokenize.txt", std::ios::binary);
  std::vector<RefLine> lines;
  for (std::string line; std::getline(in, line);) {
    const size_t tab = line.rfind('\t');
    if (tab == std::string::npos) continue;
    RefLine r{line.substr(0, tab), {}};
    std::string list = line.substr(tab + 1);
    for (char& c : list) {
      if (c == '[' || c == ']' || c == ',') c = ' ';
    }
    std::istringstream ids(list);
    for (int32_t id; ids >> id;) r.ids.push_back(id);
    lines.push_back(std::move(r));
  }
  return lines;
}

std::string Join(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += (s.empty() ? "" : ", ") + std::to_string(id);
  return "[" + s + "]";
}

class LlamaVocabTest : public ::testing::TestWithParam<const char*> {};

TEST_P(LlamaVocabTest, MatchesLlamaCppIds) {
  auto tok = LoadTokenizer(GetParam());
  ASSERT_NE(tok, nullptr);
  const auto ref = ReadReference(GetParam());
  ASSERT_EQ(ref.size(), 10u) << "reference file incomplete";
  for (const RefLine& r : ref) {
    EXPECT_EQ(Join(tok->Encode(r.text, /*add_special=*/true)), Join(r.ids)) << "input: '" << r.text << "'";
  }
}

TEST_P(LlamaVocabTest, DecodeRoundTripsWithSpacePrefix) {
  auto tok = LoadTokenizer(GetParam());
  ASSERT_NE(tok, nullptr);
  for (const RefLine& r : ReadReference(GetParam())) {
    // SentencePiece adds "▁" in front of the text, which decodes to a leading space.
    EXPECT_EQ(tok->Decode(tok->Encode(r.text, false)), " " + r.text) << "input: '" << r.text << "'";
    // BOS renders as its text, like llama.cpp's token_to_piece(special=true) in llama-simple.
    EXPECT_EQ(tok->Decode(tok->Encode(r.text, true)), "<s> " + r.text) << "input: '" << r.text << "'";
  }
}

TEST_P(LlamaVocabTest, MetadataAndSpecialTokens) {
  auto tok = LoadTokenizer(GetParam());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->model(), "llama");
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_TRUE(tok->IsEog(2));
  EXPECT_FALSE(tok->IsEog(1));
  EXPECT_EQ(tok->TokenToPiece(1), "<s>");
  EXPECT_EQ(tok->TokenToPiece(2), "</s>");
  EXPECT_EQ(tok->TokenToPiece(3 + 'A'), "A");   // <0x41> byte token
  EXPECT_EQ(tok->TokenToPiece(-1), "");
  EXPECT_EQ(tok->TokenToPiece(tok->vocab_size()), "");
  EXPECT_EQ(tok->Encode("", true), std::vector<int32_t>{1});
  EXPECT_TRUE(tok->Encode("", false).empty());
}

// llama-simple's greedy output starts with the BOS text, then the first word's SPM space.
TEST_P(LlamaVocabTest, ReproducesGreedyOutputPrefix) {
  auto tok = LoadTokenizer(GetParam());
  ASSERT_NE(tok, nullptr);
  const std::string greedy = ReadFile(std::string(DK_TEST_DATA) + "/reference/" + GetParam() + "/greedy.txt");
  const std::string marker = "OUTPUT: ";
  const size_t at = greedy.find(marker);
  ASSERT_NE(at, std::string::npos);
  const std::string output = greedy.substr(at + marker.size(), greedy.find('\n', at) - at - marker.size());
  ASSERT_EQ(output.rfind("<s> ", 0), 0u) << output;
  std::vector<int32_t> ids = tok->Encode(output.substr(4), true);
  EXPECT_EQ(tok->Decode(ids), output);
}

INSTANTIATE_TEST_SUITE_P(Models, LlamaVocabTest,
                         ::testing::Values("stories260K", "brown-kjv-llama-6M-f32", "eval-llama-27M-v3-f16"),
                         [](const auto& p) {
                           std::string s = p.param;
                           for (char& c : s) {
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return s;
                         });

TEST(TokenizerLargeText, ValidTxtTokenCountMatchesPerplexityChunks) {
  auto tok = LoadTokenizer("brown-kjv-llama-6M-f32");
  ASSERT_NE(tok, nullptr);
  const std::string text = ReadFile(std::string(DK_TEST_DATA) + "/valid.txt");
  ASSERT_GT(text.size(), 600000u);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->Encode(text, true);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("valid.txt: %zu bytes -> %zu tokens in %.3f s\n", text.size(), ids.size(), secs);
  // llama-perplexity cut this text into 344 chunks of 512 tokens (176128 tokens used).
  EXPECT_GE(ids.size(), 344u * 512u);
  EXPECT_LT(ids.size(), 345u * 512u);
  EXPECT_EQ(tok->Encode(text, true), ids);  // deterministic
  EXPECT_EQ(tok->Decode(ids), "<s> " + text);
}

// ---- small hand-made llama (SPM) vocabularies ----

TokenizerData SmallSpm() {
  TokenizerData d;
  d.model = "llama";
  d.tokens = {"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b", "c", "ab", "bc", "\xe2\x96\x81" "a", "abc"};
  d.scores = {0, 0, 0, -1, -1, -1, -1, -2, -3, -4, -1};
  d.types = {2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
  d.bos_id = 1;
  d.eos_id = 2;
  d.unk_id = 0;
  return d;
}

TEST(SpmSmall, MergesByScoreThenResegments) {
  auto tok = Tokenizer::FromData(SmallSpm());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  // "▁abc": candidates ▁a (-4), ab (-2), bc (-3): ab wins, then abc (-1) -> [▁, abc].
  EXPECT_EQ((*tok)->Encode("abc", false), (std::vector<int32_t>{3, 10}));
  // "bcb" has no "▁b" token; "bc" merges; trailing "b" stays.
  EXPECT_EQ((*tok)->Encode("bcb", false), (std::vector<int32_t>{3, 8, 5}));
  // Unknown characters fall back to bytes; no <0xXX> tokens here, so the unknown id.
  EXPECT_EQ((*tok)->Encode("a\xc3\xa9", false), (std::vector<int32_t>{9, 0, 0}));
}

TEST(SpmSmall, EqualScoresMergeLeftmostFirst) {
  TokenizerData d;
  d.model = "llama";
  d.tokens = {"<unk>", "x", "xx"};
  d.scores = {0, 0, 1};
  d.add_space_prefix = false;
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ((*tok)->Encode("xxx", false), (std::vector<int32_t>{2, 1}));
}

TEST(SpmSmall, AddSpecialHonoursFlags) {
  TokenizerData d = SmallSpm();
  d.add_bos = false;
  d.add_eos = true;
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ((*tok)->Encode("c", true), (std::vector<int32_t>{3, 6, 2}));
  EXPECT_EQ((*tok)->Encode("c", false), (std::vector<int32_t>{3, 6}));
}

// User-defined tokens are split out before SPM even without special parsing, and the text after
// one gets the space prefix again (llama.cpp's is_prev_special).
TEST(SpmSmall, UserDefinedTokensArePartitioned) {
  TokenizerData d = SmallSpm();
  d.tokens.push_back("<sep>");
  d.scores.push_back(0);
  d.types.push_back(4);
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ((*tok)->Encode("a<sep>c", false), (std::vector<int32_t>{9, 11, 3, 6}));
  EXPECT_EQ((*tok)->Decode({9, 11, 3, 6}), " a<sep> c");
  // Control-token text is not parsed: "<s>" stays text (no such characters here -> unknown).
  EXPECT_EQ((*tok)->Encode("<s>", false), (std::vector<int32_t>{3, 0, 0, 0}));
}

// EncodeWithSpecial turns control-token text into the token (what chat templates need), longest
// text first; Encode on the same text is unchanged (the text stays text).
TEST(SpmSmall, EncodeWithSpecialParsesControlTokens) {
  TokenizerData d = SmallSpm();
  for (const char* t : {"<|im_start|>", "<|im_start|>x"}) {  // the longer one must win where it fits
    d.tokens.push_back(t);
    d.scores.push_back(0);
    d.types.push_back(3);
  }
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  // After a special token the text gets the space prefix again, as after a user-defined one.
  EXPECT_EQ((*tok)->EncodeWithSpecial("<|im_start|>a</s>", true), (std::vector<int32_t>{1, 11, 9, 2}));
  EXPECT_EQ((*tok)->EncodeWithSpecial("<|im_start|>xc", false), (std::vector<int32_t>{12, 3, 6}));
  EXPECT_EQ((*tok)->EncodeWithSpecial("<s>", false), (std::vector<int32_t>{1}));
  EXPECT_EQ((*tok)->EncodeWithSpecial("<unk>a", false), (std::vector<int32_t>{0, 9}));
  EXPECT_EQ((*tok)->EncodeWithSpecial("abc", false), (*tok)->Encode("abc", false));
  // Encode keeps llama.cpp's parse_special=false: the same text is characters.
  const std::vector<int32_t> plain = (*tok)->Encode("<|im_start|>a</s>", false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 11), 0);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 2), 0);
}

TEST(SpmSmall, ByteFallbackUsesByteTokens) {
  TokenizerData d;
  d.model = "llama";
  d.tokens = {"<unk>", "\xe2\x96\x81", "<0xC3>", "<0xA9>", "h"};
  d.types = {2, 1, 6, 6, 1};
  d.unk_id = 0;
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  const std::vector<int32_t> ids = (*tok)->Encode("h\xc3\xa9", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 4, 2, 3}));
  EXPECT_EQ((*tok)->Decode(ids), " h\xc3\xa9");
}

// ---- GPT-2 byte-level BPE ----

std::string ByteChar(unsigned char b) { return test::Gpt2ByteChar(b); }
std::string Mapped(const std::string& raw) { return test::Gpt2Mapped(raw); }

// A vocabulary of all 256 byte characters (id == byte) plus one token per merge result.
// Merges are given in raw bytes, highest priority first.
TokenizerData Gpt2Data(const std::vector<std::pair<std::string, std::string>>& merges) {
  TokenizerData d;
  d.model = "gpt2";
  d.pre = "gpt-2";
  d.add_bos = false;
  for (int b = 0; b < 256; ++b) d.tokens.push_back(ByteChar(static_cast<unsigned char>(b)));
  for (const auto& [l, r] : merges) {
    d.merges.push_back(Mapped(l) + " " + Mapped(r));
    d.tokens.push_back(Mapped(l + r));
  }
  return d;
}

std::vector<std::string> Pieces(const Tokenizer& tok, const std::string& text) {
  std::vector<std::string> out;
  for (int32_t id : tok.Encode(text, false)) out.push_back(tok.TokenToPiece(id));
  return out;
}

struct Gpt2Case {
  const char* name;
  std::vector<std::pair<std::string, std::string>> merges;
  std::string text;
  std::vector<std::string> pieces;
};

// Each case has a high-priority "decoy" merge that would fire only if the pre-tokenizer failed
// to split where the GPT-2 regex does.
TEST(Gpt2Bpe, PreTokenizationAndMergeOrder) {
  const std::vector<Gpt2Case> cases = {
      {"two spaces: last one joins the word", {{" ", " "}, {" ", "b"}}, "a  b", {"a", " ", " b"}},
      {"three spaces", {{" ", " "}, {" ", "b"}}, "a   b", {"a", "  ", " b"}},
      {"trailing whitespace is one word", {{"x", " "}, {" ", "\n"}}, "x \n", {"x", " \n"}},
      {"contraction 's", {{"t", "'"}, {"'", "s"}}, "it's", {"i", "t", "'s"}},
      {"contraction 're", {{"y", "'"}, {"'", "r"}, {"'r", "e"}}, "y're", {"y", "'re"}},
      {"letters then digits", {{"b", "1"}, {"1", "2"}, {"a", "b"}}, "ab12", {"ab", "12"}},
      {"space joins digits", {{" ", "1"}, {" 1", "2"}}, "a 12", {"a", " 12"}},
      {"punctuation run", {{"i", "!"}, {"!", "?"}}, "hi!?", {"h", "i", "!?"}},
      {"space joins punctuation", {{"(", "x"}, {" ", "("}}, "a (x", {"a", " (", "x"}},
      {"non-ASCII letters stay in the word", {{"\xa9", "!"}, {"\xc3", "\xa9"}}, "f\xc3\xa9!",
       {"f", "\xc3\xa9", "!"}},
      {"lower rank first", {{"b", "c"}, {"a", "b"}}, "abc", {"a", "bc"}},
      {"lower rank first (swapped)", {{"a", "b"}, {"b", "c"}}, "abc", {"ab", "c"}},
      {"equal pairs merge leftmost", {{"a", "a"}}, "aaa", {"aa", "a"}},
      {"chained merges", {{"a", "b"}, {"c", "d"}, {"ab", "cd"}}, "abcd", {"abcd"}},
  };
  for (const Gpt2Case& c : cases) {
    auto tok = Tokenizer::FromData(Gpt2Data(c.merges));
    ASSERT_TRUE(tok.ok()) << c.name << ": " << tok.status().ToString();
    EXPECT_EQ(Pieces(**tok, c.text), c.pieces) << "case: " << c.name;
  }
}

TEST(Gpt2Bpe, ByteLevelRoundTripOfArbitraryText) {
  auto tok = Tokenizer::FromData(Gpt2Data({{" ", "t"}, {" t", "h"}, {"\xc3", "\xa9"}, {"'", "s"}}));
  ASSERT_TRUE(tok.ok());
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes += static_cast<char>(b);  // includes invalid UTF-8
  const std::vector<std::string> texts = {
      "Hello world", " the théâtre's  \t\n", "\xc3\xbcn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac "
      "\xf0\x9f\x99\x82 3.14!!", all_bytes, "", "   ", "\xe2\x80\x83x\xc2\xa0y"};
  for (const std::string& t : texts) {
    EXPECT_EQ((*tok)->Decode((*tok)->Encode(t, false)), t) << "input bytes: " << t.size();
  }
  EXPECT_TRUE((*tok)->Encode("abc", true).size() == 3u);  // gpt2 default: no BOS
}

TEST(Gpt2Bpe, ReadsMergesFromGguf) {
  const TokenizerData d = Gpt2Data({{"a", "b"}, {"ab", "c"}});
  std::vector<std::string> tokens = d.tokens;
  tokens.push_back("<|endoftext|>");
  std::vector<int32_t> types(tokens.size(), 1);
  types.back() = 3;
  GgufWriter w;
  w.Add("tokenizer.ggml.model", GgufWriter::Str("gpt2"))
      .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens))
      .Add("tokenizer.ggml.token_type", GgufWriter::I32Array(types))
      .Add("tokenizer.ggml.merges", GgufWriter::StrArray(d.merges))
      .Add("tokenizer.ggml.bos_token_id", GgufWriter::U32(static_cast<uint32_t>(tokens.size() - 1)))
      .Add("tokenizer.ggml.eos_token_id", GgufWriter::U32(static_cast<uint32_t>(tokens.size() - 1)));
  const std::string path = w.WriteTemp("tok_gpt2.gguf");
  ASSERT_FALSE(path.empty());
  auto gguf = GgufFile::Open(path);
  ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
  auto tok = Tokenizer::FromGguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->model(), "gpt2");
  EXPECT_FALSE((*tok)->add_bos());
  EXPECT_EQ((*tok)->Encode("abc abc", true), (std::vector<int32_t>{257, 32, 257}));  // "abc", " ", "abc"
  EXPECT_TRUE((*tok)->IsEog(static_cast<int32_t>(tokens.size() - 1)));
  EXPECT_EQ((*tok)->TokenToPiece(static_cast<int32_t>(tokens.size() - 1)), "<|endoftext|>");
  std::remove(path.c_str());
}

// ---- bad data ----

void ExpectError(const StatusOr<std::unique_ptr<Tokenizer>>& r, Code code, const std::string& key) {
  ASSERT_FALSE(r.ok()) << "expected an error naming " << key;
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(key), std::string::npos) << r.status().ToString();
}

TEST(TokenizerErrors, BadDataIsRejectedNamingTheKey) {
  TokenizerData empty = SmallSpm();
  empty.tokens.clear();
  empty.scores.clear();
  empty.types.clear();
  empty.bos_id = empty.eos_id = empty.unk_id = -1;
  ExpectError(Tokenizer::FromData(empty), Code::kInvalidArgument, "tokenizer.ggml.tokens");

  TokenizerData scores = SmallSpm();
  scores.scores.pop_back();
  ExpectError(Tokenizer::FromData(scores), Code::kInvalidArgument, "tokenizer.ggml.scores");

  TokenizerData types = SmallSpm();
  types.types.push_back(1);
  ExpectError(Tokenizer::FromData(types), Code::kInvalidArgument, "tokenizer.ggml.token_type");

  TokenizerData bos = SmallSpm();
  bos.bos_id = static_cast<int32_t>(bos.tokens.size());
  ExpectError(Tokenizer::FromData(bos), Code::kInvalidArgument, "tokenizer.ggml.bos_token_id");

  TokenizerData eos = SmallSpm();
  eos.eos_id = -7;
  ExpectError(Tokenizer::FromData(eos), Code::kInvalidArgument, "tokenizer.ggml.eos_token_id");

  TokenizerData model = SmallSpm();
  model.model = "t5";  // llama.cpp's UGM: not supported (llama, gpt2 and bert are)
  ExpectError(Tokenizer::FromData(model), Code::kUnimplemented, "t5");

  TokenizerData merges = Gpt2Data({});
  merges.merges.push_back("nospace");
  ExpectError(Tokenizer::FromData(merges), Code::kInvalidArgument, "tokenizer.ggml.merges");
}

TEST(TokenizerErrors, BadGgufMetadataIsRejectedNamingTheKey) {
  auto open_and_load = [](const GgufWriter& w) -> StatusOr<std::unique_ptr<Tokenizer>> {
    const std::string path = w.WriteTemp("tok_bad.gguf");
    auto gguf = GgufFile::Open(path);
    std::remove(path.c_str());
    if (!gguf.ok()) return gguf.status();
    return Tokenizer::FromGguf(**gguf);
  };
  const std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "a"};
  {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("unigram-xyz"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens));
    ExpectError(open_and_load(w), Code::kUnimplemented, "unigram-xyz");
  }
  {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("llama"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens))
        .Add("tokenizer.ggml.bos_token_id", GgufWriter::U32(4));
    ExpectError(open_and_load(w), Code::kCorrupt, "tokenizer.ggml.bos_token_id");
  }
  {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("llama"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens))
        .Add("tokenizer.ggml.scores", GgufWriter::F32Array({0, 0, 0}));
    ExpectError(open_and_load(w), Code::kCorrupt, "tokenizer.ggml.scores");
  }
  {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("llama"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray({}));
    ExpectError(open_and_load(w), Code::kCorrupt, "tokenizer.ggml.tokens");
  }
  {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("gpt2"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens));
    ExpectError(open_and_load(w), Code::kNotFound, "tokenizer.ggml.merges");
  }
  {
    // Defaults for a llama vocabulary without the optional keys (llama.cpp: bos 1, eos 2).
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("llama"))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray(tokens))
        .Add("tokenizer.ggml.eos_token_id", GgufWriter::U32(0xFFFFFFFFu));
    auto tok = open_and_load(w);
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    EXPECT_EQ((*tok)->bos_id(), 1);
    EXPECT_EQ((*tok)->eos_id(), -1);
    EXPECT_TRUE((*tok)->add_bos());
  }
}

}  // namespace
}  // namespace dk
