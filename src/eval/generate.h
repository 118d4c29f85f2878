// Prompt prefill followed by token-by-token decode, with timing.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/status.h"
#include "eval/sampler.h"
#include "kv/kv_cache.h"
#include "model/llama.h"

namespace dk {

struct GenerateStats {
  int n_prompt = 0;
  int n_generated = 0;   // tokens sampled
  int n_decoded = 0;     // single-token forward passes (what decode tokens/s counts)
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
  bool stopped_at_eog = false;
  bool stopped_at_capacity = false;
};

// Returns false from the callback to stop early.
using TokenCallback = std::function<bool(int32_t token)>;

// Prefills `prompt` (batches of n_batch), then samples up to n_predict tokens, feeding each back.
// Stops at an end-of-generation token or when the cache is full (both recorded in the stats).
StatusOr<GenerateStats> Generate(const Model& model, const std::vector<int32_t>& prompt, int n_predict, int n_batch,
                                 KvCache& cache, Sampler& sampler, ThreadPool& pool, const TokenCallback& on_token);

}  // namespace dk
