// libFuzzer target for the tokenizers: arbitrary bytes as text, through the tokenizers of the two
// shipped models (llama.cpp's SentencePiece-style BPE, loaded once), the bert-bge WordPiece test
// vocabulary (no round trip: it lowercases, so no ASCII capital may come back), and a small hand-made GPT-2
// byte-level BPE (with a user-defined and a control token). Checked on every input:
//  - ids are in the vocabulary, and Encode(text, true) is Encode(text, false) with BOS/EOS added
//    exactly as the vocabulary asks;
//  - Decode(ids) is the concatenation of TokenToPiece(id);
//  - the round trip where the tokenizer guarantees it: the GPT-2 BPE (every byte has a token)
//    gives back any input exactly; the llama models (every byte has a <0xXX> token, no
//    user-defined tokens) give back valid UTF-8 with the space prefix added and every "▁"
//    (U+2581, SentencePiece's space) read as a space. Invalid UTF-8 may come back otherwise:
//    byte-fallback tokens decode to raw bytes, so a "▁" split across fallback bytes stays "▁".
// The same bytes read as int32 ids are also decoded (any id, in range or not). The hand-made GPT-2
// vocabulary is also run with every pre-tokenizer llama.cpp names (Tokenizer::KnownPreTokenizers:
// llama3, qwen2, falcon, deepseek-*, ...): the pieces are non-empty, give the text back, and the
// byte-level round trip holds whatever the pre-tokenizer.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace {

using namespace dk;

struct Subject {
  std::string name;
  std::unique_ptr<Tokenizer> tok;
  bool byte_level;  // gpt2: lossless on any bytes
  bool encode = true;  // false: only the pre-tokenizer is checked (cheap), not the whole Encode
  bool round_trip = true;  // false: lossy by design (WordPiece lowercases, drops accents and spaces)
};

