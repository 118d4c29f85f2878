// llama.cpp's tokenizer test vocabularies (tests/data/vocab, from llama.cpp's models/ folder; see
// its README.md): every case of every vocabulary, encoded as llama.cpp's test-tokenizer-0 does
// (no BOS/EOS, special tokens not parsed), must give the ids of its .out file. Llama-3 (llama-bpe)
// and Qwen2 come without a GGUF: their pre-tokenizers are checked by the splits (against the
// models' own regexes, tests/data/vocab/*.splits.json) and by the .out ids those splits explain.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gguf_writer.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "test_util.h"

namespace dk {
namespace {

using test::GgufWriter;

const std::string kVocabDir = std::string(DK_TEST_DATA) + "/vocab/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// .inp: cases separated by "\n__ggml_vocab_test__\n", the last one followed by it too (as
// llama.cpp's test-tokenizer-0 reads them).
std::vector<std::string> ReadCases(const std::string& name) {
  std::string text = ReadFile(kVocabDir + "ggml-vocab-" + name + ".gguf.inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> cases;
  for (size_t pos; (pos = text.find(sep)) != std::string::npos;) {
    cases.push_back(text.substr(0, pos));
    text.erase(0, pos + sep.size());
  }
  return cases;
}

// .out: one line per case, the ids separated by spaces.
std::vector<std::vector<int32_t>> ReadIds(const std::string& name) {
  std::ifstream in(kVocabDir + "ggml-vocab-" + name + ".gguf.out", std::ios::binary);
  std::vector<std::vector<int32_t>> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream ss(line);
    out.emplace_back();
    for (int32_t id; ss >> id;) out.back().push_back(id);
  }
  return out;
}

// The text of a case as C would write it, UTF-8 kept.
std::string Escape(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c == '"' || c == '\\') out += std::string("\\") + ch;
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return "\"" + out + "\"";
}

std::string Join(const std::vector<int32_t>& ids) {
  std::string s;
  for (const int32_t id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return "[" + s + "]";
}

std::string JoinWords(const std::vector<std::string>& words) {
  std::string s;
  for (const std::string& w : words) s += (s.empty() ? "" : ", ") + Escape(w);
  return "[" + s + "]";
}

std::unique_ptr<Tokenizer> LoadVocab(const std::string& name) {
  auto gguf = GgufFile::Open(kVocabDir + "ggml-vocab-" + name + ".gguf");
  EXPECT_TRUE(gguf.ok()) << gguf.status().ToString();
  if (!gguf.ok()) return nullptr;
  auto tok = Tokenizer::FromGguf(**gguf);
  EXPECT_TRUE(tok.ok()) << name << ": " << tok.status().ToString();
  if (!tok.ok()) return nullptr;
  return std::move(tok).value();
}

// ---- the vocabularies with a GGUF: every case, exact ids ----

struct VocabCase {
  const char* name;
  const char* model;  // tokenizer.ggml.model
};

class VocabTest : public ::testing::TestWithParam<VocabCase> {};

TEST_P(VocabTest, EveryCaseMatchesLlamaCppIds) {
  const std::string name = GetParam().name;
  auto tok = LoadVocab(name);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->model(), GetParam().model);
  const auto cases = ReadCases(name);
  const auto expected = ReadIds(name);
  ASSERT_EQ(cases.size(), 46u) << name << ": .inp incomplete";
  ASSERT_EQ(expected.size(), cases.size()) << name << ": .out has " << expected.size() << " lines for "
                                           << cases.size() << " cases";
  size_t passed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::vector<int32_t> ids = tok->Encode(cases[i], /*add_special=*/false);
    EXPECT_EQ(ids, expected[i]) << "vocab " << name << ", case " << i << ": text " << Escape(cases[i])
                                << "\n  expected " << Join(expected[i]) << "\n  actual   " << Join(ids);
    passed += ids == expected[i];
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %zu/%zu cases (%.1f ms)\n", name.c_str(), passed, cases.size(), ms);
}

// Decoding the ids gives the text back (byte-level BPE is lossless; SentencePiece adds its "▁").
TEST_P(VocabTest, DecodeGivesTheTextBack) {
  const std::string name = GetParam().name;
  auto tok = LoadVocab(name);
  ASSERT_NE(tok, nullptr);
  if (std::string(GetParam().model) == "bert") {
    // WordPiece is lossy (BertVocab.* checks the normalized words); what it decodes is already
    // normalized, so encoding that again gives the same ids (cases without [UNK]).
    for (const std::string& text : ReadCases(name)) {
      const std::vector<int32_t> ids = tok->Encode(text, false);
      if (std::find(ids.begin(), ids.end(), 100) != ids.end()) continue;  // [UNK]
      EXPECT_EQ(tok->Encode(tok->Decode(ids), false), ids) << "vocab " << name << ", text " << Escape(text);
    }
    return;
  }
  const bool spm = std::string(GetParam().model) == "llama";
  const auto cases = ReadCases(name);
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string want = (spm && !cases[i].empty()) ? " " + cases[i] : cases[i];
    EXPECT_EQ(tok->Decode(tok->Encode(cases[i], false)), want) << "vocab " << name << ", case " << i;
  }
}

