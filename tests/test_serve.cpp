// The server's pieces without HTTP: chat templates, request parsing and validation, the wire
// bodies, stop strings, slot choice with prefix reuse, the queue, the metrics text, and
// generation on slots (exactly what `generate` computes; prefix reuse; a profile shared by slots).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "core/threads.h"
#include "eval/calibrate.h"
#include "eval/generate.h"
#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"
#include "kv/registry.h"
#include "model/llama.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/metrics.h"
#include "serve/openai_api.h"
#include "serve/slots.h"
#include "serve/text_stream.h"
#include "test_util.h"

namespace dk {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// ---- chat templates ------------------------------------------------------------------------------

TEST(ChatTemplate, DetectsFamiliesByTheirMarkers) {
  struct Case {
    const char* text;
    ChatFamily family;
  } cases[] = {
      {"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}", ChatFamily::kChatml},
      {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}", ChatFamily::kLlama3},
      {"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}", ChatFamily::kLlama2},
      {"{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}", ChatFamily::kGemma},
      {"{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}", ChatFamily::kZephyr},
  };
  for (const Case& c : cases) {
    auto f = DetectChatFamily(c.text);
    ASSERT_TRUE(f.ok()) << c.text;
    EXPECT_EQ(*f, c.family) << c.text;
  }
  auto unknown = DetectChatFamily("{{ messages | tojson }}");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(unknown.status().message(), HasSubstr("--chat-template"));
  EXPECT_THAT(unknown.status().message(), HasSubstr("tokenizer.chat_template"));
}

TEST(ChatTemplate, NamesParseAndUnknownOnesNameTheFlag) {
  EXPECT_EQ(ParseChatFamily("chatml").value(), ChatFamily::kChatml);
  EXPECT_EQ(ParseChatFamily("mistral").value(), ChatFamily::kLlama2);
  EXPECT_EQ(ParseChatFamily("gemma").value(), ChatFamily::kGemma);
  auto bad = ParseChatFamily("jinja");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("--chat-template: unknown template 'jinja'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("chatml, llama3"));
}

std::vector<ChatMessage> Conversation() {
  return {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}, {"user", "Who?"}};
}

TEST(ChatTemplate, FormatsEachFamily) {
  ChatTemplate t;
  t.bos_text = "<s>";
  t.eos_text = "</s>";
  struct Case {
    ChatFamily family;
    std::string end_of_turn, want;
  } cases[] = {
      {ChatFamily::kChatml, "<|im_end|>",
       "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
       "<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"},
      {ChatFamily::kLlama3, "<|eot_id|>",
       "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
       "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user"
       "<|end_header_id|>\n\nWho?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
      {ChatFamily::kLlama2, "</s>",
       "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Who? [/INST]"},
      {ChatFamily::kGemma, "<end_of_turn>",
       "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
       "<start_of_turn>user\nWho?<end_of_turn>\n<start_of_turn>model\n"},
      {ChatFamily::kZephyr, "</s>",
       "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nWho?</s>\n<|assistant|>\n"},
  };
  for (const Case& c : cases) {
    t.family = c.family;
    t.end_of_turn = c.end_of_turn;
    auto text = FormatChat(t, Conversation());
    ASSERT_TRUE(text.ok()) << ChatFamilyName(c.family);
    EXPECT_EQ(*text, c.want) << ChatFamilyName(c.family);
  }
}

TEST(ChatTemplate, BadRolesAndEmptyListsNameTheField) {
  ChatTemplate t;
  auto bad = FormatChat(t, {{"user", "a"}, {"tool", "b"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("messages[1].role: 'tool'"));
  EXPECT_THAT(FormatChat(t, {}).status().message(), HasSubstr("messages: the list is empty"));
}

// The model's BOS/EOS texts go into the llama-2 and zephyr layouts; zephyr's turn end follows the
// template text (Phi-3's <|end|>).
TEST(ChatTemplate, BorrowsTheModelsSpecialTexts) {
  TokenizerData d;
  d.model = "llama";
  d.tokens = {"<unk>", "<BOS>", "<EOS>", "a"};
  d.types = {2, 3, 3, 1};
  d.bos_id = 1;
  d.eos_id = 2;
  auto tok = Tokenizer::FromData(std::move(d));
  ASSERT_TRUE(tok.ok());
  const ChatTemplate l2 = ChatTemplate::For(ChatFamily::kLlama2, **tok);
  EXPECT_EQ(l2.end_of_turn, "<EOS>");
  EXPECT_THAT(FormatChat(l2, Conversation()).value(), HasSubstr("Hello. <EOS><BOS>[INST] Who?"));
  EXPECT_EQ(ChatTemplate::For(ChatFamily::kZephyr, **tok, "<|user|> ... <|end|>").end_of_turn, "<|end|>");
  EXPECT_EQ(ChatTemplate::For(ChatFamily::kZephyr, **tok, "<|user|> eos_token").end_of_turn, "<EOS>");
}

// ---- request parsing --------------------------------------------------------------------------------

TEST(ServeRequest, ParsesEveryFieldOfACompletion) {
  RequestLimits limits;
  limits.max_tokens = 100;
  auto r = ParseCompletionRequest(
      R"({"model":"m","prompt":"In the beginning","max_tokens":7,"temperature":0,"top_p":0.5,"top_k":3,)"
      R"("seed":42,"stop":["\n","God"],"stream":true,"stream_options":{"include_usage":false}})",
      false, limits);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->prompt, "In the beginning");
  EXPECT_EQ(r->max_tokens, 7);
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_EQ(r->sampling.top_p, 0.5f);
  EXPECT_EQ(r->sampling.top_k, 3);
  EXPECT_TRUE(r->seeded);
  EXPECT_EQ(r->sampling.seed, 42u);
  EXPECT_EQ(r->stop, (std::vector<std::string>{"\n", "God"}));
  EXPECT_TRUE(r->stream);
  EXPECT_FALSE(r->include_usage);
  EXPECT_EQ(r->model, "m");
}

TEST(ServeRequest, DefaultsAndTheMaxTokensCap) {
  RequestLimits limits;
  limits.max_tokens = 64;
  auto r = ParseCompletionRequest(R"({"prompt":["one string in a list"],"stop":"x"})", false, limits);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->prompt, "one string in a list");
  EXPECT_EQ(r->max_tokens, 64);  // none given: the cap
  EXPECT_EQ(r->sampling.temperature, 0.8f);
  EXPECT_EQ(r->sampling.top_k, 40);
  EXPECT_FALSE(r->seeded);
  EXPECT_FALSE(r->stream);
  EXPECT_EQ(r->stop, (std::vector<std::string>{"x"}));
  EXPECT_EQ(ParseCompletionRequest(R"({"prompt":"a","max_tokens":1000})", false, limits)->max_tokens, 64);
  EXPECT_EQ(ParseCompletionRequest(R"({"prompt":"a","max_tokens":16.0})", false, limits)->max_tokens, 16);
}

TEST(ServeRequest, ParsesChatMessagesWithTextParts) {
  auto r = ParseCompletionRequest(
      R"({"messages":[{"role":"system","content":"Be brief."},)"
      R"({"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]},)"
      R"({"role":"assistant","content":null}],"max_completion_tokens":5})",
      true, RequestLimits{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->messages.size(), 3u);
  EXPECT_EQ(r->messages[1].content, "Hi there");
  EXPECT_EQ(r->messages[2].content, "");
  EXPECT_EQ(r->max_tokens, 5);
}