std::unique_ptr<Tokenizer> FromModel(const std::string& file) {
  const std::string path = std::string(DK_TEST_DATA) + "/" + file;
  auto gguf = GgufFile::Open(path);
  FUZZ_CHECK(gguf.ok(), "cannot open " + path + ": " + gguf.status().ToString());
  auto tok = Tokenizer::FromGguf(**gguf);
  FUZZ_CHECK(tok.ok(), "no tokenizer in " + path + ": " + tok.status().ToString());
  return std::move(tok).value();
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256, 257, ...
std::string ByteChar(int b) {
  int next = 256, cp = 0;
  for (int x = 0; x <= b; ++x) {
    const bool printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
    cp = printable ? x : next++;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

std::string Mapped(std::string_view raw) {
  std::string s;
  for (const char c : raw) s += ByteChar(static_cast<unsigned char>(c));
  return s;
}

std::unique_ptr<Tokenizer> Gpt2(const std::string& pre) {
  TokenizerData d;
  d.model = "gpt2";
  d.pre = pre;
  d.add_bos = false;
  for (int b = 0; b < 256; ++b) d.tokens.push_back(ByteChar(b));
  const std::pair<const char*, const char*> merges[] = {
      {" ", "t"}, {"h", "e"}, {" t", "he"}, {"i", "n"}, {" ", "a"}, {"e", "r"}, {" ", "s"}, {"o", "n"},
      {"'", "s"}, {" ", " "}, {"\n", "\n"}, {"\xc3", "\xa9"}, {"1", "2"}, {"!", "?"}, {"in", "g"}};
  for (const auto& [l, r] : merges) {
    d.merges.push_back(Mapped(l) + " " + Mapped(r));
    d.tokens.push_back(Mapped(std::string(l) + r));
  }
  d.types.assign(d.tokens.size(), static_cast<int32_t>(TokenType::kNormal));
  d.tokens.push_back("<|user|>");
  d.types.push_back(static_cast<int32_t>(TokenType::kUserDefined));
  d.tokens.push_back("<|endoftext|>");
  d.types.push_back(static_cast<int32_t>(TokenType::kControl));
  d.eos_id = static_cast<int32_t>(d.tokens.size()) - 1;
  auto tok = Tokenizer::FromData(std::move(d));
  FUZZ_CHECK(tok.ok(), "hand-made gpt2 tokenizer, pre-tokenizer '" + pre + "': " + tok.status().ToString());
  return std::move(tok).value();
}

const std::vector<Subject>& Subjects() {
  static const std::vector<Subject>* subjects = [] {
    auto* v = new std::vector<Subject>;
    v->push_back({"stories260K", FromModel("stories260K.gguf"), false});
    v->push_back({"brown-kjv-6M", FromModel("brown-kjv-llama-6M-f32.gguf"), false});
    // WordPiece: ids in range, Decode, BOS/EOS; no round trip (ASCII letters come back lowercase).
    v->push_back({"bert-bge (WordPiece)", FromModel("vocab/ggml-vocab-bert-bge.gguf"), false, true, false});
    // Encode with GPT-2's, Llama-3's and Qwen2's pre-tokenizers; only the pieces with the others
    // (an Encode per pre-tokenizer would cut the executions per second by 30).
    for (const std::string& pre : Tokenizer::KnownPreTokenizers()) {
      const bool encode = pre == "gpt-2" || pre == "llama3" || pre == "qwen2";
      v->push_back({"gpt2 (hand-made), pre-tokenizer " + pre, Gpt2(pre), true, encode});
    }
    return v;
  }();
  return *subjects;
}

// Strictly well-formed as the tokenizer splits it: every lead byte followed by its continuation
// bytes (overlong forms and surrogates included: the splitter goes by the lead byte only).
bool WellFormedUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t len = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

std::string SpmExpected(std::string_view text) {
  std::string out = text.empty() ? "" : " ";
  for (size_t i = 0; i < text.size();) {
    if (text.substr(i, 3) == "\xe2\x96\x81") {
      out += ' ';
      i += 3;
    } else {
      out += text[i++];
    }
  }
  return out;
}

std::string Hex(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (const char c : s.substr(0, 200)) {
    out += kHex[static_cast<unsigned char>(c) >> 4];
    out += kHex[static_cast<unsigned char>(c) & 15];
  }
  return out + (s.size() > 200 ? "..." : "");
}

void CheckPreTokens(const Subject& s, const std::string& text) {
  std::string joined;
  for (const std::string& piece : s.tok->PreTokenize(text)) {
    FUZZ_CHECK(!piece.empty(), s.name + ": an empty pre-token in " + Hex(text));
    joined += piece;
  }
  FUZZ_CHECK(joined == text, s.name + ": the pre-tokens do not give the text back: " + Hex(text));
}

void CheckText(const Subject& s, const std::string& text) {
  const Tokenizer& t = *s.tok;
  const int32_t n = t.vocab_size();
  const std::vector<int32_t> ids = t.Encode(text, false);
  std::string pieces;
  for (const int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < n, s.name + ": Encode gave id " + std::to_string(id));
    pieces += t.TokenToPiece(id);
    (void)t.IsEog(id);
  }
  const std::string decoded = t.Decode(ids);
  FUZZ_CHECK(decoded == pieces, s.name + ": Decode differs from the concatenated pieces");

  std::vector<int32_t> with = t.Encode(text, true);
  std::vector<int32_t> expect;
  if (t.add_bos() && t.bos_id() >= 0) expect.push_back(t.bos_id());
  expect.insert(expect.end(), ids.begin(), ids.end());
  // add_eos is not exposed: accept one trailing EOS.
  if (with.size() == expect.size() + 1 && t.eos_id() >= 0 && with.back() == t.eos_id()) with.pop_back();
  FUZZ_CHECK(with == expect, s.name + ": Encode(text, true) is not Encode(text, false) with BOS/EOS");

  if (s.byte_level) {
    FUZZ_CHECK(decoded == text, s.name + ": round trip lost bytes: in " + Hex(text) + ", out " + Hex(decoded));
  } else if (!s.round_trip) {
    std::string words = decoded;  // the unknown token aside, no ASCII capital comes back
    for (size_t at; (at = words.find("[UNK]")) != std::string::npos;) words.erase(at, 5);
    for (const char c : words) FUZZ_CHECK(!(c >= 'A' && c <= 'Z'), s.name + ": an upper-case letter survived: " + Hex(text));
  } else if (WellFormedUtf8(text)) {
    const std::string want = SpmExpected(text);
    FUZZ_CHECK(decoded == want,
               s.name + ": round trip: in " + Hex(text) + ", out " + Hex(decoded) + ", expected " + Hex(want));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)Subjects();  // load the models before the first input (not counted as a slow unit)
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<int32_t> as_ids(size / 4);
  if (!as_ids.empty()) std::memcpy(as_ids.data(), data, as_ids.size() * 4);
  for (const Subject& s : Subjects()) {
    // Every pre-tokenizer on inputs up to 4 KiB; the seeds' 64 KiB texts only through the three
    // that also Encode (keeps the executions per second up).
    if (s.byte_level && (s.encode || text.size() <= 4096)) CheckPreTokens(s, text);
    if (!s.encode) continue;
    CheckText(s, text);
    (void)s.tok->Decode(as_ids);
  }
  return 0;
}