// WordPiece keeps words, not text: lowercased, accents dropped (NFD's first code point), whitespace
// runs gone, punctuation and CJK ideographs words of their own, each word decoded with a space in
// front; a word the vocabulary cannot cover is [UNK]. Specials: [CLS] text [SEP].
TEST(BertVocab, DecodeGivesTheNormalizedWords) {
  auto tok = LoadVocab("bert-bge");
  ASSERT_NE(tok, nullptr);
  const std::pair<std::string, std::string> cases[] = {
      {"Hello   World!", " hello world !"},
      {"\tÜber\ncafé's", " uber cafe ' s"},
      {"東京 2024", " 東 京 2024"},
      {"a\x01" "b", " ab"},  // a control character is dropped inside the word
  };
  for (const auto& [text, want] : cases) EXPECT_EQ(tok->Decode(tok->Encode(text, false)), want) << text;
  const auto ids = tok->Encode("hi", true);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(tok->TokenToPiece(ids.front()), "[CLS]");
  EXPECT_EQ(tok->TokenToPiece(ids.back()), "[SEP]");
  EXPECT_EQ(tok->Decode(tok->Encode("\xF0\x9F\x98\x80", false)), "[UNK]");  // an emoji the vocabulary lacks
}

INSTANTIATE_TEST_SUITE_P(LlamaCpp, VocabTest,
                         ::testing::Values(VocabCase{"llama-spm", "llama"}, VocabCase{"phi-3", "llama"},
                                           VocabCase{"gpt-2", "gpt2"}, VocabCase{"falcon", "gpt2"},
                                           VocabCase{"mpt", "gpt2"}, VocabCase{"starcoder", "gpt2"},
                                           VocabCase{"refact", "gpt2"}, VocabCase{"deepseek-coder", "gpt2"},
                                           VocabCase{"deepseek-llm", "gpt2"}, VocabCase{"bert-bge", "bert"}),
                         [](const auto& p) {
                           std::string s = p.param.name;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

// ---- Llama-3 (llama-bpe) and Qwen2: no GGUF, checked by their splits ----

// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for U+0100,
// U+0101, ... in byte order. Both vocabularies hold the 256 one-byte tokens as ids 0..255, printable
// bytes first ("!" is 0, "\n" 198, " " 220).
bool Printable(int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255); }

std::vector<int> ByteOrder() {
  std::vector<int> order;
  for (int b = 0; b < 256; ++b) {
    if (Printable(b)) order.push_back(b);
  }
  for (int b = 0; b < 256; ++b) {
    if (!Printable(b)) order.push_back(b);
  }
  return order;
}

std::string ByteChar(int b) { return test::Gpt2ByteChar(b); }
std::string Mapped(const std::string& raw) { return test::Gpt2Mapped(raw); }

// A tokenizer with only the 256 byte tokens, for its pre-tokenizer.
std::unique_ptr<Tokenizer> BytesOnly(const std::string& pre) {
  TokenizerData d;
  d.model = "gpt2";
  d.pre = pre;
  const std::vector<int> order = ByteOrder();
  for (int i = 0; i < 256; ++i) d.tokens.push_back(ByteChar(order[i]));
  auto tok = Tokenizer::FromData(std::move(d));
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<std::vector<std::string>> ReadSplits(const std::string& name) {
  const auto j = nlohmann::json::parse(ReadFile(kVocabDir + "ggml-vocab-" + name + ".gguf.splits.json"));
  return j.at("cases").get<std::vector<std::vector<std::string>>>();
}

class SplitVocabTest : public ::testing::TestWithParam<const char*> {};

// The words llama.cpp's pre-tokenizer gives must be those of the model's own regex (run by
// scripts/gen_vocab_splits.py with Python's `regex`, independently of this implementation).
TEST_P(SplitVocabTest, EveryCaseSplitsAsTheModelsRegex) {
  const std::string name = GetParam();
  auto tok = BytesOnly(name);
  ASSERT_NE(tok, nullptr);
  const auto cases = ReadCases(name);
  const auto splits = ReadSplits(name);
  ASSERT_EQ(cases.size(), 46u);
  ASSERT_EQ(splits.size(), cases.size());
  size_t passed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::vector<std::string> words = tok->PreTokenize(cases[i]);
    EXPECT_EQ(words, splits[i]) << "vocab " << name << ", case " << i << ": text " << Escape(cases[i])
                                << "\n  expected " << JoinWords(splits[i]) << "\n  actual   " << JoinWords(words);
    passed += words == splits[i];
  }
  std::printf("%s: %zu/%zu cases split as the model's regex\n", name.c_str(), passed, cases.size());
}

// Whether `word` can be cut into the tokens `parts` (known text, or "" for a token whose text is
// not known: any non-empty text). Dynamic programming over (part, position): O(parts x bytes^2).
bool Spells(const std::string& word, const std::vector<std::string>& parts) {
  const size_t n = word.size();
  std::vector<char> at(n + 1, 0);  // at[p]: parts [0, k) spell word[0, p)
  at[0] = 1;
  for (const std::string& part : parts) {
    std::vector<char> next(n + 1, 0);
    for (size_t p = 0; p < n; ++p) {
      if (!at[p]) continue;
      if (!part.empty()) {
        if (word.compare(p, part.size(), part) == 0) next[p + part.size()] = 1;
      } else {
        for (size_t e = p + 1; e <= n; ++e) next[e] = 1;
      }
    }
    at.swap(next);
  }
  return at[n] != 0;
}

// The .out ids against the splits, without the vocabulary. BPE never crosses a word, so the ids
// of a case are the words' tokens in order, one or more per word, and a word is always the same
// tokens. So:
//  1. every case with as many ids as words gives one token per word: word <-> id must be one to
//     one across all such cases (and a one-byte word must be that byte's token, id < 256);
//  2. the ids of those cases are reproduced by encoding with a made-up vocabulary of the 256 byte
//     tokens plus those words (Llama-3 takes a word that is a token whole, llama.cpp's
//     ignore_merges, so no merges are needed; Qwen2 does not, so there the words are looked up);
//  3. every other case must split its ids into groups, one per word, that spell the word with
//     the texts known from 1 (a group of one token whose text is unknown is a new word; a longer
//     group may hold unknown tokens, each some non-empty part of the word).
TEST_P(SplitVocabTest, SplitsExplainTheLlamaCppIds) {
  const std::string name = GetParam();
  auto splitter = BytesOnly(name);
  ASSERT_NE(splitter, nullptr);
  const auto cases = ReadCases(name);
  const auto expected = ReadIds(name);
  ASSERT_EQ(expected.size(), cases.size());
  const std::vector<int> order = ByteOrder();
  std::map<std::string, int32_t> word_id;
  std::map<int32_t, std::string> id_word;
  for (int i = 0; i < 256; ++i) {
    word_id[std::string(1, static_cast<char>(order[i]))] = i;
    id_word[i] = std::string(1, static_cast<char>(order[i]));
  }
  std::vector<std::vector<std::string>> words(cases.size());
  std::vector<size_t> one_per_word;
  for (size_t i = 0; i < cases.size(); ++i) {
    words[i] = splitter->PreTokenize(cases[i]);
    if (words[i].size() != expected[i].size()) continue;
    one_per_word.push_back(i);
    for (size_t k = 0; k < words[i].size(); ++k) {
      const std::string& w = words[i][k];
      const int32_t id = expected[i][k];
      const auto [wi, new_word] = word_id.emplace(w, id);
      const auto [ii, new_id] = id_word.emplace(id, w);
      EXPECT_TRUE(wi->second == id && ii->second == w)
          << "vocab " << name << ", case " << i << ": word " << Escape(w) << " is token " << id << " here, but "
          << (wi->second != id ? "token " + std::to_string(wi->second) : "the word " + Escape(ii->second))
          << " elsewhere";
    }
  }

  // 2. Reproduce the ids of the one-token-per-word cases.
  TokenizerData d;
  d.model = "gpt2";
  d.pre = name;
  const int32_t n_vocab = id_word.rbegin()->first + 1;
  for (int32_t id = 0; id < n_vocab; ++id) {
    auto it = id_word.find(id);
    // Ids no case shows get a text no word can be (a raw space never occurs in byte-level text).
    d.tokens.push_back(it != id_word.end() ? Mapped(it->second) : "[unseen " + std::to_string(id) + "]");
  }
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const bool ignore_merges = name == "llama-bpe";
  for (const size_t i : one_per_word) {
    std::vector<int32_t> ids;
    if (ignore_merges) {
      ids = (*tok)->Encode(cases[i], false);
    } else {
      for (const std::string& w : words[i]) ids.push_back(word_id.at(w));
    }
    EXPECT_EQ(ids, expected[i]) << "vocab " << name << ", case " << i << ": text " << Escape(cases[i])
                                << "\n  expected " << Join(expected[i]) << "\n  actual   " << Join(ids);
  }

  // 3. The other cases: the ids must group into the words.
  size_t aligned = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (words[i].size() == expected[i].size()) continue;
    const std::vector<std::string>& w = words[i];
    const std::vector<int32_t>& ids = expected[i];
    // reach[k][j]: words [0, k) use exactly ids [0, j).
    std::vector<std::vector<char>> reach(w.size() + 1, std::vector<char>(ids.size() + 1, 0));
    reach[0][0] = 1;
    for (size_t k = 0; k < w.size(); ++k) {
      for (size_t j = 0; j < ids.size(); ++j) {
        if (!reach[k][j]) continue;
        if (auto known = word_id.find(w[k]); known != word_id.end()) {  // a known word is its token
          if (ids[j] == known->second) reach[k + 1][j + 1] = 1;
          continue;
        }
        for (size_t g = 1; j + g <= ids.size() && g <= w[k].size(); ++g) {  // a token has >= 1 byte
          std::vector<std::string> parts;
          bool fits = true;
          for (size_t q = j; q < j + g; ++q) {
            auto it = id_word.find(ids[q]);
            parts.push_back(it != id_word.end() ? it->second : "");
            if (g == 1 && it != id_word.end()) fits = false;  // another word's token
          }
          if (fits && Spells(w[k], parts)) reach[k + 1][j + g] = 1;
        }
      }
    }
    EXPECT_TRUE(reach[w.size()][ids.size()])
        << "vocab " << name << ", case " << i << ": the ids " << Join(ids) << " cannot be the tokens of the words "
        << JoinWords(w) << " of " << Escape(cases[i]);
    aligned += reach[w.size()][ids.size()];
  }
  std::printf("%s: %zu cases one token per word (ids reproduced), %zu of %zu others consistent with the ids\n",
              name.c_str(), one_per_word.size(), aligned, cases.size() - one_per_word.size());
}

