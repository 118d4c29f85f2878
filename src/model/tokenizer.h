// Tokenizers built from GGUF metadata, matching llama.cpp's behaviour:
//  - "llama": SentencePiece-style BPE over scores with byte fallback (<0xXX> tokens),
//    a "▁" space prefix and spaces replaced by "▁" (llm_tokenizer_spm in llama.cpp).
//  - "gpt2": byte-level BPE with merges (llm_tokenizer_bpe), after the pre-tokenizer that
//    tokenizer.ggml.pre names (llama.cpp's regex list for that name, written out as scanners over
//    code points with Unicode 15.0 category tables: gpt-2, llama3 / llama-bpe, qwen2, falcon,
//    mpt, starcoder, refact, deepseek-coder, deepseek-llm, ...; KnownPreTokenizers() lists them).
//  - "bert": WordPiece (llm_tokenizer_wpm): words from NFD's first code point, lowercased, split at
//    whitespace, punctuation and CJK ideographs; each "▁"-prefixed word cut greedily into the
//    longest vocabulary entries; [CLS] ... [SEP] as BOS/EOS by default.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/status.h"

namespace dk {

class GgufFile;

// Unicode properties of a code point (Unicode 15.0): its major general category as one bit
// (\p{N}, \p{L}, \p{Z}, \p{M}, \p{P}, \p{S}, \p{C}; unassigned code points are C), plus
// kUnicodeSpace for White_Space (what \s matches). As llama.cpp's unicode_cpt_flags.
enum UnicodeFlag : uint16_t {
  kUnicodeNumber = 0x02, kUnicodeLetter = 0x04, kUnicodeSeparator = 0x08, kUnicodeMark = 0x10,
  kUnicodePunctuation = 0x20, kUnicodeSymbol = 0x40, kUnicodeControl = 0x80, kUnicodeSpace = 0x100,
};
uint16_t UnicodeFlags(uint32_t cp);

// Token types as in tokenizer.ggml.token_type.
enum class TokenType : int32_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6,
};

// Everything a tokenizer needs; filled from GGUF metadata or by hand in tests.
struct TokenizerData {
  std::string model;                 // "llama" or "gpt2"
  std::vector<std::string> tokens;
  std::vector<float> scores;         // may be empty for gpt2
  std::vector<int32_t> types;        // may be empty (all normal)
  std::vector<std::string> merges;   // gpt2 only: "a b" lines, by priority
  // gpt2 only: tokenizer.ggml.pre; empty (the key is absent) means llama.cpp's "default".
  std::string pre;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  bool add_bos = true;
  bool add_eos = false;
  bool add_space_prefix = true;      // llama only
};

class Tokenizer {
 public:
  // Reads tokenizer.ggml.* keys; errors name the key and what was wrong.
  static StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);
  static StatusOr<std::unique_ptr<Tokenizer>> FromData(TokenizerData data);
  ~Tokenizer();

  // Encodes text. add_special: prepend BOS / append EOS as the file says.
  // Special-token text in the input is NOT parsed (like llama.cpp with parse_special=false).
  std::vector<int32_t> Encode(const std::string& text, bool add_special) const;
  // As Encode, but the text of control, unknown and user-defined tokens ("<|im_start|>", "</s>")
  // becomes those tokens' ids (llama.cpp's parse_special=true, longest text first): for prompts
  // built from chat templates, never for text a user typed.
  std::vector<int32_t> EncodeWithSpecial(const std::string& text, bool add_special) const;
  // Whether Encode's ids of a text are those of text[0, p) followed by those of text[p, end)
  // (encoded with the state Encode carries across, see PieceEncoder): text[p - 1] is an ASCII
  // letter or digit X, text[p] a newline or a space, and no token's text has X followed by that
  // character (or by "▁" for a space). Then no vocabulary token spans p (not a SentencePiece merge
  // over the ▁-escaped text, not a user-defined token split out), and every pre-tokenizer ends a
  // word at p: a run of letters or digits ends there, and what starts at p is matched looking only
  // forward, whatever came before.
  bool CanCutAt(std::string_view text, size_t p) const;

  // Encodes a text that arrives in parts (a large file read a block at a time) with memory bounded by
  // the piece size, not the text: the ids are exactly Encode(whole text, add_special)'s. The text is
  // cut into pieces of at least piece_bytes, each ending at the first place CanCutAt allows. The
  // state a piece hands to the next is what Encode carries across the text: BOS only before the
  // first piece, EOS only after the last, and the "▁" space prefix only on the text's first
  // fragment (or one after a token split out). A text with no such place is one piece, as Encode.
  class PieceEncoder {
   public:
    PieceEncoder(const Tokenizer& tokenizer, bool add_special, size_t piece_bytes = size_t{1} << 18);
    // Appends `text` and encodes every whole piece buffered so far (ids appended to `out`).
    void Add(std::string_view text, std::vector<int32_t>& out);
    // Encodes what is left, then EOS where Encode would add it. Add must not follow.
    void Finish(std::vector<int32_t>& out);
    // Bytes of text encoded so far (those still buffered are not).
    uint64_t bytes_encoded() const { return encoded_; }

   private:
    void Encode(std::string_view piece, std::vector<int32_t>& out);
    const Tokenizer& tok_;
    bool add_special_;
    size_t piece_bytes_;
    std::string buffer_;
    size_t scan_from_ = 0;  // cuts before this buffer offset were looked for already
    uint64_t encoded_ = 0;
    bool first_ = true;         // BOS not yet written
    bool prev_special_ = true;  // the next raw fragment gets the space prefix
  };

  // Text of one token (▁ -> space, <0xXX> -> the byte). special: control and unknown tokens as
  // their text ("<s>"), as llama.cpp's detokenizer; without it, as text shown to a user: control
  // tokens nothing, an unknown one U+2585 (llama.cpp's token_to_piece(special=false)). Generated
  // text (generate, the server, the Python module) is always shown without.
  std::string TokenToPiece(int32_t id, bool special = true) const;
  // The pieces the pre-tokenizer cuts raw text into before BPE (gpt2 vocabularies; the whole text
  // as one piece for the others). User-defined tokens are not split out here.
  std::vector<std::string> PreTokenize(const std::string& text) const;
  // The values of tokenizer.ggml.pre that gpt2 vocabularies may name, as llama.cpp spells them.
  static std::vector<std::string> KnownPreTokenizers();
  // Decodes a sequence (byte tokens joined into UTF-8; no leading-space stripping).
  std::string Decode(const std::vector<int32_t>& ids, bool special = true) const;

  int32_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  bool add_bos() const;
  bool IsEog(int32_t id) const;  // end of generation (EOS / EOT)
  const std::string& model() const;

 private:
  Tokenizer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dk
