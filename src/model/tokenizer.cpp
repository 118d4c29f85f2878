// Tokenizers matching llama.cpp (commit c392e509): llm_tokenizer_spm for "llama" and
// llm_tokenizer_bpe with the pre-tokenizer that tokenizer.ggml.pre names for "gpt2". See tokenizer.h.
#include "model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <iterator>
#include <queue>
#include <string_view>
#include <unordered_set>
#include <utility>

#include "model/gguf.h"

namespace dk {
namespace {

constexpr std::string_view kSpaceMarker = "\xe2\x96\x81";  // U+2581 "▁", SentencePiece's space

// Byte length of the UTF-8 sequence starting with `lead`, as llama.cpp's unicode_len_utf8:
// a stray continuation byte counts as one character.
size_t Utf8Len(unsigned char lead) {
  static constexpr std::array<uint8_t, 16> kLen = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[lead >> 4];
}

void ReplaceAll(std::string& s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out.append(to);
  }
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

void AppendUtf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// One code point of a UTF-8 string. Invalid or truncated sequences yield one byte with
// valid=false, so every input byte belongs to exactly one unit and round trips are exact.
struct CodeUnit {
  uint32_t cp;
  size_t len;
  bool valid;
};

CodeUnit NextCodePoint(std::string_view s, size_t pos) {
  const auto b0 = static_cast<unsigned char>(s[pos]);
  if (b0 < 0x80) return {b0, 1, true};
  size_t len = 0;
  uint32_t cp = 0;
  if ((b0 & 0xE0) == 0xC0) { len = 2; cp = b0 & 0x1F; }
  else if ((b0 & 0xF0) == 0xE0) { len = 3; cp = b0 & 0x0F; }
  else if ((b0 & 0xF8) == 0xF0) { len = 4; cp = b0 & 0x07; }
  else return {b0, 1, false};
  if (pos + len > s.size()) return {b0, 1, false};
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[pos + k]);
    if ((b & 0xC0) != 0x80) return {b0, 1, false};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {cp, len, true};
}

// ---- Unicode classes ----
// Generated from the Unicode Character Database 15.0.0 by scripts/gen_unicode_tables.py.
#include "model/unicode_tables.inc"

constexpr uint16_t kCategoryFlag[7] = {kUnicodeNumber, kUnicodeLetter,      kUnicodeSeparator, kUnicodeMark,
                                       kUnicodePunctuation, kUnicodeSymbol, kUnicodeControl};

uint16_t LookupFlags(uint32_t cp) {
  if (cp > 0x10FFFF) return kUnicodeControl;
  // Last run starting at or before cp.
  const uint32_t* it = std::upper_bound(std::begin(kUnicodeRuns), std::end(kUnicodeRuns), (cp << 3) | 7u);
  return kCategoryFlag[*(it - 1) & 7u];
}

// Flags of the Basic Multilingual Plane, built once; the rest by binary search.
const std::array<uint16_t, 0x10000>& BmpFlags() {
  static const auto* table = [] {
    auto* t = new std::array<uint16_t, 0x10000>;
    for (uint32_t cp = 0; cp < 0x10000; ++cp) (*t)[cp] = LookupFlags(cp);
    for (const uint32_t cp : kUnicodeWhiteSpace) (*t)[cp] |= kUnicodeSpace;
    return t;
  }();
  return *table;
}

// Simple lowercase mapping (UnicodeData field 13), as llama.cpp's unicode_tolower.
uint32_t UnicodeToLower(uint32_t cp) {
  const auto* it = std::lower_bound(std::begin(kUnicodeLower), std::end(kUnicodeLower), cp,
                                    [](const uint32_t(&e)[2], uint32_t v) { return e[0] < v; });
  return it != std::end(kUnicodeLower) && (*it)[0] == cp ? (*it)[1] : cp;
}

// The first code point of cp's canonical decomposition, or cp: llama.cpp's
// unicode_cpts_normalize_nfd, which keeps only that one (combining marks are dropped).
uint32_t UnicodeNfdFirst(uint32_t cp) {
  const auto* it = std::upper_bound(std::begin(kUnicodeNfdFirst), std::end(kUnicodeNfdFirst), cp,
                                    [](uint32_t v, const uint32_t(&e)[3]) { return v < e[0]; });
  if (it == std::begin(kUnicodeNfdFirst)) return cp;
  const uint32_t(&run)[3] = *(it - 1);
  return cp <= run[1] ? run[2] : cp;
}

// ---- Pre-tokenizers (llama.cpp's llm_tokenizer_bpe regex lists, by tokenizer.ggml.pre) ----
//
// llama.cpp runs each vocabulary's list of regexes in turn, each one over every piece the previous
// one left (unicode_regex_split): a regex's matches become pieces, and so does the text between
// them. Two regexes (GPT-2's and Llama-3's) have hand-written splitters there; the others run on
// std::regex over a "collapsed" text in which every non-ASCII code point is one byte standing for
// its class (\p{L}, \p{N}, \p{P}, whitespace or other), or, for regexes without \p{..}, on
// std::wregex over the code points with non-ASCII whitespace replaced by U+000B. Each regex is
// written out here as a scanner over code points with the same (ECMAScript, leftmost, greedy with
// backtracking) semantics on those classes:
//   \p{L}, \p{N}, \p{P}: the Unicode major categories (ASCII included: \p{P} is !"#%&'()*,-./:;?@[\]_{}),
//   \s: White_Space (ASCII \t\n\v\f\r and space, U+0085, U+00A0, U+1680, U+2000-U+200A, ...),
//   explicit ranges ([一-龥], [!-/...]): code point ranges, which non-ASCII whitespace never matches
//   (std::wregex sees U+000B there).
// Bytes that are not UTF-8 count as U+FFFD (a symbol), as llama.cpp reads them; they keep their
// own bytes in the pieces, so splitting never changes the text.
enum class Stage {
  kGpt2,             // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,           // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
                     //   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,            // the same with \p{N} instead of \p{N}{1,3}
  kDefaultPunct,     // [\p{P}\$\+<=>\^~\|]+
  kFalconPunct,      // [\p{P}\$\+<=>\^~\|`]+
  kNumber,           // \p{N}
  kNumbers,          // \p{N}+
  kThreeDigits,      // [0-9][0-9][0-9]
  kNewline,          // [\r\n]
  kSpaceLetters,     // \s?\p{L}+
  kSpacePunct,       // \s?\p{P}+
  kCjk,              // [一-龥ࠀ-一가-퟿]+
  kDeepseekLetters,  // \s?[A-Za-zµÀ-ÖØ-öø-ƺ...𞤀-𞥃]+ (deepseek-llm's list of cased-letter ranges)
  kDeepseekPunct,    // \s?[!-/:-~！-／：-～‘-‟　-。]+
  kTrailingSpace,    // \s+$
  kBloom,            //  ?[^(\s|.,!?…。，、।۔،)]+
};

struct PreTokenizerDef {
  std::vector<const char*> names;  // values of tokenizer.ggml.pre
  std::vector<Stage> stages;
  bool ignore_merges = false;      // a word that is a token is not merged (llama.cpp: llama3)
  bool add_bos = false;            // default of tokenizer.ggml.add_bos_token
};

const std::vector<PreTokenizerDef>& PreTokenizerDefs() {
  using S = Stage;
  static const std::vector<PreTokenizerDef> defs = {
      {{"default"}, {S::kDefaultPunct, S::kGpt2, S::kNumbers, S::kThreeDigits}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3"}, {S::kLlama3}, true, true},
      {{"dbrx", "smaug-bpe", "chatglm-bpe"}, {S::kLlama3}},
      {{"deepseek-llm"},
       {S::kNewline, S::kDeepseekLetters, S::kDeepseekPunct, S::kTrailingSpace, S::kCjk, S::kNumbers}},
      {{"deepseek-coder"}, {S::kNewline, S::kSpaceLetters, S::kSpacePunct, S::kCjk, S::kNumber}},
      {{"falcon"}, {S::kFalconPunct, S::kGpt2, S::kThreeDigits}},
      {{"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}, {S::kNumber, S::kGpt2}},
      {{"gpt-2", "mpt", "olmo", "jais", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
        "jina-v2-de", "jina-v2-code", "roberta-bpe"},
       {S::kGpt2}},
      {{"qwen2", "stablelm2", "megrez"}, {S::kQwen2}},
      {{"poro-chat", "bloom", "gpt3-finnish"}, {S::kBloom}},
      {{"viking"}, {S::kBloom, S::kNumber}},
  };
  return defs;
}

const PreTokenizerDef* FindPreTokenizer(std::string_view name) {
  for (const PreTokenizerDef& def : PreTokenizerDefs()) {
    for (const char* n : def.names) {
      if (name == n) return &def;
    }
  }
  return nullptr;
}

std::string KnownPreTokenizerList() {
  std::string out;
  for (const PreTokenizerDef& def : PreTokenizerDefs()) {
    for (const char* n : def.names) out += (out.empty() ? "" : ", ") + std::string(n);
  }
  return out;
}

bool InRanges(uint32_t cp, std::initializer_list<std::pair<uint32_t, uint32_t>> ranges) {
  for (const auto& [lo, hi] : ranges) {
    if (cp >= lo && cp <= hi) return true;
  }
  return false;
}

// deepseek-llm's letter class. llama.cpp's source spells a few bounds with the canonical
// singletons U+1F7D, U+1FD3, U+1FDB, U+1FBE, U+2126 and U+212A (which NFC would fold into other
// code points); these are the code points.
bool IsDeepseekLetter(uint32_t cp) {
  if (cp < 0x80) return (cp >= 'A' && cp <= 'Z') || (cp >= 'a' && cp <= 'z');
  return InRanges(cp, {{0xB5, 0xB5}, {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x1BA}, {0x1BC, 0x1BF}, {0x1C4, 0x293},
                       {0x295, 0x2AF}, {0x370, 0x373}, {0x376, 0x377}, {0x37B, 0x37D}, {0x37F, 0x37F},
                       {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5},
                       {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556}, {0x10A0, 0x10C5}, {0x13A0, 0x13F5},
                       {0x13F8, 0x13FD}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF}, {0x1D00, 0x1D2B}, {0x1D6B, 0x1D77},
                       {0x1D79, 0x1D9A}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D},
                       {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D},
                       {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC},
                       {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC},
                       {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D},
                       {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2134},
                       {0x2139, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184},
                       {0x2C00, 0x2C7B}, {0x2C7E, 0x2CE4}, {0x2CEB, 0x2CEE}, {0x2CF2, 0x2CF3}, {0xA640, 0xA66D},
                       {0xA680, 0xA69B}, {0xA722, 0xA76F}, {0xA771, 0xA787}, {0xA78B, 0xA78E}, {0xAB70, 0xABBF},
                       {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0x10400, 0x1044F},
                       {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2},
                       {0x118A0, 0x118DF}, {0x1E900, 0x1E943}});
}

// The text as code points with their classes; offs[i] is the byte offset of code point i.
struct CodePoints {
  std::vector<uint32_t> cp;
  std::vector<uint16_t> flags;
  std::vector<size_t> offs;  // size() + 1 entries

  explicit CodePoints(std::string_view text) {
    cp.reserve(text.size());
    flags.reserve(text.size());
    offs.reserve(text.size() + 1);
    for (size_t pos = 0; pos < text.size();) {
      const CodeUnit u = NextCodePoint(text, pos);
      const uint32_t c = u.valid ? u.cp : 0xFFFD;
      cp.push_back(c);
      flags.push_back(UnicodeFlags(c));
      offs.push_back(pos);
      pos += u.len;
    }
    offs.push_back(text.size());
  }
  size_t size() const { return cp.size(); }
};

// One regex (stage) over the piece [b, e) of the code points; appends the end of every piece it
// cuts, the last one being e.
class StageSplitter {
 public:
  StageSplitter(const CodePoints& t, size_t b, size_t e, std::vector<size_t>& ends)
      : t_(t), b_(b), e_(e), last_(b), ends_(ends) {}

  void Run(Stage stage) {
    switch (stage) {
      case Stage::kGpt2: Gpt2(); break;
      case Stage::kLlama3: Llama3(3); break;
      case Stage::kQwen2: Llama3(1); break;
      default: Search(stage); break;
    }
    Emit(e_);
  }

 private:
  // Flags of position i, 0 past the piece (llama.cpp's splitters see nothing there).
  uint16_t F(size_t i) const { return i < e_ ? t_.flags[i] : 0; }
  uint32_t C(size_t i) const { return i < e_ ? t_.cp[i] : 0xFFFFFFFFu; }
  bool Is(size_t i, uint16_t flag) const { return (F(i) & flag) != 0; }
  bool Space(size_t i) const { return Is(i, kUnicodeSpace); }
  bool Letter(size_t i) const { return Is(i, kUnicodeLetter); }
  bool Number(size_t i) const { return Is(i, kUnicodeNumber); }
  // [^\s\p{L}\p{N}]
  bool Other(size_t i) const { return i < e_ && !Is(i, kUnicodeSpace | kUnicodeLetter | kUnicodeNumber); }
  bool CrLf(size_t i) const { return C(i) == '\r' || C(i) == '\n'; }
  // The code point std::wregex sees: non-ASCII whitespace is U+000B there.
  uint32_t W(size_t i) const { return (C(i) >= 0x80 && Space(i)) ? 0x0B : C(i); }

  void Emit(size_t end) {
    if (end > last_) {
      ends_.push_back(end);
      last_ = end;
    }
  }

  // 's|'t|'re|'ve|'m|'ll|'d (ASCII letters; with `fold` either case: no other code point
  // lowercases to one of these letters). Returns the end, or pos when there is none.
  size_t Contraction(size_t pos, bool fold) const {
    if (C(pos) != '\'' || pos + 1 >= e_) return pos;
    auto low = [&](size_t i) {
      const uint32_t c = C(i);
      return (fold && c >= 'A' && c <= 'Z') ? c + 32 : c;
    };
    const uint32_t c1 = low(pos + 1);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return pos + 2;
    if (pos + 2 >= e_) return pos;
    const uint32_t c2 = low(pos + 2);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return pos + 3;
    return pos;
  }

  // Trailing whitespace rule shared by GPT-2 and Llama-3: \s+(?!\S) leaves the last whitespace
  // character of a run to the word after it; \s+ takes a run at the end of the piece.
  size_t SpaceRun(size_t pos) const {
    size_t n = 0;
    while (Space(pos + n)) ++n;
    if (n > 1 && pos + n < e_) return pos + n - 1;
    return pos + std::max<size_t>(n, 1);  // (n == 0 cannot happen: every code point has a class)
  }

  void Gpt2() {
    for (size_t pos = b_; pos < e_;) {
      if (const size_t end = Contraction(pos, false); end != pos) {
        Emit(pos = end);
        continue;
      }
      const size_t head = C(pos) == ' ' ? pos + 1 : pos;  // " ?"
      if (Letter(head) || Number(head)) {
        const uint16_t run = F(head) & (kUnicodeLetter | kUnicodeNumber);
        for (pos = head; Is(pos, run);) ++pos;
        Emit(pos);
        continue;
      }
      if (Other(head)) {
        for (pos = head; Other(pos);) ++pos;
        Emit(pos);
        continue;
      }
      Emit(pos = SpaceRun(pos));
    }
  }

  void Llama3(size_t max_digits) {
    for (size_t pos = b_; pos < e_;) {
      if (const size_t end = Contraction(pos, true); end != pos) {
        Emit(pos = end);
        continue;
      }
      // [^\r\n\p{L}\p{N}]?\p{L}+
      if (!CrLf(pos) && !Number(pos) && (Letter(pos) || Letter(pos + 1))) {
        for (++pos; Letter(pos);) ++pos;
        Emit(pos);
        continue;
      }
      // \p{N}{1,3} (Llama-3) or \p{N} (Qwen2)
      if (Number(pos)) {
        const size_t start = pos;
        while (Number(pos) && pos - start < max_digits) ++pos;
        Emit(pos);
        continue;
      }
      // " ?[^\s\p{L}\p{N}]+[\r\n]*"
      const size_t head = C(pos) == ' ' ? pos + 1 : pos;
      if (Other(head)) {
        for (pos = head; Other(pos);) ++pos;
        while (CrLf(pos)) ++pos;
        Emit(pos);
        continue;
      }
      // \s*[\r\n]+: whitespace up to and including its last \r or \n
      size_t n = 0, crlf_end = 0;
      for (; Space(pos + n); ++n) {
        if (CrLf(pos + n)) crlf_end = pos + n + 1;
      }
      if (crlf_end != 0) {
        Emit(pos = crlf_end);
        continue;
      }
      Emit(pos = SpaceRun(pos));
    }
  }

  // End of the match of `stage` starting at pos, or pos when there is none.
  size_t MatchAt(Stage stage, size_t pos) const {
    // "X+" and "\s?X+" for a class X.
    auto run = [&](auto&& in_class, bool optional_space) {
      size_t i = pos;
      if (optional_space && Space(i) && in_class(i + 1)) ++i;
      while (in_class(i)) ++i;
      return i;
    };
    switch (stage) {
      case Stage::kDefaultPunct:
      case Stage::kFalconPunct:
        return run([&](size_t i) {
          if (Is(i, kUnicodePunctuation)) return true;
          const uint32_t c = C(i);
          return c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' || c == '~' || c == '|' ||
                 (c == '`' && stage == Stage::kFalconPunct);
        }, false);
      case Stage::kNumber:
        return Number(pos) ? pos + 1 : pos;
      case Stage::kNumbers:
        return run([&](size_t i) { return Number(i); }, false);
      case Stage::kThreeDigits: {
        auto digit = [&](size_t i) { return C(i) >= '0' && C(i) <= '9'; };
        return digit(pos) && digit(pos + 1) && digit(pos + 2) ? pos + 3 : pos;
      }
      case Stage::kNewline:
        return CrLf(pos) ? pos + 1 : pos;
      case Stage::kSpaceLetters:
        return run([&](size_t i) { return Letter(i); }, true);
      case Stage::kSpacePunct:
        return run([&](size_t i) { return Is(i, kUnicodePunctuation); }, true);
      case Stage::kCjk:
        return run([&](size_t i) {
          const uint32_t c = W(i);
          return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x0800 && c <= 0x4E00) || (c >= 0xAC00 && c <= 0xD7FF);
        }, false);
      case Stage::kDeepseekLetters:
        return run([&](size_t i) { return i < e_ && IsDeepseekLetter(W(i)); }, true);
      case Stage::kDeepseekPunct:
        return run([&](size_t i) {
          const uint32_t c = W(i);
          return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x7E) || (c >= 0xFF01 && c <= 0xFF0F) ||
                 (c >= 0xFF1A && c <= 0xFF5E) || (c >= 0x2018 && c <= 0x201F) || (c >= 0x3000 && c <= 0x3002);
        }, true);
      case Stage::kTrailingSpace: {
        size_t i = pos;
        while (Space(i)) ++i;
        return i == e_ ? i : pos;  // $: only a run that reaches the end of the piece
      }
      case Stage::kBloom: {
        auto in_class = [&](size_t i) {
          if (i >= e_ || Space(i)) return false;
          const uint32_t c = W(i);
          return !(c == '(' || c == '|' || c == '.' || c == ',' || c == '!' || c == '?' || c == ')' ||
                   c == 0x2026 || c == 0x3002 || c == 0xFF0C || c == 0x3001 || c == 0x0964 || c == 0x06D4 ||
                   c == 0x060C);
        };
        size_t i = pos;
        if (C(i) == ' ' && in_class(i + 1)) ++i;
        while (in_class(i)) ++i;
        return i;
      }
      case Stage::kGpt2:
      case Stage::kLlama3:
      case Stage::kQwen2:
        break;
    }
    return pos;
  }