TEST(ServeRequest, BadBodiesNameTheField) {
  struct Case {
    bool chat;
    std::string body, field, needle;
  } cases[] = {
      {false, "{\"prompt\": ", "", "invalid JSON"},
      {false, "[1, 2]", "", "must be a JSON object"},
      {false, "{}", "prompt", "required"},
      {false, R"({"prompt": 5})", "prompt", "expected a string"},
      {false, R"({"prompt":"a","max_tokens":-1})", "max_tokens", "expected an integer in [1,"},
      {false, R"({"prompt":"a","max_tokens":"5"})", "max_tokens", "got \"5\""},
      {false, R"({"prompt":"a","max_tokens":2.5})", "max_tokens", "expected an integer"},
      {false, R"({"prompt":"a","temperature":3})", "temperature", "[0.0, 2.0]"},
      {false, R"({"prompt":"a","top_p":-0.1})", "top_p", "expected a number"},
      {false, R"({"prompt":"a","top_k":true})", "top_k", "got true"},
      {false, R"({"prompt":"a","seed":-7})", "seed", "expected an integer"},
      {false, R"({"prompt":"a","stop":5})", "stop", "a string or a list"},
      {false, R"({"prompt":"a","stop":["x", 1]})", "stop[1]", "expected a string"},
      {false, R"({"prompt":"a","stop":""})", "stop", "empty"},
      {false, R"({"prompt":"a","stream":"yes"})", "stream", "true or false"},
      {false, R"({"prompt":"a","n":2})", "n", "one choice"},
      {false, R"({"prompt":"a","logprobs":3})", "logprobs", "not supported"},
      {false, R"({"prompt":"a","stream_options":{"include_usage":1}})", "stream_options.include_usage", "true or"},
      {true, R"({"prompt":"a"})", "messages", "required"},
      {true, R"({"messages":[]})", "messages", "non-empty list"},
      {true, R"({"messages":["hi"]})", "messages[0]", "an object"},
      {true, R"({"messages":[{"role":"robot","content":"x"}]})", "messages[0].role", "one of system, user"},
      {true, R"({"messages":[{"content":"x"}]})", "messages[0].role", "one of system"},
      {true, R"({"messages":[{"role":"user","content":5}]})", "messages[0].content", "a string or a list"},
      {true, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})", "messages[0].content[0]",
       "only text"},
  };
  for (const Case& c : cases) {
    auto r = ParseCompletionRequest(c.body, c.chat, RequestLimits{});
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c.body;
    EXPECT_THAT(r.status().message(), HasSubstr(c.needle)) << c.body;
    const ApiError e = BadRequest(r.status());
    EXPECT_EQ(e.param, c.field) << r.status().message();
    EXPECT_EQ(e.http_status, 400);
  }
}

