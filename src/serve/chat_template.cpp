#include "serve/chat_template.h"

#include <array>
#include <utility>

#include "model/tokenizer.h"

namespace dk {
namespace {

struct FamilyInfo {
  ChatFamily family;
  const char* name;
  const char* marker;  // recognised in a GGUF template's text
};

// Checked in this order: a template holding two markers is the first family's.
constexpr std::array<FamilyInfo, 5> kFamilies = {{
    {ChatFamily::kChatml, "chatml", "<|im_start|>"},
    {ChatFamily::kLlama3, "llama3", "<|start_header_id|>"},
    {ChatFamily::kGemma, "gemma", "<start_of_turn>"},
    {ChatFamily::kZephyr, "zephyr", "<|user|>"},
    {ChatFamily::kLlama2, "llama2", "[INST]"},
}};

std::string Trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

Status BadRole(size_t i, const std::string& role, const char* family) {
  return InvalidArgument("messages[" + std::to_string(i) + "].role: '" + Printable(role, 40) + "' is not one of system, user, " +
                         "assistant (chat template " + family + ")");
}

std::string FormatChatml(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  return out + "<|im_start|>assistant\n";
}

std::string FormatLlama3(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const ChatMessage& m : messages) {
    out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Trim(m.content) + "<|eot_id|>";
  }
  return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
}

// Meta's llama-2 chat layout: the system prompt inside the first [INST] block, every answer
// closed by EOS and every later turn opened by BOS (the first BOS is the tokenizer's).
std::string FormatLlama2(const ChatTemplate& t, const std::vector<ChatMessage>& messages) {
  std::string out = "[INST] ";
  bool inside_turn = true;
  for (const ChatMessage& m : messages) {
    if (!inside_turn) {
      out += t.bos_text + "[INST] ";
      inside_turn = true;
    }
    if (m.role == "system") {
      out += "<<SYS>>\n" + Trim(m.content) + "\n<</SYS>>\n\n";
    } else if (m.role == "user") {
      out += Trim(m.content) + " [/INST]";
    } else {
      out += " " + Trim(m.content) + " " + t.eos_text;
      inside_turn = false;
    }
  }
  return out;
}

// Gemma has no system role: system text opens the next user turn, as its own template does.
std::string FormatGemma(const std::vector<ChatMessage>& messages) {
  std::string out, system;
  for (const ChatMessage& m : messages) {
    if (m.role == "system") {
      system += Trim(m.content) + "\n\n";
      continue;
    }
    std::string content = Trim(m.content);
    if (m.role == "user") {
      content = system + content;
      system.clear();
    }
    out += "<start_of_turn>" + std::string(m.role == "assistant" ? "model" : "user") + "\n" + content +
           "<end_of_turn>\n";
  }
  if (!system.empty()) out += "<start_of_turn>user\n" + system + "<end_of_turn>\n";
  return out + "<start_of_turn>model\n";
}

std::string FormatZephyr(const ChatTemplate& t, const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content + t.end_of_turn + "\n";
  return out + "<|assistant|>\n";
}

}  // namespace

const char* ChatFamilyName(ChatFamily family) {
  for (const FamilyInfo& f : kFamilies) {
    if (f.family == family) return f.name;
  }
  return "?";
}

std::string ChatFamilyNames() {
  std::string names;
  for (const FamilyInfo& f : kFamilies) names += (names.empty() ? "" : ", ") + std::string(f.name);
  return names;
}

StatusOr<ChatFamily> ParseChatFamily(const std::string& name) {
  if (name == "mistral") return ChatFamily::kLlama2;  // the same [INST] layout
  for (const FamilyInfo& f : kFamilies) {
    if (name == f.name) return f.family;
  }
  return InvalidArgument("--chat-template: unknown template '" + Printable(name) + "' (known: " + ChatFamilyNames() +
                         ", mistral)");
}

StatusOr<ChatFamily> DetectChatFamily(const std::string& template_text) {
  for (const FamilyInfo& f : kFamilies) {
    if (template_text.find(f.marker) != std::string::npos) return f.family;
  }
  std::string markers;
  for (const FamilyInfo& f : kFamilies) markers += (markers.empty() ? "" : ", ") + std::string(f.marker);
  return NotFound("the model's chat template (tokenizer.chat_template) is not one dynakv knows: it holds none of " +
                  markers + "; start the server with --chat-template NAME (" + ChatFamilyNames() + ")");
}

ChatTemplate ChatTemplate::For(ChatFamily family, const Tokenizer& tokenizer, const std::string& template_text) {
  ChatTemplate t;
  t.family = family;
  if (tokenizer.bos_id() >= 0) t.bos_text = tokenizer.TokenToPiece(tokenizer.bos_id());
  if (tokenizer.eos_id() >= 0) t.eos_text = tokenizer.TokenToPiece(tokenizer.eos_id());
  switch (family) {
    case ChatFamily::kChatml: t.end_of_turn = "<|im_end|>"; break;
    case ChatFamily::kLlama3: t.end_of_turn = "<|eot_id|>"; break;
    case ChatFamily::kLlama2: t.end_of_turn = t.eos_text; break;
    case ChatFamily::kGemma: t.end_of_turn = "<end_of_turn>"; break;
    case ChatFamily::kZephyr:
      // Phi-3 shares zephyr's roles and ends turns with <|end|>; some zephyr builds use <|endoftext|>.
      t.end_of_turn = template_text.find("<|end|>") != std::string::npos         ? "<|end|>"
                      : template_text.find("<|endoftext|>") != std::string::npos ? "<|endoftext|>"
                                                                                  : t.eos_text;
      break;
  }
  return t;
}

StatusOr<std::string> FormatChat(const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return InvalidArgument("messages: the list is empty (at least one message is needed)");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") return BadRole(i, r, ChatFamilyName(tmpl.family));
  }
  switch (tmpl.family) {
    case ChatFamily::kChatml: return FormatChatml(messages);
    case ChatFamily::kLlama3: return FormatLlama3(messages);
    case ChatFamily::kLlama2: return FormatLlama2(tmpl, messages);
    case ChatFamily::kGemma: return FormatGemma(messages);
    case ChatFamily::kZephyr: return FormatZephyr(tmpl, messages);
  }
  return Internal("FormatChat: unknown family");
}

}  // namespace dk