  // std::regex_iterator: the leftmost match, then on from its end; the text between matches is
  // a piece of its own.
  void Search(Stage stage) {
    for (size_t pos = b_; pos < e_;) {
      const size_t end = MatchAt(stage, pos);
      if (end == pos) {
        ++pos;
        continue;
      }
      Emit(pos);
      Emit(pos = end);
    }
  }

  const CodePoints& t_;
  const size_t b_, e_;
  size_t last_;
  std::vector<size_t>& ends_;
};

// Splits text into pre-tokens (byte ranges of text) with the stages of one pre-tokenizer.
std::vector<std::string_view> PreTokenizeWith(const PreTokenizerDef& def, std::string_view text) {
  const CodePoints t(text);
  std::vector<size_t> ends = {t.size()}, next;
  if (t.size() == 0) ends.clear();
  for (const Stage stage : def.stages) {
    next.clear();
    size_t b = 0;
    for (const size_t e : ends) {
      StageSplitter(t, b, e, next).Run(stage);
      b = e;
    }
    std::swap(ends, next);
  }
  std::vector<std::string_view> words;
  words.reserve(ends.size());
  size_t b = 0;
  for (const size_t e : ends) {
    words.push_back(text.substr(t.offs[b], t.offs[e] - t.offs[b]));
    b = e;
  }
  return words;
}