INSTANTIATE_TEST_SUITE_P(NoGguf, SplitVocabTest, ::testing::Values("llama-bpe", "qwen2"), [](const auto& p) {
  std::string s = p.param;
  std::replace(s.begin(), s.end(), '-', '_');
  return s;
});

// ---- pre-tokenizers by hand ----

std::vector<std::string> Split(const std::string& pre, const std::string& text) {
  auto tok = BytesOnly(pre);
  return tok ? tok->PreTokenize(text) : std::vector<std::string>{"<no tokenizer>"};
}

using Words = std::vector<std::string>;

// Expectations derived from llama.cpp's regexes (src/llama-vocab.cpp) by hand; each comment says
// which alternative or stage makes the cut.
TEST(PreTokenizer, HandDerivedSplits) {
  // GPT-2: contractions are lowercase only; " ?\p{N}+" keeps a digit run whole; \s+(?!\S)
  // leaves the last space of a run to the next word.
  EXPECT_EQ(Split("gpt-2", "it's 'RE 12345  x"), (Words{"it", "'s", " '", "RE", " 12345", " ", " x"}));
  // Llama-3: (?i:...) contractions, \p{N}{1,3}; [^\r\n\p{L}\p{N}]?\p{L}+ takes one non-letter in
  // front of letters, but a match that starts at the space of " $x" fails there (the space and
  // "$" are two non-letters), so " ?[^\s\p{L}\p{N}]+[\r\n]*" takes " $" and "x" is a word of its
  // own; the same alternative keeps the newlines after "!!".
  EXPECT_EQ(Split("llama-bpe", "it'S 'RE 1234567 $x !!\n\nA"),
            (Words{"it", "'S", " '", "RE", " ", "123", "456", "7", " $", "x", " !!\n\n", "A"}));
  // \s*[\r\n]+: whitespace up to its last newline; then \s+(?!\S) and the word's own space.
  EXPECT_EQ(Split("llama-bpe", "a \n \n  b"), (Words{"a", " \n \n", " ", " b"}));
  // Qwen2: one digit at a time.
  EXPECT_EQ(Split("qwen2", "x 2024"), (Words{"x", " ", "2", "0", "2", "4"}));
  // Falcon: first runs of punctuation and $+<=>^~|` (the space before them stays apart), then
  // GPT-2, then [0-9][0-9][0-9] cuts triples out of the number ("12345" -> "123", "45").
  EXPECT_EQ(Split("falcon", "a+=b 12345 (x)"), (Words{"a", "+=", "b", " ", "123", "45", " ", "(", "x", ")"}));
  // StarCoder/Refact: \p{N} first, so every digit is a piece; then GPT-2 on the rest.
  EXPECT_EQ(Split("starcoder", "v12 ab"), (Words{"v", "1", "2", " ab"}));
  // DeepSeek-Coder: [\r\n], \s?\p{L}+, \s?\p{P}+, the CJK ranges, \p{N}, each stage splitting the
  // pieces of the one before; text no stage matches stays one piece: " +" (a space and '+',
  // which is \p{S}) is what is left of " +1" once \p{N} takes the digit.
  EXPECT_EQ(Split("deepseek-coder", "ab +1,\n你好"), (Words{"ab", " +", "1", ",", "\n", "你好"}));
  // DeepSeek-LLM: \s+$ splits whitespace at the end of a piece; U+3000 (ideographic space) is
  // whitespace, so std::wregex sees U+000B and the CJK range [ࠀ-一] does not take it.
  EXPECT_EQ(Split("deepseek-llm", "Ab  \xe4\xbd\xa0\xe3\x80\x80\xe5\xa5\xbd"),
            (Words{"Ab", "  ", "\xe4\xbd\xa0", "\xe3\x80\x80", "\xe5\xa5\xbd"}));
  // Default (no tokenizer.ggml.pre): punctuation runs first, so "it's" loses its contraction.
  EXPECT_EQ(Split("default", "it's 1234"), (Words{"it", "'", "s", " ", "123", "4"}));
  // BLOOM: " ?[^(\s|.,!?…。，、।۔،)]+", where '(' and ')' are in the excluded class: " (" and ")!"
  // match nothing and stay one piece each, as every gap between matches does.
  EXPECT_EQ(Split("bloom", "Hi, you (x)!"), (Words{"Hi", ",", " you", " (", "x", ")!"}));
}

