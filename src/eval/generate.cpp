#include "eval/generate.h"

#include <chrono>

namespace dk {

StatusOr<GenerateStats> Generate(const Model& model, const std::vector<int32_t>& prompt, int n_predict, int n_batch,
                                 KvCache& cache, Sampler& sampler, ThreadPool& pool, const TokenCallback& on_token) {
  if (prompt.empty()) return InvalidArgument("generate: empty prompt");
  if (static_cast<int>(prompt.size()) > cache.capacity() - cache.n_tokens()) {
    return InvalidArgument("generate: the prompt has " + std::to_string(prompt.size()) +
                           " tokens but the context holds " + std::to_string(cache.capacity() - cache.n_tokens()) +
                           " (raise -c or shorten the prompt)");
  }
  using Clock = std::chrono::steady_clock;
  const int V = model.config().n_vocab;
  n_batch = std::max(1, n_batch);
  ForwardState st(model.config(), std::min<int>(n_batch, static_cast<int>(prompt.size())));
  std::vector<float> logits(V);
  GenerateStats s;
  s.n_prompt = static_cast<int>(prompt.size());
  auto t0 = Clock::now();
  for (size_t b = 0; b < prompt.size(); b += st.max_batch) {
    const int n = static_cast<int>(std::min<size_t>(st.max_batch, prompt.size() - b));
    DK_RETURN_IF_ERROR(model.Forward(prompt.data() + b, n, cache, st, logits.data(), false, pool));
  }
  DK_RETURN_IF_ERROR(cache.EndPrompt(pool));  // eviction wrappers compress the prompt now
  s.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  for (int i = 0; i < n_predict; ++i) {
    const int32_t tok = sampler.Sample(logits.data(), V);
    ++s.n_generated;
    if (on_token && !on_token(tok)) break;
    if (model.tokenizer().IsEog(tok)) {
      s.stopped_at_eog = true;
      break;
    }
    if (i + 1 == n_predict) break;
    auto plan = cache.Plan(1);
    if (!plan.ok()) {
      s.stopped_at_capacity = true;
      break;
    }
    DK_RETURN_IF_ERROR(model.Forward(&tok, 1, cache, st, logits.data(), false, pool));
    ++s.n_decoded;
  }
  s.decode_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return s;
}

}  // namespace dk