TEST(ServeRequest, NestingDepthIsCountedWithoutRecursion) {
  EXPECT_EQ(JsonNestingDepth(R"({"a": [1, {"b": []}]})"), 4u);
  EXPECT_EQ(JsonNestingDepth(R"({"a": "[[[{{\"[["})"), 1u);  // brackets and escaped quotes in strings are text
  EXPECT_EQ(JsonNestingDepth(std::string(1000000, '[')), 1000000u);
  auto nested_stop = [](size_t levels) {  // inside the body's object: levels + 1 in all
    const std::string v = std::string(levels, '[') + std::string(levels, ']');
    return ParseCompletionRequest(R"({"prompt": "a", "stop": )" + v + "}", false, RequestLimits{}).status().message();
  };
  EXPECT_THAT(nested_stop(kMaxJsonDepth - 1), HasSubstr("stop[0]: expected a string"));  // 512 in all: parsed
  EXPECT_THAT(nested_stop(kMaxJsonDepth), HasSubstr("invalid JSON: nested 513 levels deep, more than 512"));
}

TEST(ServeRequest, ErrorBodiesAreOpenAiShaped) {
  const ApiError e = BadRequest(InvalidArgument("max_tokens: expected an integer in [1, 10], got 0"));
  const json body = json::parse(e.Body());
  EXPECT_EQ(body["error"]["message"], "max_tokens: expected an integer in [1, 10], got 0");
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_EQ(body["error"]["param"], "max_tokens");
  EXPECT_EQ(body["error"]["code"], "invalid_value");
  const json bad_json = json::parse(BadRequest(InvalidArgument("invalid JSON: x")).Body());
  EXPECT_TRUE(bad_json["error"]["param"].is_null());
  EXPECT_EQ(bad_json["error"]["code"], "invalid_json");
  EXPECT_EQ(FieldOf("messages[2].content[0]: x"), "messages[2].content[0]");
  EXPECT_EQ(FieldOf("the prompt: x"), "");
}

TEST(ServeRequest, ResponseBodiesAreOpenAiShaped) {
  ResponseHead head{"cmpl-1", 1700000000, "m.gguf", false};
  json c = CompletionBody(head, "text", FinishReason::kLength, Usage{5, 3});
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["text"], "text");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c["usage"]["total_tokens"], 8);
  head.chat = true;
  json chat = CompletionBody(head, "hi", FinishReason::kStop, Usage{5, 1});
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(chat["choices"][0]["message"]["content"], "hi");
  json first = StreamChunk(head, "he", true, nullptr, nullptr);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "he");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  const FinishReason stop = FinishReason::kStop;
  const Usage usage{5, 2};
  json last = StreamChunk(head, "", false, &stop, &usage);
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(last["usage"]["completion_tokens"], 2);
  // Bytes that are not UTF-8 (a character cut by max_tokens) become U+FFFD, never an exception.
  EXPECT_EQ(SseEvent(json{{"t", std::string("a\xe2\x96")}}), "data: {\"t\":\"a\xef\xbf\xbd\"}\n\n");
}

// ---- stop strings and UTF-8 ---------------------------------------------------------------------------

std::string PushAll(TextStream& s, const std::vector<std::string>& pieces, std::vector<std::string>* sent) {
  std::string all;
  for (const std::string& p : pieces) {
    sent->push_back(s.Push(p));
    all += sent->back();
  }
  return all;
}

TEST(TextStream, StopStringsAcrossPiecesAreCutAndNeverSent) {
  TextStream s({"<|im_end|>", "\n\n"});
  std::vector<std::string> sent;
  EXPECT_EQ(PushAll(s, {"Hello", " world<|im", "_e", "nd|> more"}, &sent), "Hello world");
  EXPECT_EQ(sent[1], " world");  // "<|im" waits: it may start the stop string
  EXPECT_EQ(sent[2], "");
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(s.Push("after"), "");
  EXPECT_EQ(s.Flush(), "");
}

TEST(TextStream, APartialStopThatDoesNotCompleteIsSentLater) {
  TextStream s({"<|im_end|>"});
  std::vector<std::string> sent;
  EXPECT_EQ(PushAll(s, {"a<|im", "_start"}, &sent), "a<|im_start");
  EXPECT_EQ(sent[0], "a");
  EXPECT_FALSE(s.stopped());
  TextStream t({"END"});
  EXPECT_EQ(t.Push("xEN"), "x");
  EXPECT_EQ(t.Flush(), "EN");  // generation ended: held text is text
}

TEST(TextStream, UtfEightCharactersAreNeverSplit) {
  TextStream s({});
  // "é" = C3 A9, "€" = E2 82 AC, split over byte tokens.
  EXPECT_EQ(s.Push("caf\xc3"), "caf");
  EXPECT_EQ(s.Push("\xa9 \xe2"), "\xc3\xa9 ");
  EXPECT_EQ(s.Push("\x82"), "");
  EXPECT_EQ(s.Push("\xac!"), "\xe2\x82\xac!");
  EXPECT_EQ(IncompleteUtf8Tail("ab\xf0\x9f\x98"), 3u);
  EXPECT_EQ(IncompleteUtf8Tail("ab\xf0\x9f\x98\x80"), 0u);
  EXPECT_EQ(IncompleteUtf8Tail("\x80\x80"), 0u);  // stray continuation bytes: sent as they are
}

// ---- slots: prefix reuse, choice, queue ----------------------------------------------------------------

TEST(ServeSlots, ReusablePrefixNeedsAProperPrefix) {
  const std::vector<int32_t> prompt = {1, 5, 6, 7, 8};
  EXPECT_EQ(ReusablePrefix({1, 5, 6}, prompt), 3u);
  EXPECT_EQ(ReusablePrefix({}, prompt), 0u);
  EXPECT_EQ(ReusablePrefix({1, 5, 6, 7, 8}, prompt), 0u);     // nothing new to run: recompute
  EXPECT_EQ(ReusablePrefix({1, 5, 6, 7, 8, 9}, prompt), 0u);  // holds more than the prompt
  EXPECT_EQ(ReusablePrefix({1, 5, 9}, prompt), 0u);
}

TEST(ServeSlots, ChoosesTheLongestReuseThenTheLeastRecentlyUsed) {
  const std::vector<int32_t> a = {1, 2}, ab = {1, 2, 3}, other = {9, 9}, prompt = {1, 2, 3, 4};
  std::vector<SlotView> v = {{false, 5, &a}, {false, 7, &ab}, {false, 1, &other}};
  EXPECT_EQ(ChooseSlot(v, prompt).slot, 1);
  EXPECT_EQ(ChooseSlot(v, prompt).reuse, 3u);
  v[1].busy = true;  // the best one is taken: the next best reuse
  EXPECT_EQ(ChooseSlot(v, prompt).slot, 0);
  EXPECT_EQ(ChooseSlot(v, {7, 7, 7}).slot, 2);  // no reuse anywhere: least recently used
  EXPECT_EQ(ChooseSlot(v, {7, 7, 7}).reuse, 0u);
  for (SlotView& s : v) s.busy = true;
  EXPECT_EQ(ChooseSlot(v, prompt).slot, -1);
}

std::vector<std::unique_ptr<KvCache>> SmallCaches(int n) {
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int i = 0; i < n; ++i) caches.push_back(std::make_unique<FullKvCache>(KvShape{1, 1, 1, 4, 4}, 8, KvDtype::kF32));
  return caches;
}

TEST(ServeSlots, QueueIsFifoBoundedAndDrains) {
  SlotPool pool(SmallCaches(1), 1);
  const auto far = SlotPool::Clock::now() + std::chrono::seconds(30);
  Refusal why;
  SlotLease first = pool.Acquire({1, 2}, far, nullptr, &why);
  ASSERT_TRUE(first);
  std::atomic<bool> second_got{false};
  std::thread waiter([&] {
    Refusal w;
    SlotLease l = pool.Acquire({1, 2}, far, nullptr, &w);
    second_got = static_cast<bool>(l);
  });
  while (pool.waiting() == 0) std::this_thread::yield();
  SlotLease third = pool.Acquire({1}, far, nullptr, &why);  // the queue (1) is full
  EXPECT_FALSE(third);
  EXPECT_EQ(why, Refusal::kQueueFull);
  EXPECT_EQ(pool.busy(), 1);
  first.Release();
  waiter.join();
  EXPECT_TRUE(second_got);
  // A waiter gives up at its deadline, or when its client is gone; Drain refuses everyone.
  SlotLease hold = pool.Acquire({1}, far, nullptr, &why);
  EXPECT_FALSE(pool.Acquire({1}, SlotPool::Clock::now() + std::chrono::milliseconds(60), nullptr, &why));
  EXPECT_EQ(why, Refusal::kTimeout);
  EXPECT_FALSE(pool.Acquire({1}, far, [] { return true; }, &why));
  EXPECT_EQ(why, Refusal::kCancelled);
  pool.Drain();
  EXPECT_FALSE(pool.Acquire({1}, far, nullptr, &why));
  EXPECT_EQ(why, Refusal::kShuttingDown);
  EXPECT_EQ(pool.waiting(), 0);
}

// ---- metrics ----------------------------------------------------------------------------------------------

TEST(ServeMetrics, PrometheusTextHasEveryFamily) {
  ServeMetrics m;
  m.CountRequest("/v1/completions", 200);
  m.CountRequest("/v1/completions", 200);
  m.CountRequest("/v1/chat/completions", 400);
  m.CountRequest("/wp-admin/x.php", 404);
  m.CountPrompt(12, 8);
  m.CountGenerated(5);
  ServeGauges g;
  g.slots_total = 4;
  g.slots_busy = 1;
  g.queue_length = 2;
  g.kv_bytes_used = 3072;
  g.kv_tokens = 4;
  g.fp16_bytes_per_token = 3072;  // 4 tokens of the full cache would take 12288 bytes
  const std::string text = FormatMetrics(m.Snapshot(), g);
  EXPECT_THAT(text, HasSubstr("# TYPE dynakv_requests_total counter\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_requests_total{endpoint=\"other\",status=\"404\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_prompt_tokens_total 12\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_prompt_tokens_reused_total 8\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_tokens_generated_total 5\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_tokens_per_second 5\n"));  // within the first second
  EXPECT_THAT(text, HasSubstr("dynakv_kv_bytes_used 3072\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_kv_fraction 0.25\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_queue_length 2\n"));
  EXPECT_THAT(text, HasSubstr("dynakv_slots_busy 1\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE dynakv_slots_total gauge\ndynakv_slots_total 4\n"));
  // Every line is a comment or "name[{labels}] value".
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# ", 0) == 0) continue;
    EXPECT_THAT(line, ::testing::MatchesRegex("dynakv_[a-z_]+(\\{[^}]*\\})? [0-9.e+-]+")) << line;
  }
  EXPECT_THAT(FormatMetrics(ServeCounters{}, ServeGauges{}), HasSubstr("dynakv_kv_fraction 0\n"));
}