// Whatever the bytes, the pieces are non-empty and give the text back, for every pre-tokenizer.
TEST(PreTokenizer, PiecesCoverTheTextForEveryPreTokenizer) {
  std::vector<std::string> texts = ReadCases("gpt-2");
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes += static_cast<char>(b);
  texts.push_back(all_bytes);
  std::mt19937 rng(7);
  // Bytes to draw from: ASCII of each class, UTF-8 pieces (é, U+3000, an emoji, 你) and stray bytes.
  static constexpr char kBytes[] = "a1 \n\t'.\xc3\xa9\xe3\x80\x80\xf0\x9f\x98\x81\x80\xff\xe4\xbd\xa0sS3,$";
  for (int i = 0; i < 200; ++i) {
    std::string t;
    const int n = static_cast<int>(rng() % 40);
    for (int k = 0; k < n; ++k) t += kBytes[rng() % (sizeof(kBytes) - 1)];
    texts.push_back(t);
  }
  for (const std::string& pre : Tokenizer::KnownPreTokenizers()) {
    auto tok = BytesOnly(pre);
    ASSERT_NE(tok, nullptr) << pre;
    for (const std::string& t : texts) {
      const std::vector<std::string> words = tok->PreTokenize(t);
      std::string joined;
      for (const std::string& w : words) {
        EXPECT_FALSE(w.empty()) << pre << ": empty piece in " << Escape(t);
        joined += w;
      }
      EXPECT_EQ(joined, t) << pre;
    }
  }
}

