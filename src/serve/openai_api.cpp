#include "serve/openai_api.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <random>

namespace dk {
namespace {

using json = nlohmann::json;

// A value as it appeared, short and printable, for "expected X, got Y" messages.
std::string Shown(const json& v) {
  return Printable(v.dump(-1, ' ', false, json::error_handler_t::replace), 40);
}

Status Expected(const std::string& field, const std::string& what, const json& got) {
  return InvalidArgument(field + ": expected " + what + ", got " + Shown(got));
}

bool Absent(const json& body, const char* field) { return !body.contains(field) || body.at(field).is_null(); }

StatusOr<double> NumberField(const json& body, const char* field, double def, double lo, double hi) {
  if (Absent(body, field)) return def;
  const json& v = body.at(field);
  const std::string range = "a number in [" + Shown(lo) + ", " + Shown(hi) + "]";
  if (!v.is_number()) return Expected(field, range, v);
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) return Expected(field, range, v);
  return x;
}

// Integers; a float with an integral value (16.0) counts as one.
StatusOr<int64_t> IntField(const json& body, const char* field, int64_t def, int64_t lo, int64_t hi) {
  if (Absent(body, field)) return def;
  const json& v = body.at(field);
  const std::string range = "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!v.is_number()) return Expected(field, range, v);
  const double x = v.get<double>();
  if (std::floor(x) != x || x < static_cast<double>(lo) || x > static_cast<double>(hi)) return Expected(field, range, v);
  return v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(x);
}

StatusOr<bool> BoolField(const json& body, const char* field, bool def) {
  if (Absent(body, field)) return def;
  if (!body.at(field).is_boolean()) return Expected(field, "true or false", body.at(field));
  return body.at(field).get<bool>();
}

StatusOr<std::vector<std::string>> StopField(const json& body, const RequestLimits& limits) {
  std::vector<std::string> stops;
  if (Absent(body, "stop")) return stops;
  const json& v = body.at("stop");
  if (v.is_string()) {
    stops.push_back(v.get<std::string>());
  } else if (v.is_array()) {
    if (static_cast<int>(v.size()) > limits.max_stops)
      return InvalidArgument("stop: at most " + std::to_string(limits.max_stops) + " stop strings, got " +
                             std::to_string(v.size()));
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_string()) return Expected("stop[" + std::to_string(i) + "]", "a string", v[i]);
      stops.push_back(v[i].get<std::string>());
    }
  } else {
    return Expected("stop", "a string or a list of strings", v);
  }
  for (const std::string& s : stops)
    if (s.empty()) return InvalidArgument("stop: a stop string is empty");
  return stops;
}

StatusOr<std::string> PromptField(const json& body) {
  if (!body.contains("prompt")) return InvalidArgument("prompt: required (the text to continue)");
  const json& v = body.at("prompt");
  if (v.is_string()) return v.get<std::string>();
  if (v.is_array() && v.size() == 1 && v[0].is_string()) return v[0].get<std::string>();
  return Expected("prompt", "a string (or a list of one string)", v);
}

// content: a string, or a list of {"type": "text", "text": ...} parts (joined).
StatusOr<std::string> ContentOf(const json& m, const std::string& field) {
  if (!m.contains("content") || m.at("content").is_null()) return std::string();
  const json& c = m.at("content");
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) return Expected(field, "a string or a list of text parts", c);
  std::string text;
  for (size_t i = 0; i < c.size(); ++i) {
    const std::string part = field + "[" + std::to_string(i) + "]";
    if (!c[i].is_object() || c[i].value("type", "") != "text" || !c[i].contains("text") || !c[i]["text"].is_string())
      return Expected(part, "a part {\"type\": \"text\", \"text\": \"...\"} (only text is supported)", c[i]);
    text += c[i]["text"].get<std::string>();
  }
  return text;
}

StatusOr<std::vector<ChatMessage>> MessagesField(const json& body) {
  if (!body.contains("messages")) return InvalidArgument("messages: required (a list of {role, content})");
  const json& v = body.at("messages");
  if (!v.is_array() || v.empty()) return Expected("messages", "a non-empty list of {role, content}", v);
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string field = "messages[" + std::to_string(i) + "]";
    if (!v[i].is_object()) return Expected(field, "an object {role, content}", v[i]);
    if (!v[i].contains("role") || !v[i]["role"].is_string())
      return Expected(field + ".role", "one of system, user, assistant", v[i].value("role", json()));
    ChatMessage m;
    m.role = v[i]["role"].get<std::string>();
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      return Expected(field + ".role", "one of system, user, assistant", v[i]["role"]);
    DK_ASSIGN_OR_RETURN(m.content, ContentOf(v[i], field + ".content"));
    messages.push_back(std::move(m));
  }
  return messages;
}

// Options dynakv does not implement: refused when asked for, so no client is silently misled.
Status Unsupported(const json& body) {
  if (!Absent(body, "n") && body.at("n") != 1) return Expected("n", "1 (one choice per request)", body.at("n"));
  if (!Absent(body, "best_of") && body.at("best_of") != 1) return Expected("best_of", "1", body.at("best_of"));
  if (!Absent(body, "echo") && body.at("echo") != false) return Expected("echo", "false (echo is not supported)",
                                                                          body.at("echo"));
  for (const char* f : {"logprobs", "top_logprobs"}) {
    if (!Absent(body, f) && body.at(f) != false && body.at(f) != 0)
      return Expected(f, "null or false (log probabilities are not supported)", body.at(f));
  }
  return Status::Ok();
}