// GPT-2's reversible byte -> printable code point mapping.
std::array<uint32_t, 256> Gpt2ByteToCodePoint() {
  std::array<uint32_t, 256> map{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? b : next++;
  }
  return map;
}

int32_t ParseByteToken(const std::string& text) {
  // "<0xXX>"
  if (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>') return -1;
  int32_t value = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char h = text[i];
    int d = (h >= '0' && h <= '9') ? h - '0' : (h >= 'A' && h <= 'F') ? h - 'A' + 10
          : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : -1;
    if (d < 0) return -1;
    value = value * 16 + d;
  }
  return value;
}

// Texts llama.cpp treats as end-of-generation when they are control tokens.
bool IsEogText(const std::string& t) {
  return t == "<|eot_id|>" || t == "<|im_end|>" || t == "<|end|>" || t == "<end_of_turn>" ||
         t == "<|endoftext|>" || t == "<|eom_id|>" || t == "<EOT>";
}

}  // namespace

uint16_t UnicodeFlags(uint32_t cp) { return cp < 0x10000 ? BmpFlags()[cp] : LookupFlags(cp); }

struct Tokenizer::Impl {
  TokenizerData data;
  bool is_llama = true;
  bool is_bert = false;        // WordPiece (llama.cpp's WPM): no merges, longest match per word
  size_t max_token_len = 0;    // bert: the longest token text, in bytes
  // Bytes X where some token's text has X followed by a newline / by a space (" " or "▁"): a text
  // is not cut between X and that character (Tokenizer::CanCutAt), as a token could span the cut.
  std::array<bool, 256> before_newline_in_token{}, before_space_in_token{};
  const PreTokenizerDef* pre = nullptr;  // gpt2
  std::unordered_map<std::string_view, int32_t> token_to_id;  // views into data.tokens
  std::array<int32_t, 256> byte_token{};                      // llama byte fallback per byte
  std::vector<int32_t> user_defined;                          // longest text first
  std::vector<int32_t> special_tokens;  // control, unknown and user-defined, longest text first
  std::unordered_set<int32_t> eog;
  // gpt2
  std::unordered_map<std::string, int32_t> merge_rank;  // key: MergeKey(left, right)
  std::array<std::string, 256> byte_to_unicode;         // byte -> UTF-8 of its mapped code point
  std::unordered_map<uint32_t, uint8_t> unicode_to_byte;