TEST(PreTokenizer, UnicodeClasses) {
  EXPECT_EQ(UnicodeFlags('a'), kUnicodeLetter);
  EXPECT_EQ(UnicodeFlags('7'), kUnicodeNumber);
  EXPECT_EQ(UnicodeFlags(' '), kUnicodeSeparator | kUnicodeSpace);
  EXPECT_EQ(UnicodeFlags('\n'), kUnicodeControl | kUnicodeSpace);
  EXPECT_EQ(UnicodeFlags(0x1C), kUnicodeControl);  // not White_Space (Python's str.isspace says yes)
  EXPECT_EQ(UnicodeFlags('$'), kUnicodeSymbol);
  EXPECT_EQ(UnicodeFlags('_'), kUnicodePunctuation);
  EXPECT_EQ(UnicodeFlags(0xBD), kUnicodeNumber);                       // ½ (No)
  EXPECT_EQ(UnicodeFlags(0x0663), kUnicodeNumber);                     // Arabic-Indic three
  EXPECT_EQ(UnicodeFlags(0x3000), kUnicodeSeparator | kUnicodeSpace);  // ideographic space
  EXPECT_EQ(UnicodeFlags(0x17B6), kUnicodeMark);                       // Khmer vowel sign AA (Mc)
  EXPECT_EQ(UnicodeFlags(0x200D), kUnicodeControl);                    // zero width joiner (Cf)
  EXPECT_EQ(UnicodeFlags(0x4E2D), kUnicodeLetter);                     // 中
  EXPECT_EQ(UnicodeFlags(0x1F680), kUnicodeSymbol);                    // 🚀
  EXPECT_EQ(UnicodeFlags(0x20000), kUnicodeLetter);                    // CJK extension B
  EXPECT_EQ(UnicodeFlags(0xE000), kUnicodeControl);                    // private use (Co)
  EXPECT_EQ(UnicodeFlags(0x10FFFF), kUnicodeControl);                  // unassigned (Cn)
  EXPECT_EQ(UnicodeFlags(0x110000), kUnicodeControl);                  // beyond Unicode
}

