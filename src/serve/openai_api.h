// The OpenAI wire format of dynakv serve: request bodies of /v1/completions and
// /v1/chat/completions parsed and checked (every error names the field), and the response,
// stream-chunk and error bodies built. No HTTP here: serve/server.cpp moves these strings.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "eval/sampler.h"
#include "serve/chat_template.h"

namespace dk {

// What the server allows a request.
struct RequestLimits {
  int max_tokens = 256;   // cap on max_tokens, and its value when a request gives none (-n)
  int max_stops = 16;     // stop strings per request
};

struct CompletionRequest {
  bool chat = false;
  std::string prompt;                 // /v1/completions
  std::vector<ChatMessage> messages;  // /v1/chat/completions
  int max_tokens = 0;                 // after the cap
  SamplerOptions sampling;            // temperature 0 = greedy; the seed drawn when not given
  bool seeded = false;                // the request gave a seed
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = true;          // usage in the last stream chunk
  std::string model;                  // as given (any name is served by the one model)
};

// The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count);
// a scan, so it cannot recurse.
size_t JsonNestingDepth(const std::string& text);
// Requests nested deeper are refused before they are parsed (real requests nest 4 levels).
inline constexpr size_t kMaxJsonDepth = 512;

// Parses a request body. InvalidArgument whose message starts with the field at fault
// ("max_tokens: expected an integer >= 1, got -3"; "messages[1].content: ...") or, for a body
// that is not a JSON object or nests deeper than kMaxJsonDepth, with "invalid JSON". Defaults
// follow `dynakv generate` (temperature 0.8, top_k 40, top_p 0.95).
StatusOr<CompletionRequest> ParseCompletionRequest(const std::string& body, bool chat, const RequestLimits& limits);

// An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
  std::string Body() const;
};
// 400 from a parse or validation status; param is the field its message starts with, if any.
ApiError BadRequest(const Status& status, const std::string& code = "invalid_value");
// The field a message starts with ("messages[1].role: ..." -> "messages[1].role"), or "".
std::string FieldOf(const std::string& message);

enum class FinishReason { kStop, kLength };
const char* FinishName(FinishReason reason);

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

// What every body of one response shares.
struct ResponseHead {
  std::string id;     // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;
  std::string model;
  bool chat = false;
};

// The whole answer of a non-streaming request.
nlohmann::json CompletionBody(const ResponseHead& head, const std::string& text, FinishReason finish,
                              const Usage& usage);
// One stream event's JSON: a text delta (chat: the first one also carries the role), or the last
// one (finish set, usage when given).
nlohmann::json StreamChunk(const ResponseHead& head, const std::string& delta, bool first, const FinishReason* finish,
                           const Usage* usage);
// "data: <json>\n\n"; invalid UTF-8 in generated text becomes U+FFFD rather than an exception.
std::string SseEvent(const nlohmann::json& body);
std::string DumpJson(const nlohmann::json& body);

}  // namespace dk
