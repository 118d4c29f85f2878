// Chat prompts without a Jinja engine: the template text in GGUF (tokenizer.chat_template) is only
// read for the markers of the common families, and each family is formatted by our own code.
// The prompt text holds special-token text ("<|im_start|>"); encode it with
// Tokenizer::EncodeWithSpecial so that text becomes the special tokens.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace dk {

class Tokenizer;

enum class ChatFamily {
  kChatml,  // <|im_start|>role\ncontent<|im_end|>\n                      (Qwen, many fine-tunes)
  kLlama3,  // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kLlama2,  // [INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] ...  (Mistral too)
  kGemma,   // <start_of_turn>user\ncontent<end_of_turn>\n  (assistant is "model", no system role)
  kZephyr,  // <|user|>\ncontent</s>\n
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// The names --chat-template takes: chatml, llama3, llama2 (or mistral), gemma, zephyr.
const char* ChatFamilyName(ChatFamily family);
std::string ChatFamilyNames();
// InvalidArgument naming --chat-template and the names it takes.
StatusOr<ChatFamily> ParseChatFamily(const std::string& name);
// The family of a GGUF template by its markers; NotFound when it has none we know (the message
// says which families are recognised and that --chat-template forces one).
StatusOr<ChatFamily> DetectChatFamily(const std::string& template_text);

// A family plus the texts it borrows from the model (BOS/EOS for llama-2 and zephyr).
struct ChatTemplate {
  ChatFamily family = ChatFamily::kChatml;
  std::string bos_text = "<s>";
  std::string eos_text = "</s>";
  std::string end_of_turn;  // what ends an assistant turn: a stop string for chat requests

  // The template of a family for a model's tokenizer (its BOS/EOS texts); `template_text` may
  // change details (zephyr's turn end is <|endoftext|> when the template says so).
  static ChatTemplate For(ChatFamily family, const Tokenizer& tokenizer, const std::string& template_text = "");
};

// The prompt for messages, ending with the opening of the assistant's turn. BOS is not written:
// the tokenizer adds it (add_special). InvalidArgument naming messages[i].role for a role the
// family cannot take, or for an empty list.
StatusOr<std::string> FormatChat(const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages);

}  // namespace dk