TEST(PreTokenizer, UnknownNameIsRefusedListingTheKnownOnes) {
  TokenizerData d;
  d.model = "gpt2";
  d.pre = "tekken";
  d.tokens = {"a"};
  auto tok = Tokenizer::FromData(d);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), Code::kUnimplemented);
  for (const char* part : {"tokenizer.ggml.pre", "'tekken'", "gpt-2", "llama-bpe", "qwen2", "deepseek-coder"}) {
    EXPECT_NE(tok.status().message().find(part), std::string::npos) << part << " in " << tok.status().ToString();
  }

  GgufWriter w;
  w.Add("tokenizer.ggml.model", GgufWriter::Str("gpt2"))
      .Add("tokenizer.ggml.pre", GgufWriter::Str("no-such-pre"))
      .Add("tokenizer.ggml.tokens", GgufWriter::StrArray({"a", "b"}))
      .Add("tokenizer.ggml.merges", GgufWriter::StrArray({"a b"}));
  const std::string path = w.WriteTemp("tok_pre.gguf");
  auto gguf = GgufFile::Open(path);
  std::remove(path.c_str());
  ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
  auto from_file = Tokenizer::FromGguf(**gguf);
  ASSERT_FALSE(from_file.ok());
  EXPECT_EQ(from_file.status().code(), Code::kUnimplemented);
  for (const char* part : {"tok_pre.gguf", "tokenizer.ggml.pre", "'no-such-pre'", "(known: default, llama3"}) {
    EXPECT_NE(from_file.status().message().find(part), std::string::npos)
        << part << " in " << from_file.status().ToString();
  }
}