Status ReadSampling(const json& body, CompletionRequest& r) {
  DK_ASSIGN_OR_RETURN(double temp, NumberField(body, "temperature", 0.8, 0.0, 2.0));
  DK_ASSIGN_OR_RETURN(double top_p, NumberField(body, "top_p", 0.95, 0.0, 1.0));
  DK_ASSIGN_OR_RETURN(int64_t top_k, IntField(body, "top_k", 40, 0, std::numeric_limits<int32_t>::max()));
  DK_ASSIGN_OR_RETURN(int64_t seed, IntField(body, "seed", -1, -1, std::numeric_limits<int64_t>::max()));
  r.sampling.temperature = static_cast<float>(temp);
  r.sampling.top_p = static_cast<float>(top_p);
  r.sampling.top_k = static_cast<int>(top_k);
  r.seeded = seed >= 0;  // -1: a random seed, as llama.cpp
  r.sampling.seed = r.seeded ? static_cast<uint64_t>(seed) : std::random_device()();
  return Status::Ok();
}

Status ReadLimits(const json& body, const RequestLimits& limits, CompletionRequest& r) {
  // max_completion_tokens is the newer name of the same field in chat requests.
  const char* field = !Absent(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  DK_ASSIGN_OR_RETURN(int64_t max_tokens, IntField(body, field, limits.max_tokens, 1, std::numeric_limits<int32_t>::max()));
  r.max_tokens = static_cast<int>(std::min<int64_t>(max_tokens, limits.max_tokens));  // capped (-n)
  DK_ASSIGN_OR_RETURN(r.stop, StopField(body, limits));
  DK_ASSIGN_OR_RETURN(r.stream, BoolField(body, "stream", false));
  if (!Absent(body, "stream_options")) {
    const json& so = body.at("stream_options");
    if (!so.is_object()) return Expected("stream_options", "an object", so);
    if (!Absent(so, "include_usage") && !so.at("include_usage").is_boolean())
      return Expected("stream_options.include_usage", "true or false", so.at("include_usage"));
    r.include_usage = so.value("include_usage", true);
  }
  if (!Absent(body, "model")) {
    if (!body.at("model").is_string()) return Expected("model", "a string", body.at("model"));
    r.model = body.at("model").get<std::string>();
  }
  return Status::Ok();
}

}  // namespace

size_t JsonNestingDepth(const std::string& text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;  // the escaped character cannot end the string
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

StatusOr<CompletionRequest> ParseCompletionRequest(const std::string& body, bool chat, const RequestLimits& limits) {
  // Checked before parsing: printing a value in an error message (and nlohmann's dump) recurses
  // once per level, so 100,000 levels would overflow the connection thread's stack.
  const size_t depth = JsonNestingDepth(body);
  if (depth > kMaxJsonDepth)
    return InvalidArgument("invalid JSON: nested " + std::to_string(depth) + " levels deep, more than " +
                           std::to_string(kMaxJsonDepth) + " (arrays and objects inside each other)");
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument("invalid JSON: the request body does not parse as JSON");
  if (!j.is_object()) return InvalidArgument("invalid JSON: the request body must be a JSON object, got " + Shown(j));
  CompletionRequest r;
  r.chat = chat;
  if (chat) {
    DK_ASSIGN_OR_RETURN(r.messages, MessagesField(j));
  } else {
    DK_ASSIGN_OR_RETURN(r.prompt, PromptField(j));
  }
  DK_RETURN_IF_ERROR(Unsupported(j));
  DK_RETURN_IF_ERROR(ReadSampling(j, r));
  DK_RETURN_IF_ERROR(ReadLimits(j, limits, r));
  return r;
}

std::string FieldOf(const std::string& message) {
  const size_t colon = message.find(": ");
  if (colon == std::string::npos || colon == 0) return "";
  for (size_t i = 0; i < colon; ++i) {
    const char c = message[i];
    if (!std::islower(static_cast<unsigned char>(c)) && !std::isdigit(static_cast<unsigned char>(c)) && c != '_' &&
        c != '.' && c != '[' && c != ']')
      return "";
  }
  return message.substr(0, colon);
}

ApiError BadRequest(const Status& status, const std::string& code) {
  ApiError e;
  e.message = status.message();
  e.param = FieldOf(status.message());
  e.code = status.message().rfind("invalid JSON", 0) == 0 ? "invalid_json" : code;
  return e;
}

std::string ApiError::Body() const {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return DumpJson(json{{"error", e}});
}

const char* FinishName(FinishReason reason) { return reason == FinishReason::kStop ? "stop" : "length"; }

namespace {

json UsageJson(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

json Envelope(const ResponseHead& head, const char* object) {
  return {{"id", head.id}, {"object", object}, {"created", head.created}, {"model", head.model}};
}

}  // namespace

json CompletionBody(const ResponseHead& head, const std::string& text, FinishReason finish, const Usage& usage) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", FinishName(finish)}};
  if (head.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  json body = Envelope(head, head.chat ? "chat.completion" : "text_completion");
  body["choices"] = json::array({choice});
  body["usage"] = UsageJson(usage);
  return body;
}

json StreamChunk(const ResponseHead& head, const std::string& delta, bool first, const FinishReason* finish,
                 const Usage* usage) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  if (finish != nullptr) choice["finish_reason"] = FinishName(*finish);
  if (head.chat) {
    json d = json::object();
    if (first) d["role"] = "assistant";
    if (!delta.empty() || (first && finish == nullptr)) d["content"] = delta;
    choice["delta"] = d;
  } else {
    choice["text"] = delta;
  }
  json body = Envelope(head, head.chat ? "chat.completion.chunk" : "text_completion");
  body["choices"] = json::array({choice});
  if (usage != nullptr) body["usage"] = UsageJson(*usage);
  return body;
}

std::string DumpJson(const json& body) { return body.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string SseEvent(const json& body) { return "data: " + DumpJson(body) + "\n\n"; }

}  // namespace dk
