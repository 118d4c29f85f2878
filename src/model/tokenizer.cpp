// Tokenizers matching llama.cpp (commit c392e509): llm_tokenizer_spm for "llama" and
// llm_tokenizer_bpe with the GPT-2 pre-tokenizer for "gpt2". See tokenizer.h.
#include "model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstring>
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

// ---- Unicode classes for the GPT-2 pre-tokenizer ----
// ASCII is classified exactly. Beyond ASCII this is an approximation of \p{L}, \p{N} and \s
// (no Unicode tables): the listed whitespace, digit/number-form and punctuation/symbol/mark
// blocks are classified as such, and every other code point counts as a letter.
enum class CharClass { kLetter, kNumber, kSpace, kOther };

bool InRanges(uint32_t cp, std::initializer_list<std::pair<uint32_t, uint32_t>> ranges) {
  for (const auto& [lo, hi] : ranges) {
    if (cp >= lo && cp <= hi) return true;
  }
  return false;
}

CharClass Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::kLetter;
    if (cp >= '0' && cp <= '9') return CharClass::kNumber;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::kSpace;
    return CharClass::kOther;
  }
  if (InRanges(cp, {{0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680}, {0x2000, 0x200A},
                    {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}})) {
    return CharClass::kSpace;
  }
  if (InRanges(cp, {{0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE},          // superscripts, fractions
                    {0x0660, 0x0669}, {0x06F0, 0x06F9}, {0x07C0, 0x07C9},  // Arabic, NKo digits
                    {0x0966, 0x096F}, {0x09E6, 0x09EF}, {0x0E50, 0x0E59},  // Devanagari, Bengali, Thai
                    {0x2070, 0x2079}, {0x2080, 0x2089}, {0x2150, 0x2189},  // super/subscripts, number forms
                    {0x2460, 0x249B}, {0x24EA, 0x24FF}, {0x2776, 0x2793},  // enclosed numbers
                    {0x3007, 0x3007}, {0x3021, 0x3029}, {0xFF10, 0xFF19},  // CJK numerals, fullwidth digits
                    {0x1D7CE, 0x1D7FF}})) {                              // mathematical digits
    return CharClass::kNumber;
  }
  if ((cp >= 0x80 && cp <= 0xBF && cp != 0xAA && cp != 0xB5 && cp != 0xBA) || cp == 0xD7 ||
      cp == 0xF7 ||
      InRanges(cp, {{0x0300, 0x036F},                      // combining marks (\p{M} is not \p{L})
                    {0x2010, 0x2027}, {0x2030, 0x205E}, {0x2060, 0x206F},  // general punctuation
                    {0x20A0, 0x20FF},                      // currency, combining marks for symbols
                    {0x2190, 0x245F}, {0x2500, 0x2775}, {0x2794, 0x2BFF},  // arrows, math, boxes, dingbats
                    {0x2E00, 0x2E7F}, {0x3001, 0x3006}, {0x3008, 0x3020},  // CJK punctuation
                    {0xFE00, 0xFE0F}, {0xFE30, 0xFE6F},                   // variation selectors, CJK forms
                    {0xFF01, 0xFF0F}, {0xFF1A, 0xFF20}, {0xFF3B, 0xFF40}, {0xFF5B, 0xFF65},
                    {0x1F000, 0x1FAFF}})) {                // emoji and pictographs
    return CharClass::kOther;
  }
  return CharClass::kLetter;
}

// Splits text into GPT-2 pre-tokens (byte ranges) with the regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// written out by hand as llama.cpp's unicode_regex_split_custom_gpt2 does.
std::vector<std::string_view> SplitGpt2(std::string_view text) {
  std::vector<uint32_t> cps;
  std::vector<CharClass> cls;
  std::vector<size_t> offs;  // byte offset of each code unit; offs.back() == text.size()
  for (size_t pos = 0; pos < text.size();) {
    const CodeUnit u = NextCodePoint(text, pos);
    cps.push_back(u.valid ? u.cp : 0xFFFFFFFFu);
    cls.push_back(u.valid ? Classify(u.cp) : CharClass::kOther);
    offs.push_back(pos);
    pos += u.len;
  }
  const size_t n = cps.size();
  offs.push_back(text.size());
  auto cp_at = [&](size_t i) { return i < n ? cps[i] : 0xFFFFFFFFu; };
  auto is = [&](size_t i, CharClass c) { return i < n && cls[i] == c; };

  std::vector<std::string_view> words;
  size_t start = 0;
  auto emit = [&](size_t end) {
    if (end > start) words.push_back(text.substr(offs[start], offs[end] - offs[start]));
    start = end;
  };
  for (size_t pos = 0; pos < n;) {
    const uint32_t c = cps[pos];
    if (c == '\'' && pos + 1 < n) {  // contractions
      const uint32_t c1 = cp_at(pos + 1);
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        pos += 2;
        emit(pos);
        continue;
      }
      const uint32_t c2 = cp_at(pos + 2);
      if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
        pos += 3;
        emit(pos);
        continue;
      }
    }
    // " ?X+" for letters, numbers, and everything else that is not whitespace.
    const size_t head = (c == ' ') ? pos + 1 : pos;
    if (head < n && cls[head] != CharClass::kSpace) {
      const CharClass run = cls[head];
      pos = head;
      while (is(pos, run)) ++pos;
      emit(pos);
      continue;
    }
    size_t spaces = 0;
    while (is(pos + spaces, CharClass::kSpace)) ++spaces;
    if (spaces > 1 && pos + spaces < n) {  // \s+(?!\S): leave the last space to the next word
      pos += spaces - 1;
      emit(pos);
      continue;
    }
    pos += std::max<size_t>(spaces, 1);
    emit(pos);
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