// Llama-3 files add BOS by default (llama.cpp), other gpt2 vocabularies do not.
TEST(PreTokenizer, Llama3AddsBosByDefault) {
  for (const auto& [pre, add_bos] : std::vector<std::pair<std::string, bool>>{{"llama-bpe", true}, {"qwen2", false}}) {
    GgufWriter w;
    w.Add("tokenizer.ggml.model", GgufWriter::Str("gpt2"))
        .Add("tokenizer.ggml.pre", GgufWriter::Str(pre))
        .Add("tokenizer.ggml.tokens", GgufWriter::StrArray({"a", "b", "<s>"}))
        .Add("tokenizer.ggml.merges", GgufWriter::StrArray({"a b"}))
        .Add("tokenizer.ggml.bos_token_id", GgufWriter::U32(2));
    const std::string path = w.WriteTemp("tok_bos.gguf");
    auto gguf = GgufFile::Open(path);
    std::remove(path.c_str());
    ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
    auto tok = Tokenizer::FromGguf(**gguf);
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    EXPECT_EQ((*tok)->add_bos(), add_bos) << pre;
  }
}

// ---- Tokenizer::PieceEncoder: a text encoded a piece at a time has the whole text's ids ----

const char* const kAllInp[] = {"bert-bge", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
                               "llama-spm", "mpt", "phi-3", "qwen2", "refact", "starcoder"};

// Every vocabulary test's cases and the start of valid.txt as one text: many places to cut (an
// ASCII letter or digit, then a newline), and around them what the cases exercise (whitespace
// runs, digits, contractions, punctuation before newlines, CJK, emoji, invalid UTF-8).
std::string PieceText() {
  std::string text;
  for (const char* name : kAllInp) text += ReadFile(kVocabDir + "ggml-vocab-" + name + ".gguf.inp");
  text += ReadFile(test::DataPath("valid.txt")).substr(0, 40000);
  return text;
}

// `text` through a PieceEncoder in parts of 1 to 300 bytes; *before_finish: bytes encoded before
// Finish (0 would mean the text was never cut).
std::vector<int32_t> EncodeInPieces(const Tokenizer& tok, const std::string& text, size_t piece_bytes,
                                    uint64_t* before_finish) {
  Tokenizer::PieceEncoder enc(tok, true, piece_bytes);
  std::vector<int32_t> ids;
  std::mt19937 rng(7);
  for (size_t at = 0; at < text.size();) {
    const size_t n = std::min<size_t>(text.size() - at, 1 + rng() % 300);
    enc.Add(std::string_view(text).substr(at, n), ids);
    at += n;
  }
  *before_finish = enc.bytes_encoded();
  enc.Finish(ids);
  return ids;
}

// Where two id lists first differ, for a readable failure ("" when equal).
std::string FirstDifference(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  if (a == b) return "";
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return "sizes " + std::to_string(a.size()) + " / " + std::to_string(b.size()) + ", first difference at id " +
         std::to_string(i);
}

TEST(PieceEncoder, SameIdsAsTheWholeTextForEveryVocabulary) {
  const std::string text = PieceText();
  std::vector<std::pair<std::string, std::unique_ptr<Tokenizer>>> toks;
  for (const char* name : {"bert-bge", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-spm", "mpt",
                           "phi-3", "refact", "starcoder"})
    toks.emplace_back(name, LoadVocab(name));
  // The models of the engine tests (SentencePiece vocabularies with BOS and the space prefix).
  for (const char* model : {"stories260K", "brown-kjv-llama-6M-f32", "eval-llama-27M-v3-q8_0"}) {
    auto gguf = GgufFile::Open(test::DataPath(std::string(model) + ".gguf"));
    ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
    auto tok = Tokenizer::FromGguf(**gguf);
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    toks.emplace_back(model, std::move(tok).value());
  }
  for (const auto& [name, tok] : toks) {
    SCOPED_TRACE(name);
    ASSERT_NE(tok, nullptr);
    const std::vector<int32_t> whole = tok->Encode(text, true);
    for (const size_t piece : {size_t{1}, size_t{64}, size_t{4096}}) {
      uint64_t before = 0;
      EXPECT_EQ(FirstDifference(EncodeInPieces(*tok, text, piece, &before), whole), "") << "piece_bytes " << piece;
      EXPECT_GT(before, text.size() / 2) << "piece_bytes " << piece << ": the text was hardly cut";
    }
    // A text that ends at a place to cut, and an empty one: BOS / EOS as Encode.
    for (const std::string& t : {std::string("abc\n"), std::string("Hello world\nagain"), std::string()}) {
      uint64_t before = 0;
      EXPECT_EQ(FirstDifference(EncodeInPieces(*tok, t, 1, &before), tok->Encode(t, true)), "") << Escape(t);
    }
  }
}