  static std::string MergeKey(std::string_view left, std::string_view right) {
    std::string key = std::to_string(left.size());
    key += ':';
    key.append(left);
    key.append(right);
    return key;
  }

  TokenType TypeOf(int32_t id) const {
    return data.types.empty() ? TokenType::kNormal : static_cast<TokenType>(data.types[id]);
  }
  int32_t Lookup(std::string_view text) const {
    auto it = token_to_id.find(text);
    return it == token_to_id.end() ? -1 : it->second;
  }

  void EncodeSpm(const std::string& escaped, std::vector<int32_t>& out) const;
  std::vector<int32_t> EncodeText(std::string_view text, bool add_special,
                                  const std::vector<int32_t>& split_out) const;
  // The text's fragments encoded (no BOS / EOS); prev_special: whether the text's first raw
  // fragment gets the space prefix (llama), left as the next text would need it.
  void EncodeFragments(std::string_view text, const std::vector<int32_t>& split_out, bool& prev_special,
                       std::vector<int32_t>& out) const;
  void EncodeBpeWord(std::string_view word, std::vector<int32_t>& out) const;
  void EncodeWpm(std::string_view text, std::vector<int32_t>& out) const;
};

// ---- bert (WordPiece, as llama.cpp's llm_tokenizer_wpm) ----
// Words: the text's code points (invalid UTF-8 as U+FFFD) mapped to the first code point of their
// canonical decomposition and lowercased; split at White_Space, which is dropped; control
// characters (category C), U+0000 and U+FFFD dropped; punctuation, ASCII symbols and CJK ideographs
// each a word of their own. Each word, with "▁" (the converter's mark of a word start) in front, is
// cut greedily into the longest vocabulary entries from the left, by bytes; a word with a byte
// no entry covers becomes the unknown token as a whole.
namespace {
bool IsCjkIdeograph(uint32_t cp) {
  return InRanges(cp, {{0x4E00, 0x9FFF}, {0x3400, 0x4DBF}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B73F}, {0x2B740, 0x2B81F},
                       {0x2B920, 0x2CEAF}, {0xF900, 0xFAFF}, {0x2F800, 0x2FA1F}});
}
}  // namespace