// ---- generation on slots -----------------------------------------------------------------------------------

const Model& Stories() {
  static std::unique_ptr<Model> model = [] {
    auto m = Model::Load(test::DataPath("stories260K.gguf"));
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return std::move(m).value();
  }();
  return *model;
}

std::vector<int32_t> GenerateReference(const std::vector<int32_t>& prompt, int n, int n_ctx) {
  FullKvCache cache(Stories().config().kv_shape(), n_ctx, KvDtype::kF16);
  Sampler sampler(SamplerOptions{0.0f, 40, 0.95f, 0});
  ThreadPool pool(1);
  std::vector<int32_t> out;
  auto s = Generate(Stories(), prompt, n, 512, cache, sampler, pool, [&](int32_t t) {
    out.push_back(t);
    return true;
  });
  EXPECT_TRUE(s.ok());
  return out;
}

struct SlotRun {
  StatusOr<GenerationResult> result = Internal("not run");
  std::string text;
};

SlotRun RunOn(ForwardGate& gate, Slot& slot, const std::vector<int32_t>& prompt, GenerationParams params,
          std::function<bool()> keep_going = [] { return true; }) {
  SlotRun r;
  r.result = RunGeneration(
      gate, slot, prompt, params,
      [&](const std::string& s) {
        r.text += s;
        return true;
      },
      keep_going, nullptr);
  return r;
}