struct Tokenizer::Impl {
  TokenizerData data;
  bool is_llama = true;
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
  std::vector<int32_t> EncodeText(const std::string& text, bool add_special,
                                  const std::vector<int32_t>& split_out) const;
  void EncodeBpeWord(std::string_view word, std::vector<int32_t>& out) const;
};

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
  const bool is_llama = data.model == "llama";
  if (!is_llama && data.model != "gpt2") {
    return Unimplemented("tokenizer.ggml.model: unsupported tokenizer model '" + data.model +
                         "' (supported: llama, gpt2)");
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

  auto impl = std::make_unique<Impl>();
  impl->data = std::move(data);
  impl->is_llama = is_llama;
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

  if (is_llama) {
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
  const bool is_llama = d.model == "llama";
  if (!is_llama && d.model != "gpt2") {
    return Unimplemented(gguf.path() + ": tokenizer.ggml.model: unsupported tokenizer model '" + Printable(d.model) +
                         "' (supported: llama, gpt2)");
  }
  DK_ASSIGN_OR_RETURN(d.tokens, gguf.GetStringArray("tokenizer.ggml.tokens"));
  if (d.tokens.empty()) return Corrupt(gguf.path() + ": tokenizer.ggml.tokens: vocabulary is empty");
  if (gguf.Find("tokenizer.ggml.scores") != nullptr) {
    DK_ASSIGN_OR_RETURN(d.scores, gguf.GetFloatArray("tokenizer.ggml.scores"));
  }
  if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
    DK_ASSIGN_OR_RETURN(d.types, gguf.GetIntArray("tokenizer.ggml.token_type"));
  }
  if (!is_llama) {
    DK_ASSIGN_OR_RETURN(d.merges, gguf.GetStringArray("tokenizer.ggml.merges"));
    if (const GgufValue* pre = gguf.Find("tokenizer.ggml.pre"); pre != nullptr) {
      DK_ASSIGN_OR_RETURN(std::string pre_name, gguf.GetString("tokenizer.ggml.pre"));
      if (pre_name != "gpt-2" && pre_name != "gpt2") {
        return Unimplemented(gguf.path() + ": tokenizer.ggml.pre: pre-tokenizer '" + Printable(pre_name) +
                             "' is not supported (only the GPT-2 regex is implemented)");
      }
    }
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
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.bos_token_id", is_llama ? 1 : -1, &d.bos_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eos_token_id", is_llama ? 2 : -1, &d.eos_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.unknown_token_id", is_llama ? 0 : -1, &d.unk_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.padding_token_id", -1, &d.pad_id));
  int32_t eot_id = -1, eom_id = -1;
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eot_token_id", -1, &eot_id));
  DK_RETURN_IF_ERROR(read_id("tokenizer.ggml.eom_token_id", -1, &eom_id));
  DK_ASSIGN_OR_RETURN(d.add_bos, gguf.GetBoolOr("tokenizer.ggml.add_bos_token", is_llama));
  DK_ASSIGN_OR_RETURN(d.add_eos, gguf.GetBoolOr("tokenizer.ggml.add_eos_token", false));
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
std::vector<int32_t> Tokenizer::Impl::EncodeText(const std::string& text, bool add_special,
                                                 const std::vector<int32_t>& split_out) const {
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
      for (size_t hit; (hit = std::string_view(text.data(), end).find(st, pos)) != std::string_view::npos;) {
        if (hit > pos) next.push_back({pos, hit - pos, -1});
        next.push_back({hit, st.size(), special});
        pos = hit + st.size();
      }
      if (pos < end) next.push_back({pos, end - pos, -1});
    }
    frags = std::move(next);
  }

  std::vector<int32_t> out;
  if (add_special && d.add_bos && d.bos_id >= 0) out.push_back(d.bos_id);
  bool prev_special = true;  // llama: the first text fragment gets the space prefix
  for (const Fragment& f : frags) {
    if (f.token >= 0) {
      out.push_back(f.token);
      prev_special = true;
      continue;
    }
    if (m.is_llama) {
      std::string piece = (d.add_space_prefix && prev_special) ? " " : "";
      piece.append(text, f.start, f.len);
      ReplaceAll(piece, " ", kSpaceMarker);
      m.EncodeSpm(piece, out);
    } else {
      for (const std::string_view word : SplitGpt2(std::string_view(text).substr(f.start, f.len))) {
        m.EncodeBpeWord(word, out);
      }
    }
    prev_special = false;
  }
  if (add_special && d.add_eos && d.eos_id >= 0) out.push_back(d.eos_id);
  return out;
}

std::string Tokenizer::TokenToPiece(int32_t id) const {
  const Impl& m = *impl_;
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& text = m.data.tokens[id];
  switch (m.TypeOf(id)) {
    case TokenType::kControl:
    case TokenType::kUnknown:
    case TokenType::kUserDefined:
      return text;  // printed as their text, like llama.cpp's token_to_piece(special=true)
    case TokenType::kNormal: {
      if (m.is_llama) {
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

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (const int32_t id : ids) out += TokenToPiece(id);
  return out;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->data.bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->data.eos_id; }
bool Tokenizer::add_bos() const { return impl_->data.add_bos; }
bool Tokenizer::IsEog(int32_t id) const { return impl_->eog.count(id) != 0; }
const std::string& Tokenizer::model() const { return impl_->data.model; }

}  // namespace dk