void Tokenizer::Impl::EncodeWpm(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::string> words(1);
  for (size_t pos = 0; pos < text.size();) {
    const CodeUnit u = NextCodePoint(text, pos);
    pos += u.len;
    const uint32_t cp = UnicodeNfdFirst(u.valid ? u.cp : 0xFFFD);
    const uint16_t flags = UnicodeFlags(cp);
    if (flags & kUnicodeSpace) {
      if (!words.back().empty()) words.emplace_back();
      continue;
    }
    if (cp == 0 || cp == 0xFFFD || (flags & kUnicodeControl)) continue;
    std::string s;
    AppendUtf8(UnicodeToLower(cp), s);
    if ((flags & kUnicodePunctuation) || (cp < 0x7F && (flags & kUnicodeSymbol)) || IsCjkIdeograph(cp)) {
      if (!words.back().empty()) words.emplace_back();
      words.back() = std::move(s);
      words.emplace_back();
    } else {
      words.back() += s;
    }
  }
  for (const std::string& word : words) {
    if (word.empty()) continue;
    const std::string w = std::string(kSpaceMarker) + word;
    const size_t start = out.size();
    const size_t n = w.size();
    for (size_t i = 0; i < n; ++i) {
      bool match = false;
      for (size_t j = std::min(n, i + max_token_len + 1); j > i; --j) {
        const int32_t id = Lookup(std::string_view(w).substr(i, j - i));
        if (id >= 0) {
          out.push_back(id);
          match = true;
          i = j - 1;
          break;
        }
      }
      if (!match) {  // discard the word's tokens so far
        out.resize(start);
        break;
      }
    }
    if (out.size() == start && data.unk_id >= 0) out.push_back(data.unk_id);
  }
}

// ---- llama (SentencePiece BPE by scores) ----
void Tokenizer::Impl::EncodeSpm(const std::string& text, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t prev, next;
    size_t start, n;
  };
  struct Bigram {
    int32_t left, right;
    float score;
    size_t size;
  };
  // Highest score first; ties go to the leftmost pair.
  auto lower = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::vector<Symbol> symbols;
  for (size_t offs = 0; offs < text.size();) {
    const size_t len = std::min(text.size() - offs, Utf8Len(static_cast<unsigned char>(text[offs])));
    const auto idx = static_cast<int32_t>(symbols.size());
    symbols.push_back({idx - 1, offs + len == text.size() ? -1 : idx + 1, offs, len});
    offs += len;
  }
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower)> queue(lower);
  auto try_add = [&](int32_t left, int32_t right) {
    if (left == -1 || right == -1) return;
    const std::string_view pair(text.data() + symbols[left].start, symbols[left].n + symbols[right].n);
    const int32_t id = Lookup(pair);
    if (id < 0) return;
    const float score = data.scores.empty() ? 0.0f : data.scores[id];
    queue.push({left, right, score, pair.size()});
  };
  for (size_t i = 1; i < symbols.size(); ++i) try_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = symbols[b.left];
    Symbol& r = symbols[b.right];
    // Stale entry: one side was merged away or grew since the pair was queued.
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }

  // Every merged symbol is a vocabulary token by construction; a leftover single character
  // that is not falls back to its bytes.
  for (int32_t i = symbols.empty() ? -1 : 0; i != -1; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    const int32_t id = Lookup(std::string_view(text.data() + s.start, s.n));
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    for (size_t k = 0; k < s.n; ++k) {
      const int32_t byte_id = byte_token[static_cast<unsigned char>(text[s.start + k])];
      if (byte_id >= 0) out.push_back(byte_id);
    }
  }
}