GenerationParams Greedy(int max_tokens) {
  GenerationParams p;
  p.max_tokens = max_tokens;
  p.sampling = SamplerOptions{0.0f, 40, 0.95f, 0};
  return p;
}

TEST(ServeEngine, AFreshSlotComputesWhatGenerateComputes) {
  const Tokenizer& tok = Stories().tokenizer();
  const std::vector<int32_t> prompt = tok.Encode("Once upon a time", true);
  const std::vector<int32_t> want = GenerateReference(prompt, 24, 256);
  ForwardGate gate(Stories(), 1);
  Slot slot;
  slot.cache = std::make_unique<FullKvCache>(Stories().config().kv_shape(), 256, KvDtype::kF16);
  SlotRun r = RunOn(gate, slot, prompt, Greedy(24));
  ASSERT_TRUE(r.result.ok()) << r.result.status().ToString();
  std::string want_text;
  for (int32_t t : want) want_text += tok.IsEog(t) ? "" : tok.TokenToPiece(t, /*special=*/false);
  EXPECT_EQ(r.text, want_text);
  EXPECT_EQ(r.result->end, EndReason::kMaxTokens);
  EXPECT_EQ(r.result->n_generated, 24);
  // The slot's token list is the cache's content: the prompt and every answer token but the last.
  EXPECT_EQ(static_cast<int>(slot.tokens.size()), slot.cache->n_tokens());
  EXPECT_EQ(slot.tokens.size(), prompt.size() + 23);
  EXPECT_EQ(slot.n_tokens.load(), slot.cache->n_tokens());
  EXPECT_EQ(slot.bytes_used.load(), slot.cache->BytesUsed());
}

