// Running requests on slots. Every slot's request runs on its own thread (the connection's), but
// forward passes go through one ForwardGate in turn: one thread pool and OpenBLAS (-t threads)
// serve them all, one pass at a time, first come first served. A pass reads only its own slot's
// cache and activations, so the interleaving never changes a result: a greedy request gives what
// `dynakv generate --temp 0` gives for the same prompt and cache flags. Nothing waits on two
// locks, so nothing can deadlock.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/threads.h"
#include "eval/sampler.h"
#include "model/llama.h"
#include "serve/metrics.h"
#include "serve/slots.h"

namespace dk {

class ForwardGate {
 public:
  // Creates the pool and sets OpenBLAS's thread count (process-wide) to `threads`.
  ForwardGate(const Model& model, int threads);
  const Model& model() const { return model_; }

  // Model::Forward / KvCache::EndPrompt, one caller at a time (FIFO), on the shared pool.
  Status Forward(const int32_t* tokens, int n, KvCache& cache, ForwardState& state, float* logits);
  Status EndPrompt(KvCache& cache);

 private:
  class Turn;
  void Enter();
  void Leave();

  const Model& model_;
  ThreadPool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_ticket_ = 0;  // a ticket lock: FIFO, so no slot starves another
  uint64_t serving_ = 0;
};

struct GenerationParams {
  int max_tokens = 16;
  SamplerOptions sampling;
  std::vector<std::string> stop;
  int n_batch = 512;  // prompt tokens per forward pass, as `generate -b`
};

enum class EndReason {
  kEndOfText,    // the model's end-of-generation token
  kStopString,   // a stop string (chat: also the template's end of turn)
  kMaxTokens,
  kContextFull,
  kCancelled,    // on_text or keep_going said stop
};

struct GenerationResult {
  EndReason end = EndReason::kMaxTokens;
  int n_prompt = 0;
  int n_reused = 0;     // prompt tokens the slot's cache already held
  int n_generated = 0;  // tokens of the answer (an end-of-generation token is not counted)
};

// Runs `prompt` on a leased slot: keeps the slot's cached prefix when the prompt extends it and
// the cache is batch-invariant (else clears the cache), prefills the rest in batches of n_batch, calls EndPrompt, then
// samples up to max_tokens, feeding each token back. on_text receives the answer's text as it
// becomes safe to send (stop strings removed, whole UTF-8 characters); it and keep_going
// (checked before each forward pass) return false to cancel. The slot's token list always
// matches its cache; after a failed pass the cache is cleared. The prompt must fit the cache.
StatusOr<GenerationResult> RunGeneration(ForwardGate& gate, Slot& slot, const std::vector<int32_t>& prompt,
                                         const GenerationParams& params,
                                         const std::function<bool(const std::string&)>& on_text,
                                         const std::function<bool()>& keep_going, ServeMetrics* metrics);

}  // namespace dk