// ---- gpt2 (byte-level BPE by merge rank) ----
void Tokenizer::Impl::EncodeBpeWord(std::string_view word, std::vector<int32_t>& out) const {
  std::string mapped;
  for (const char c : word) mapped += byte_to_unicode[static_cast<unsigned char>(c)];
  if (pre->ignore_merges) {  // llama.cpp's ignore_merges (Llama-3): a word that is a token stays whole
    if (const int32_t id = Lookup(mapped); id >= 0) {
      out.push_back(id);
      return;
    }
  }

  struct Symbol {
    int32_t prev, next;
    size_t start, n;
  };
  struct Bigram {
    int32_t left, right;
    int32_t rank;
    size_t size;
  };
  // Lowest rank first; ties go to the leftmost pair.
  auto later = [](const Bigram& a, const Bigram& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  std::vector<Symbol> symbols;
  for (size_t offs = 0; offs < mapped.size();) {
    const size_t len = std::min(mapped.size() - offs, Utf8Len(static_cast<unsigned char>(mapped[offs])));
    const auto idx = static_cast<int32_t>(symbols.size());
    symbols.push_back({idx - 1, offs + len == mapped.size() ? -1 : idx + 1, offs, len});
    offs += len;
  }
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(later)> queue(later);
  auto view = [&](const Symbol& s) { return std::string_view(mapped.data() + s.start, s.n); };
  auto try_add = [&](int32_t left, int32_t right) {
    if (left == -1 || right == -1) return;
    auto it = merge_rank.find(MergeKey(view(symbols[left]), view(symbols[right])));
    if (it == merge_rank.end()) return;
    queue.push({left, right, it->second, symbols[left].n + symbols[right].n});
  };
  for (size_t i = 1; i < symbols.size(); ++i) try_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = symbols[b.left];
    Symbol& r = symbols[b.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }

  for (int32_t i = symbols.empty() ? -1 : 0; i != -1; i = symbols[i].next) {
    const std::string_view piece = view(symbols[i]);
    const int32_t id = Lookup(piece);
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    // As llama.cpp: try each byte of the piece as a one-character token, drop the rest.
    for (const char c : piece) {
      const int32_t byte_id = Lookup(std::string_view(&c, 1));
      if (byte_id >= 0) out.push_back(byte_id);
    }
  }
}

// ---- construction ----
StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromData(TokenizerData data) {
  const bool is_llama = data.model == "llama", is_bert = data.model == "bert";
  const bool is_gpt2 = !is_llama && !is_bert;
  if (is_gpt2 && data.model != "gpt2") {
    return Unimplemented("tokenizer.ggml.model: unsupported tokenizer model '" + data.model +
                         "' (supported: llama, gpt2, bert)");
  }
  const size_t n = data.tokens.size();
  if (n == 0) return InvalidArgument("tokenizer.ggml.tokens: vocabulary is empty");
  if (n > static_cast<size_t>(INT32_MAX)) return InvalidArgument("tokenizer.ggml.tokens: too many tokens");
  if (!data.scores.empty() && data.scores.size() != n) {
    return InvalidArgument("tokenizer.ggml.scores: expected " + std::to_string(n) + " entries (one per token), found " +
                           std::to_string(data.scores.size()));
  }
  if (!data.types.empty() && data.types.size() != n) {
    return InvalidArgument("tokenizer.ggml.token_type: expected " + std::to_string(n) +
                           " entries (one per token), found " + std::to_string(data.types.size()));
  }
  for (size_t i = 0; i < data.types.size(); ++i) {
    if (data.types[i] < 0 || data.types[i] > static_cast<int32_t>(TokenType::kByte)) {
      return InvalidArgument("tokenizer.ggml.token_type: token " + std::to_string(i) + " has unknown type " +
                             std::to_string(data.types[i]) + " (expected 0..6)");
    }
  }
  const std::pair<const char*, int32_t> specials[] = {
      {"tokenizer.ggml.bos_token_id", data.bos_id}, {"tokenizer.ggml.eos_token_id", data.eos_id},
      {"tokenizer.ggml.unknown_token_id", data.unk_id}, {"tokenizer.ggml.padding_token_id", data.pad_id}};
  for (const auto& [key, id] : specials) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return InvalidArgument(std::string(key) + ": id " + std::to_string(id) + " is outside the vocabulary of " +
                             std::to_string(n) + " tokens");
    }
  }

  const PreTokenizerDef* pre = nullptr;
  if (is_gpt2) {
    pre = FindPreTokenizer(data.pre.empty() ? "default" : data.pre);
    if (pre == nullptr) {
      return Unimplemented("tokenizer.ggml.pre: unknown pre-tokenizer '" + Printable(data.pre) + "' (known: " +
                           KnownPreTokenizerList() + ")");
    }
  }

  auto impl = std::make_unique<Impl>();
  impl->data = std::move(data);
  impl->is_llama = is_llama;
  impl->is_bert = is_bert;
  impl->pre = pre;
  const TokenizerData& d = impl->data;
  impl->token_to_id.reserve(n);
  for (size_t i = 0; i < n; ++i) impl->token_to_id[d.tokens[i]] = static_cast<int32_t>(i);  // last wins, as llama.cpp

  for (size_t i = 0; i < n; ++i) {
    if (impl->TypeOf(static_cast<int32_t>(i)) == TokenType::kUserDefined) {
      impl->user_defined.push_back(static_cast<int32_t>(i));
    }
    if (impl->TypeOf(static_cast<int32_t>(i)) == TokenType::kControl && IsEogText(d.tokens[i])) {
      impl->eog.insert(static_cast<int32_t>(i));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const TokenType t = impl->TypeOf(static_cast<int32_t>(i));
    if (t == TokenType::kControl || t == TokenType::kUnknown || t == TokenType::kUserDefined)
      impl->special_tokens.push_back(static_cast<int32_t>(i));
  }
  auto longer = [&](int32_t a, int32_t b) { return d.tokens[a].size() > d.tokens[b].size(); };
  std::stable_sort(impl->user_defined.begin(), impl->user_defined.end(), longer);
  std::stable_sort(impl->special_tokens.begin(), impl->special_tokens.end(), longer);
  if (d.eos_id >= 0) impl->eog.insert(d.eos_id);
  for (const std::string& t : d.tokens) {
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      const auto x = static_cast<unsigned char>(t[i]);
      if (t[i + 1] == '\n') impl->before_newline_in_token[x] = true;
      if (t[i + 1] == ' ' || t.compare(i + 1, kSpaceMarker.size(), kSpaceMarker) == 0) impl->before_space_in_token[x] = true;
    }
  }

  if (is_bert) {
    for (const std::string& t : d.tokens) impl->max_token_len = std::max(impl->max_token_len, t.size());
  } else if (is_llama) {
    // Byte fallback: "<0xXX>", else the byte itself as a token (llama.cpp's byte_to_token),
    // else the unknown token.
    for (int b = 0; b < 256; ++b) {
      static constexpr char kHex[] = "0123456789ABCDEF";
      const char name[7] = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>', 0};
      int32_t id = impl->Lookup(name);
      if (id < 0) {
        const char raw = static_cast<char>(b);
        id = impl->Lookup(std::string_view(&raw, 1));
      }
      impl->byte_token[b] = id >= 0 ? id : d.unk_id;
    }
  } else {
    const auto map = Gpt2ByteToCodePoint();
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(map[b], impl->byte_to_unicode[b]);
      impl->unicode_to_byte[map[b]] = static_cast<uint8_t>(b);
    }
    impl->merge_rank.reserve(d.merges.size());
    for (size_t i = 0; i < d.merges.size(); ++i) {
      const std::string& m = d.merges[i];
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) {
        return InvalidArgument("tokenizer.ggml.merges: entry " + std::to_string(i) + " ('" + m +
                               "') is not two symbols separated by a space");
      }
      // emplace keeps the first (highest-priority) rank of a duplicated merge.
      impl->merge_rank.emplace(Impl::MergeKey(std::string_view(m).substr(0, sp), std::string_view(m).substr(sp + 1)),
                               static_cast<int32_t>(i));
    }
  }

  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  tok->impl_ = std::move(impl);
  return tok;
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  auto fail = [&](const Status& s) { return Status(s.code() == Code::kInvalidArgument ? Code::kCorrupt : s.code(),
                                                   gguf.path() + ": " + s.message()); };
  TokenizerData d;
  DK_ASSIGN_OR_RETURN(d.model, gguf.GetString("tokenizer.ggml.model"));
  const bool is_llama = d.model == "llama", is_bert = d.model == "bert";
  if (!is_llama && !is_bert && d.model != "gpt2") {
    return Unimplemented(gguf.path() + ": tokenizer.ggml.model: unsupported tokenizer model '" + Printable(d.model) +
                         "' (supported: llama, gpt2, bert)");
  }
  DK_ASSIGN_OR_RETURN(d.tokens, gguf.GetStringArray("tokenizer.ggml.tokens"));
  if (d.tokens.empty()) return Corrupt(gguf.path() + ": tokenizer.ggml.tokens: vocabulary is empty");
  if (gguf.Find("tokenizer.ggml.scores") != nullptr) {
    DK_ASSIGN_OR_RETURN(d.scores, gguf.GetFloatArray("tokenizer.ggml.scores"));
  }
  if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
    DK_ASSIGN_OR_RETURN(d.types, gguf.GetIntArray("tokenizer.ggml.token_type"));
  }
  bool pre_add_bos = false;  // llama.cpp: llama3 vocabularies add BOS unless the file says otherwise
  if (!is_llama && !is_bert) {
    DK_ASSIGN_OR_RETURN(d.merges, gguf.GetStringArray("tokenizer.ggml.merges"));
    // Absent: llama.cpp's "default" pre-tokenizer (with a warning there).
    if (gguf.Find("tokenizer.ggml.pre") != nullptr) {
      DK_ASSIGN_OR_RETURN(d.pre, gguf.GetString("tokenizer.ggml.pre"));
      if (d.pre.empty()) d.pre = "default";
    }
    const PreTokenizerDef* pre = FindPreTokenizer(d.pre.empty() ? "default" : d.pre);
    if (pre == nullptr) {
      return Unimplemented(gguf.path() + ": tokenizer.ggml.pre: unknown pre-tokenizer '" + Printable(d.pre) +
                           "' (known: " + KnownPreTokenizerList() + ")");
    }
    pre_add_bos = pre->add_bos;
  }
  // Special ids: llama.cpp defaults for "llama" are bos=1, eos=2, unk=0 (when the vocabulary is
  // that large); 0xFFFFFFFF means none.
  constexpr uint64_t kNone = 0xFFFFFFFFu;
  auto read_id = [&](const char* key, int32_t def, int32_t* out) -> Status {
    if (def >= static_cast<int64_t>(d.tokens.size())) def = -1;
    auto v = gguf.GetUIntOr(key, def < 0 ? kNone : static_cast<uint64_t>(def));
    if (!v.ok()) return v.status();
    if (*v == kNone) { *out = -1; return Status::Ok(); }
    if (*v >= d.tokens.size()) {
      return Corrupt(gguf.path() + ": " + key + ": id " + std::to_string(*v) + " is outside the vocabulary of " +
                     std::to_string(d.tokens.size()) + " tokens");
    }
    *out = static_cast<int32_t>(*v);
    return Status::Ok();
  };
  // bert (llama.cpp's defaults for WPM): [CLS] 101 begins, [SEP] 102 ends (as EOS here), [UNK] 100.
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.bos_token_id", is_llama ? 1 : is_bert ? 101 : -1, &d.bos_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eos_token_id", is_llama ? 2 : is_bert ? 102 : -1, &d.eos_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.unknown_token_id", is_llama ? 0 : is_bert ? 100 : -1, &d.unk_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.padding_token_id", is_bert ? 0 : -1, &d.pad_id));
  int32_t eot_id = -1, eom_id = -1;
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eot_token_id", -1, &eot_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eom_token_id", -1, &eom_id));
  DK_ASSIGN_OR_RETURN(d.add_bos, gguf.GetBoolOr("tokenizer.ggml.add_bos_token", is_llama || is_bert || pre_add_bos));
  DK_ASSIGN_OR_RETURN(d.add_eos, gguf.GetBoolOr("tokenizer.ggml.add_eos_token", is_bert));
  DK_ASSIGN_OR_RETURN(d.add_space_prefix, gguf.GetBoolOr("tokenizer.ggml.add_space_prefix", is_llama));

  auto tok = FromData(std::move(d));
  if (!tok.ok()) return fail(tok.status());
  if (eot_id >= 0) (*tok)->impl_->eog.insert(eot_id);
  if (eom_id >= 0) (*tok)->impl_->eog.insert(eom_id);
  return tok;
}