// A vocabulary with a token holding "b\n": a cut after "b" would split it ("▁a", "b" | "\n", ...
// instead of "▁a", "b\n"), so the text is not cut there; after "c" it is. The same for "b▁".
TEST(PieceEncoder, NoCutWhereATokenSpansIt) {
  TokenizerData d;
  d.model = "llama";
  d.tokens = {"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b", "c", "\n", "b\n", "\xe2\x96\x81" "a", "ab"};
  d.scores = {0, 0, 0, -1, -1, -1, -1, -1, -1, -2, -3};
  d.types = {2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
  d.bos_id = 1;
  d.eos_id = 2;
  auto tok = Tokenizer::FromData(d);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const std::string text = "ab\nab\nab\nac\nab\n";
  const std::vector<int32_t> whole = (*tok)->Encode(text, true);
  EXPECT_NE(std::find(whole.begin(), whole.end(), 8), whole.end());  // "b\n" is used
  uint64_t before = 0;
  EXPECT_EQ(FirstDifference(EncodeInPieces(**tok, text, 1, &before), whole), "");
  EXPECT_EQ(before, 11u);  // cut only after "ac": "ab\nab\nab\nac" | "\nab\n"
  EXPECT_FALSE((*tok)->CanCutAt(text, 2));
  EXPECT_TRUE((*tok)->CanCutAt(text, 11));

  d.tokens[8] = "b\xe2\x96\x81";
  auto spaced = Tokenizer::FromData(d);
  ASSERT_TRUE(spaced.ok()) << spaced.status().ToString();
  const std::string words = "ab ab ab ac ab ";
  const std::vector<int32_t> ids = (*spaced)->Encode(words, true);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 8), ids.end());  // "b▁" is used
  EXPECT_EQ(FirstDifference(EncodeInPieces(**spaced, words, 1, &before), ids), "");
  EXPECT_EQ(before, 11u);
  EXPECT_FALSE((*spaced)->CanCutAt(words, 2));
  EXPECT_TRUE((*spaced)->CanCutAt(words, 11));
  EXPECT_TRUE((*spaced)->CanCutAt(text, 2));  // "b\n" is no token of this one
}

// At every place a PieceEncoder may cut, every pre-tokenizer's words are the same whether the text
// is split there or not: the split adds no word boundary and moves none. (For the gpt2 vocabularies
// without a GGUF here, llama-bpe and qwen2, this is what makes their ids equal.)
TEST(PieceEncoder, PreTokenizersEndAWordAtEveryCut) {
  const std::string text = PieceText();
  for (const std::string& pre : Tokenizer::KnownPreTokenizers()) {
    SCOPED_TRACE(pre);
    auto tok = BytesOnly(pre);
    ASSERT_NE(tok, nullptr);
    std::vector<size_t> cuts = {0};
    for (size_t p = 1; p < text.size(); ++p)
      if (tok->CanCutAt(text, p)) cuts.push_back(p);
    cuts.push_back(text.size());
    ASSERT_GT(cuts.size(), 3000u);
    const std::vector<std::string> whole = tok->PreTokenize(text);
    std::vector<std::string> pieces;
    for (size_t i = 0; i + 1 < cuts.size(); ++i)
      for (std::string& w : tok->PreTokenize(text.substr(cuts[i], cuts[i + 1] - cuts[i]))) pieces.push_back(std::move(w));
    ASSERT_EQ(pieces.size(), whole.size());
    for (size_t i = 0; i < whole.size(); ++i) ASSERT_EQ(pieces[i], whole[i]) << "word " << i;
  }
}

}  // namespace
}  // namespace dk
