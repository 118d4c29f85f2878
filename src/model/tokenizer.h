// Tokenizers built from GGUF metadata, matching llama.cpp's behaviour:
//  - "llama": SentencePiece-style BPE over scores with byte fallback (<0xXX> tokens),
//    a "▁" space prefix and spaces replaced by "▁" (llm_tokenizer_spm in llama.cpp).
//  - "gpt2": byte-level BPE with merges and GPT-2 style pre-tokenization.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/status.h"

namespace dk {

class GgufFile;

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
  // Text of one token as printed (▁ -> space, <0xXX> -> the byte, control tokens -> their text, e.g. "<s>").
  std::string TokenToPiece(int32_t id) const;
  // Decodes a sequence (byte tokens joined into UTF-8; no leading-space stripping).
  std::string Decode(const std::vector<int32_t>& ids) const;

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