Tokenizer::~Tokenizer() = default;

// ---- encode / decode ----
std::vector<int32_t> Tokenizer::Encode(const std::string& text, bool add_special) const {
  return impl_->EncodeText(text, add_special, impl_->user_defined);
}

std::vector<int32_t> Tokenizer::EncodeWithSpecial(const std::string& text, bool add_special) const {
  return impl_->EncodeText(text, add_special, impl_->special_tokens);
}

// Fragments: raw text ranges, or a token of `split_out` found in the text (llama.cpp splits
// user-defined tokens out even when special-token parsing is off; control tokens only with it).
std::vector<int32_t> Tokenizer::Impl::EncodeText(std::string_view text, bool add_special,
                                                 const std::vector<int32_t>& split_out) const {
  std::vector<int32_t> out;
  if (add_special && data.add_bos && data.bos_id >= 0) out.push_back(data.bos_id);
  bool prev_special = true;  // llama: the first text fragment gets the space prefix
  EncodeFragments(text, split_out, prev_special, out);
  if (add_special && data.add_eos && data.eos_id >= 0) out.push_back(data.eos_id);
  return out;
}

void Tokenizer::Impl::EncodeFragments(std::string_view text, const std::vector<int32_t>& split_out,
                                      bool& prev_special, std::vector<int32_t>& out) const {
  const Impl& m = *this;
  const TokenizerData& d = m.data;
  struct Fragment {
    size_t start, len;
    int32_t token;  // -1 for raw text
  };
  std::vector<Fragment> frags;
  if (!text.empty()) frags.push_back({0, text.size(), -1});
  for (const int32_t special : split_out) {
    const std::string& st = d.tokens[special];
    if (st.empty()) continue;
    std::vector<Fragment> next;
    for (const Fragment& f : frags) {
      if (f.token >= 0) { next.push_back(f); continue; }
      size_t pos = f.start;
      const size_t end = f.start + f.len;
      for (size_t hit; (hit = text.substr(0, end).find(st, pos)) != std::string_view::npos;) {
        if (hit > pos) next.push_back({pos, hit - pos, -1});
        next.push_back({hit, st.size(), special});
        pos = hit + st.size();
      }
      if (pos < end) next.push_back({pos, end - pos, -1});
    }
    frags = std::move(next);
  }

  for (const Fragment& f : frags) {
    if (f.token >= 0) {
      out.push_back(f.token);
      prev_special = true;
      continue;
    }
    if (m.is_bert) {
      m.EncodeWpm(text.substr(f.start, f.len), out);
    } else if (m.is_llama) {
      std::string piece = (d.add_space_prefix && prev_special) ? " " : "";
      piece.append(text.substr(f.start, f.len));
      ReplaceAll(piece, " ", kSpaceMarker);
      m.EncodeSpm(piece, out);
    } else {
      for (const std::string_view word : PreTokenizeWith(*m.pre, text.substr(f.start, f.len))) {
        m.EncodeBpeWord(word, out);
      }
    }
    prev_special = false;
  }
}