TEST(ServeEngine, TheNextTurnReusesTheSlotsPrefix) {
  const Tokenizer& tok = Stories().tokenizer();
  ForwardGate gate(Stories(), 1);
  Slot slot;
  slot.cache = std::make_unique<FullKvCache>(Stories().config().kv_shape(), 256, KvDtype::kF16);
  const std::vector<int32_t> prompt = tok.Encode("Once upon a time", true);
  ASSERT_TRUE(RunOn(gate, slot, prompt, Greedy(8)).result.ok());
  std::vector<int32_t> next = slot.tokens;  // what a client sends back: prompt, answer, more
  for (int32_t t : tok.Encode(" and then", false)) next.push_back(t);
  const size_t held = slot.tokens.size();
  SlotRun r = RunOn(gate, slot, next, Greedy(4));
  ASSERT_TRUE(r.result.ok());
  EXPECT_EQ(r.result->n_reused, static_cast<int>(held));
  EXPECT_EQ(slot.cache->n_tokens(), static_cast<int>(next.size() + 3));
  // A prompt that does not extend the slot's tokens starts from an empty cache.
  SlotRun fresh = RunOn(gate, slot, prompt, Greedy(8));
  ASSERT_TRUE(fresh.result.ok());
  EXPECT_EQ(fresh.result->n_reused, 0);
  EXPECT_EQ(slot.tokens.size(), prompt.size() + 7);
}

