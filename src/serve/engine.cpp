#include "serve/engine.h"

#include <algorithm>

#include "serve/text_stream.h"

namespace dk {

ForwardGate::ForwardGate(const Model& model, int threads) : model_(model), pool_(threads) { ConfigureBlasFor(threads); }

void ForwardGate::Enter() {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t ticket = next_ticket_++;
  cv_.wait(lock, [&] { return serving_ == ticket; });
}

void ForwardGate::Leave() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++serving_;
  }
  cv_.notify_all();
}

// Leaves the gate even when a pass throws (std::bad_alloc), or every later pass would wait forever.
class ForwardGate::Turn {
 public:
  explicit Turn(ForwardGate& gate) : gate_(gate) { gate_.Enter(); }
  ~Turn() { gate_.Leave(); }
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;

 private:
  ForwardGate& gate_;
};

Status ForwardGate::Forward(const int32_t* tokens, int n, KvCache& cache, ForwardState& state, float* logits) {
  Turn turn(*this);
  return model_.Forward(tokens, n, cache, state, logits, /*all_logits=*/false, pool_);
}

Status ForwardGate::EndPrompt(KvCache& cache) {
  Turn turn(*this);
  return cache.EndPrompt(pool_);
}

namespace {

void ClearSlot(Slot& slot) {
  slot.cache->Clear();
  slot.tokens.clear();
  slot.Publish();
}

// A failed pass may have left the cache part-written: forget it all, so the token list and the
// cache agree again.
Status Forget(Slot& slot, const Status& error) {
  ClearSlot(slot);
  return error;
}

// Prefills prompt[reuse:] in batches; false when keep_going stopped it (the slot then holds the
// batches done so far).
StatusOr<bool> Prefill(ForwardGate& gate, Slot& slot, const std::vector<int32_t>& prompt, size_t reuse,
                       ForwardState& st, std::vector<float>& logits, const std::function<bool()>& keep_going) {
  for (size_t b = reuse; b < prompt.size(); b += st.max_batch) {
    if (!keep_going()) return false;
    const int n = static_cast<int>(std::min<size_t>(st.max_batch, prompt.size() - b));
    if (Status s = gate.Forward(prompt.data() + b, n, *slot.cache, st, logits.data()); !s.ok()) return Forget(slot, s);
    slot.tokens.insert(slot.tokens.end(), prompt.begin() + b, prompt.begin() + b + n);
    slot.Publish();
  }
  if (Status s = gate.EndPrompt(*slot.cache); !s.ok()) return Forget(slot, s);  // eviction compresses here
  slot.Publish();
  return true;
}

}  // namespace

StatusOr<GenerationResult> RunGeneration(ForwardGate& gate, Slot& slot, const std::vector<int32_t>& prompt,
                                         const GenerationParams& params,
                                         const std::function<bool(const std::string&)>& on_text,
                                         const std::function<bool()>& keep_going, ServeMetrics* metrics) {
  const Model& model = gate.model();
  if (prompt.empty() || static_cast<int>(prompt.size()) > slot.cache->capacity())
    return InvalidArgument("prompt: " + std::to_string(prompt.size()) + " tokens do not fit the context of " +
                           std::to_string(slot.cache->capacity()));
  GenerationResult r;
  r.n_prompt = static_cast<int>(prompt.size());
  const std::vector<int32_t>* held = ReusableTokens(slot);
  const size_t reuse = held != nullptr ? ReusablePrefix(*held, prompt) : 0;
  r.n_reused = static_cast<int>(reuse);
  if (reuse == 0) ClearSlot(slot);
  // Batches as Generate cuts them (from the first new token), so a fresh slot computes exactly
  // what `dynakv generate` computes.
  ForwardState st(model.config(), std::max(1, std::min<int>(params.n_batch, static_cast<int>(prompt.size() - reuse))));
  std::vector<float> logits(model.config().n_vocab);
  DK_ASSIGN_OR_RETURN(bool prefilled, Prefill(gate, slot, prompt, reuse, st, logits, keep_going));
  if (metrics != nullptr) metrics->CountPrompt(r.n_prompt, r.n_reused);
  r.end = EndReason::kCancelled;
  if (!prefilled) return r;

  Sampler sampler(params.sampling);
  TextStream text(params.stop);
  const Tokenizer& tok = model.tokenizer();
  for (int i = 0; i < params.max_tokens; ++i) {
    const int32_t t = sampler.Sample(logits.data(), model.config().n_vocab);
    if (tok.IsEog(t)) {
      r.end = EndReason::kEndOfText;
      break;
    }
    ++r.n_generated;
    if (metrics != nullptr) metrics->CountGenerated(1);
    const std::string out = text.Push(tok.TokenToPiece(t, /*special=*/false));  // never "<s>" as text
    if (!out.empty() && !on_text(out)) return r;  // cancelled
    if (text.stopped()) {
      r.end = EndReason::kStopString;
      break;
    }
    r.end = i + 1 == params.max_tokens ? EndReason::kMaxTokens : EndReason::kContextFull;
    if (i + 1 == params.max_tokens || !slot.cache->Plan(1).ok()) break;
    if (!keep_going()) {
      r.end = EndReason::kCancelled;
      return r;
    }
    if (Status s = gate.Forward(&t, 1, *slot.cache, st, logits.data()); !s.ok()) return Forget(slot, s);
    slot.tokens.push_back(t);
    slot.Publish();
  }
  const std::string rest = text.Flush();
  if (!rest.empty() && !on_text(rest)) r.end = EndReason::kCancelled;
  return r;
}

}  // namespace dk