Tokenizer::PieceEncoder::PieceEncoder(const Tokenizer& tokenizer, bool add_special, size_t piece_bytes)
    : tok_(tokenizer), add_special_(add_special), piece_bytes_(std::max<size_t>(piece_bytes, 1)) {}

void Tokenizer::PieceEncoder::Encode(std::string_view piece, std::vector<int32_t>& out) {
  const Impl& m = *tok_.impl_;
  if (first_ && add_special_ && m.data.add_bos && m.data.bos_id >= 0) out.push_back(m.data.bos_id);
  first_ = false;
  m.EncodeFragments(piece, m.user_defined, prev_special_, out);
  encoded_ += piece.size();
}

bool Tokenizer::CanCutAt(std::string_view text, size_t p) const {
  if (p == 0 || p >= text.size() || (text[p] != '\n' && text[p] != ' ')) return false;
  const auto x = static_cast<unsigned char>(text[p - 1]);
  if (!((x >= '0' && x <= '9') || (x >= 'A' && x <= 'Z') || (x >= 'a' && x <= 'z'))) return false;
  return !(text[p] == '\n' ? impl_->before_newline_in_token : impl_->before_space_in_token)[x];
}

void Tokenizer::PieceEncoder::Add(std::string_view text, std::vector<int32_t>& out) {
  buffer_.append(text);
  size_t start = 0;  // of the buffered text not yet encoded
  while (buffer_.size() - start > piece_bytes_) {
    // The first cut p at least piece_bytes in: buffer_[p - 1] is a letter or digit no token puts
    // before a newline, buffer_[p] the newline.
    size_t p = std::max(scan_from_, start + piece_bytes_);
    while (p < buffer_.size() && !tok_.CanCutAt(buffer_, p)) ++p;
    if (p >= buffer_.size()) {
      scan_from_ = buffer_.size();
      break;
    }
    Encode(std::string_view(buffer_).substr(start, p - start), out);
    start = p;
    scan_from_ = p;
  }
  buffer_.erase(0, start);
  scan_from_ -= start;
}

void Tokenizer::PieceEncoder::Finish(std::vector<int32_t>& out) {
  const Impl& m = *tok_.impl_;
  if (!buffer_.empty() || first_) Encode(buffer_, out);
  buffer_.clear();
  scan_from_ = 0;
  if (add_special_ && m.data.add_eos && m.data.eos_id >= 0) out.push_back(m.data.eos_id);
}

std::string Tokenizer::TokenToPiece(int32_t id, bool special) const {
  const Impl& m = *impl_;
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& text = m.data.tokens[id];
  switch (m.TypeOf(id)) {
    case TokenType::kControl:
      return special ? text : "";
    case TokenType::kUnknown:
      return special ? text : "\xe2\x96\x85";  // U+2585, as llama.cpp prints an unknown token as text
    case TokenType::kUserDefined:
      return text;  // printed as their text, like llama.cpp's token_to_piece
    case TokenType::kNormal: {
      if (m.is_llama || m.is_bert) {
        std::string piece = text;
        ReplaceAll(piece, kSpaceMarker, " ");
        return piece;
      }
      std::string piece;
      for (size_t pos = 0; pos < text.size();) {
        const CodeUnit u = NextCodePoint(text, pos);
        auto it = u.valid ? m.unicode_to_byte.find(u.cp) : m.unicode_to_byte.end();
        if (it != m.unicode_to_byte.end()) {
          piece += static_cast<char>(it->second);
        } else {
          piece.append(text, pos, u.len);  // not a mapped byte: keep the text as is
        }
        pos += u.len;
      }
      return piece;
    }
    case TokenType::kByte: {
      if (!m.is_llama) return "";  // llama.cpp has no byte tokens for gpt2 vocabularies
      const int32_t b = ParseByteToken(text);
      return b >= 0 ? std::string(1, static_cast<char>(b)) : text;
    }
    case TokenType::kUndefined:
    case TokenType::kUnused:
      return "";
  }
  return "";
}

std::vector<std::string> Tokenizer::PreTokenize(const std::string& text) const {
  if (impl_->is_llama || impl_->is_bert) return {text};
  std::vector<std::string> out;
  for (const std::string_view word : PreTokenizeWith(*impl_->pre, text)) out.emplace_back(word);
  return out;
}

std::vector<std::string> Tokenizer::KnownPreTokenizers() {
  std::vector<std::string> out;
  for (const PreTokenizerDef& def : PreTokenizerDefs()) {
    for (const char* n : def.names) out.emplace_back(n);
  }
  return out;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool special) const {
  std::string out;
  for (const int32_t id : ids) out += TokenToPiece(id, special);
  return out;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->data.bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->data.eos_id; }
bool Tokenizer::add_bos() const { return impl_->data.add_bos; }
bool Tokenizer::IsEog(int32_t id) const { return impl_->eog.count(id) != 0; }
const std::string& Tokenizer::model() const { return impl_->data.model; }

}  // namespace dk