TEST(ServeEngine, StopStringsAndCancellation) {
  const Tokenizer& tok = Stories().tokenizer();
  ForwardGate gate(Stories(), 1);
  Slot slot;
  slot.cache = std::make_unique<FullKvCache>(Stories().config().kv_shape(), 256, KvDtype::kF16);
  const std::vector<int32_t> prompt = tok.Encode("Once upon a time", true);
  SlotRun full = RunOn(gate, slot, prompt, Greedy(24));
  ASSERT_TRUE(full.result.ok());
  const size_t comma = full.text.find(',');
  ASSERT_NE(comma, std::string::npos) << full.text;
  GenerationParams p = Greedy(24);
  p.stop = {","};
  SlotRun stopped = RunOn(gate, slot, prompt, p);
  ASSERT_TRUE(stopped.result.ok());
  EXPECT_EQ(stopped.text, full.text.substr(0, comma));
  EXPECT_EQ(stopped.result->end, EndReason::kStopString);
  int passes = 0;
  SlotRun cancelled = RunOn(gate, slot, prompt, Greedy(24), [&] { return ++passes <= 3; });
  ASSERT_TRUE(cancelled.result.ok());
  EXPECT_EQ(cancelled.result->end, EndReason::kCancelled);
  EXPECT_EQ(static_cast<int>(slot.tokens.size()), slot.cache->n_tokens());  // still consistent
}

// Slots on one DynaKV profile share a single copy of it (LoadSharedProfile), and threads running
// slots at once through the gate each get what one slot alone gets.
TEST(ServeEngine, SlotsShareOneProfileAndRunConcurrentlyExactly) {
  ThreadPool pool(1);
  const std::vector<int32_t> calib = Stories().tokenizer().Encode(test::ReadText(test::DataPath("valid.txt")), true);
  auto profile = Calibrate(Stories(), calib, CalibrateOptions{128, 128, 4, {}}, pool);
  ASSERT_TRUE(profile.ok()) << profile.status().ToString();
  const std::string path = ::testing::TempDir() + "dk_serve_profile.dkv";
  ASSERT_TRUE(SaveProfile(*profile, path).ok());
  KvConfig kv;
  kv.method = "dynakv";
  kv.Set("--profile", path).Set("--rank-policy", "uniform").Set("--kv-budget", "0.5");
  const KvModelInfo info{Stories().config().kv_shape(), Stories().fingerprint(), "stories260K"};
  std::vector<std::unique_ptr<Slot>> slots;
  for (int i = 0; i < 3; ++i) {
    auto cache = CreateKvCache(kv, info, 256);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    slots.push_back(std::make_unique<Slot>());
    slots.back()->cache = std::move(cache).value();
  }
  auto profile_of = [&](int i) { return &dynamic_cast<const DynaKvCache&>(*slots[i]->cache).profile(); };
  EXPECT_EQ(profile_of(0), profile_of(1));
  EXPECT_EQ(profile_of(0), profile_of(2));

  ForwardGate gate(Stories(), 1);
  const char* prompts[] = {"Once upon a time", "The little dog", "Lily was"};
  std::vector<std::string> alone(3), together(3);
  for (int i = 0; i < 3; ++i) alone[i] = RunOn(gate, *slots[i], Stories().tokenizer().Encode(prompts[i], true),
                                               Greedy(20)).text;
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      together[i] = RunOn(gate, *slots[i], Stories().tokenizer().Encode(prompts[i], true), Greedy(20)).text;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(together, alone);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace dk
